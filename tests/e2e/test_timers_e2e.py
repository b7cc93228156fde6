"""Wait steps (durable timers) on real Airflow processes with Postgres: a timer parks in
the triggerer and fires, and a retry run does not wait again (a triggerer killed with
timers parked is in test_triggerer_kill_e2e.py, with approvals and event waits)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_retry_runs_e2e import cli, finished

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

DAG = "timed__v1"


def events(ledger: Ledger, run_id: str, kind: str, step: str | None = None) -> list[dict[str, Any]]:
    return [
        e
        for e in ledger.events(run_id)
        if e["kind"] == kind and (step is None or e["step_key"] == step)
    ]


def states(stack: AirflowStack, ledger_run: str) -> dict[str, str]:
    dag_id, run_id = ledger_run.split("/", 1)
    return {t["task_id"]: t["state"] for t in stack.task_instances(dag_id, run_id)}


def attempts(ledger: Ledger, run_id: str, step: str) -> list[str]:
    return [a["status"] for a in ledger.attempts(run_id, step)]


def test_a_timer_parks_in_the_triggerer_fires_and_the_run_goes_on(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """``for: 3s``: the task is deferred (no worker slot) while it waits, fires no earlier
    than planned, and the run goes on; ``until`` already past fires at once. Each timer
    is parked and fired once; its output (planned, fired, lag) is what the next step
    reads and what ``ledgerflow show`` prints."""
    run = f"{DAG}/{stack.trigger(DAG, {'ref': f'tm-{uuid.uuid4().hex[:8]}'})}"
    wait_for(lambda: states(stack, run).get("pause") == "deferred", 180, "pause deferred")
    assert finished(stack, ledger, run) == "success"
    for step in ("pause", "at"):
        assert len(events(ledger, run, "timer_parked", step)) == 1, step
        assert len(events(ledger, run, "timer_fired", step)) == 1, step
    out = ledger.outputs(run)
    pause = out["pause"]["output"]
    planned, fired = (datetime.fromisoformat(pause[k]) for k in ("planned", "fired"))
    assert fired >= planned and pause["lag_ms"] >= 0
    parked_at = events(ledger, run, "timer_parked", "pause")[0]["at"]
    assert planned - parked_at >= timedelta(seconds=2.9)
    assert out["at"]["output"]["planned"] == "2020-01-01T00:00:00+00:00"
    assert out["after"]["output"]["value"]["planned"] == out["at"]["output"]["planned"]
    assert attempts(ledger, run, "after") == ["completed"]
    shown = cli(stack, "show", run)
    assert shown.returncode == 0, shown.stderr
    assert "pause" in shown.stdout and "lag_ms" in shown.stdout


def test_a_retry_run_reuses_the_completed_timers_and_does_not_wait_again(
    stack: AirflowStack, ledger: Ledger, tmp_path: Path
) -> None:
    """A run fails after its timers fired; its retry reuses both completed timers (no new
    parking, no deferral) and runs only the failed step."""
    flag = tmp_path / "block"
    flag.touch()
    at = (datetime.now(timezone.utc) + timedelta(seconds=8)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
    conf = {"ref": f"tr-{uuid.uuid4().hex[:8]}", "at": at, "flag": str(flag)}
    original = f"{DAG}/{stack.trigger(DAG, conf)}"
    assert finished(stack, ledger, original) == "failed"
    assert len(events(ledger, original, "timer_fired")) == 2
    flag.unlink()
    done = cli(stack, "retry", original)
    assert done.returncode == 0, done.stderr + done.stdout
    retry = next(r["run_id"] for r in ledger.retries_of(original))
    assert finished(stack, ledger, retry) == "success"
    assert events(ledger, retry, "timer_parked") == []
    assert events(ledger, retry, "timer_fired") == []
    assert ledger.outputs(retry)["at"] == ledger.outputs(original)["at"]
    assert attempts(ledger, retry, "pause") == [] and attempts(ledger, retry, "at") == []
    assert attempts(ledger, retry, "after") == ["completed"]
