"""A fused segment run by Airflow (``ledgerflow run``: a real ``dag.test()`` in a child
process, SQLite ledger): every step keeps its own attempts, ``when`` and dead letter
inside the one task, and the saga still undoes each completed step in its own task."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

WORKFLOW = """\
name: fz
version: 1
execution: fused
params:
  order_id: {type: string, required: true}
  decline: {type: boolean, default: false}
  skip_tail: {type: boolean, default: false}
defaults:
  retry: {max_attempts: 3, backoff: {initial: 0.2s, multiplier: 1, max: 0.2s}, jitter: none}
steps:
  - id: reserve
    tool: demo.reserve_inventory
    args: {order_id: "{{ params.order_id }}", sku: sku-mug}
    idempotency: {key: "{{ params.order_id }}"}
    compensate:
      tool: demo.release_inventory
      args: {reservation_id: "{{ steps.reserve.output.reservation_id }}"}
  - id: charge
    needs: [reserve]
    tool: demo.charge_payment
    args: {order_id: "{{ params.order_id }}", amount: 5, decline: "{{ params.decline }}"}
    idempotency: {key: "{{ params.order_id }}"}
    retry: {max_attempts: 3, backoff: {initial: 0.2s}, non_retryable: [PaymentDeclined]}
  - id: flaky
    needs: [charge]
    tool: demo.refund_payment
    args: {payment_id: "{{ steps.charge.output.payment_id }}", fail_times: 2}
    idempotency: {key: "{{ params.order_id }}"}
  - id: note
    needs: [flaky]
    when: "not params.skip_tail"
    tool: demo.noop
    idempotency: natural
  - id: tail
    needs: [note]
    tool: demo.noop
    idempotency: natural
"""


def run(
    tmp_path: Path, cache: Path, *params: str, workflow: str = WORKFLOW
) -> tuple[subprocess.CompletedProcess[str], Path]:
    (tmp_path / "dags" / "workflows" / "fz").mkdir(parents=True)
    (tmp_path / "dags" / "workflows" / "fz" / "v1.yaml").write_text(workflow)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["XDG_CACHE_HOME"] = str(cache)
    env["LEDGERFLOW_DEMO_TOOLS"] = "1"
    # The demo's offline rule-based model (what scripts/demo.sh configures).
    env["AIRFLOW_CONN_LEDGERFLOW_LLM"] = (
        '{"conn_type": "pydanticai", "extra": {"model": "ledgerflow:rules"}}'
    )
    args = [a for p in params for a in ("--param", p)]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ledgerflow.cli",
            "run",
            "dags/workflows/fz/v1.yaml",
            *args,
            "--workdir",
            "work",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, tmp_path / "work" / "ledger.db"


def rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_retries_inside_the_segment_and_a_skip_carries_to_its_end(
    tmp_path: Path, cache: Path
) -> None:
    done, db = run(tmp_path, cache, "order_id=f-1", "skip_tail=true")
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    status = dict(rows(db, "SELECT step_id, status FROM lf_steps"))
    assert status == {
        "reserve": "completed",
        "charge": "completed",
        "flaky": "completed",
        "note": "skipped",  # when: false
        "tail": "skipped",  # after a skipped step, as Airflow's trigger rule would
    }
    # The flaky step's first two attempts failed and were retried in the task.
    attempts = rows(
        db, "SELECT try_number, status FROM lf_attempts WHERE step_key = 'flaky' ORDER BY id"
    )
    assert attempts == [(1, "failed"), (2, "failed"), (3, "completed")]
    assert rows(db, "SELECT count(*) FROM lf_dead_letters") == [(0,)]
    (event,) = rows(db, "SELECT data FROM lf_events WHERE kind = 'segment_started'")
    assert '"task_id":"fused__reserve__tail"' in str(event[0]).replace(" ", "")
    assert rows(db, "SELECT status FROM lf_runs") == [("succeeded",)]


def test_a_final_failure_fails_the_segment_and_the_saga_undoes_the_steps_before_it(
    tmp_path: Path, cache: Path
) -> None:
    done, db = run(tmp_path, cache, "order_id=f-2", "decline=true")
    assert done.returncode != 0 or "failed" in done.stdout, done.stderr[-3000:]
    status = dict(rows(db, "SELECT step_id, status FROM lf_steps"))
    assert status["reserve"] == "compensated"
    assert status["charge"] == "failed"
    assert "flaky" not in status and "tail" not in status  # never started
    # Declined is non-retryable: one attempt, then the dead letter.
    assert rows(db, "SELECT try_number, status FROM lf_attempts WHERE step_key = 'charge'") == [
        (1, "failed")
    ]
    assert rows(db, "SELECT step_key FROM lf_dead_letters") == [("charge",)]
    assert rows(db, "SELECT status, saga, failed_step FROM lf_runs") == [
        ("failed", "compensated", "charge")
    ]
    undone = rows(db, "SELECT step_key, status FROM lf_compensations ORDER BY step_key")
    assert ("reserve", "completed") in undone


def test_an_llm_branch_point_ending_a_segment_follows_its_fallback(
    tmp_path: Path, cache: Path
) -> None:
    """The shipped ticket triage, fused: ``intake`` and the LLM step ``classify`` share a
    task; a ticket no category fits fails classify's check, so the segment task takes the
    fallback branch: ``route`` is skipped, ``classify_rules`` and ``close`` run."""
    root = Path(__file__).resolve().parents[2]
    source = (root / "dags/workflows/ticket_triage/v1.yaml").read_text()
    source = source.replace("name: ticket_triage", "name: fz").replace(
        "owner: support-team", "owner: support-team\nexecution: fused"
    )
    intake = "  - id: intake\n    tool: demo.noop\n    idempotency: natural\n\n"
    source = source.replace("steps:\n", "steps:\n" + intake, 1).replace(
        "    kind: llm\n", "    kind: llm\n    needs: [intake]\n", 1
    )
    done, db = run(
        tmp_path, cache, "ticket_id=t-1", "ticket=Hello there, nice weather.", workflow=source
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    status = dict(rows(db, "SELECT step_id, status FROM lf_steps"))
    assert status["intake"] == "completed" and status["classify"] == "completed"
    assert status["classify_rules"] == "completed" and status["close"] == "completed"
    assert "route" not in status  # the branch not taken: skipped by Airflow, never run
    (event,) = rows(db, "SELECT data FROM lf_events WHERE kind = 'segment_started'")
    assert '"fused__intake__classify"' in str(event[0])
    assert rows(db, "SELECT status FROM lf_runs") == [("succeeded",)]


INTERRUPTED = """\
name: fi
version: 1
execution: fused
steps:
  - id: once
    tool: demo.send_email
    args: {to: "x@example.com", subject: once, body: b}
    idempotency: none
  - id: keyed
    needs: [once]
    tool: demo.send_email
    args: {to: "x@example.com", subject: keyed, body: b}
    idempotency: {key: "{{ run.id }}"}
"""


@pytest.mark.parametrize("step_id", ["once", "keyed"])
def test_a_try_after_a_killed_one_counts_its_attempts_and_never_reruns_a_step_declared_none(
    tmp_path: Path, ledger_url: str, step_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the next try of a killed segment task finds: an attempt of the step left
    behind. A step with ``idempotency: none`` is not started again (it would be a second
    call to something that must never be called twice); a keyed step runs its next
    attempt under the same key, numbered after the killed one."""
    from sqlalchemy import text

    from ledgerflow.errors import AttemptsUsedUp
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.kernel import RunRef, register_run
    from ledgerflow.steps.segment import SegmentOperator
    from ledgerflow.workflow.validate import load_workflow

    monkeypatch.setenv("LEDGERFLOW_DEMO_TOOLS", "1")
    path = tmp_path / "fi" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(INTERRUPTED)
    spec = load_workflow(path)
    ledger = Ledger(ledger_url)
    ledger.migrate()
    run = RunRef("fi__v1/r1", "fi__v1")
    register_run(ledger, spec, run, {})
    ledger.begin_attempt(
        run_id=run.run_id,
        step_key=step_id,
        step_id=step_id,
        map_index=-1,
        try_number=1,
        args={},
        idempotency_key=None,
        first=True,
    )  # the killed try's attempt, still "running"
    task = SegmentOperator(task_id="fused__once__keyed", step_ids=["once", "keyed"])
    result, failure = task._run(ledger, spec, spec.step(step_id), run, {}, 2, 1e12)
    with ledger.engine.connect() as conn:
        sent = conn.execute(text("SELECT subject FROM demo_emails")).scalars().all()
    tries = [a["try_number"] for a in ledger.attempts(run.run_id, step_id)]
    if step_id == "once":
        assert result is None and isinstance(failure, AttemptsUsedUp)
        assert sent == [] and tries == [1]
    else:
        assert failure is None and result is not None and result.status == "completed"
        assert sent == ["keyed"] and tries == [1, 2]
