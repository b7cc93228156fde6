"""Headless Chromium for browser tests: Debian's package driven by Playwright.

Playwright cannot download its own browsers on our machines, so it drives
``/usr/bin/chromium`` (``scripts/test.sh`` installs the Debian package when missing)
with the flags that keep Chromium off the network.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 60_000


@contextmanager
def chromium() -> Iterator[Any]:
    """A Playwright ``Browser`` on Debian's chromium."""
    if not CHROMIUM.exists():
        raise FileNotFoundError(
            f"{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium package"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def log_in(page: Any, stack: Any, user: str) -> None:
    """Sign into Airflow's UI on SimpleAuthManager's login page as ``user``."""
    page.goto(stack.base_url + "/")
    page.wait_for_url("**/auth/login**", timeout=TIMEOUT_MS)
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", stack.password(user))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Browse").wait_for(timeout=TIMEOUT_MS)


def submit_in_frame(page: Any, title: str, button: str, url: str) -> Any:
    """Click ``button`` of a form in the plugin's frame titled ``title`` and wait until the
    frame has loaded the page the form asked for (its URL matches the glob ``url``).
    A locator used sooner may act on the page being replaced: click a link that the
    form's navigation then overrides, or read from a document that goes away ("execution
    context was destroyed"). Returns the frame's locator."""
    selector = f"iframe[title='{title}']"
    content = page.locator(selector).element_handle().content_frame()
    assert content is not None, f"no frame titled {title!r}"
    frame = page.frame_locator(selector)
    frame.get_by_role("button", name=button).click()
    content.wait_for_url(url)
    content.wait_for_load_state("load")
    return frame


def keep(*shots: Path, folder: Path) -> None:
    """Copy screenshots to ``folder`` (scripts/test.sh's test-output/) when it exists, so
    they outlive pytest's tmp path; print where they are."""
    for shot in shots:
        print(f"screenshot: {shot}")
        if folder.is_dir():
            shutil.copy(shot, folder / shot.name)
            print(f"screenshot: {folder / shot.name}")
