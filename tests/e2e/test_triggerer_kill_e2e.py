"""One triggerer, SIGKILLed with every kind of parked step at once: 20 approvals, 10 event
waits and 8 timers share it (and one LISTEN connection); it is killed and started again,
and each parked step resumes exactly once.

The three kinds used to have a kill test each (three kills, ~160 s of the suite); parked
together they also prove that the kinds do not disturb one another across a restart."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
from tests.e2e.test_approvals_e2e import decide, listeners
from tests.e2e.test_approvals_e2e import events as approval_events
from tests.e2e.test_approvals_e2e import parked as approval_parked
from tests.e2e.test_events_e2e import PAY, kinds
from tests.e2e.test_events_e2e import parked as event_parked
from tests.e2e.test_retry_runs_e2e import finished
from tests.e2e.test_timers_e2e import DAG as TIMED
from tests.e2e.test_timers_e2e import attempts, states
from tests.e2e.test_timers_e2e import events as timer_events

from ledgerflow.ledger import event_waits
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

ONBOARDING = "onboarding__v1"


def test_triggerer_killed_with_approvals_event_waits_and_timers_parked_each_resumes_once(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """20 runs park on an approval, 10 on an event, 8 on an ``until`` timer; the triggerer
    is SIGKILLed; the events are written to the ledger while it is down (no api-server to
    end the tasks); it is started again before the timers' fire time; the approvals are
    decided. Every run succeeds; each approval is decided and completed once, each event
    step completed once, each timer parked and fired once (never before its planned
    time), and the step after each parked one ran once. All parked approvals and event
    waits share one listening connection, before and after the restart."""
    approval_runs = [
        stack.trigger(ONBOARDING, {"customer_id": f"bulk-{uuid.uuid4().hex[:8]}"})
        for _ in range(20)
    ]
    refs = [uuid.uuid4().hex[:8] for _ in range(10)]
    event_runs = [stack.trigger(PAY, {"ref": ref}) for ref in refs]
    parked_ones = [
        approval_parked(stack, ledger, ONBOARDING, run_id, "manager_approval")
        for run_id in approval_runs
    ]
    for run_id in event_runs:
        event_parked(stack, ledger, PAY, run_id, "settled")
    wait_for(lambda: listeners(ledger) == 1, 60, "one LISTEN connection")

    # The timers come last: their fire time leaves room to park them and to restart the
    # triggerer, counted from now rather than from the first trigger.
    at = (datetime.now(timezone.utc) + timedelta(seconds=75)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    timer_runs = [
        f"{TIMED}/{stack.trigger(TIMED, {'ref': f'tk-{n}-{uuid.uuid4().hex[:6]}', 'at': at})}"
        for n in range(8)
    ]
    for run in timer_runs:
        wait_for(lambda run=run: states(stack, run).get("at") == "deferred", 240, f"{run} parked")
    assert all(timer_events(ledger, run, "timer_fired", "at") == [] for run in timer_runs), (
        "fired too early"
    )

    stack.kill("triggerer")
    for ref in refs:
        done = event_waits.deliver(
            ledger,
            name="payment.settled",
            key=f"pay-{ref}",
            event_id=f"kill-{ref}",
            payload={"amount": 1},
            source="test",
        )
        assert done.status == "delivered"
    stack.restart("triggerer")
    wait_for(lambda: listeners(ledger) == 1, 120, "one LISTEN connection after the restart")
    for approval in parked_ones:
        decide(stack, approval.id, "approve", "bulk")

    for run_id in approval_runs:
        assert stack.wait_for_run(ONBOARDING, run_id, timeout=300) == "success"
    for run_id in event_runs:
        assert stack.wait_for_run(PAY, run_id, timeout=300) == "success"
    for run in timer_runs:
        assert finished(stack, ledger, run) == "success", run
    # The api-server and the woken triggers end the same tasks at once: that must not
    # break the triggerer (it once died on a duplicate XCom row).
    assert stack.is_alive("triggerer"), stack.log_tail("triggerer")

    for run_id in approval_runs:
        ledger_run = f"{ONBOARDING}/{run_id}"
        assert len(approval_events(ledger, ledger_run, "approval_decided")) == 1
        completed = approval_events(ledger, ledger_run, "approval_completed")
        assert len(completed) == 1, ledger_run
        assert [a["status"] for a in ledger.attempts(ledger_run, "activate_account")] == [
            "completed"
        ]
    for run_id in event_runs:
        ledger_run = f"{PAY}/{run_id}"
        assert len(kinds(ledger, ledger_run, "event_step_completed")) == 1, ledger_run
        assert [a["status"] for a in ledger.attempts(ledger_run, "book")] == ["completed"]
    for run in timer_runs:
        assert len(timer_events(ledger, run, "timer_parked", "at")) == 1, run
        fired = timer_events(ledger, run, "timer_fired", "at")
        assert len(fired) == 1, run
        assert datetime.fromisoformat(fired[0]["data"]["fired"]) >= datetime.fromisoformat(
            fired[0]["data"]["planned"]
        )
        assert attempts(ledger, run, "at") == ["completed"], run
        assert attempts(ledger, run, "after") == ["completed"], run
