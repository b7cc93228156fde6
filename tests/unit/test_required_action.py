"""A response from Airflow's Required Actions applied to a real (SQLite) ledger, and the
entry's respondents and body derived from the ledger's request."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.triggers import required_action as ra


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    return ledger


@pytest.fixture
def users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER",
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    )
    monkeypatch.setenv(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
        "admin:admin,boss:Admin,manager:user,clerk:op",
    )


def request(ledger: Ledger, approvers: dict[str, list[str]]) -> approvals.Approval:
    approval, _ = approvals.request(
        ledger,
        run_id="wf__v1/run-1",
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject="Pay 12?",
        body="**Pay** the invoice?",
        payload={"amount": 12},
        approvers=approvers,
        deadline=now() + timedelta(hours=1),
        at_deadline="reject",
    )
    return approval


def kinds(ledger: Ledger) -> list[str]:
    return [e["kind"] for e in ledger.events("wf__v1/run-1") if e["kind"] != "approval_requested"]


def test_respondents_are_the_named_users_and_the_role_holders(users: None) -> None:
    """Airflow matches respondents by user id (SimpleAuthManager: the user name): the
    named users, then the holders of a named role (case-insensitive), each once; with
    nobody to name, an id no user has, so Airflow refuses every response there."""
    assert ra.assigned_users({"users": ["manager", "admin"], "roles": ["ADMIN"]}) == [
        {"id": "manager", "name": "manager"},
        {"id": "admin", "name": "admin"},
        {"id": "boss", "name": "boss"},
    ]
    assert ra.assigned_users({"users": [], "roles": ["viewer"]}) == [ra.NOBODY]


def test_the_body_shows_the_ledgers_body_payload_hash_and_link(ledger: Ledger) -> None:
    """The Airflow entry shows what our page shows: the body, the payload, its hash, and
    the link to the approval's page."""
    approval = request(ledger, {"users": ["manager"], "roles": []})
    body = ra.body_of(approval)
    assert body.startswith("**Pay** the invoice?")
    assert '{"amount":12}' in body and approval.payload_hash[:12] in body
    assert f"/ledgerflow/approvals/{approval.id}" in body


def test_a_response_from_an_approver_is_the_decision_and_a_later_one_loses(
    ledger: Ledger, users: None
) -> None:
    """A non-approver's response and a choice that is not one decision are refused (the
    approval stays pending, each is recorded); an approver's is decided through the
    ledger with the comment, the payload shown and source airflow; a response after that
    changes nothing and is recorded as ignored."""
    approval = request(ledger, {"users": [], "roles": ["admin"]})

    outcome, current = ra.apply_response(
        ledger, approval, chosen=["Approve"], responder="clerk", comment="mine?"
    )
    assert outcome == "refused" and current.pending
    outcome, current = ra.apply_response(
        ledger, approval, chosen=["Approve", "Reject"], responder="boss", comment=None
    )
    assert outcome == "refused" and current.pending

    outcome, decided = ra.apply_response(
        ledger, approval, chosen=["Reject"], responder="boss", comment="too much"
    )
    assert outcome == "decided"
    assert (decided.status, decided.decided_by, decided.comment) == ("rejected", "boss", "too much")
    assert decided.seen_hash == approval.payload_hash

    outcome, after = ra.apply_response(
        ledger, approval, chosen=["Approve"], responder="admin", comment="late"
    )
    assert outcome == "late" and after == decided
    assert kinds(ledger) == [
        "approval_response_refused",
        "approval_response_refused",
        "approval_decided",
        "approval_response_ignored",
    ]
    (event,) = [e for e in ledger.events("wf__v1/run-1") if e["kind"] == "approval_decided"]
    assert event["data"]["source"] == "airflow" and event["data"]["payload"] == {"amount": 12}


def test_response_fields_from_the_resume_event_and_the_sdk_response() -> None:
    """Both shapes of Airflow's response give the options, the responder's name and the
    comment."""
    event = {
        "chosen_options": ["Approve"],
        "params_input": {"comment": "ok"},
        "responded_by_user": {"id": "manager", "name": "manager"},
        "responded_at": now(),
    }
    assert ra.is_response(event) and not ra.is_response({"approval_id": 1})
    assert ra.response_fields(event) == (["Approve"], "manager", "ok")
    resp = SimpleNamespace(
        chosen_options=["Reject"],
        params_input={},
        responded_by_user=SimpleNamespace(id="7", name="boss"),
    )
    assert ra.response_fields(resp) == (["Reject"], "boss", None)


def test_the_trigger_applies_a_response_given_before_the_task_deferred(
    ledger: Ledger, users: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response stored in Airflow while the task was still running (so Airflow could
    not resume it) is found by the trigger, decided through the ledger (source airflow),
    and the trigger fires with that decision; a trigger not listed in Airflow never asks."""
    import asyncio

    from ledgerflow.triggers.approval import ApprovalTrigger

    approval = request(ledger, {"users": ["manager"], "roles": []})
    asked: list[object] = []
    answer = SimpleNamespace(
        chosen_options=["Approve"],
        params_input={"comment": "from the Airflow page"},
        responded_by_user=SimpleNamespace(id="manager", name="manager"),
    )

    def read_response(ti_id: object) -> object:  # Airflow's side, outside this test
        asked.append(ti_id)
        return answer

    monkeypatch.setattr(ra, "read_response", read_response)

    async def no_wait(event: asyncio.Event, seconds: float) -> None:
        await asyncio.sleep(0)

    async def first_event(trigger: ApprovalTrigger) -> object:
        trigger._wait = no_wait
        async for event in trigger.run():
            return event.payload
        return None

    async def bounded(trigger: ApprovalTrigger, seconds: float = 0.5) -> object:
        return await asyncio.wait_for(first_event(trigger), seconds)

    unlisted = ApprovalTrigger(approval.id, ledger.url, poll_interval=0.01)
    with pytest.raises(TimeoutError):  # still waiting: nothing decided, Airflow not asked
        asyncio.run(bounded(unlisted))
    assert asked == [] and approvals.get(ledger, approval.id).pending

    listed = ApprovalTrigger(approval.id, ledger.url, poll_interval=0.01, ti_id="ti-1")
    payload = asyncio.run(bounded(listed, 30))
    assert payload == {"approval_id": approval.id, "status": "approved", "decided_by": "manager"}
    stored = approvals.get(ledger, approval.id)
    assert stored.comment == "from the Airflow page"
    assert asked and set(asked) == {"ti-1"}
    (event,) = [e for e in ledger.events("wf__v1/run-1") if e["kind"] == "approval_decided"]
    assert event["data"]["source"] == "airflow"
