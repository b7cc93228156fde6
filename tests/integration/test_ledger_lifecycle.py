"""The ledger holds every record to its lifecycle (SQLite and Postgres): illegal
transitions are refused and change nothing; finding 5 (dead letters resolved by a retry
that completes their step); an Airflow clear reopens a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import IllegalTransition
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def flaky(tmp_path: Path) -> tuple[WorkflowSpec, Path]:
    """A two-step workflow whose second step fails while a flag file exists."""
    flag = tmp_path / "broken"
    flag.write_text("x")
    path = tmp_path / "workflows" / "flaky" / "v1.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(
        "name: flaky\nversion: 1\nsteps:\n"
        "  - id: a\n    tool: demo.noop\n    idempotency: natural\n"
        "  - id: b\n    needs: [a]\n    tool: demo.fail_while\n"
        f"    args: {{flag: '{flag}'}}\n    idempotency: natural\n"
    )
    return load_workflow(path), flag


def run(ledger: Ledger, spec: WorkflowSpec, ref: RunRef, step: str, **kw: Any) -> Any:
    return execute_step(ledger, spec, spec.tool_step(step), ref, params={}, **kw)


def test_a_completed_step_is_never_attempted_again(ledger: Ledger, tmp_path: Path) -> None:
    """begin_attempt on a completed checkpoint is refused (IllegalTransition) and the
    checkpoint, its output and its attempts are unchanged."""
    spec, _ = flaky(tmp_path)
    ref = RunRef(run_id="flaky__v1/r", dag_id="flaky__v1")
    run(ledger, spec, ref, "a")
    before = (ledger.checkpoint(ref.run_id, "a"), ledger.attempts(ref.run_id, "a"))
    with pytest.raises(IllegalTransition, match="completed -> running"):
        ledger.begin_attempt(
            run_id=ref.run_id,
            step_key="a",
            step_id="a",
            map_index=-1,
            try_number=2,
            args={},
            idempotency_key=None,
        )
    assert (ledger.checkpoint(ref.run_id, "a"), ledger.attempts(ref.run_id, "a")) == before


def test_only_a_running_step_completes(ledger: Ledger, tmp_path: Path) -> None:
    """complete_step twice (a twin finishing the same step) is refused in the second
    transaction, which rolls back: one completed checkpoint, its first output."""
    spec, _ = flaky(tmp_path)
    ref = RunRef(run_id="flaky__v1/twice", dag_id="flaky__v1")
    run(ledger, spec, ref, "a")
    attempt = ledger.attempts(ref.run_id, "a")[0]["id"]
    with pytest.raises(IllegalTransition), ledger.begin() as conn:
        ledger.complete_step(
            conn, run_id=ref.run_id, step_key="a", attempt_id=attempt, output="x", reused=False
        )
    assert ledger.checkpoint(ref.run_id, "a").output != "x"  # type: ignore[union-attr]


def test_a_compensated_effect_cannot_be_finished(ledger: Ledger) -> None:
    """An effect the saga undid is terminal: finishing it again is refused."""
    with ledger.begin() as conn:
        ledger.claim_effect(conn, key="k1", tool="demo.noop", run_id="w/r", step_key="s")
        ledger.finish_effect(conn, key="k1", result={"v": 1})
    with ledger.begin() as conn:
        from sqlalchemy import update

        from ledgerflow.ledger import schema as t

        conn.execute(
            update(t.effects)
            .where(t.effects.c.idempotency_key == "k1")
            .values(status="compensated")
        )
    with pytest.raises(IllegalTransition, match="compensated -> done"), ledger.begin() as conn:
        ledger.finish_effect(conn, key="k1", result={"v": 2})
    assert ledger.effect("k1").result == {"v": 1}  # type: ignore[union-attr]


def test_retry_that_completes_the_step_resolves_its_dead_letter(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Finding 5: a step dead-lettered in a failed run, then completed by a retry run of
    it, leaves no open dead letter; the original run's letter is resolved with an event
    naming the retry."""
    spec, flag = flaky(tmp_path)
    first = RunRef(run_id="flaky__v1/first", dag_id="flaky__v1")
    run(ledger, spec, first, "a")
    with pytest.raises(Exception):  # noqa: B017 - the tool's own failure
        run(ledger, spec, first, "b")
    assert [d["step_key"] for d in ledger.dead_letters()] == ["b"]
    flag.unlink()  # the cause is fixed
    retry = RunRef(run_id="flaky__v1/retry", dag_id="flaky__v1", retry_of=first.run_id)
    assert run(ledger, spec, retry, "a").status == "reused"
    assert run(ledger, spec, retry, "b").status == "completed"
    assert ledger.dead_letters() == []
    resolved = [e for e in ledger.events(first.run_id) if e["kind"] == "dead_letter_resolved"]
    assert [e["data"] for e in resolved] == [{"how": "completed_by", "run_id": retry.run_id}]


def test_a_cleared_task_reopens_the_run(ledger: Ledger, tmp_path: Path) -> None:
    """A failed run whose failed step is cleared in Airflow and then succeeds is running
    again in the ledger while it runs, its saga reset, and ends succeeded: the ledger and
    Airflow agree."""
    spec, flag = flaky(tmp_path)
    ref = RunRef(run_id="flaky__v1/clear", dag_id="flaky__v1")
    run(ledger, spec, ref, "a")
    with pytest.raises(Exception):  # noqa: B017
        run(ledger, spec, ref, "b")
    ledger.start_saga(ref.run_id, "b")
    ledger.finish_saga(ref.run_id)
    ledger.finish_run(ref.run_id, "failed")
    flag.unlink()
    run(ledger, spec, ref, "b", try_number=2)  # the cleared task
    row = ledger.run(ref.run_id)
    assert row is not None and (row["status"], row["saga"]) == ("running", None)
    ledger.finish_run(ref.run_id, "succeeded")
    assert ledger.run(ref.run_id)["status"] == "succeeded"  # type: ignore[index]
    kinds = [e["kind"] for e in ledger.events(ref.run_id)]
    assert "run_reopened" in kinds


def test_finishing_a_saga_twice_and_a_compensation_after_completion(ledger: Ledger) -> None:
    """A repeated outcome is a no-op; a compensation that completed cannot go back to
    `not_needed` (a retried compensation task finds it undone instead)."""
    ledger.ensure_run(
        run_id="w/s", dag_id="w", workflow="w", version=1, params={}, trigger_kind="manual"
    )
    ledger.start_saga("w/s", "x")
    ledger.record_compensation("w/s", "x", "running")
    ledger.record_compensation("w/s", "x", "completed")
    ledger.record_compensation("w/s", "x", "completed")
    assert ledger.finish_saga("w/s") == "compensated"
    assert ledger.finish_saga("w/s") == "compensated"
    with pytest.raises(IllegalTransition):
        ledger.record_compensation("w/s", "x", "not_needed")
    assert ledger.compensations("w/s")["x"]["status"] == "completed"


def test_an_ended_runs_pending_approval_is_abandoned(ledger: Ledger) -> None:
    """A run that ended while its approval waited (its trigger failed, an operator marked
    it failed): the approval becomes `abandoned` once, with an event, leaves the pending
    list, and a decision on it is refused instead of being recorded for a dead task."""
    from datetime import timedelta

    from ledgerflow.ledger import approvals
    from ledgerflow.ledger.store import now

    approval, _ = approvals.request(
        ledger,
        run_id="wf__v1/ended",
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject="Approve?",
        body="",
        payload={},
        approvers={"users": ["manager"], "roles": []},
        deadline=now() + timedelta(hours=1),
        at_deadline="reject",
    )
    assert approvals.abandon_for_run(ledger, "wf__v1/ended", "the run ended (failed)") == 1
    assert approvals.abandon_for_run(ledger, "wf__v1/ended", "again") == 0
    assert approvals.get(ledger, approval.id).status == "abandoned"
    assert all(a.id != approval.id for a in approvals.listing(ledger))
    with pytest.raises(approvals.ApprovalConflict):
        approvals.decide(ledger, approval.id, decision="approved", by="manager")
    kinds = [e["kind"] for e in ledger.events("wf__v1/ended")]
    assert kinds.count("approval_abandoned") == 1


# -- the records one by one, through the ledger's own calls ----------------------------


def start(ledger: Ledger, run_id: str, retry_of: str | None = None) -> str:
    ledger.ensure_run(
        run_id=run_id,
        dag_id="w__v1",
        workflow="w",
        version=1,
        params={},
        trigger_kind="retry" if retry_of else "manual",
        retry_of=retry_of,
    )
    return run_id


def attempt(ledger: Ledger, run_id: str, step: str, key: str | None = None, tries: int = 1) -> int:
    return ledger.begin_attempt(
        run_id=run_id,
        step_key=step,
        step_id=step,
        map_index=-1,
        try_number=tries,
        args={"n": tries},
        idempotency_key=key,
        first=tries == 1,
    )


def complete(
    ledger: Ledger, run_id: str, step: str, attempt_id: int, key: str | None = None
) -> None:
    """What a keyed step commits: its effect done and its checkpoint completed, at once."""
    with ledger.begin() as conn:
        if key is not None:
            ledger.claim_effect(conn, key=key, tool="demo.noop", run_id=run_id, step_key=step)
            ledger.finish_effect(conn, key=key, result={"by": attempt_id})
        ledger.complete_step(
            conn,
            run_id=run_id,
            step_key=step,
            attempt_id=attempt_id,
            output={"by": attempt_id},
            reused=False,
        )


def kinds(ledger: Ledger, run_id: str) -> list[str]:
    return [e["kind"] for e in ledger.events(run_id)]


def fail(ledger: Ledger, run_id: str, step: str, attempt_id: int, final: bool = True) -> None:
    ledger.fail_attempt(
        run_id=run_id,
        step_key=step,
        attempt_id=attempt_id,
        error=RuntimeError("boom"),
        final=final,
    )


def letter(ledger: Ledger, run_id: str, step: str, attempts: int = 1) -> None:
    ledger.dead_letter(
        workflow="w",
        version=1,
        run_id=run_id,
        step_key=step,
        attempts=attempts,
        error=RuntimeError(f"boom {attempts}"),
        args={},
        idempotency_key=None,
    )


def test_a_skipped_step_is_never_attempted_and_a_started_one_is_not_skipped(
    ledger: Ledger,
) -> None:
    """begin_attempt on a skipped checkpoint is refused; mark_step('skipped') on a
    running step is refused and writes no ``step_skipped`` event; skipping twice (a twin)
    is a no-op with one event."""
    run = start(ledger, "w/skip")
    ledger.mark_step(run_id=run, step_key="s", step_id="s", map_index=-1, status="skipped")
    ledger.mark_step(run_id=run, step_key="s", step_id="s", map_index=-1, status="skipped")
    with pytest.raises(IllegalTransition, match="skipped -> running"):
        attempt(ledger, run, "s")
    attempt(ledger, run, "t")
    with pytest.raises(IllegalTransition, match="running -> skipped"):
        ledger.mark_step(run_id=run, step_key="t", step_id="t", map_index=-1, status="skipped")
    assert ledger.checkpoint(run, "s").status == "skipped"  # type: ignore[union-attr]
    assert ledger.checkpoint(run, "t").status == "running"  # type: ignore[union-attr]
    assert ledger.attempts(run, "s") == []
    assert kinds(ledger, run).count("step_skipped") == 1


def test_a_lost_attempt_neither_completes_nor_fails_the_step(ledger: Ledger) -> None:
    """An attempt that a later one found lost (a hung process Airflow gave up on) is
    refused when it reports back: its completion rolls back with its effect, and its
    failure does not fail the step the later attempt is running. The later attempt
    completes the step once."""
    run = start(ledger, "w/zombie")
    old = attempt(ledger, run, "s", key="k-zombie")
    new = attempt(ledger, run, "s", key="k-zombie", tries=2)
    assert [a["status"] for a in ledger.attempts(run, "s")] == ["lost", "running"]
    with pytest.raises(IllegalTransition, match=r"attempt .*lost -> completed"):
        complete(ledger, run, "s", old, key="k-zombie")
    assert ledger.effect("k-zombie") is None  # rolled back with the refused completion
    with pytest.raises(IllegalTransition, match=r"attempt .*lost -> failed"):
        fail(ledger, run, "s", old)
    assert ledger.checkpoint(run, "s").status == "running"  # type: ignore[union-attr]
    complete(ledger, run, "s", new, key="k-zombie")
    assert ledger.checkpoint(run, "s").output == {"by": new}  # type: ignore[union-attr]
    assert [a["status"] for a in ledger.attempts(run, "s")] == ["lost", "completed"]
    assert kinds(ledger, run).count("step_completed") == 1


def test_a_failure_after_a_twin_completed_keeps_the_step_completed(ledger: Ledger) -> None:
    """Two twins started the step with no checkpoint (both first): one completes, the
    other fails; its attempt is recorded failed, the step stays completed with the
    winner's output, and the event says an attempt failed, not the step."""
    run = start(ledger, "w/twins")
    a = attempt(ledger, run, "s")
    b = attempt(ledger, run, "s")  # first=True: no sweep, both running
    complete(ledger, run, "s", a)
    fail(ledger, run, "s", b)
    assert ledger.checkpoint(run, "s").status == "completed"  # type: ignore[union-attr]
    assert [x["status"] for x in ledger.attempts(run, "s")] == ["completed", "failed"]
    assert "step_failed" not in kinds(ledger, run)


def test_saga_outcome_says_what_was_undone(ledger: Ledger) -> None:
    """finish_saga: ``compensated`` only when at least one compensation completed;
    ``compensation_failed`` when any failed (even beside a completed one);
    ``nothing_to_compensate`` when none completed (not_needed, not_compensable, or no
    rows at all); the event ``saga_<outcome>`` is written once; a second start joins."""
    cases = {
        "w/undone": [("a", "completed"), ("b", "not_needed")],
        "w/broken": [("a", "completed"), ("b", "failed")],
        "w/nothing": [("a", "not_needed"), ("b", "not_compensable")],
        "w/none": [],
    }
    want = {
        "w/undone": "compensated",
        "w/broken": "compensation_failed",
        "w/nothing": "nothing_to_compensate",
        "w/none": "nothing_to_compensate",
    }
    for run, rows in cases.items():
        start(ledger, run)
        assert ledger.start_saga(run, "b") is True
        assert ledger.start_saga(run, "c") is False  # a second failure joins it
        for step, status in rows:
            ledger.record_compensation(run, step, status, tool="demo.noop")
        assert ledger.finish_saga(run) == want[run]
        assert ledger.finish_saga(run) == want[run]
        row = ledger.run(run)
        assert row is not None and (row["saga"], row["failed_step"]) == (want[run], "b")
        assert kinds(ledger, run).count(f"saga_{want[run]}") == 1
        assert kinds(ledger, run).count("saga_compensating") == 1


def test_a_completed_compensation_marks_checkpoint_and_effect_compensated(
    ledger: Ledger,
) -> None:
    """record_compensation(..., 'completed') moves, in its own transaction, the step's
    checkpoint completed -> compensated and the effect under its key done ->
    compensated (event ``effect_compensated``): a state, not a deletion. The effect can
    then not be finished again, and the step can only run again as a new attempt."""
    run = start(ledger, "w/undo")
    first = attempt(ledger, run, "pay", key="pay-1")
    complete(ledger, run, "pay", first, key="pay-1")
    ledger.start_saga(run, "ship")
    ledger.record_compensation(run, "pay", "running", tool="demo.refund")
    ledger.record_compensation(run, "pay", "completed", tool="demo.refund")
    assert ledger.checkpoint(run, "pay").status == "compensated"  # type: ignore[union-attr]
    effect = ledger.effect("pay-1")
    assert effect is not None and (effect.status, effect.result) == ("compensated", {"by": first})
    events = [e for e in ledger.events(run) if e["kind"] == "effect_compensated"]
    assert [(e["step_key"], e["data"]) for e in events] == [("pay", {"key": "pay-1"})]
    with pytest.raises(IllegalTransition, match="compensated -> done"):
        ledger.finish_effect(key="pay-1", result={"again": True})
    assert ledger.effect("pay-1").status == "compensated"  # type: ignore[union-attr]
    # A repeated completion (a retried compensation task) changes nothing more.
    ledger.record_compensation(run, "pay", "completed", tool="demo.refund")
    assert kinds(ledger, run).count("effect_compensated") == 1
    assert ledger.finish_saga(run) == "compensated"


def test_a_compensation_of_a_step_that_never_completed_changes_nothing(
    ledger: Ledger,
) -> None:
    """A ``completed`` compensation of a step still running is refused as a whole: the
    compensation row, the checkpoint and the events are as they were."""
    run = start(ledger, "w/early")
    attempt(ledger, run, "pay", key="pay-2")
    before = kinds(ledger, run)
    with pytest.raises(IllegalTransition, match="running -> compensated"):
        ledger.record_compensation(run, "pay", "completed", tool="demo.refund")
    assert ledger.compensations(run) == {}
    assert ledger.checkpoint(run, "pay").status == "running"  # type: ignore[union-attr]
    assert kinds(ledger, run) == before


def test_completion_resolves_open_letters_up_the_retry_chain_only(ledger: Ledger) -> None:
    """complete_step resolves, in its transaction, the open dead letters of the same
    step key in its run and every run it retries (two levels up here), each with an
    event naming the completing run; a letter of an unrelated run and of another step
    stay open."""
    a, b = start(ledger, "w/a"), start(ledger, "w/b", retry_of="w/a")
    c = start(ledger, "w/c", retry_of=b)
    other = start(ledger, "w/other")
    for run in (a, b, other):
        fail(ledger, run, "s", attempt(ledger, run, "s"))
        letter(ledger, run, "s")
    fail(ledger, a, "t", attempt(ledger, a, "t"))
    letter(ledger, a, "t")
    complete(ledger, c, "s", attempt(ledger, c, "s"))
    still = {(d["run_id"], d["step_key"]) for d in ledger.dead_letters()}
    assert still == {(other, "s"), (a, "t")}
    for run in (a, b):
        resolved = [e for e in ledger.events(run) if e["kind"] == "dead_letter_resolved"]
        assert [e["data"] for e in resolved] == [{"how": "completed_by", "run_id": c}]


def test_a_dead_letter_resolves_once_and_reopens_on_a_new_final_failure(
    ledger: Ledger,
) -> None:
    """Resolving a resolved letter is a no-op (False, no second event), as the machine
    lists; an unknown letter is refused; the same step failing for good again opens its
    letter again with the newest error."""
    run = start(ledger, "w/dl")
    fail(ledger, run, "s", attempt(ledger, run, "s"))
    letter(ledger, run, "s", attempts=1)
    (row,) = ledger.dead_letters()
    assert ledger.resolve_dead_letter(row["id"], "by hand") is True
    assert ledger.resolve_dead_letter(row["id"], "by hand again") is False
    assert kinds(ledger, run).count("dead_letter_resolved") == 1
    with pytest.raises(IllegalTransition, match=r"\(none\) -> resolved"):
        ledger.resolve_dead_letter(row["id"] + 1000, "nobody")
    fail(ledger, run, "s", attempt(ledger, run, "s", tries=2))  # a cleared task
    letter(ledger, run, "s", attempts=2)
    (again,) = ledger.dead_letters()
    assert (again["id"], again["attempts"], again["error"]) == (row["id"], 2, "boom 2")


def test_a_final_failure_in_a_run_whose_retry_completed_the_step_stays_resolved(
    ledger: Ledger,
) -> None:
    """Found by the model test: run A failed at ``s``, its retry B completed ``s``
    (resolving A's letter); then a task of A was cleared and failed for good again. The
    business step is done (by B): A's letter is recorded resolved at once, naming B,
    not opened again for someone to fix what is fixed."""
    a = start(ledger, "w/late-a")
    fail(ledger, a, "s", attempt(ledger, a, "s"))
    letter(ledger, a, "s", attempts=1)
    b = start(ledger, "w/late-b", retry_of=a)
    complete(ledger, b, "s", attempt(ledger, b, "s"))
    assert ledger.dead_letters() == []
    fail(ledger, a, "s", attempt(ledger, a, "s", tries=2))  # A's task cleared, fails
    letter(ledger, a, "s", attempts=2)
    assert ledger.dead_letters() == []
    resolved = [e["data"] for e in ledger.events(a) if e["kind"] == "dead_letter_resolved"]
    assert resolved[-1] == {"how": "completed_by", "run_id": b}


def test_runs_end_once_and_reopen_when_cleared(ledger: Ledger) -> None:
    """finish_run: the same end twice is a no-op (one event); reopen_run moves an ended
    run back to running with ``run_reopened`` (old status and saga) and resets its
    saga; a running run is not reopened; the other end after an end reopens first; a
    status that is not an end is refused and nothing changes."""
    run = start(ledger, "w/ends")
    ledger.start_saga(run, "s")
    ledger.finish_saga(run)
    ledger.finish_run(run, "failed")
    ledger.finish_run(run, "failed")
    assert kinds(ledger, run).count("run_failed") == 1
    assert ledger.reopen_run(run) is True
    assert ledger.reopen_run(run) is False
    row = ledger.run(run)
    assert row is not None and (row["status"], row["saga"]) == ("running", None)
    reopened = [e["data"] for e in ledger.events(run) if e["kind"] == "run_reopened"]
    assert reopened == [{"status": "failed", "saga": "nothing_to_compensate"}]
    ledger.finish_run(run, "succeeded")
    ledger.finish_run(run, "failed")  # Airflow ran it again and it failed this time
    assert ledger.run(run)["status"] == "failed"  # type: ignore[index]
    assert kinds(ledger, run).count("run_reopened") == 2
    with pytest.raises(IllegalTransition):
        ledger.finish_run(run, "running")
    assert ledger.run(run)["status"] == "failed"  # type: ignore[index]
    ledger.finish_run("w/never-registered", "failed")  # no task ran: nothing to record
    assert ledger.run("w/never-registered") is None
