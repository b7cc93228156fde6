"""One response given in Airflow's Required Actions, brought to the ledger twice: by the
task Airflow resumed with it (the resume event, a dict) and by the approval's trigger,
which reads the same response from the entry before the triggerer cancels it (the Task
SDK's response object). It is applied once: one event, the same outcome for both, on
SQLite and on Postgres, one after the other and at the same moment."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest
from tests.integration import test_ledger_lifecycle
from tests.unit.test_quorum import RUN, ask

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.triggers import required_action as ra

pytestmark = pytest.mark.integration


ledger = test_ledger_lifecycle.ledger  # a migrated ledger, on SQLite and on Postgres


def resume_event(by: str, option: str, at: datetime) -> dict[str, Any]:
    """What Airflow resumes the task with (``HITLDetail.as_resume_event_payload``)."""
    return {
        "chosen_options": [option],
        "params_input": {"comment": None},
        "responded_at": at,
        "responded_by_user": {"id": by, "name": by},
        "timedout": False,
    }


def sdk_response(by: str, option: str, at: datetime) -> SimpleNamespace:
    """What the trigger reads from the entry (the Task SDK's ``HITLDetailResponse``): the
    same time, seen through the API as an ISO string with its zone."""
    return SimpleNamespace(
        chosen_options=[option],
        params_input={},
        responded_by_user=SimpleNamespace(id=by, name=by),
        responded_at=at.astimezone(timezone(timedelta(hours=2))).isoformat(),
    )


def race(
    start: threading.Barrier,
    ledger: Ledger,
    approval: approvals.Approval,
    response: Any,
    outcomes: list[str],
    errors: list[BaseException],
) -> None:
    """One bringer of ``response``, released together with the other by ``start``."""
    try:
        start.wait(10)
        outcomes.append(ra.apply(ledger, approval, response)[0])
    except BaseException as exc:  # reported by the test
        errors.append(exc)


def kinds(ledger: Ledger) -> list[str]:
    return [e["kind"] for e in ledger.events(RUN) if e["kind"] != "approval_requested"]


def test_a_refused_response_brought_twice_is_recorded_once(ledger: Ledger) -> None:
    """The former approver's response (after an escalation) is refused once, whoever
    brings it; a new response of theirs, stored later, is a new refusal."""
    approval = ask(ledger, required=1, users=("clerk",))
    at = datetime.now(timezone.utc)
    first = ra.apply(ledger, approval, resume_event("manager", "Approve", at))
    second = ra.apply(ledger, approval, sdk_response("manager", "Approve", at))
    assert first[0] == second[0] == "refused"
    assert first[1].pending and second[1].pending
    assert kinds(ledger) == ["approval_response_refused"]

    later = at + timedelta(seconds=5)
    assert ra.apply(ledger, approval, sdk_response("manager", "Approve", later))[0] == "refused"
    assert kinds(ledger) == ["approval_response_refused"] * 2
    refused = [e["data"] for e in ledger.events(RUN) if e["kind"] == "approval_response_refused"]
    assert [r["responded_at"] for r in refused] == [
        at.isoformat(),
        later.isoformat(),
    ]


def test_a_deciding_response_brought_twice_is_one_decision_and_nothing_ignored(
    ledger: Ledger,
) -> None:
    """The trigger applies the approver's response first (the decision); the resumed task
    then brings the same response and gets the same outcome, not a "late" one recorded
    as ignored."""
    approval = ask(ledger, required=1, users=("clerk",))
    at = datetime.now(timezone.utc)
    outcome, decided = ra.apply(ledger, approval, sdk_response("clerk", "Approve", at))
    assert outcome == "decided" and decided.status == "approved"
    again, current = ra.apply(ledger, approval, resume_event("clerk", "Approve", at))
    assert again == "decided" and current.status == "approved"
    assert kinds(ledger) == ["approval_decided"]
    # Another person's response after the decision is still late, and recorded.
    assert ra.apply(ledger, approval, resume_event("boss", "Reject", at))[0] == "late"
    assert kinds(ledger) == ["approval_decided", "approval_response_ignored"]


def test_one_decision_of_a_quorum_brought_twice_is_not_refused_as_decided_before(
    ledger: Ledger,
) -> None:
    """One person's decision of a two-person quorum: both bringers see ``partial``; no
    "decided before" refusal is recorded for the same response."""
    approval = ask(ledger, required=2, users=("clerk", "boss"))
    at = datetime.now(timezone.utc)
    assert ra.apply(ledger, approval, resume_event("clerk", "Approve", at))[0] == "partial"
    outcome, current = ra.apply(ledger, approval, sdk_response("clerk", "Approve", at))
    assert outcome == "partial" and current.pending
    assert kinds(ledger) == ["approval_partial"]


def test_the_same_response_brought_at_the_same_moment_is_applied_once(
    ledger: Ledger,
) -> None:
    """The resumed task and the trigger apply one response concurrently, eight times over
    (fresh approvals): each time exactly one event, and both see the same outcome."""
    for n in range(8):
        run = f"wf__v1/race-{n}"
        approval = ask(ledger, required=1, users=("clerk",), run=run)
        by = "manager" if n % 2 else "clerk"  # refused, then decided, in turn
        at = datetime.now(timezone.utc)
        responses = [resume_event(by, "Approve", at), sdk_response(by, "Approve", at)]
        start = threading.Barrier(2)
        outcomes: list[str] = []
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=race, args=(start, ledger, approval, r, outcomes, errors))
            for r in responses
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not errors, errors
        expected = "refused" if by == "manager" else "decided"
        assert outcomes == [expected, expected], (n, outcomes)
        recorded = [e["kind"] for e in ledger.events(run) if e["kind"] != "approval_requested"]
        assert len(recorded) == 1, (n, recorded)
