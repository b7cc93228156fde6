"""A person approves in a real browser: headless Chromium (Debian's package) via Playwright.

The browser logs into Airflow's UI with SimpleAuthManager's login page, opens the
approvals page from Airflow's menu (Browse -> Approvals, the plugin's external view),
opens the pending approval and approves it with a comment. A screenshot of the decided
approval is saved under the test's tmp path, and copied to test-output/ when that folder
exists (scripts/test.sh makes it); the paths are printed.
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.browser import TIMEOUT_MS, keep, log_in

pytestmark = pytest.mark.e2e

KEEP = Path(__file__).resolve().parents[2] / "test-output"  # scripts/test.sh makes it

DAG_ID = "onboarding__v1"


def wait_for_pending(ledger: Ledger, run_id: str, timeout: float = 180.0) -> approvals.Approval:
    """The approval request of an onboarding run, once its operator has written it."""
    deadline = time.monotonic() + timeout
    while True:
        found = approvals.for_step(ledger, f"{DAG_ID}/{run_id}", "manager_approval")
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no approval request for {run_id} after {timeout:.0f}s")
        time.sleep(0.5)


def test_manager_approves_an_onboarding_run_in_the_browser(
    stack: AirflowStack, ledger: Ledger, browser: Any, tmp_path: Path
) -> None:
    """A manager signs into Airflow's UI, finds the pending onboarding approval through the
    plugin's menu entry, approves it with a comment in the page's form; the ledger stores
    that user, comment and payload hash, and the parked run resumes and succeeds."""
    customer = f"cust-{secrets.token_hex(4)}"
    stack.unpause(DAG_ID)
    run_id = stack.trigger(DAG_ID, {"customer_id": customer, "name": "Grace Hopper"})
    approval = wait_for_pending(ledger, run_id)
    assert approval.pending

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, stack, "manager")

    # The menu entry: Browse -> Approvals opens the plugin page inside Airflow's UI.
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Approvals").click()
    page.wait_for_url("**/plugin/ledgerflow-approvals**")
    frame = page.frame_locator("iframe[title=Approvals]")
    frame.get_by_role("heading", name="Pending approvals").wait_for()

    frame.get_by_role("link", name=approval.subject).click()
    frame.locator("#payload-hash").wait_for()
    assert frame.locator("#payload-hash").inner_text() == approval.payload_hash
    assert customer in frame.locator("#payload").inner_text()
    comment = f"Checked {customer}: welcome aboard."
    frame.locator("#comment-input").fill(comment)
    frame.get_by_role("button", name="Approve").click()
    frame.get_by_role("status").filter(has_text="Approved").wait_for()
    assert frame.locator("#status").inner_text() == "approved"

    shot = tmp_path / "approval-approved.png"
    page.screenshot(path=str(shot), full_page=True)
    context.close()
    assert shot.stat().st_size > 0
    keep(shot, folder=KEEP)

    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by, stored.comment) == ("approved", "manager", comment)
    assert stored.seen_hash == approval.payload_hash
    assert stack.wait_for_run(DAG_ID, run_id, timeout=300) == "success"
    states = {t["task_id"]: t["state"] for t in stack.task_instances(DAG_ID, run_id)}
    assert states["activate_account"] == "success"
    assert states["send_refusal"] == "skipped"
