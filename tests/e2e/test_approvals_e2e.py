"""Approval steps on real Airflow processes with Postgres: park, decide, resume, audit."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e


def states(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in stack.task_instances(dag_id, run_id)}


def parked(
    stack: AirflowStack, ledger: Ledger, dag_id: str, run_id: str, step: str
) -> approvals.Approval:
    """Wait until the step's task is deferred and its request is in the ledger."""

    def ready() -> approvals.Approval | None:
        if states(stack, dag_id, run_id).get(step) != "deferred":
            return None
        return approvals.for_step(ledger, f"{dag_id}/{run_id}", step)

    found: approvals.Approval = wait_for(ready, 180, f"{dag_id}/{run_id} {step} deferred")
    return found


def decide(
    stack: AirflowStack, approval_id: int, decision: str, comment: str, **kw: Any
) -> dict[str, Any]:
    """A decision through Ledgerflow's REST endpoint (the plugin app in the api-server)."""
    body = {"decision": decision, "comment": comment, **kw}
    result: dict[str, Any] = stack.api(
        "POST", f"/ledgerflow/api/approvals/{approval_id}/decision", json=body
    )
    return result


def events(ledger: Ledger, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events(run_id) if e["kind"] == kind]


def test_parks_without_a_worker_slot_and_resumes_on_a_rest_decision(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """The approval task is deferred (no running task instance, no occupied pool slot);
    an approve through the REST endpoint resumes the run on the main path; the ledger
    holds the request, the notification and the decision with approver, time, comment
    and the hash and snapshot of the payload shown."""
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger("onboarding__v1", {"customer_id": customer, "name": "Grace"})
    approval = parked(stack, ledger, "onboarding__v1", run_id, "manager_approval")
    s = states(stack, "onboarding__v1", run_id)
    assert "running" not in s.values(), s
    # Deferred tasks hold no pool slot (include_deferred is off), and no process of ours runs.
    pool = stack.api("GET", "/api/v2/pools/default_pool")
    assert pool["deferred_slots"] >= 1 and pool["include_deferred"] is False, pool
    running = stack.api(
        "GET", "/api/v2/dags/~/dagRuns/~/taskInstances", params={"state": "running", "limit": 100}
    )["task_instances"]
    assert not [t for t in running if t["dag_run_id"] == run_id], running
    assert approval.payload == {
        "customer_id": customer,
        "name": "Grace",
        "plan": "business",
        "credit_limit": 5000,  # a lone {{ expression }} keeps its type
    }
    assert approval.payload_hash == approvals.payload_hash(approval.payload)
    assert "**Grace**" in approval.body

    stored = decide(stack, approval.id, "approve", "looks good", seen_hash=approval.payload_hash)
    assert stored["status"] == "approved" and stored["decided_by"] == "admin"
    assert stack.wait_for_run("onboarding__v1", run_id, timeout=180) == "success"
    s = states(stack, "onboarding__v1", run_id)
    assert s["activate_account"] == "success" and s["send_refusal"] == "skipped"

    ledger_run = f"onboarding__v1/{run_id}"
    kinds = [e["kind"] for e in ledger.events(ledger_run) if e["step_key"] == "manager_approval"]
    assert kinds.count("approval_requested") == 1
    assert kinds.count("approval_notified") == 1
    assert kinds.count("approval_decided") == 1
    assert kinds.count("approval_completed") == 1
    # The api-server ended the parked task itself (no trigger or worker hop needed).
    (completed,) = events(ledger, ledger_run, "approval_completed")
    assert completed["data"]["via"] == "api"
    (decided,) = events(ledger, ledger_run, "approval_decided")
    assert decided["data"]["by"] == "admin" and decided["data"]["comment"] == "looks good"
    assert decided["data"]["payload"] == approval.payload
    assert decided["data"]["payload_hash"] == approval.payload_hash
    checkpoint = ledger.checkpoint(ledger_run, "manager_approval")
    assert checkpoint is not None and checkpoint.output["approver"] == "admin"
    with ledger.engine.connect() as conn:
        body = conn.execute(
            text("SELECT body FROM demo_emails WHERE subject = 'Welcome aboard' AND body LIKE :b"),
            {"b": "%approved by admin%"},
        ).all()
    assert body


def test_reject_takes_the_declared_branch(stack: AirflowStack, ledger: Ledger) -> None:
    """A reject runs the on_reject step and skips the main path; the run succeeds."""
    run_id = stack.trigger("onboarding__v1", {"customer_id": f"cust-{uuid.uuid4().hex[:8]}"})
    approval = parked(stack, ledger, "onboarding__v1", run_id, "manager_approval")
    decide(stack, approval.id, "reject", "credit check failed")
    assert stack.wait_for_run("onboarding__v1", run_id, timeout=180) == "success"
    s = states(stack, "onboarding__v1", run_id)
    assert s["send_refusal"] == "success" and s["activate_account"] == "skipped"
    refusal = ledger.checkpoint(f"onboarding__v1/{run_id}", "send_refusal")
    assert refusal is not None
    with ledger.engine.connect() as conn:
        body = conn.execute(
            text("SELECT body FROM demo_emails WHERE id = :i"), {"i": refusal.output["email_id"]}
        ).scalar_one()
    assert "credit check failed" in body  # the refusal read the approver's comment


def test_reject_without_a_branch_fails_the_run_and_compensates(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """With no on_reject, a reject fails the step at once (one try) and the saga undoes
    the reservation made before the approval."""
    order = f"ord-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger("approval_strict__v1", {"order_id": order})
    approval = parked(stack, ledger, "approval_strict__v1", run_id, "approve_order")
    decide(stack, approval.id, "reject", "no stock for you")
    assert stack.wait_for_run("approval_strict__v1", run_id, timeout=180) == "failed"
    tis = {t["task_id"]: t for t in stack.task_instances("approval_strict__v1", run_id)}
    assert tis["approve_order"]["state"] == "failed" and tis["approve_order"]["try_number"] == 1
    assert tis["after"]["state"] == "upstream_failed"
    assert tis["compensate__reserve"]["state"] == "success"
    with ledger.engine.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM demo_reservations WHERE order_id = :o"), {"o": order}
        ).scalar_one()
    assert status == "released"


def test_deadline_applies_the_declared_outcome(stack: AirflowStack, ledger: Ledger) -> None:
    """Nobody decides: at the deadline the trigger records `approved` by the deadline
    and the run goes on."""
    run_id = stack.trigger("approval_auto__v1", {"ref": uuid.uuid4().hex[:8]})
    assert stack.wait_for_run("approval_auto__v1", run_id, timeout=180) == "success"
    approval = approvals.for_step(ledger, f"approval_auto__v1/{run_id}", "ask")
    assert approval is not None
    assert approval.status == "approved" and approval.decided_by == "ledgerflow:deadline"
    after = ledger.checkpoint(f"approval_auto__v1/{run_id}", "after")
    assert after is not None and after.output == {"value": "ledgerflow:deadline"}


def test_escalation_then_fail_at_the_last_deadline(stack: AirflowStack, ledger: Ledger) -> None:
    """The first deadline hands the approval to the admins (level 1, notified again);
    the second applies `fail`: the approval is expired and the run fails."""
    run_id = stack.trigger("approval_escalate__v1", {"ref": uuid.uuid4().hex[:8]})
    assert stack.wait_for_run("approval_escalate__v1", run_id, timeout=180) == "failed"
    ledger_run = f"approval_escalate__v1/{run_id}"
    approval = approvals.for_step(ledger, ledger_run, "ask")
    assert approval is not None
    assert approval.status == "expired" and approval.level == 1
    assert approval.approvers == {"users": [], "roles": ["admin"]}
    (escalated,) = events(ledger, ledger_run, "approval_escalated")
    assert escalated["data"]["level"] == 1
    assert len(events(ledger, ledger_run, "approval_notified")) == 2
    assert states(stack, "approval_escalate__v1", run_id)["after"] == "upstream_failed"


def listeners(ledger: Ledger) -> int:
    """Connections that LISTEN for approval decisions (any database of this server)."""
    with ledger.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE query = 'LISTEN ledgerflow_approvals' AND datname = current_database()"
                )
            ).scalar_one()
        )
