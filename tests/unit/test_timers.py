"""Wait steps (durable timers): the file's checks, segment planning, reading ``until`` in
the workflow's time zone, parking once per run, and the trigger firing once."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import NonRetryableError, SpecError
from ledgerflow.factory import build_dag
from ledgerflow.ledger import timers
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.spec.models import WaitStep, WorkflowSpec
from ledgerflow.steps.kernel import RunRef
from ledgerflow.steps.wait import WaitKind, WaitOperator, park
from ledgerflow.triggers.timer import TimerTrigger
from ledgerflow.workflow.segments import Segment, segments
from ledgerflow.workflow.validate import load_workflow

HEAD = """\
name: tm
version: 1
timezone: {tz}
execution: {execution}
params:
  day: {{type: string, default: "2026-01-01"}}
  at: {{type: string, default: "2026-01-01T00:00"}}
steps:
"""
NOOP = "tool: demo.noop\n    idempotency: natural"


def _write(tmp_path: Path, steps: str, *, tz: str = "UTC", execution: str = "tasks") -> Path:
    path = tmp_path / "tm" / "v1.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        HEAD.format(tz=tz, execution=execution) + textwrap.dedent(steps), encoding="utf-8"
    )
    return path


def _load(tmp_path: Path, steps: str, **kw: Any) -> WorkflowSpec:
    return load_workflow(_write(tmp_path, steps, **kw))


def _refused(tmp_path: Path, steps: str, **kw: Any) -> tuple[Path, str]:
    path = _write(tmp_path, steps, **kw)
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    return path, str(info.value)


# ----------------------------------------------------------------------------- the file


def test_for_and_until_load_and_build_a_deferrable_wait_task(tmp_path: Path) -> None:
    """``for`` reads the spec's durations; ``until`` may be a template; each wait is a
    WaitOperator task (not retried by Airflow, no execution timeout cutting a long wait)."""
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: cool_off
    kind: wait
    for: 3d
    needs: [a]
  - id: at_nine
    kind: wait
    until: "{{{{ params.day }}}}T09:00"
    needs: [cool_off]
""",
    )
    first, second = spec.step("cool_off"), spec.step("at_nine")
    assert isinstance(first, WaitStep) and first.for_ == timedelta(days=3)
    assert isinstance(second, WaitStep) and second.until == "{{ params.day }}T09:00"
    dag = build_dag(spec)
    task = dag.get_task("cool_off")
    assert isinstance(task, WaitOperator)
    assert task.retries == 0 and task.execution_timeout is None


@pytest.mark.parametrize(
    ("body", "needle", "field", "fragment"),
    [
        ("kind: wait", "kind: wait", "kind", "needs `for: <duration>`"),
        ("kind: wait\n    for: 1h\n    until: '2026-01-01T00:00'", "until:", "until", "not both"),
        ("kind: wait\n    for: soon", "for: soon", "for", "is not a duration"),
        ("kind: wait\n    for: -5s", "for: -5s", "for", "is not a duration"),
        ("kind: wait\n    until: next tuesday", "until:", "until", "is not a date and time"),
        (
            "kind: wait\n    until: '{{ steps.nope.output.at }}'",
            "until:",
            "until",
            "nope",
        ),
        ("kind: wait\n    for: 1h\n    for_each: '{{ [1] }}'", "for_each:", "for_each", "wait"),
        ("kind: wait\n    for: 1h\n    tool: demo.noop", "tool:", "tool", "unknown field"),
    ],
    ids=[
        "neither",
        "both",
        "bad-for",
        "negative-for",
        "bad-until",
        "unknown-ref",
        "for-each",
        "extra",
    ],
)
def test_a_bad_wait_names_file_line_and_field(
    tmp_path: Path, body: str, needle: str, field: str, fragment: str
) -> None:
    """Every problem of a wait step is reported as ``file:line: steps[n].field: why``."""
    text = f"""\
  - id: a
    {NOOP}
  - id: w
    needs: [a]
    {body}
"""
    path, report = _refused(tmp_path, text)
    full = (HEAD.format(tz="UTC", execution="tasks") + textwrap.dedent(text)).splitlines()
    start = next(n for n, row in enumerate(full, start=1) if "id: w" in row)
    line = next(n for n, row in enumerate(full, start=1) if needle in row and n >= start)
    prefix = f"{path}:{line}: steps[1].{field}: "
    hits = [row for row in report.splitlines() if prefix in row]
    assert hits, f"no problem at {prefix!r}:\n{report}"
    assert any(fragment in hit for hit in hits), report


def test_a_wait_ends_a_fused_segment_like_an_approval(tmp_path: Path) -> None:
    """``execution: fused``: a wait parks in the triggerer, so the chain a -> b -> wait ->
    c -> d fuses into two segments around the wait's own task; ``segment:`` on a wait is
    refused with the reason."""
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: b
    needs: [a]
    {NOOP}
  - id: w
    kind: wait
    for: 5s
    needs: [b]
  - id: c
    needs: [w]
    {NOOP}
  - id: d
    needs: [c]
    {NOOP}
""",
        execution="fused",
    )
    assert segments(spec) == [
        Segment("fused__a__b", ("a", "b")),
        Segment("fused__c__d", ("c", "d")),
    ]
    dag = build_dag(spec)
    assert isinstance(dag.get_task("w"), WaitOperator)
    assert dag.get_task("w").upstream_task_ids == {"fused__a__b"}
    assert dag.get_task("fused__c__d").upstream_task_ids == {"w"}
    _, report = _refused(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
    segment: s
  - id: w
    kind: wait
    for: 5s
    needs: [a]
    segment: s
""",
    )
    assert "steps[1].segment: a wait parks in the triggerer" in report


# ------------------------------------------------------------------------------ until


def test_until_without_an_offset_is_read_in_the_workflows_time_zone(tmp_path: Path) -> None:
    """A moment without an offset is the workflow's local time (as a schedule is); one with
    an offset keeps it; a rendered value that is no moment is a non-retryable error."""
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: w
    kind: wait
    until: "{{{{ params.at }}}}"
    needs: [a]
""",
        tz="Europe/Paris",
    )
    step = spec.step("w")
    assert isinstance(step, WaitStep)
    kind = WaitKind(spec, step)
    winter = kind.render({"params": {"at": "2026-01-15T09:00"}})
    assert kind.planned(winter, now()) == datetime(2026, 1, 15, 8, 0, tzinfo=timezone.utc)
    summer = kind.render({"params": {"at": "2026-07-15 09:00"}})
    assert kind.planned(summer, now()) == datetime(2026, 7, 15, 7, 0, tzinfo=timezone.utc)
    offset = kind.render({"params": {"at": "2026-07-15T09:00:00+00:00"}})
    assert kind.planned(offset, now()) == datetime(2026, 7, 15, 9, 0, tzinfo=timezone.utc)
    assert winter.args == {"until": "2026-01-15T09:00:00+01:00"}
    with pytest.raises(NonRetryableError, match="step w: until: 'tomorrow-ish'"):
        kind.render({"params": {"at": "tomorrow-ish"}})


# ------------------------------------------------------------------ parking and firing


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Ledger:
    monkeypatch.setenv("AIRFLOW_CONN_TEST_LEDGER", f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger = Ledger.from_airflow("test_ledger")
    ledger.migrate()
    return ledger


def _wait_spec(tmp_path: Path, body: str, when: str = "") -> WorkflowSpec:
    return _load(
        tmp_path,
        f"""\
  - id: w
    kind: wait
    {body}
{when}""",
    )


def _run(n: int = 1) -> RunRef:
    return RunRef(run_id=f"tm__v1/run-{n}", dag_id="tm__v1", trigger_kind="manual")


def _collect(trigger: TimerTrigger, clock: list[datetime]) -> list[Any]:
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += timedelta(seconds=seconds)

    trigger._now = lambda: clock[0]
    trigger._sleep = sleep

    async def go() -> list[Any]:
        return [event async for event in trigger.run()]

    events = asyncio.run(go())
    assert all(s <= 60 for s in sleeps)
    return events


def test_parked_once_per_run_and_fired_once(tmp_path: Path, ledger: Ledger) -> None:
    """The fire time is recorded when the step first parks: a second try of the task
    (cleared while parked) keeps it. The trigger, rebuilt from its serialized kwargs,
    sleeps until then and completes the step once with planned, fired and lag; run
    again (a triggerer restart after it fired) it records nothing new and ends the task
    with the same output."""
    from airflow.triggers.base import TaskSuccessEvent

    spec = _wait_spec(tmp_path, "for: 2h")
    step = spec.step("w")
    assert isinstance(step, WaitStep)
    first = park(ledger, spec, step, _run(), params={})
    assert first.planned is not None
    assert timedelta(hours=2) - (first.planned - now()) < timedelta(seconds=5)
    again = park(ledger, spec, step, _run(), params={}, try_number=2)
    assert again.planned == first.planned

    trigger = TimerTrigger(_run().run_id, "w", first.planned.isoformat(), conn_id="test_ledger")
    classpath, kwargs = trigger.serialize()
    assert classpath == "ledgerflow.triggers.timer.TimerTrigger"
    assert kwargs == {
        "run_id": "tm__v1/run-1",
        "step_key": "w",
        "planned": first.planned.isoformat(),
        "conn_id": "test_ledger",
    }
    rebuilt = TimerTrigger(**kwargs)
    clock = [now()]
    events = _collect(rebuilt, clock)
    assert clock[0] >= first.planned
    assert len(events) == 1 and isinstance(events[0], TaskSuccessEvent)
    output = events[0].xcoms["return_value"]
    assert output["planned"] == first.planned.isoformat()
    assert output["lag_ms"] >= 0
    checkpoint = ledger.checkpoint(_run().run_id, "w")
    assert checkpoint is not None and checkpoint.status == "completed"
    assert checkpoint.output == output

    replay = _collect(TimerTrigger(**kwargs), [now() + timedelta(hours=3)])
    assert replay[0].xcoms["return_value"] == output
    kinds = [e["kind"] for e in ledger.events(_run().run_id) if e["step_key"] == "w"]
    assert kinds.count("timer_parked") == 1
    assert kinds.count("timer_fired") == 1
    assert kinds.count("step_completed") == 1
    # The task run again after that (cleared): the completed step is reused, no new wait.
    assert park(ledger, spec, step, _run(), params={}, try_number=3).reused == output


def test_a_past_until_is_due_at_once_and_a_false_when_skips(tmp_path: Path, ledger: Ledger) -> None:
    """``until`` already past: the planned time is that moment (the operator fires at once);
    ``when`` false: skipped, nothing parked."""
    spec = _wait_spec(tmp_path, "until: '2020-01-01T00:00'")
    step = spec.step("w")
    assert isinstance(step, WaitStep)
    parked = park(ledger, spec, step, _run(), params={})
    assert parked.planned == datetime(2020, 1, 1, tzinfo=timezone.utc)
    output = timers.fire(ledger, _run().run_id, "w")
    assert output["lag_ms"] > 0
    skipping = _wait_spec(tmp_path, "for: 1h", when="    when: \"params.day == 'never'\"\n")
    skipped_step = skipping.step("w")
    assert isinstance(skipped_step, WaitStep)
    assert park(ledger, skipping, skipped_step, _run(2), params={"day": "2026-01-01"}).skipped
    assert not [e for e in ledger.events(_run(2).run_id) if e["kind"] == "timer_parked"]


def test_a_retry_run_reuses_a_completed_wait(tmp_path: Path, ledger: Ledger) -> None:
    """A retry of a failed run finds the wait completed in the run it retries (same
    duration) and does not wait again."""
    spec = _wait_spec(tmp_path, "for: 1h")
    step = spec.step("w")
    assert isinstance(step, WaitStep)
    park(ledger, spec, step, _run(), params={})
    output = timers.fire(ledger, _run().run_id, "w")
    ledger.finish_run(_run().run_id, "failed")
    retry = RunRef(
        run_id="tm__v1/retry-1", dag_id="tm__v1", trigger_kind="manual", retry_of=_run().run_id
    )
    found = park(ledger, spec, step, retry, params={})
    assert found.reused == output and found.planned is None
    assert not [e for e in ledger.events(retry.run_id) if e["kind"] == "timer_parked"]
