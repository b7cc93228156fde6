"""Cancelling runs on real Airflow processes (the shared stack): a run in a slow step,
a run parked on an approval, a fused run; with and without compensation; the API's
rights, repeats and refusals; a retry of a cancelled run. Invariants: a cancelled run is
`cancelled` in the ledger and `failed` in Airflow, its stopped task never completes,
each completed step is undone at most once (in reverse order), and nobody can decide a
withdrawn approval."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from test_approvals_e2e import parked
from test_retry_runs_e2e import cli

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

SLOW = "cancel_slow__v1"
FUSED = "cancel_fused__v1"
PARKED = "approval_strict__v1"


def in_step(ledger: Ledger, ledger_run: str, step: str) -> None:
    """Wait until ``step`` of the run has a running attempt (its task is working)."""
    wait_for(
        lambda: any(a["status"] == "running" for a in ledger.attempts(ledger_run, step)),
        180,
        f"{ledger_run} {step} running",
    )


def cancel_api(stack: AirflowStack, run: str, user: str = "admin", **body: Any) -> httpx.Response:
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token(user)}"} if user else {},
        timeout=60,
    ) as client:
        return client.post(f"/ledgerflow/api/runs/{run}/cancel", json=body)


def states(stack: AirflowStack, dag: str, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in stack.task_instances(dag, run_id)}


def kinds(ledger: Ledger, run: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events(run) if e["kind"] == kind]


def demo_status(ledger: Ledger, order: str) -> tuple[str, str]:
    with ledger.engine.connect() as conn:
        reservation = conn.execute(
            text("SELECT status FROM demo_reservations WHERE order_id = :o"), {"o": order}
        ).scalar_one()
        payment = conn.execute(
            text("SELECT status FROM demo_payments WHERE order_id = :o"), {"o": order}
        ).scalar_one()
    return str(reservation), str(payment)


def test_cancel_a_running_run_with_compensate_then_retry_it(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A run sleeping in its third step: a viewer may not cancel it (403, nothing
    changed); the admin's cancel with compensate stops the sleeping task (its attempt
    `lost`, the task `failed`, the next one `upstream_failed`), undoes charge then
    reserve once each through the saga's tasks, and the DagRun ends `failed` while the
    ledger says `cancelled` with who and why and saga `compensated`. A second cancel
    changes nothing (200, already). A retry of the cancelled run is allowed: it performs
    the undone steps again and succeeds; cancelling that succeeded retry is 409."""
    order = f"cx-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(SLOW, {"order_id": order})
    run = f"{SLOW}/{run_id}"
    in_step(ledger, run, "wait")
    denied = cancel_api(stack, run, "viewer", reason="not mine")
    assert denied.status_code == 403, denied.text
    assert cancel_api(stack, run, "", reason="anon").status_code == 401
    assert (ledger.run(run) or {})["status"] == "running"

    done = cancel_api(stack, run, reason="customer changed their mind", compensate=True)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "cancelled" and body["cancelled_by"] == "admin"
    assert body["stopped"] == ["wait"] and body["airflow"]["tasks"]["wait"] == "failed"
    assert stack.wait_for_run(SLOW, run_id, timeout=180) == "failed"
    wait_for(lambda: (ledger.run(run) or {}).get("saga") == "compensated", 60, "saga ended")
    tis = states(stack, SLOW, run_id)
    assert (tis["wait"], tis["after"]) == ("failed", "upstream_failed")
    assert tis["compensate__charge"] == tis["compensate__reserve"] == "success"
    row = ledger.run(run) or {}
    assert (row["status"], row["cancelled_by"], row["cancel_reason"]) == (
        "cancelled",
        "admin",
        "customer changed their mind",
    )
    assert [a["status"] for a in ledger.attempts(run, "wait")] == ["lost"]
    undone = [e["step_key"] for e in kinds(ledger, run, "compensation_completed")]
    assert undone == ["charge", "reserve"]
    assert demo_status(ledger, order) == ("released", "refunded")
    # The DAG's end-of-run callback (in the dag-processor) reports `failed`: recorded only.
    ended_in_airflow = wait_for(
        lambda: kinds(ledger, run, "airflow_run_ended"), 120, "the end-of-run callback"
    )
    assert ended_in_airflow[0]["data"] == {"state": "failed"}

    again = cancel_api(stack, run, reason="twice")
    assert again.status_code == 200 and again.json()["already_cancelled"] is True
    assert len(kinds(ledger, run, "run_cancelled")) == 1

    retried = stack.api(
        "POST", f"/ledgerflow/api/runs/{run}/retry", json={"params": {"seconds": 0}}
    )
    retry = retried["run_id"]
    assert stack.wait_for_run(SLOW, retried["dag_run_id"], timeout=240) == "success"
    wait_for(lambda: (ledger.run(retry) or {}).get("status") == "succeeded", 60, "retry done")
    with ledger.engine.connect() as conn:  # performed again: a new reservation and charge
        fresh = conn.execute(
            text(
                "SELECT (SELECT count(*) FROM demo_reservations WHERE order_id = :o), "
                "(SELECT count(*) FROM demo_payments WHERE order_id = :o AND status = 'captured')"
            ),
            {"o": order},
        ).one()
    assert tuple(fresh) == (2, 1)
    ended = cancel_api(stack, retry, reason="too late")
    assert ended.status_code == 409 and "already ended (succeeded)" in ended.json()["detail"]
    assert (ledger.run(retry) or {})["status"] == "succeeded"


def test_cancel_a_parked_approval_from_the_cli_withdraws_it(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A run parked on an approval, cancelled with `ledgerflow cancel` (no compensate):
    the approval is `withdrawn` (by the canceller, with the reason), a decision after it
    gets 409 naming the cancel, Airflow's Required Actions entry is closed, the
    deferred task ends `failed` (its trigger gone) and the compensation task is skipped:
    the reservation stays, the ledger has no saga."""
    order = f"cp-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(PARKED, {"order_id": order})
    run = f"{PARKED}/{run_id}"
    approval = parked(stack, ledger, PARKED, run_id, "approve_order")
    out = cli(stack, "cancel", PARKED, run_id, "--reason", "order withdrawn", "--user", "ops")
    assert out.returncode == 0, out.stderr
    assert f"{run}: cancelled by ops: order withdrawn" in out.stdout
    assert f"withdrawn        approval {approval.id}" in out.stdout
    got = approvals.get(ledger, approval.id)
    assert (got.status, got.decided_by) == ("withdrawn", "ops")
    assert stack.wait_for_run(PARKED, run_id, timeout=60) == "failed"
    tis = states(stack, PARKED, run_id)
    # Two ways, both right: the cancel's Airflow step fails the deferred task and skips
    # what follows, or the approval's trigger, seeing the withdrawal first, fails its task
    # itself and Airflow marks what follows `upstream_failed`. Either way nothing after
    # it runs and the compensation task does nothing.
    assert tis["approve_order"] == "failed", (tis, out.stdout)
    assert tis["after"] in ("skipped", "upstream_failed"), (tis, out.stdout)
    assert tis["compensate__reserve"] == "skipped", (tis, out.stdout)
    assert ledger.checkpoint(run, "after") is None
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token('manager')}"},
        timeout=30,
    ) as client:
        late = client.post(
            f"/ledgerflow/api/approvals/{approval.id}/decision",
            json={"decision": "approve", "comment": "late"},
        )
        assert late.status_code == 409 and "withdrawn" in late.text, late.text
        listed = stack.api(
            "GET",
            f"/api/v2/dags/{PARKED}/dagRuns/{run_id}/hitlDetails",
            params={"task_id": "approve_order"},
        )["hitl_details"]
        assert listed and listed[0]["response_received"] is True
        answer = client.patch(
            f"/api/v2/dags/{PARKED}/dagRuns/{run_id}/taskInstances/approve_order/-1/hitlDetails",
            json={"chosen_options": ["Approve"], "params_input": {"comment": "late"}},
        )
        assert answer.status_code == 409, answer.text
    assert approvals.get(ledger, approval.id).status == "withdrawn"
    row = ledger.run(run) or {}
    assert (row["status"], row["saga"]) == ("cancelled", None)
    with ledger.engine.connect() as conn:
        reservation = conn.execute(
            text("SELECT status FROM demo_reservations WHERE order_id = :o"), {"o": order}
        ).scalar_one()
    assert reservation == "reserved"
    again = cli(stack, "cancel", run, "--reason", "again")
    assert again.returncode == 0 and "already cancelled by ops" in again.stdout


def test_cancel_during_a_fused_segment_stops_its_task_and_keeps_its_checkpoints(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A fused run (one task for all four steps) cancelled while its third step sleeps,
    without compensate: the segment's task is killed and `failed`, the DagRun `failed`,
    the two steps it completed stay completed (ledger and effects agree), the sleeping
    step never completes, nothing after it runs, and no saga starts."""
    order = f"cf-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(FUSED, {"order_id": order})
    run = f"{FUSED}/{run_id}"
    in_step(ledger, run, "wait")
    done = cancel_api(stack, run, reason="fused stop")
    assert done.status_code == 200, done.text
    assert stack.wait_for_run(FUSED, run_id, timeout=60) == "failed"
    tis = states(stack, FUSED, run_id)
    assert tis["fused__reserve__after"] == "failed"
    assert tis["compensate__charge"] == tis["compensate__reserve"] == "skipped"
    steps = {c.step_key: c.status for c in ledger.checkpoints(run)}
    assert steps == {"reserve": "completed", "charge": "completed", "wait": "failed"}
    assert demo_status(ledger, order)[1] == "captured"
    assert demo_status(ledger, order)[0] == "reserved"
    row = ledger.run(run) or {}
    assert (row["status"], row["saga"]) == ("cancelled", None)
    assert ledger.compensations(run) == {}


def test_the_cancel_button_on_the_run_page(
    stack: AirflowStack, ledger: Ledger, browser: Any, tmp_path: Path
) -> None:
    """In a browser signed into Airflow's UI: a running run's page has a Cancel form (a
    reason, a compensate checkbox); submitting it cancels the run with the reason and the
    user recorded and the saga asked for; the page then says who cancelled it and why and
    offers no Cancel form any more."""
    from urllib.parse import quote

    from ledgerflow.testing.browser import TIMEOUT_MS, log_in

    order = f"cb-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(SLOW, {"order_id": order})
    run = f"{SLOW}/{run_id}"
    in_step(ledger, run, "wait")
    context = browser.new_context(viewport={"width": 1300, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, stack, "admin")
    page.goto(f"{stack.base_url}/ledgerflow/runs/{quote(run, safe='/')}")
    assert page.locator("#run-status").inner_text() == "running"
    page.fill("#cancel-reason", "wrong address")
    page.check("#cancel-compensate")
    page.click("#cancel-button")
    page.locator("#cancelled").wait_for()
    assert page.locator("#run-status").inner_text() == "cancelled"
    said = page.locator("#cancelled").inner_text()
    assert "admin" in said and "wrong address" in said
    assert page.locator("#cancel-form").count() == 0
    page.screenshot(path=str(tmp_path / "run-page-cancelled.png"), full_page=True)
    row = ledger.run(run) or {}
    assert (row["status"], row["cancelled_by"], row["cancel_reason"], row["cancel_compensate"]) == (
        "cancelled",
        "admin",
        "wrong address",
        True,
    )
    assert stack.wait_for_run(SLOW, run_id, timeout=180) == "failed"
    wait_for(lambda: (ledger.run(run) or {}).get("saga") == "compensated", 60, "saga ended")
    context.close()


def test_cancel_a_run_that_has_not_started_a_task_yet(stack: AirflowStack, ledger: Ledger) -> None:
    """A DagRun queued behind its paused DAG has no task started, so it is not in the
    ledger yet: the cancel registers it from Airflow (workflow, version, params) and
    cancels it; its tasks are skipped, the DagRun ends `failed`, and after the DAG is
    unpaused nothing of it runs (no attempt in the ledger)."""
    order = f"cq-{uuid.uuid4().hex[:8]}"
    stack.api("PATCH", f"/api/v2/dags/{SLOW}", json={"is_paused": True})
    try:
        run_id = stack.trigger(SLOW, {"order_id": order})
        run = f"{SLOW}/{run_id}"
        assert ledger.run(run) is None
        done = cancel_api(stack, run, reason="ordered by mistake")
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "cancelled"
    finally:
        stack.unpause(SLOW)
    assert stack.wait_for_run(SLOW, run_id, timeout=120) == "failed"
    row = ledger.run(run) or {}
    assert (row["status"], row["cancelled_by"], row["workflow"], row["version"]) == (
        "cancelled",
        "admin",
        "cancel_slow",
        1,
    )
    assert row["params"]["order_id"] == order
    assert all(
        state in ("skipped", "upstream_failed") for state in states(stack, SLOW, run_id).values()
    )
    assert ledger.attempts(run) == []
