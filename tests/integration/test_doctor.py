"""``ledgerflow doctor`` against real orphans: each cause is created for real (a workflow
run by Airflow's ``dag.test()`` in a child process, its ledger on Postgres, the process
SIGKILLed mid-step the way a dead worker leaves it, then Airflow's metadata changed the
way the scheduler or an operator changes it), listed with its cause, repaired by
``--fix`` through the lifecycle machines, and a second ``--fix`` changes nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.ledger.store import Ledger

pytestmark = pytest.mark.integration

HOLD = """\
name: {name}
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: reserve
    tool: demo.reserve_inventory
    args: {{order_id: "{{{{ params.order_id }}}}", sku: sku-mug}}
    idempotency: {{key: "{{{{ params.order_id }}}}"}}
  - id: hold
    needs: [reserve]
    tool: demo.sleep
    args: {{seconds: 600, first_tries: 1}}
    idempotency: {{key: "{{{{ params.order_id }}}}"}}
"""

# The run fails after reserving; its compensation (a slow undo) is where the process dies.
UNDO = """\
name: {name}
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: reserve
    tool: demo.noop
    args: {{value: "{{{{ params.order_id }}}}"}}
    idempotency: {{key: "{{{{ params.order_id }}}}"}}
    compensate:
      tool: demo.sleep
      args: {{seconds: 600}}
  - id: ship
    needs: [reserve]
    tool: demo.fail_while
    args: {{flag: "{flag}"}}
    idempotency: natural
"""

APPROVE = """\
name: {name}
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: prepare
    tool: demo.noop
    idempotency: natural
  - id: sign_off
    needs: [prepare]
    kind: approval
    approvers: {{users: [ops]}}
    subject: "ship {{{{ params.order_id }}}}?"
    deadline: 1d
    at_deadline: reject
"""


DOCTOR = [sys.executable, "-m", "ledgerflow.cli", "doctor"]


@dataclass
class Stage:
    """One workflow in its own folder: dags, Airflow's metadata (SQLite), the ledger (Postgres)."""

    work: Path
    ledger_url: str
    env: dict[str, str]

    @property
    def metadata(self) -> Path:
        return self.work / "airflow.db"

    def airflow_sql(self, statement: str, *args: Any) -> int:
        """What the scheduler or an operator does to Airflow's own records."""
        with sqlite3.connect(self.metadata) as db:
            return db.execute(statement, args).rowcount

    def doctor(self, *options: str) -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [*DOCTOR, "--url", self.ledger_url, "--grace", "0s", "--json", *options],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)


@pytest.fixture
def stage(tmp_path: Path) -> Iterator[Callable[[str, str], Stage]]:
    from ledgerflow.testing.postgres import fresh_database

    made: list[Any] = []

    def make(name: str, workflow: str) -> Stage:
        from ledgerflow.cli_local import run_env
        from ledgerflow.cli_publish import SHIM

        work = tmp_path / name
        folder = work / "dags" / "workflows" / name
        folder.mkdir(parents=True)
        (folder / "v1.yaml").write_text(workflow)
        (folder / "v1.py").write_text(SHIM)
        ctx = fresh_database("doctor")
        url = ctx.__enter__()
        made.append(ctx)
        env = run_env(work, work / "dags")
        env["AIRFLOW_CONN_LEDGERFLOW_DB"] = url
        env["LEDGERFLOW_DEMO_TOOLS"] = "1"
        ledger_url = url.replace("postgresql://", "postgresql+psycopg2://", 1)
        Ledger(ledger_url).migrate()
        return Stage(work, ledger_url, env)

    yield make
    for ctx in made:
        ctx.__exit__(None, None, None)


def _template() -> Path:
    from ledgerflow.cli_local import _airflow_version, cache_dir

    return cache_dir() / f"airflow-{_airflow_version()}-metadata.db"


def start(stage: Stage, name: str, **params: Any) -> subprocess.Popen[bytes]:
    """``dag.test()`` of the workflow in a child process (what ``ledgerflow run`` starts)."""
    template = _template()
    if template.exists():
        shutil.copyfile(template, stage.metadata)
    request = {
        "dag_file": str(stage.work / "dags" / "workflows" / name / "v1.py"),
        "params": params,
        "decisions": {},
        "template": str(template),
        "result": str(stage.work / "result.json"),
    }
    log = open(stage.work / "airflow.log", "wb")  # noqa: SIM115 - the child's, closed by it
    return subprocess.Popen(
        [sys.executable, "-m", "ledgerflow.local_run", json.dumps(request)],
        env=stage.env,
        cwd=stage.work,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(what: Callable[[], Any], child: subprocess.Popen[bytes], stage: Stage) -> Any:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        if child.poll() is not None and not what():
            log = (stage.work / "airflow.log").read_text()[-3000:]
            raise AssertionError(f"the run ended ({child.returncode}) first:\n{log}")
        time.sleep(0.3)
    raise AssertionError("timed out")


def kill(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as a worker dies: no handler, no callback, nothing written after."""
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)


def running_attempt(ledger: Ledger, step_key: str) -> Callable[[], Any]:
    def look() -> Any:
        for run in ledger.runs(limit=5):
            for a in ledger.attempts(run["run_id"], step_key):
                if a["status"] == "running":
                    return run["run_id"]
        return None

    return look


def causes(report: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((f["cause"], f["status"]) for f in report["findings"])


def repairs_logged(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in ledger.events(run_id) if e["kind"] == "doctor_repaired"]


def test_a_killed_worker_after_its_dag_run_failed(stage: Callable[[str, str], Stage]) -> None:
    """A worker SIGKILLed while its keyed step waits on the remote call leaves the run,
    the step and the attempt running and the effect claimed; the scheduler then fails the
    task and the DagRun (its zombie detection) without the ledger hearing of it. The
    doctor lists the run (run_ended), the attempt (attempt_lost), the step
    (step_stranded) and the effect (effect_unfinished, manual: never invented); --fix
    ends the run failed, the attempt lost, the step failed, each with a doctor_repaired
    event, leaves the effect pending; a second --fix repairs nothing."""
    s = stage("dr_hold", HOLD.format(name="dr_hold"))
    ledger = Ledger(s.ledger_url)
    child = start(s, "dr_hold", order_id="o-1")
    try:
        run_id = wait_for(running_attempt(ledger, "hold"), child, s)
    finally:
        kill(child)
    dag_id, dag_run_id = run_id.split("/", 1)

    code, before = s.doctor()
    # The killed process was on this host: the attempt is lost even while Airflow still
    # says the task runs (the scheduler has not noticed yet).
    assert code == 1
    assert causes(before) == [("attempt_lost", "found")], before
    assert "is gone" in before["findings"][0]["why"]

    # The scheduler's zombie handling: the task and the run fail; the ledger never hears.
    assert s.airflow_sql(
        "UPDATE task_instance SET state='failed', end_date=CURRENT_TIMESTAMP "
        "WHERE dag_id=? AND run_id=? AND task_id='hold'",
        dag_id,
        dag_run_id,
    )
    s.airflow_sql(
        "UPDATE dag_run SET state='failed', end_date=CURRENT_TIMESTAMP WHERE dag_id=? AND run_id=?",
        dag_id,
        dag_run_id,
    )
    code, found = s.doctor()
    assert code == 1
    assert causes(found) == [
        ("attempt_lost", "found"),
        ("effect_unfinished", "found"),
        ("run_ended", "found"),
        ("step_stranded", "found"),
    ]
    assert ledger.run(run_id)["status"] == "running"  # type: ignore[index]  # no --fix: no write

    code, fixed = s.doctor("--fix")
    assert code == 1  # the effect needs a person
    assert causes(fixed) == [
        ("attempt_lost", "repaired"),
        ("effect_unfinished", "manual"),
        ("run_ended", "repaired"),
        ("step_stranded", "repaired"),
    ]
    effect = next(f for f in fixed["findings"] if f["cause"] == "effect_unfinished")
    assert f"ledgerflow retry {run_id}" in effect["manual"]
    assert ledger.run(run_id)["status"] == "failed"  # type: ignore[index]
    assert [a["status"] for a in ledger.attempts(run_id, "hold")] == ["lost"]
    assert ledger.checkpoint(run_id, "hold").status == "failed"  # type: ignore[union-attr]
    assert ledger.checkpoint(run_id, "reserve").status == "completed"  # type: ignore[union-attr]
    assert [e["status"] for e in ledger.effects(run_id) if e["tool"] == "demo.sleep"] == ["pending"]
    logged = repairs_logged(ledger, run_id)
    assert sorted(e["cause"] for e in logged) == ["attempt_lost", "run_ended", "step_stranded"]
    assert all(e["by"].startswith("ledgerflow doctor (cli") and e["why"] for e in logged)

    code, again = s.doctor("--fix")
    assert code == 1
    assert causes(again) == [("effect_unfinished", "manual")]
    assert len(repairs_logged(ledger, run_id)) == 3  # nothing repaired twice

    # The manual action's rule holds after the repairs: the task cleared in Airflow (its
    # DagRun runs again, try 2), the step runs under the kernel again, re-claims the SAME
    # key, calls once more and finishes the one effect; the doctor then finds nothing.
    s.airflow_sql(
        "UPDATE dag_run SET state='running', end_date=NULL WHERE dag_id=? AND run_id=?",
        dag_id,
        dag_run_id,
    )
    s.airflow_sql(
        "UPDATE task_instance SET state='running', try_number=2, end_date=NULL "
        "WHERE dag_id=? AND run_id=? AND task_id='hold'",
        dag_id,
        dag_run_id,
    )
    from ledgerflow.steps.protocol import RunRef, execute_step
    from ledgerflow.workflow.validate import load_workflow

    spec = load_workflow(s.work / "dags" / "workflows" / "dr_hold" / "v1.yaml")
    result = execute_step(
        ledger,
        spec,
        spec.tool_step("hold"),
        RunRef(run_id=run_id, dag_id=dag_id),
        params={"order_id": "o-1"},
        try_number=2,
        max_attempts=3,
    )
    assert result.output == {"slept": 0.0}
    held = [e for e in ledger.effects() if e["tool"] == "demo.sleep"]
    assert [(e["status"], e["idempotency_key"]) for e in held] == [("done", "dr_hold:hold:o-1")]
    assert [a["status"] for a in ledger.attempts(run_id, "hold")] == ["lost", "completed"]
    code, clean = s.doctor("--fix")
    assert (code, clean["findings"]) == (0, []), clean


def fail_dag_run(s: Stage, run_id: str) -> None:
    """What the scheduler does to a run whose worker died: its tasks and the run fail."""
    dag_id, dag_run_id = run_id.split("/", 1)
    s.airflow_sql(
        "UPDATE task_instance SET state='failed', end_date=CURRENT_TIMESTAMP "
        "WHERE dag_id=? AND run_id=? AND state IN ('running', 'deferred', 'queued')",
        dag_id,
        dag_run_id,
    )
    s.airflow_sql(
        "UPDATE dag_run SET state='failed', end_date=CURRENT_TIMESTAMP WHERE dag_id=? AND run_id=?",
        dag_id,
        dag_run_id,
    )


def test_a_saga_killed_while_compensating(
    stage: Callable[[str, str], Stage], tmp_path: Path
) -> None:
    """The run fails after `reserve`; its compensation task is SIGKILLed while undoing,
    then the DagRun fails: the saga stays `compensating` forever. The doctor lists it
    (saga_stuck) with the run, the compensation's attempt and step; --fix fails the
    compensation left running and ends the saga `compensation_failed` (never
    `compensated`: the undo did not finish), with the run failed; a second --fix
    changes nothing."""
    flag = tmp_path / "broken"
    flag.write_text("x")
    s = stage("dr_undo", UNDO.format(name="dr_undo", flag=flag))
    ledger = Ledger(s.ledger_url)
    child = start(s, "dr_undo", order_id="o-2")
    try:
        run_id = wait_for(running_attempt(ledger, "compensate__reserve"), child, s)
    finally:
        kill(child)
    assert ledger.run(run_id)["saga"] == "compensating"  # type: ignore[index]
    assert ledger.compensations(run_id)["reserve"]["status"] == "running"
    fail_dag_run(s, run_id)

    code, found = s.doctor()
    assert code == 1
    kinds = causes(found)
    assert ("saga_stuck", "found") in kinds and ("run_ended", "found") in kinds, kinds
    assert ("attempt_lost", "found") in kinds and ("step_stranded", "found") in kinds, kinds

    code, fixed = s.doctor("--fix")
    assert all(status in ("repaired", "manual") for _, status in causes(fixed)), fixed
    run = ledger.run(run_id)
    assert run is not None and (run["status"], run["saga"]) == ("failed", "compensation_failed")
    assert ledger.compensations(run_id)["reserve"]["status"] == "failed"
    assert ledger.checkpoint(run_id, "reserve").status == "completed"  # type: ignore[union-attr]
    assert "saga_stuck" in {e["cause"] for e in repairs_logged(ledger, run_id)}

    n = len(repairs_logged(ledger, run_id))
    code, again = s.doctor("--fix")
    assert all(status == "manual" for _, status in causes(again)), again
    assert len(repairs_logged(ledger, run_id)) == n


def test_an_approval_whose_run_ended(stage: Callable[[str, str], Stage]) -> None:
    """The run parks at an approval (its task deferred, no process: the doctor does not
    take the missing process for a lost attempt), then its process dies and the DagRun
    is failed by hand: the approval can never resume it. The doctor lists it
    (approval_stranded); --fix abandons it (the approval machine's `abandoned`), and a
    second --fix changes nothing."""
    s = stage("dr_ask", APPROVE.format(name="dr_ask"))
    ledger = Ledger(s.ledger_url)
    child = start(s, "dr_ask", order_id="o-3")
    # `ledgerflow run`'s process exits (3) by itself at an approval nobody decides.
    child.wait(timeout=300)
    from ledgerflow.ledger import approvals

    pending = approvals.listing(ledger, status="pending")
    assert len(pending) == 1, (s.work / "airflow.log").read_text()[-2000:]
    run_id = pending[0].run_id
    dag_id, dag_run_id = run_id.split("/", 1)
    # Inside dag.test() the trigger runs in the run's own process, so the task may still
    # be `running` when that process dies (or already `deferred`: it races). A running
    # task whose process is gone is lost:
    s.airflow_sql(
        "UPDATE task_instance SET state='running' WHERE dag_id=? AND run_id=? "
        "AND task_id='sign_off'",
        dag_id,
        dag_run_id,
    )
    code, dead = s.doctor()
    assert causes(dead) == [("attempt_lost", "found")], dead
    # A deployment's worker defers the task and exits: `deferred`, no process, not lost.
    assert s.airflow_sql(
        "UPDATE task_instance SET state='deferred' WHERE dag_id=? AND run_id=? "
        "AND task_id='sign_off'",
        dag_id,
        dag_run_id,
    )
    code, before = s.doctor()
    assert (code, causes(before)) == (0, []), before  # parked, not lost

    fail_dag_run(s, run_id)
    code, found = s.doctor()
    assert code == 1
    assert ("approval_stranded", "found") in causes(found), found
    code, fixed = s.doctor("--fix")
    assert code == 0, fixed
    assert approvals.get(ledger, pending[0].id).status == "abandoned"
    assert ledger.run(run_id)["status"] == "failed"  # type: ignore[index]
    code, again = s.doctor("--fix")
    assert (code, again["findings"]) == (0, [])


def test_a_dag_run_deleted_and_a_try_that_moved_on(stage: Callable[[str, str], Stage]) -> None:
    """A worker SIGKILLed mid-step, then the scheduler retries the task (its try number
    moves on): the old attempt is lost though the DagRun runs. Then the DagRun is deleted
    in Airflow: the ledger run is `run_missing`, repaired `failed` (never a success
    Airflow did not see). The maintenance task reports it and sends the
    `orphaned_runs` gauge; it repairs only with `[ledgerflow] doctor_fix`."""
    from ledgerflow.testing.statsd import StatsdListener

    s = stage("dr_gone", HOLD.format(name="dr_gone"))
    ledger = Ledger(s.ledger_url)
    child = start(s, "dr_gone", order_id="o-4")
    try:
        run_id = wait_for(running_attempt(ledger, "hold"), child, s)
    finally:
        kill(child)
    dag_id, dag_run_id = run_id.split("/", 1)
    assert s.airflow_sql(
        "UPDATE task_instance SET try_number=try_number+1, state='queued' "
        "WHERE dag_id=? AND run_id=? AND task_id='hold'",
        dag_id,
        dag_run_id,
    )
    code, moved = s.doctor()
    assert causes(moved) == [("attempt_lost", "found")], moved
    assert "moved on to try 2" in moved["findings"][0]["why"]

    s.airflow_sql("DELETE FROM task_instance WHERE dag_id=? AND run_id=?", dag_id, dag_run_id)
    assert s.airflow_sql("DELETE FROM dag_run WHERE dag_id=? AND run_id=?", dag_id, dag_run_id)

    statsd = StatsdListener(keep=("airflow.ledgerflow.orphaned_runs",)).start()
    try:
        env = {
            **s.env,
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__LEDGERFLOW__DOCTOR_GRACE": "1s",
        }
        time.sleep(1.1)
        report = maintenance(env)
        assert report["orphaned_runs"] == 1 and report["repaired"] == 0, report
        assert ("run_missing", "found") in causes(report)
        assert ledger.run(run_id)["status"] == "running"  # type: ignore[index]
        deadline = time.monotonic() + 10
        while (
            not statsd.gauges.get("airflow.ledgerflow.orphaned_runs")
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
        assert statsd.gauges.get("airflow.ledgerflow.orphaned_runs") == [1.0]

        fixed = maintenance({**env, "AIRFLOW__LEDGERFLOW__DOCTOR_FIX": "True"})
        assert ("run_missing", "repaired") in causes(fixed), fixed
        assert ledger.run(run_id)["status"] == "failed"  # type: ignore[index]
        by = {e["by"] for e in repairs_logged(ledger, run_id)}
        assert by and all("maintenance DAG" in b for b in by)
    finally:
        statsd.stop()
    code, again = s.doctor("--fix")
    assert (code, causes(again)) == (1, [("effect_unfinished", "manual")]), again


def maintenance(env: dict[str, str]) -> dict[str, Any]:
    """The maintenance DAG's task, in a process configured as a worker is."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json; from ledgerflow.maintenance import check_orphans; "
            "print('REPORT ' + json.dumps(check_orphans(), default=str))",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))  # type: ignore[no-any-return]


def test_an_airflow_it_cannot_read_is_an_error_not_a_gone_run(tmp_path: Path) -> None:
    """Pointed at an Airflow metadata database it cannot read, the doctor exits 2 and
    changes nothing: "cannot see the DagRun" is never taken for "the DagRun is gone"."""
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(ledger_url)
    ledger.migrate()
    ledger.ensure_run(
        run_id="shop__v1/manual__1",
        dag_id="shop__v1",
        workflow="shop",
        version=1,
        params={},
        trigger_kind="manual",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(tmp_path / "airflow")
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{tmp_path / 'empty.db'}"
    done = subprocess.run(
        [*DOCTOR, "--url", ledger_url, "--grace", "0", "--fix"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "cannot read Airflow's metadata database" in done.stderr
    assert ledger.run("shop__v1/manual__1")["status"] == "running"  # type: ignore[index]
    assert not [e for e in ledger.events("shop__v1/manual__1") if e["kind"] == "doctor_repaired"]
