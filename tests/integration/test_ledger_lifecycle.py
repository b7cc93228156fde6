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
from ledgerflow.spec.validate import load_workflow
from ledgerflow.steps.protocol import RunRef, execute_step

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
