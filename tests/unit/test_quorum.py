"""Quorum approvals (``required: M`` of the approvers) and escalation ``mode``.

The spec's checks name file, line and field; the ledger (SQLite here, Postgres in
tests/integration/test_quorum_postgres.py) records one decision per person with what
they saw, keeps the approval pending until the quorum or a reject, counts a person
once, and escalates by replacing or adding approvers; the trigger does not fire on a
decision short of the quorum and applies its deadline to a partial quorum."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import ApprovalConflict, DecidedBefore, SpecError
from ledgerflow.ledger import approvals, quorum
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.triggers import required_action
from ledgerflow.triggers.approval import DEADLINE_USER, ApprovalTrigger
from ledgerflow.workflow.validate import load_workflow

RUN = "wf__v1/run-1"

# --------------------------------------------------------------------------- the spec


def _load(tmp_path: Path, approval: str) -> Any:
    text = textwrap.dedent(
        """\
        name: wf
        version: 1
        steps:
          - id: ask
            kind: approval
            subject: Pay?
        """
    ) + textwrap.indent(textwrap.dedent(approval), "    ")
    path = tmp_path / "wf.yaml"
    path.write_text(text, encoding="utf-8")
    return path, text


def _error(tmp_path: Path, approval: str) -> tuple[str, list[str]]:
    path, text = _load(tmp_path, approval)
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    return str(info.value), text.splitlines()


def _line(lines: list[str], needle: str) -> int:
    return next(n for n, line in enumerate(lines, start=1) if needle in line)


def test_required_defaults_to_one_and_escalation_to_replace(tmp_path: Path) -> None:
    path, _ = _load(tmp_path, "approvers: {users: [ann]}\n")
    step = load_workflow(path).step("ask")
    assert step.required == 1  # type: ignore[union-attr]
    path, _ = _load(
        tmp_path,
        """\
        approvers: {users: [ann, bob, cy]}
        required: 2
        at_deadline:
          escalate: {approvers: {users: [dee, eve]}, deadline: 1h}
        """,
    )
    step = load_workflow(path).step("ask")
    assert step.required == 2  # type: ignore[union-attr]
    assert step.at_deadline.escalate.mode == "replace"  # type: ignore[union-attr]
    chain = approvals.deadline_chain(step.at_deadline)  # type: ignore[union-attr]
    assert chain["escalate"]["mode"] == "replace"


def test_more_required_than_named_users_is_an_error_at_its_line(tmp_path: Path) -> None:
    report, lines = _error(tmp_path, "approvers: {users: [ann, bob, ann]}\nrequired: 3\n")
    where = f"wf.yaml:{_line(lines, 'required: 3')}: steps[0].required: "
    assert where in report, report
    assert "required: 3 approvals, but the step names only 2 approver(s) (ann, bob)" in report


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_required_must_be_a_positive_integer(tmp_path: Path, value: str) -> None:
    report, lines = _error(tmp_path, f"approvers: {{users: [ann]}}\nrequired: {value}\n")
    assert f"wf.yaml:{_line(lines, 'required: ')}: steps[0].required: " in report, report


def test_a_role_makes_any_required_possible(tmp_path: Path) -> None:
    """A role's holders are known only at run time: no upper bound is checked."""
    path, _ = _load(tmp_path, "approvers: {users: [ann], roles: [Op]}\nrequired: 5\n")
    assert load_workflow(path).step("ask").required == 5  # type: ignore[union-attr]


def test_an_escalation_that_replaces_with_too_few_approvers_is_an_error(tmp_path: Path) -> None:
    bad = """\
        approvers: {users: [ann, bob, cy]}
        required: 2
        at_deadline:
          escalate:
            approvers: {users: [dee]}
            deadline: 1h
        """
    report, lines = _error(tmp_path, bad)
    where = f"wf.yaml:{_line(lines, 'users: [dee]')}: steps[0].at_deadline.escalate.approvers: "
    assert where in report, report
    assert "escalation level 1 (mode: replace) leaves 1 approver(s) (dee)" in report
    assert "mode: add" in report
    # Adding dee to the three keeps four approvers: fine.
    path, _ = _load(tmp_path, bad.replace("deadline: 1h", "deadline: 1h\n            mode: add"))
    step = load_workflow(path).step("ask")
    assert step.at_deadline.escalate.mode == "add"  # type: ignore[union-attr]


def test_an_unknown_escalation_mode_is_an_error_at_its_line(tmp_path: Path) -> None:
    report, lines = _error(
        tmp_path,
        """\
        approvers: {users: [ann]}
        at_deadline:
          escalate:
            approvers: {users: [dee]}
            deadline: 1h
            mode: merge
        """,
    )
    # The loader names the union's member in the field and the at_deadline line.
    where = (
        f"wf.yaml:{_line(lines, 'at_deadline:')}: steps[0].at_deadline.EscalateTo.escalate.mode: "
    )
    assert where in report, report
    assert "Input should be 'replace' or 'add'" in report


# --------------------------------------------------------------------------- the ledger


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    monkeypatch.setenv("AIRFLOW_CONN_TEST_LEDGER", f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger.from_airflow("test_ledger")
    ledger.migrate()
    return ledger


def ask(
    ledger: Ledger,
    *,
    required: int = 2,
    users: tuple[str, ...] = ("ann", "bob", "cy"),
    deadline: timedelta = timedelta(hours=1),
    at_deadline: Any = "reject",
    run: str = RUN,
) -> approvals.Approval:
    approval, created = approvals.request(
        ledger,
        run_id=run,
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject="Pay 900?",
        body="**two of three**",
        payload={"amount": 900},
        approvers={"users": list(users), "roles": []},
        deadline=now() + deadline,
        at_deadline=at_deadline,
        required=required,
    )
    assert created
    return approval


def kinds(ledger: Ledger) -> list[str]:
    return [e["kind"] for e in ledger.events(RUN)]


def test_two_of_three_waits_for_the_second_approval(ledger: Ledger) -> None:
    a = ask(ledger)
    first = approvals.decide(ledger, a.id, decision="approved", by="ann", comment="ok")
    assert first.pending and first.decided_by is None
    assert kinds(ledger).count("approval_partial") == 1
    assert "approval_decided" not in kinds(ledger)
    second = approvals.decide(ledger, a.id, decision="approved", by="bob", seen_hash=a.payload_hash)
    assert (second.status, second.decided_by) == ("approved", "bob")
    assert kinds(ledger).count("approval_decided") == 1
    rows = quorum.decisions(ledger, a.id)
    assert [(d.by, d.decision, d.comment) for d in rows] == [
        ("ann", "approved", "ok"),
        ("bob", "approved", None),
    ]
    # Each row holds what that person was shown.
    want = {"subject": "Pay 900?", "body": "**two of three**", "payload": {"amount": 900}}
    assert all(d.seen == want and d.seen_hash == a.payload_hash for d in rows)
    assert rows[0].at <= rows[1].at
    assert quorum.approvals_so_far(ledger, [a.id]) == {a.id: 2}
    # The third is late: the approval is decided.
    with pytest.raises(ApprovalConflict, match="already decided"):
        approvals.decide(ledger, a.id, decision="approved", by="cy")
    assert len(quorum.decisions(ledger, a.id)) == 2


def test_one_reject_ends_a_quorum_rejected(ledger: Ledger) -> None:
    a = ask(ledger)
    approvals.decide(ledger, a.id, decision="approved", by="ann")
    rejected = approvals.decide(ledger, a.id, decision="rejected", by="cy", comment="too much")
    assert (rejected.status, rejected.decided_by, rejected.comment) == (
        "rejected",
        "cy",
        "too much",
    )
    assert rejected.fails_step  # no on_reject branch stored: the step fails (saga)
    assert [d.decision for d in quorum.decisions(ledger, a.id)] == ["approved", "rejected"]


def test_the_same_person_counts_once(ledger: Ledger) -> None:
    a = ask(ledger)
    approvals.decide(ledger, a.id, decision="approved", by="ann")
    for decision in ("approved", "rejected"):
        with pytest.raises(DecidedBefore, match="ann already decided"):
            approvals.decide(ledger, a.id, decision=decision, by="ann")
    assert approvals.get(ledger, a.id).pending
    assert len(quorum.decisions(ledger, a.id)) == 1
    assert issubclass(DecidedBefore, ApprovalConflict)  # the API's 409


def test_a_changed_payload_records_nothing(ledger: Ledger) -> None:
    a = ask(ledger)
    with pytest.raises(ApprovalConflict, match="the payload you saw"):
        approvals.decide(ledger, a.id, decision="approved", by="ann", seen_hash="0" * 64)
    assert quorum.decisions(ledger, a.id) == []


def test_required_one_is_the_decision_of_one_person(ledger: Ledger) -> None:
    """Default behaviour unchanged: one decision ends it (and is recorded as a row)."""
    a = ask(ledger, required=1)
    decided = approvals.decide(ledger, a.id, decision="approved", by="bob")
    assert (decided.status, decided.decided_by) == ("approved", "bob")
    assert "approval_partial" not in kinds(ledger)
    assert decided.output()["required"] == 1


def _chain(mode: str | None) -> dict[str, Any]:
    esc: dict[str, Any] = {
        "approvers": {"users": ["dee", "eve"], "roles": []},
        "deadline": 3600.0,
        "at_deadline": "reject",
    }
    if mode is not None:
        esc["mode"] = mode
    return {"escalate": esc}


@pytest.mark.parametrize("mode", ["replace", None])
def test_escalation_replace_hands_it_to_the_new_approvers(ledger: Ledger, mode: Any) -> None:
    """``replace`` (and a chain stored before modes existed): the first approvers can no
    longer decide; an approval they gave stands."""
    a = ask(ledger, at_deadline=_chain(mode))
    approvals.decide(ledger, a.id, decision="approved", by="ann")
    escalated = approvals.escalate(ledger, approvals.get(ledger, a.id), now())
    assert escalated is not None
    assert escalated.approvers == {"users": ["dee", "eve"], "roles": []}
    assert not escalated.may_decide("bob", set()) and escalated.may_decide("dee", set())
    done = approvals.decide(ledger, a.id, decision="approved", by="dee")
    assert done.status == "approved"  # ann's (level 0) and dee's (level 1)
    assert [d.level for d in quorum.decisions(ledger, a.id)] == [0, 1]


def test_escalation_add_keeps_the_first_approvers(ledger: Ledger) -> None:
    a = ask(ledger, at_deadline=_chain("add"))
    escalated = approvals.escalate(ledger, a, now())
    assert escalated is not None
    assert escalated.approvers == {"users": ["ann", "bob", "cy", "dee", "eve"], "roles": []}
    assert escalated.may_decide("bob", set()) and escalated.may_decide("eve", set())
    event = next(e for e in ledger.events(RUN) if e["kind"] == "approval_escalated")
    assert event["data"]["mode"] == "add"


# --------------------------------------------------------------------------- the trigger


class FakeClock:
    def __init__(self) -> None:
        self.at = now()
        self.actions: list[tuple[datetime, Any]] = []

    def now(self) -> datetime:
        return self.at

    def after(self, delay: timedelta, action: Any) -> None:
        self.actions.append((self.at + delay, action))

    async def wait(self, event: asyncio.Event, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)
        for when, action in list(self.actions):
            if when <= self.at:
                self.actions.remove((when, action))
                action()
        await asyncio.sleep(0)


def run_trigger(ledger: Ledger, approval_id: int, clock: FakeClock) -> list[dict[str, Any]]:
    trigger = ApprovalTrigger(approval_id, ledger.conn_id, poll_interval=60)
    trigger._now = clock.now
    trigger._wait = clock.wait

    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    return asyncio.run(collect())


def test_the_trigger_fires_once_when_the_quorum_is_met(ledger: Ledger) -> None:
    a = ask(ledger)
    clock = FakeClock()
    clock.after(timedelta(minutes=5), lambda: approvals.decide(ledger, a.id, decision="approved", by="ann"))  # fmt: skip
    clock.after(timedelta(minutes=20), lambda: approvals.decide(ledger, a.id, decision="approved", by="cy"))  # fmt: skip
    events = run_trigger(ledger, a.id, clock)
    assert events == [{"approval_id": a.id, "status": "approved", "decided_by": "cy"}]
    assert clock.at - now() >= timedelta(minutes=20)  # the partial decision did not fire it


@pytest.mark.parametrize(("outcome", "status"), [("reject", "rejected"), ("approve", "approved")])
def test_the_deadline_settles_a_partial_quorum(ledger: Ledger, outcome: str, status: str) -> None:
    """One approval of two, then the deadline: its declared outcome is the decision; the
    person's decision stays recorded."""
    a = ask(ledger, deadline=timedelta(minutes=30), at_deadline=outcome)
    clock = FakeClock()
    clock.after(timedelta(minutes=1), lambda: approvals.decide(ledger, a.id, decision="approved", by="ann"))  # fmt: skip
    events = run_trigger(ledger, a.id, clock)
    assert events == [{"approval_id": a.id, "status": status, "decided_by": DEADLINE_USER}]
    assert [d.by for d in quorum.decisions(ledger, a.id)] == ["ann"]


# ------------------------------------------------------------ Airflow's Required Actions


def test_a_response_in_airflow_is_one_decision_of_the_quorum(ledger: Ledger) -> None:
    a = ask(ledger)
    outcome, approval = required_action.apply_response(
        ledger, a, chosen=["Approve"], responder="ann", comment=None
    )
    assert (outcome, approval.status) == ("partial", "pending")
    outcome, approval = required_action.apply_response(
        ledger, a, chosen=["Approve"], responder="ann", comment=None
    )
    assert (outcome, approval.status) == ("refused", "pending")
    refused = [e for e in ledger.events(RUN) if e["kind"] == "approval_response_refused"]
    assert refused[0]["data"]["reason"] == "decided before"
    outcome, approval = required_action.apply_response(
        ledger, a, chosen=["Approve"], responder="bob", comment="yes"
    )
    assert (outcome, approval.status) == ("decided", "approved")
    assert [(d.by, d.source) for d in quorum.decisions(ledger, a.id)] == [
        ("ann", "airflow"),
        ("bob", "airflow"),
    ]


def test_a_response_found_by_the_trigger_short_of_the_quorum_reopens(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response stored in Airflow before the task deferred is found by the trigger:
    one decision of two is recorded and the trigger fires a ``reopen`` event (the task's
    resume parks it again, which reopens the Airflow entry for the others)."""
    from types import SimpleNamespace

    a = ask(ledger)
    answer = SimpleNamespace(
        chosen_options=["Approve"],
        params_input={"comment": "from Airflow"},
        responded_by_user=SimpleNamespace(id="ann", name="ann"),
    )
    # Airflow's side (its HITL entry), outside this test.
    monkeypatch.setattr(required_action, "read_response", lambda ti_id: answer)
    trigger = ApprovalTrigger(a.id, ledger.conn_id, poll_interval=60, ti_id="ti-1")
    clock = FakeClock()
    trigger._now = clock.now
    trigger._wait = clock.wait

    async def collect() -> list[dict[str, Any]]:
        return [event.payload async for event in trigger.run()]

    events = asyncio.run(collect())
    assert events == [{"approval_id": a.id, "status": "pending", "reopen": True}]
    assert approvals.get(ledger, a.id).pending
    assert [(d.by, d.comment, d.source) for d in quorum.decisions(ledger, a.id)] == [
        ("ann", "from Airflow", "airflow")
    ]
