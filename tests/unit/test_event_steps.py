"""Event steps (``kind: event``) on a SQLite ledger: the spec's errors name file, line and
field; a delivery counts once per event id, wakes every parked wait of its name and key
or is kept and taken by exactly one later wait; a payload that does not fit is refused
naming the field; the trigger ends the task with the step's outcome recorded once."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import EventPayloadInvalid, SpecError
from ledgerflow.ledger import event_outcomes, event_waits
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.triggers.event import EventTrigger
from ledgerflow.workflow.validate import load_workflow

SCHEMA = {"type": "object", "required": ["amount"], "properties": {"amount": {"type": "number"}}}


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    """A SQLite ledger behind the Airflow connection ``test_ledger`` (a trigger names it)."""
    monkeypatch.setenv("AIRFLOW_CONN_TEST_LEDGER", f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger.from_airflow("test_ledger")
    ledger.migrate()
    return ledger


def open_wait(ledger: Ledger, run: str, key: str = "pay-1", **kw: Any) -> event_waits.Wait:
    ledger.ensure_run(
        run_id=f"wf__v1/{run}",
        dag_id="wf__v1",
        workflow="wf",
        version=1,
        params={},
        trigger_kind="manual",
    )
    wait = event_waits.open_wait(
        ledger,
        run_id=f"wf__v1/{run}",
        step_key="settled",
        dag_id="wf__v1",
        task_id="settled",
        workflow="wf",
        name="payment.settled",
        key=key,
        schema=kw.get("schema", SCHEMA),
        deadline=kw.get("deadline", now() + timedelta(hours=1)),
        on_deadline=kw.get("on_deadline", "fail"),
        default=kw.get("default"),
        follow=kw.get("follow"),
    )
    ledger.begin_attempt(
        run_id=f"wf__v1/{run}",
        step_key="settled",
        step_id="settled",
        map_index=-1,
        try_number=1,
        args={"event": "payment.settled", "key": key},
        idempotency_key=f"event:{wait.id}",
        first=True,
    )
    return wait


def deliver(ledger: Ledger, event_id: str, payload: Any, key: str = "pay-1") -> Any:
    return event_waits.deliver(
        ledger, name="payment.settled", key=key, event_id=event_id, payload=payload
    )


def first_event(trigger: EventTrigger) -> Any:
    async def first() -> Any:
        async for event in trigger.run():
            return event
        raise AssertionError("no event")

    return asyncio.run(first())


# ---------------------------------------------------------------------------------- spec


def _load(tmp_path: Path, steps: str) -> Any:
    path = tmp_path / "wf.yaml"
    path.write_text(
        "name: wf\nversion: 1\nsteps:\n"
        "  - id: charge\n    tool: sql\n    args: {conn_id: db, statement: select 1}\n"
        "    idempotency: natural\n" + textwrap.indent(textwrap.dedent(steps), "  ")
    )
    return path, load_workflow(path)


def test_a_good_event_step_loads(tmp_path: Path) -> None:
    """The documented shape loads: templated key, schema, deadline, branch outcome."""
    _, spec = _load(
        tmp_path,
        """\
          - id: settled
            kind: event
            needs: [charge]
            event: payment.settled
            key: "{{ steps.charge.output.rows }}"
            schema: {type: object}
            deadline: 2h
            on_deadline: {branch: late}
          - id: late
            needs: [settled]
            tool: sql
            args: {conn_id: db, statement: select 1}
            idempotency: natural
        """,
    )
    step = spec.step("settled")
    assert step.kind == "event" and step.deadline == timedelta(hours=2)
    assert step.branch_target == "late" and step.payload_schema == {"type": "object"}


@pytest.mark.parametrize(
    ("body", "needle", "field", "fragment"),
    [
        (
            "    on_deadline: {branch: nowhere}\n",
            "on_deadline",
            "steps[1].on_deadline",
            "unknown step",
        ),
        ("    schema: {type: 12}\n", "schema", "steps[1].schema.type", "not a valid JSON Schema"),
        (
            "    on_deadline: continue\n    default: {amount: x}\n",
            "default",
            "steps[1].default",
            "payload.amount",
        ),
        ("    default: {amount: 1}\n", "default", "steps[1]", "on_deadline: continue"),
        ("    deadline: soon\n", "deadline", "steps[1].deadline", "not a duration"),
        ('    key: "{{ steps.nope.output }}"\n', "key", "steps[1].key", "nope"),
        ("    event: 'bad name!'\n", "event", "steps[1].event", "pattern"),
    ],
)
def test_bad_event_steps_name_file_line_and_field(
    tmp_path: Path, body: str, needle: str, field: str, fragment: str
) -> None:
    """Each mistake is a SpecError at the line of the offending field, naming it."""
    base = {
        "event": "    event: payment.settled\n",
        "key": '    key: "k"\n',
        "schema": "    schema: {type: object, properties: {amount: {type: number}}}\n",
    }
    for name in list(base):
        if body.startswith(f"    {name}:"):
            del base[name]
    text = "  - id: settled\n    kind: event\n    needs: [charge]\n" + "".join(base.values()) + body
    path = tmp_path / "wf.yaml"
    path.write_text(
        "name: wf\nversion: 1\nsteps:\n"
        "  - id: charge\n    tool: sql\n    args: {conn_id: db, statement: select 1}\n"
        "    idempotency: natural\n" + text
    )
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    lines = path.read_text().splitlines()
    line = next(n for n, item in enumerate(lines, 1) if item.strip().startswith(f"{needle}:"))
    report = str(info.value)
    hits = [r for r in report.splitlines() if f"{path}:" in r and f"{field}" in r]
    assert hits, report
    assert any(fragment in h for h in hits), report
    if needle != "default" or field != "steps[1]":
        assert any(f"{path}:{line}:" in h for h in hits), (line, report)


# ---------------------------------------------------------------------------- deliveries


def test_a_delivery_wakes_the_parked_wait_and_counts_once(ledger: Ledger) -> None:
    """Delivered while parked: the wait receives the payload; the same event id again is
    a duplicate that changes nothing."""
    wait = open_wait(ledger, "r1")
    assert wait.waiting
    done = deliver(ledger, "evt-1", {"amount": 12})
    assert done.status == "delivered" and [w.id for w in done.woke] == [wait.id]
    again = deliver(ledger, "evt-1", {"amount": 99})
    assert again.status == "duplicate" and again.woke == []
    got = event_waits.get(ledger, wait.id)
    assert got.status == "received" and got.payload == {"amount": 12}
    kinds = [e["kind"] for e in ledger.events("wf__v1/r1")]
    assert kinds.count("event_received") == 1


def test_a_payload_that_does_not_fit_is_refused_naming_the_field(ledger: Ledger) -> None:
    """The waiting step's schema decides: nothing is stored, the error names the field,
    and a good delivery afterwards (same id) is still taken."""
    wait = open_wait(ledger, "r2")
    with pytest.raises(EventPayloadInvalid) as info:
        deliver(ledger, "evt-2", {"amount": "twelve"})
    assert info.value.field == "payload.amount"
    assert "payload.amount" in str(info.value)
    with pytest.raises(EventPayloadInvalid) as missing:
        deliver(ledger, "evt-2", {})
    assert missing.value.field == "payload.amount"
    assert event_waits.get(ledger, wait.id).waiting
    assert deliver(ledger, "evt-2", {"amount": 1}).status == "delivered"


def test_an_early_delivery_is_kept_and_taken_by_exactly_one_later_wait(ledger: Ledger) -> None:
    """Before any wait: kept. The first wait that starts takes it at once (received);
    the second wait with the same name and key does not get it again."""
    kept = deliver(ledger, "evt-3", {"amount": 5}, key="pay-3")
    assert kept.status == "kept"
    first = open_wait(ledger, "r3a", key="pay-3")
    second = open_wait(ledger, "r3b", key="pay-3")
    assert first.status == "received" and first.payload == {"amount": 5}
    assert first.resolved_by == "kept"
    assert second.waiting
    assert deliver(ledger, "evt-3", {"amount": 5}, key="pay-3").status == "duplicate"


def test_a_kept_delivery_that_does_not_fit_is_rejected_and_the_wait_goes_on(
    ledger: Ledger,
) -> None:
    """Without a wait the schema is unknown: a kept delivery is checked when a wait takes
    it; one that does not fit is marked rejected (with the field) and never taken."""
    assert deliver(ledger, "evt-4", {"amount": "x"}, key="pay-4").status == "kept"
    wait = open_wait(ledger, "r4", key="pay-4")
    assert wait.waiting
    events = [e for e in ledger.events("wf__v1/r4") if e["kind"] == "event_delivery_rejected"]
    assert len(events) == 1 and "payload.amount" in events[0]["data"]["error"]


def test_a_kept_delivery_past_its_time_to_live_is_never_taken(ledger: Ledger) -> None:
    done = event_waits.deliver(
        ledger,
        name="payment.settled",
        key="pay-5",
        event_id="evt-5",
        payload={"amount": 1},
        ttl=timedelta(seconds=0),
    )
    assert done.status == "kept"
    assert open_wait(ledger, "r5", key="pay-5").waiting


def test_one_delivery_wakes_every_wait_of_its_name_and_key(ledger: Ledger) -> None:
    """Two runs parked on the same key: one delivery wakes both (documented)."""
    a, b = open_wait(ledger, "r6a", key="pay-6"), open_wait(ledger, "r6b", key="pay-6")
    other = open_wait(ledger, "r6c", key="pay-other")
    done = deliver(ledger, "evt-6", {"amount": 2}, key="pay-6")
    assert sorted(w.id for w in done.woke) == sorted([a.id, b.id])
    assert event_waits.get(ledger, other.id).waiting


def test_withdrawn_waits_take_no_delivery_and_no_deadline(ledger: Ledger) -> None:
    wait = open_wait(ledger, "r7", key="pay-7")
    assert ledger.withdraw_event_waits("wf__v1/r7", "cancelled") == 1
    assert ledger.withdraw_event_waits("wf__v1/r7", "cancelled") == 0
    assert deliver(ledger, "evt-7", {"amount": 1}, key="pay-7").status == "kept"
    assert not event_waits.expire(ledger, wait.id, now() + timedelta(days=1))
    assert event_waits.get(ledger, wait.id).status == "withdrawn"


# ------------------------------------------------------------------------------ trigger


def test_serialize_round_trip() -> None:
    trigger = EventTrigger(7, conn_id="ledgerflow_db", poll_interval=3.0)
    path, kwargs = trigger.serialize()
    assert path == "ledgerflow.triggers.event.EventTrigger"
    assert kwargs == {"wait_id": 7, "conn_id": "ledgerflow_db", "poll_interval": 3.0}
    assert EventTrigger(**kwargs).serialize() == (path, kwargs)
    with pytest.raises(Exception, match="connection id"):
        EventTrigger(7, conn_id="postgresql://u:p@h/db")


def test_a_delivery_ends_the_task_in_the_trigger_once(ledger: Ledger) -> None:
    """The trigger ends the task with the payload as its output; the checkpoint is
    completed once (a second trigger copy records nothing new)."""
    from airflow.triggers.base import TaskSuccessEvent

    wait = open_wait(ledger, "r8", key="pay-8")
    event_waits.deliver(
        ledger,
        name="payment.settled",
        key="pay-8",
        event_id="evt-8",
        payload={"amount": 8},
        source="test",
    )
    event = first_event(EventTrigger(wait.id, ledger.conn_id, poll_interval=60))
    again = first_event(EventTrigger(wait.id, ledger.conn_id, poll_interval=60))
    assert isinstance(event, TaskSuccessEvent) and isinstance(again, TaskSuccessEvent)
    assert event.xcoms == {"return_value": {"amount": 8}} == again.xcoms
    checkpoint = ledger.checkpoint("wf__v1/r8", "settled")
    assert checkpoint is not None and checkpoint.status == "completed"
    assert checkpoint.output == {"amount": 8}
    kinds = [e["kind"] for e in ledger.events("wf__v1/r8")]
    assert kinds.count("event_step_completed") == 1


def _expire_now(ledger: Ledger, **kw: Any) -> tuple[event_waits.Wait, Any]:
    wait = open_wait(ledger, kw.pop("run"), key=kw.pop("key"), deadline=now(), **kw)
    return wait, first_event(EventTrigger(wait.id, ledger.conn_id, poll_interval=60))


def test_deadline_continue_completes_with_the_default(ledger: Ledger) -> None:
    from airflow.triggers.base import TaskSuccessEvent

    wait, event = _expire_now(
        ledger, run="r9", key="pay-9", on_deadline="continue", default={"amount": 0}
    )
    assert isinstance(event, TaskSuccessEvent)
    assert event.xcoms == {"return_value": {"amount": 0}}
    assert event_waits.get(ledger, wait.id).status == "expired"
    # A delivery after the deadline changes nothing for that wait.
    assert deliver(ledger, "evt-9", {"amount": 3}, key="pay-9").status == "kept"


def test_deadline_branch_follows_only_the_branch(ledger: Ledger) -> None:
    from airflow.triggers.base import TaskSuccessEvent

    follow = {"received": ["book", "compensate__charge"], "expired": ["late", "compensate__charge"]}
    _, event = _expire_now(
        ledger, run="r10", key="pay-10", on_deadline={"branch": "late"}, follow=follow
    )
    assert isinstance(event, TaskSuccessEvent) and event.xcoms is not None
    assert event.xcoms["skipmixin_key"] == {"followed": ["late", "compensate__charge"]}


def test_deadline_fail_fails_the_step_and_starts_the_saga(ledger: Ledger) -> None:
    from airflow.triggers.base import TaskFailedEvent

    wait, event = _expire_now(ledger, run="r11", key="pay-11", on_deadline="fail")
    assert isinstance(event, TaskFailedEvent)
    checkpoint = ledger.checkpoint("wf__v1/r11", "settled")
    assert checkpoint is not None and checkpoint.status == "failed"
    run = ledger.run("wf__v1/r11")
    assert run is not None and run["saga"] == "compensating"
    assert "did not arrive before the deadline" in event_outcomes.fail(ledger, wait.id, "x")


def test_a_withdrawn_wait_ends_its_trigger_and_records_no_outcome(ledger: Ledger) -> None:
    """A cancelled run's wait (withdrawn): the trigger ends the task failed, and nothing
    completes or fails the step's checkpoint (the cancel records the run's outcome)."""
    from airflow.triggers.base import TaskFailedEvent

    wait = open_wait(ledger, "r12", key="pay-12")
    ledger.withdraw_event_waits("wf__v1/r12", "cancelled by ops")
    event = first_event(EventTrigger(wait.id, ledger.conn_id, poll_interval=60))
    assert isinstance(event, TaskFailedEvent)
    checkpoint = ledger.checkpoint("wf__v1/r12", "settled")
    assert checkpoint is None or checkpoint.status == "running"
    withdrawn = [e for e in ledger.events("wf__v1/r12") if e["kind"] == "event_wait_withdrawn"]
    assert len(withdrawn) == 1 and withdrawn[0]["data"]["reason"] == "cancelled by ops"
