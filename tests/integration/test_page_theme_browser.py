"""Ledgerflow's pages in light and dark, in a real browser (Debian's headless chromium).

The pages are rendered as the app renders them and served from a loopback server; the
browser's colour-scheme preference and the theme chosen in Airflow's UI (its ``theme``
localStorage entry, same origin) vary. No Airflow needed: what is tested is the pages'
CSS and their theme script."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ledgerflow.api import _render, _runs

pytestmark = pytest.mark.integration

CALLER = SimpleNamespace(name="ada", roles=frozenset({"admin"}))
LIGHT_BG, DARK_BG = "rgb(247, 249, 251)", "rgb(20, 24, 29)"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("pages")
    runs = _runs._page(
        "runs",
        title="Runs",
        root="/ledgerflow",
        caller=CALLER,
        runs=[],
        workflows=[],
        statuses=[],
        f=SimpleNamespace(workflow=None, version=None, status=None, since=None, until=None),
        filtered=False,
    )
    pending = _render.page(
        "pending", title="Pending", root="/ledgerflow", caller=CALLER, approvals=[],
        workflows=[], workflow=None, assignee=None,
    )  # fmt: skip
    (folder / "runs.html").write_text(runs)
    (folder / "pending.html").write_text(pending)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, directory=str(folder), **kw)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from ledgerflow.testing.browser import CHROMIUM, chromium

    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (scripts/test.sh installs it)")
    with chromium() as browser:
        yield browser


def _background(chromium: Any, url: str, scheme: str, theme: str | None) -> str:
    context = chromium.new_context(color_scheme=scheme)
    try:
        page = context.new_page()
        page.goto(url.rsplit("/", 1)[0] + "/missing")  # same origin, to set localStorage
        if theme is not None:
            page.evaluate("t => localStorage.setItem('theme', t)", theme)
        page.goto(url)
        return str(page.evaluate("getComputedStyle(document.body).backgroundColor"))
    finally:
        context.close()


@pytest.mark.parametrize(
    "scheme, theme, runs_bg, pending_bg",
    [
        ("light", None, LIGHT_BG, LIGHT_BG),
        ("dark", None, DARK_BG, DARK_BG),
        ("dark", "system", DARK_BG, DARK_BG),
        ("light", "dark", DARK_BG, LIGHT_BG),  # only the runs pages read Airflow's choice
        ("dark", "light", LIGHT_BG, DARK_BG),
    ],
)
def test_pages_follow_the_browser_and_the_runs_pages_airflows_theme(
    chromium: Any, site: str, scheme: str, theme: str | None, runs_bg: str, pending_bg: str
) -> None:
    """Every page is light or dark as the browser prefers; the runs pages follow the theme
    chosen in Airflow's UI when it is light or dark (``system``: the browser's). The
    approval pages carry no script, so they follow the browser only."""
    assert _background(chromium, f"{site}/runs.html", scheme, theme) == runs_bg
    assert _background(chromium, f"{site}/pending.html", scheme, theme) == pending_bg


def test_the_runs_page_follows_a_theme_switched_in_airflows_ui(chromium: Any, site: str) -> None:
    """A theme switched in Airflow's UI (another page of the same origin writes
    localStorage) reaches an open runs page at once, without reloading it."""
    context = chromium.new_context(color_scheme="light")
    try:
        ours, airflow = context.new_page(), context.new_page()
        ours.goto(f"{site}/runs.html")
        airflow.goto(f"{site}/missing")
        bg = "getComputedStyle(document.body).backgroundColor"
        assert ours.evaluate(bg) == LIGHT_BG
        airflow.evaluate("localStorage.setItem('theme', 'dark')")
        ours.wait_for_function(f"{bg} === '{DARK_BG}'", timeout=10_000)
        airflow.evaluate("localStorage.setItem('theme', 'system')")
        ours.wait_for_function(f"{bg} === '{LIGHT_BG}'", timeout=10_000)
    finally:
        context.close()
