"""The approval trigger on its own: serialization, and run() driven by a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.triggers.approval import DEADLINE_USER, ApprovalTrigger


class FakeClock:
    """Time moves only when the trigger waits; scheduled actions run when it passes them."""

    def __init__(self) -> None:
        self.at = now()
        self.waits: list[float] = []
        self.actions: list[tuple[datetime, Callable[[], Any]]] = []

    def now(self) -> datetime:
        return self.at

    def after(self, delay: timedelta, action: Callable[[], Any]) -> None:
        self.actions.append((self.at + delay, action))

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        self.waits.append(seconds)
        self.at += timedelta(seconds=seconds)
        for when, action in list(self.actions):
            if when <= self.at:
                self.actions.remove((when, action))
                action()
        await asyncio.sleep(0)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    return ledger


def make_request(
    ledger: Ledger, deadline: timedelta, at_deadline: Any = "reject", follow: Any = None
) -> int:
    approval, created = approvals.request(
        ledger,
        run_id="wf__v1/run-1",
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject="Approve?",
        body="**yes?**",
        payload={"amount": 12},
        approvers={"users": ["manager"], "roles": []},
        deadline=now() + deadline,
        at_deadline=at_deadline,
        follow=follow,
    )
    assert created
    return approval.id


def run_trigger(trigger: ApprovalTrigger, clock: FakeClock) -> list[dict[str, Any]]:
    trigger._now = clock.now
    trigger._wait = clock.wait

    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(collect())


def test_serialize_round_trip() -> None:
    """serialize() names the importable classpath and every kwarg; a trigger rebuilt from
    them serializes the same (the triggerer rebuilds it that way)."""
    trigger = ApprovalTrigger(approval_id=7, ledger_url="sqlite:///x.db", poll_interval=12.5)
    classpath, kwargs = trigger.serialize()
    assert classpath == "ledgerflow.triggers.approval.ApprovalTrigger"
    assert kwargs == {
        "approval_id": 7,
        "ledger_url": "sqlite:///x.db",
        "poll_interval": 12.5,
        "ti_id": None,
    }
    module, name = classpath.rsplit(".", 1)
    cls = getattr(__import__(module, fromlist=[name]), name)
    assert cls(**kwargs).serialize() == (classpath, kwargs)
    # The task instance whose Required Actions entry it watches travels with it; a trigger
    # serialized by an older release (no ti_id) still loads.
    listed = ApprovalTrigger(7, "sqlite:///x.db", 12.5, ti_id="0190-ti")
    assert cls(**listed.serialize()[1]).ti_id == "0190-ti"
    old = {k: v for k, v in kwargs.items() if k != "ti_id"}
    assert cls(**old).serialize() == (classpath, kwargs)


def test_a_decision_fires_the_trigger(ledger: Ledger) -> None:
    """A decision after 10 minutes is seen at the next poll; one event, with the decision;
    no wait is longer than the poll interval."""
    approval_id = make_request(ledger, timedelta(hours=1))
    clock = FakeClock()
    clock.after(
        timedelta(minutes=10),
        lambda: approvals.decide(ledger, approval_id, decision="approved", by="manager"),
    )
    trigger = ApprovalTrigger(approval_id, ledger.url, poll_interval=60)
    events = run_trigger(trigger, clock)
    assert events == [{"approval_id": approval_id, "status": "approved", "decided_by": "manager"}]
    assert max(clock.waits) <= 60
    assert clock.at - now() < timedelta(minutes=12)


def test_the_deadline_applies_its_outcome(ledger: Ledger) -> None:
    """Nobody decides: at the deadline the trigger records the declared outcome as the
    deadline's decision, then fires."""
    approval_id = make_request(ledger, timedelta(minutes=5), at_deadline="approve")
    clock = FakeClock()
    events = run_trigger(ApprovalTrigger(approval_id, ledger.url, poll_interval=60), clock)
    assert events == [
        {"approval_id": approval_id, "status": "approved", "decided_by": DEADLINE_USER}
    ]
    stored = approvals.get(ledger, approval_id)
    assert stored.decided_at is not None
    assert clock.at >= stored.deadline


def test_escalation_then_the_final_outcome(ledger: Ledger) -> None:
    """At the first deadline the approval moves to the next approvers with a new
    deadline (and is notified again); at the second, its own outcome applies."""
    chain = {
        "escalate": {
            "approvers": {"users": [], "roles": ["admin"]},
            "deadline": 3600.0,
            "at_deadline": "fail",
        }
    }
    approval_id = make_request(ledger, timedelta(minutes=30), at_deadline=chain)
    clock = FakeClock()
    events = run_trigger(ApprovalTrigger(approval_id, ledger.url, poll_interval=600), clock)
    assert events[0]["status"] == "expired"
    stored = approvals.get(ledger, approval_id)
    assert stored.level == 1 and stored.approvers == {"users": [], "roles": ["admin"]}
    kinds = [e["kind"] for e in ledger.events("wf__v1/run-1")]
    assert kinds.count("approval_escalated") == 1
    assert kinds.count("approval_notified") == 1  # the escalation's (the operator sends the first)
    assert kinds.count("approval_decided") == 1
    assert clock.at - now() >= timedelta(minutes=89)


def test_escalated_approvers_may_decide(ledger: Ledger) -> None:
    """After the escalation an admin's decision fires the trigger before the new deadline."""
    chain = {
        "escalate": {"approvers": {"roles": ["admin"]}, "deadline": 3600.0, "at_deadline": "reject"}
    }
    approval_id = make_request(ledger, timedelta(minutes=30), at_deadline=chain)
    clock = FakeClock()
    clock.after(
        timedelta(minutes=45),
        lambda: approvals.decide(ledger, approval_id, decision="approved", by="ops-lead"),
    )
    events = run_trigger(ApprovalTrigger(approval_id, ledger.url, poll_interval=120), clock)
    assert events == [{"approval_id": approval_id, "status": "approved", "decided_by": "ops-lead"}]
    assert approvals.get(ledger, approval_id).level == 1
    assert approvals.get(ledger, approval_id).may_decide("someone", {"Admin"})


def test_a_person_who_decides_first_wins_over_the_deadline(ledger: Ledger) -> None:
    """A decision that commits before the deadline's update stands; the deadline
    records nothing (one decision event)."""
    approval_id = make_request(ledger, timedelta(minutes=5), at_deadline="approve")
    clock = FakeClock()
    # Decided seconds before the deadline, within the trigger's last wait.
    clock.after(
        timedelta(minutes=4, seconds=50),
        lambda: approvals.decide(ledger, approval_id, decision="rejected", by="manager"),
    )
    events = run_trigger(ApprovalTrigger(approval_id, ledger.url, poll_interval=600), clock)
    assert events[0]["status"] == "rejected" and events[0]["decided_by"] == "manager"
    kinds = [e["kind"] for e in ledger.events("wf__v1/run-1")]
    assert kinds.count("approval_decided") == 1


def test_two_copies_of_a_trigger_record_one_outcome(ledger: Ledger) -> None:
    """A trigger that runs twice (moved between triggerers) fires twice but the deadline's
    decision is stored once."""
    approval_id = make_request(ledger, timedelta(minutes=5), at_deadline="reject")
    first = run_trigger(ApprovalTrigger(approval_id, ledger.url, poll_interval=600), FakeClock())
    second = run_trigger(ApprovalTrigger(approval_id, ledger.url, poll_interval=600), FakeClock())
    assert first == second
    kinds = [e["kind"] for e in ledger.events("wf__v1/run-1")]
    assert kinds.count("approval_decided") == 1


def test_an_approve_ends_the_task_in_the_trigger(ledger: Ledger) -> None:
    """With the follow lists recorded, an approve ends the task from the trigger: a
    TaskSuccessEvent whose XComs carry the step's output and the followed branch, with
    the step's checkpoint completed once (a second trigger copy records nothing new)."""
    from airflow.triggers.base import TaskSuccessEvent

    approval, _ = approvals.request(
        ledger,
        run_id="wf__v1/run-2",
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject="Approve?",
        body="",
        payload={"amount": 3},
        approvers={"users": ["manager"], "roles": []},
        deadline=now() + timedelta(hours=1),
        at_deadline="reject",
        follow={"approved": ["next", "compensate__a"], "rejected": ["refuse", "compensate__a"]},
    )
    approvals.decide(ledger, approval.id, decision="rejected", by="manager", comment="no")

    async def first() -> Any:
        async for event in ApprovalTrigger(approval.id, ledger.url, poll_interval=60).run():
            return event
        raise AssertionError("no event")

    event = asyncio.run(first())
    again = asyncio.run(first())
    assert isinstance(event, TaskSuccessEvent) and isinstance(again, TaskSuccessEvent)
    assert event.xcoms is not None
    assert event.xcoms["skipmixin_key"] == {"followed": ["refuse", "compensate__a"]}
    assert event.xcoms["return_value"]["decision"] == "rejected"
    assert event.xcoms["return_value"]["comment"] == "no"
    assert again.xcoms == event.xcoms
    checkpoint = ledger.checkpoint("wf__v1/run-2", "ask")
    assert checkpoint is not None and checkpoint.status == "completed"
    assert checkpoint.output == event.xcoms["return_value"]
    kinds = [e["kind"] for e in ledger.events("wf__v1/run-2")]
    assert kinds.count("approval_completed") == 1


def test_a_reject_without_a_branch_fails_the_task_in_the_trigger(ledger: Ledger) -> None:
    """A reject with no branch fails the step from the trigger: a TaskFailedEvent (no
    worker resumes the task, so no retry of a final decision), the attempt and the step
    failed in the ledger with the reason, and the saga started; a second copy of the
    trigger records nothing more."""
    from airflow.triggers.base import TaskFailedEvent

    approval_id = make_request(
        ledger, timedelta(hours=1), follow={"approved": ["next"], "rejected": None}
    )
    ledger.ensure_run(
        run_id="wf__v1/run-1",
        dag_id="wf__v1",
        workflow="wf",
        version=1,
        params={},
        trigger_kind="manual",
    )
    approvals.decide(ledger, approval_id, decision="rejected", by="manager", comment="no")
    for _ in range(2):

        async def first() -> Any:
            async for event in ApprovalTrigger(approval_id, ledger.url).run():
                return event
            raise AssertionError("no event")

        assert isinstance(asyncio.run(first()), TaskFailedEvent)
    checkpoint = ledger.checkpoint("wf__v1/run-1", "ask")
    assert checkpoint is not None and checkpoint.status == "failed"
    assert checkpoint.error is not None and "rejected by manager: no" in checkpoint.error
    kinds = [e["kind"] for e in ledger.events("wf__v1/run-1")]
    assert kinds.count("approval_failed_step") == 1
    assert kinds.count("saga_compensating") == 1
