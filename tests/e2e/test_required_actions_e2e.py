"""A pending approval in Airflow's Required Actions (its human-in-the-loop API), on real
Airflow processes with Postgres: listed with our link, decided there through the ledger,
and closed there when our page decides first."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

DAG = "onboarding__v1"  # approvers: {users: [manager], roles: [admin]}
STEP = "manager_approval"


def parked(stack: AirflowStack, ledger: Ledger, run_id: str) -> approvals.Approval:
    def ready() -> approvals.Approval | None:
        tis = {t["task_id"]: t["state"] for t in stack.task_instances(DAG, run_id)}
        if tis.get(STEP) != "deferred":
            return None
        return approvals.for_step(ledger, f"{DAG}/{run_id}", STEP)

    found: approvals.Approval = wait_for(ready, 180, f"{run_id} {STEP} deferred")
    return found


def entry(stack: AirflowStack, run_id: str) -> dict[str, Any]:
    """The approval task's Required Actions entry, as Airflow's UI reads it."""
    listed = stack.api(
        "GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/hitlDetails", params={"task_id": STEP}
    )
    (found,) = listed["hitl_details"]
    return dict(found)


def pending_in_airflow(stack: AirflowStack, run_id: str) -> list[dict[str, Any]]:
    """What Browse -> Required Actions lists as waiting (every DAG and run)."""
    listed = stack.api(
        "GET",
        "/api/v2/dags/~/dagRuns/~/hitlDetails",
        params={"response_received": "false", "dag_id_pattern": DAG, "limit": 1000},
    )["hitl_details"]
    return [h for h in listed if h["task_instance"]["dag_run_id"] == run_id]


def respond(
    stack: AirflowStack, user: str, run_id: str, option: str, comment: str
) -> httpx.Response:
    return respond_to(stack, user, DAG, run_id, STEP, option, comment)


def respond_to(
    stack: AirflowStack,
    user: str,
    dag: str,
    run_id: str,
    task: str,
    option: str,
    comment: str = "",
) -> httpx.Response:
    """A response through Airflow's own route, as the Required Actions page sends it."""
    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token(user)}"},
        timeout=30,
    ) as c:
        return c.patch(
            f"/api/v2/dags/{dag}/dagRuns/{run_id}/taskInstances/{task}/-1/hitlDetails",
            json={"chosen_options": [option], "params_input": {"comment": comment}},
        )


def decided_events(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events(f"{DAG}/{run_id}") if e["kind"] == "approval_decided"]


def test_pending_approval_is_listed_and_an_airflow_response_is_the_ledgers_decision(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """The parked approval is an entry of Airflow's Required Actions with the ledger's
    subject, body and payload, our page's link, Approve/Reject and the approvers as
    respondents; a non-approver is refused there (403); the approver's response ends
    the wait and is recorded in the ledger as our page records a decision: approver,
    time, decision, comment, the hash and snapshot of the payload shown, with its
    source; the entry is no longer pending."""
    customer = f"cust-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(DAG, {"customer_id": customer, "name": "Ada"})
    approval = parked(stack, ledger, run_id)

    found = entry(stack, run_id)
    assert found["subject"] == approval.subject
    assert found["options"] == ["Approve", "Reject"] and found["multiple"] is False
    assert approval.body in found["body"] and customer in found["body"]
    assert f"/ledgerflow/approvals/{approval.id}" in found["body"]
    assert approval.payload_hash[:12] in found["body"]
    # The named approver and the holders of the approver role (admin) respond there.
    assert {u["id"] for u in found["assigned_users"]} == {"manager", "admin"}
    assert found["response_received"] is False
    assert [h["task_instance"]["task_id"] for h in pending_in_airflow(stack, run_id)] == [STEP]

    refused = respond(stack, "clerk", run_id, "Approve", "not mine to approve")
    assert refused.status_code == 403, refused.text
    assert approvals.get(ledger, approval.id).pending

    answer = respond(stack, "manager", run_id, "Approve", "approved in Airflow")
    assert answer.status_code == 200, answer.text
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "success"
    tis = {t["task_id"]: t["state"] for t in stack.task_instances(DAG, run_id)}
    assert tis["activate_account"] == "success" and tis["send_refusal"] == "skipped"

    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by, stored.comment) == (
        "approved",
        "manager",
        "approved in Airflow",
    )
    assert stored.seen_hash == approval.payload_hash and stored.decided_at is not None
    (decided,) = decided_events(ledger, run_id)
    assert decided["data"]["by"] == "manager" and decided["data"]["source"] == "airflow"
    assert decided["data"]["payload"] == approval.payload
    assert decided["data"]["payload_hash"] == approval.payload_hash
    assert decided["data"]["at"] == stored.decided_at.isoformat()
    checkpoint = ledger.checkpoint(f"{DAG}/{run_id}", STEP)
    assert checkpoint is not None and checkpoint.output["approver"] == "manager"
    assert checkpoint.output["comment"] == "approved in Airflow"
    assert pending_in_airflow(stack, run_id) == []


def test_a_decision_on_our_page_first_then_a_late_airflow_response_is_one_decision(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Our page decides (reject): the Airflow entry takes that decision as its response
    and leaves the pending list; a later Approve in Airflow gets 409 and changes
    nothing; the ledger holds one decision and the run takes the reject branch."""
    run_id = stack.trigger(DAG, {"customer_id": f"cust-{uuid.uuid4().hex[:8]}"})
    approval = parked(stack, ledger, run_id)
    assert len(pending_in_airflow(stack, run_id)) == 1

    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token('manager')}"},
        timeout=30,
    ) as c:
        ours = c.post(
            f"/ledgerflow/api/approvals/{approval.id}/decision",
            json={"decision": "reject", "comment": "decided on the ledgerflow page"},
        )
    assert ours.status_code == 200, ours.text

    closed = entry(stack, run_id)
    assert closed["response_received"] is True
    assert closed["chosen_options"] == ["Reject"]
    assert closed["responded_by_user"]["name"] == "manager"
    assert pending_in_airflow(stack, run_id) == []

    late = respond(stack, "admin", run_id, "Approve", "too late")
    assert late.status_code == 409, late.text

    assert stack.wait_for_run(DAG, run_id, timeout=180) == "success"
    tis = {t["task_id"]: t["state"] for t in stack.task_instances(DAG, run_id)}
    assert tis["send_refusal"] == "success" and tis["activate_account"] == "skipped"
    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by) == ("rejected", "manager")
    (decided,) = decided_events(ledger, run_id)
    assert decided["data"]["source"] == "ledgerflow"


def test_the_deadline_closes_the_entry_from_the_triggerer(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Nobody responds; the deadline's decision (recorded by the trigger) becomes the
    entry's response through the Task SDK, so Airflow stops listing it as pending."""
    dag = "approval_auto__v1"  # approvers: {roles: [admin]}, deadline 4s -> approve
    run_id = stack.trigger(dag, {"ref": uuid.uuid4().hex[:8]})
    assert stack.wait_for_run(dag, run_id, timeout=180) == "success"
    stored = approvals.for_step(ledger, f"{dag}/{run_id}", "ask")
    assert stored is not None and stored.decided_by == "ledgerflow:deadline"
    listed = stack.api(
        "GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}/hitlDetails", params={"task_id": "ask"}
    )["hitl_details"]
    (found,) = listed
    assert {u["id"] for u in found["assigned_users"]} == {"admin"}
    assert found["response_received"] is True and found["chosen_options"] == ["Approve"]


def test_a_former_approvers_response_after_an_escalation_is_refused_and_relisted(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """After an escalation the entry still names the former approver (Airflow cannot
    change its respondents); their response there resumes the task, the ledger refuses
    it (recorded), the entry is pending again and the task waits again; the new
    approver decides on our page and the run goes on with that decision."""
    dag = "approval_handover__v1"  # manager for 3s, then clerk
    run_id = stack.trigger(dag, {"ref": uuid.uuid4().hex[:8]})
    ledger_run = f"{dag}/{run_id}"

    def escalated() -> approvals.Approval | None:
        found = approvals.for_step(ledger, ledger_run, "ask")
        return found if found is not None and found.level == 1 else None

    approval = wait_for(escalated, 180, f"{ledger_run} escalated")
    answer = respond_to(stack, "manager", dag, run_id, "ask", "Approve")
    assert answer.status_code == 200, answer.text  # Airflow still lists the manager

    def refused() -> list[dict[str, Any]]:
        return [e for e in ledger.events(ledger_run) if e["kind"] == "approval_response_refused"]

    (event,) = wait_for(refused, 180, "the response refused")
    assert event["data"]["by"] == "manager" and event["data"]["source"] == "airflow"

    def relisted() -> dict[str, Any] | None:
        tis = {t["task_id"]: t["state"] for t in stack.task_instances(dag, run_id)}
        listed = stack.api(
            "GET", f"/api/v2/dags/{dag}/dagRuns/{run_id}/hitlDetails", params={"task_id": "ask"}
        )["hitl_details"]
        ok = tis.get("ask") == "deferred" and listed and not listed[0]["response_received"]
        return listed[0] if ok else None

    wait_for(relisted, 180, "the entry pending again and the task deferred")
    assert approvals.get(ledger, approval.id).pending

    with httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token('clerk')}"},
        timeout=30,
    ) as c:
        ours = c.post(
            f"/ledgerflow/api/approvals/{approval.id}/decision",
            json={"decision": "approve", "comment": "handed over"},
        )
    assert ours.status_code == 200, ours.text
    assert stack.wait_for_run(dag, run_id, timeout=180) == "success"
    after = ledger.checkpoint(ledger_run, "after")
    assert after is not None and after.output == {"value": "clerk"}
    assert len([e for e in ledger.events(ledger_run) if e["kind"] == "approval_decided"]) == 1
