"""Quorum approvals on real Airflow processes with Postgres (the shared stack):
``approval_quorum`` reserves stock, then needs two of manager, clerk and admin."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ledgerflow.ledger import approvals, quorum
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

DAG = "approval_quorum__v1"
STEP = "approve_order"


def states(stack: AirflowStack, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in stack.task_instances(DAG, run_id)}


def parked(stack: AirflowStack, ledger: Ledger, run_id: str) -> approvals.Approval:
    def ready() -> approvals.Approval | None:
        if states(stack, run_id).get(STEP) != "deferred":
            return None
        return approvals.for_step(ledger, f"{DAG}/{run_id}", STEP)

    found: approvals.Approval = wait_for(ready, 180, f"{run_id} {STEP} deferred")
    return found


def as_user(stack: AirflowStack, user: str) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token(user)}"},
        timeout=30,
    )


def decide(
    stack: AirflowStack, user: str, approval: approvals.Approval, decision: str, comment: str
) -> httpx.Response:
    """A decision through Ledgerflow's REST API as ``user``."""
    with as_user(stack, user) as c:
        return c.post(
            f"/ledgerflow/api/approvals/{approval.id}/decision",
            json={"decision": decision, "comment": comment, "seen_hash": approval.payload_hash},
        )


def still_parked(stack: AirflowStack, run_id: str, seconds: float = 4.0) -> bool:
    """The approval task stays deferred and ``after`` does not start for ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        now = states(stack, run_id)
        if now.get(STEP) != "deferred" or now.get("after") not in (None, "none"):
            return False
        time.sleep(0.5)
    return True


def test_two_of_three_with_one_reject_fails_the_run_and_compensates(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """manager approves (1 of 2: the task stays parked, the page says so), manager again
    is 409, clerk rejects: the approval is rejected, the run fails and the saga releases
    the stock reserved before the approval."""
    order = f"ord-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(DAG, {"order_id": order})
    approval = parked(stack, ledger, run_id)
    assert approval.required == 2

    first = decide(stack, "manager", approval, "approve", "fine by me")
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["approvals"]) == ("pending", 1)
    assert still_parked(stack, run_id)
    with as_user(stack, "clerk") as c:
        page = c.get(f"/ledgerflow/approvals/{approval.id}", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "1 of 2 approvals" in page.text and "fine by me" in page.text
    again = decide(stack, "manager", approval, "reject", "changed my mind")
    assert again.status_code == 409 and "manager already decided" in again.text

    last = decide(stack, "clerk", approval, "reject", "no stock for you")
    assert last.status_code == 200, last.text
    assert last.json()["status"] == "rejected"
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "failed"
    tis = states(stack, run_id)
    assert tis[STEP] == "failed" and tis["after"] == "upstream_failed"
    assert tis["compensate__reserve"] == "success"
    with ledger.engine.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM demo_reservations WHERE order_id = :o"), {"o": order}
        ).scalar_one()
    assert status == "released"
    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by) == ("rejected", "clerk")
    rows = quorum.decisions(ledger, approval.id)
    assert [(d.by, d.decision, d.comment) for d in rows] == [
        ("manager", "approved", "fine by me"),
        ("clerk", "rejected", "no stock for you"),
    ]
    assert all(d.seen["payload"] == approval.payload for d in rows)


def test_two_of_three_one_in_airflow_one_on_ledgerflow_goes_on(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """manager approves in Airflow's Required Actions: Airflow resumes the task, the
    ledger records 1 of 2 and the task parks again with its entry open; clerk approves
    through Ledgerflow's REST API: the quorum is met and the run goes on, once."""
    run_id = stack.trigger(DAG, {"order_id": f"ord-{uuid.uuid4().hex[:8]}"})
    ledger_run = f"{DAG}/{run_id}"
    approval = parked(stack, ledger, run_id)
    with as_user(stack, "manager") as c:
        answer = c.patch(
            f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{STEP}/-1/hitlDetails",
            json={"chosen_options": ["Approve"], "params_input": {"comment": "in Airflow"}},
        )
    assert answer.status_code == 200, answer.text

    def reparked() -> dict[str, Any] | None:
        if (
            not quorum.decisions(ledger, approval.id)
            or states(stack, run_id).get(STEP) != "deferred"
        ):
            return None
        listed = stack.api(
            "GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/hitlDetails", params={"task_id": STEP}
        )["hitl_details"]
        return listed[0] if listed and not listed[0]["response_received"] else None

    wait_for(reparked, 180, "1 of 2 recorded, the task parked again, its entry open")
    assert approvals.get(ledger, approval.id).pending
    assert states(stack, run_id).get("after") in (None, "none")

    last = decide(stack, "clerk", approval, "approve", "second")
    assert last.status_code == 200, last.text
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "success"
    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by) == ("approved", "clerk")
    rows = quorum.decisions(ledger, approval.id)
    assert [(d.by, d.source) for d in rows] == [("manager", "airflow"), ("clerk", "ledgerflow")]
    checkpoint = ledger.checkpoint(ledger_run, STEP)
    assert checkpoint is not None and checkpoint.output["required"] == 2
    assert [d["by"] for d in checkpoint.output["decisions"]] == ["manager", "clerk"]
    after = ledger.checkpoint(ledger_run, "after")
    assert after is not None and after.output == {"value": "clerk"}
    kinds = [e["kind"] for e in ledger.events(ledger_run)]
    assert kinds.count("approval_decided") == 1 and kinds.count("approval_completed") == 1
