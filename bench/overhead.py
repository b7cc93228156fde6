"""Benchmark: what a Ledgerflow DAG costs over a hand-written Airflow DAG doing the same work.

Target: ``overhead_ratio`` <= 1.10 (median DagRun duration, Ledgerflow / plain Airflow).

One real Airflow 3 deployment (``ledgerflow.testing.airflow_stack.AirflowStack``:
api-server, scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata) with
the ledger on a separate fresh Postgres database (``AIRFLOW_CONN_LEDGERFLOW_DB``). Its
dags folder holds the same 10-step sequential workflow twice:

* ``ledgerflow`` - ``workflows/overhead/v1.yaml`` + its two-line shim: steps ``s01..s10``,
  each ``tool: demo.noop`` with ``args: {value: "{{ steps.<prev>.output.value }}"}``
  (the first one from a param);
* ``plain``      - ``plain_overhead.py``: a hand-written ``airflow.sdk`` DAG of 10
  ``PythonOperator`` tasks calling the same function (``ledgerflow.tools.demo.noop`` with a
  ``ToolContext``), each pulling the previous value from XCom. Same retries, retry delay,
  execution timeout and (default) pool as the Ledgerflow tasks.

Each DAG is warmed up (``WARMUP_RUNS`` runs, until every executor worker has had a task),
then run ``--runs`` times each, interleaved (a, b, a, b...), one run at a time. A run's duration is Airflow's own: the DagRun's ``start_date`` ->
``end_date``; first-task-start -> last-task-end comes from the task instances.

Then, to say where the extra time goes: Airflow's timestamps of every task instance, the
task logs (the task runner's own events, with its ``dag_file_parse_ms``) and the ledger's
``lf_attempts`` rows split each hop into scheduling gap, task process start-up, DAG file
parse, ``execute()`` (and, for Ledgerflow, the ledger work around the attempt row) and
the rest; fresh subprocesses time (1) the parse of each DAG file the way the task runner
does it (``BundleDagBag`` of that one file) and (2) one step's ``execute_step`` the way a
task process runs it, by ledger call and by kind of wait (connection, statements, commits).

The stack is a Ledgerflow deployment: the Ledgerflow plugin is loaded (as in
``docker-compose.yml``), so every component has imported the step code before it forks
task processes (``ledgerflow.preload``). A second, bench-only plugin file preloads the
plain DAG's imports (``PLAIN_PRELOAD``) the same way, so neither DAG starts warmer; the
fresh-process breakdowns below preload both as well.

The stack differs from ``AirflowStack``'s test defaults in two settings, both to cut noise
that hits either DAG at random (see the constants below): Airflow's default parallelism
(32 LocalExecutor workers) and no periodic re-parse of the dags folder during the runs.

The last line is ``overhead_ratio=<median DagRun duration ledgerflow / plain>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    ROOT,
    deployment,
    finish,
    git_revision,
    logger,
    med,
    ms,
    new_base,
    rounds,
    write_workflow,
)

TARGET_RATIO = 1.10
STEPS = [f"s{i:02d}" for i in range(1, 11)]
DAG_IDS = {"ledgerflow": "overhead__v1", "plain": "plain_overhead"}
KINDS = tuple(DAG_IDS)
BUNDLE = "dags-folder"  # the name Airflow gives the dags folder's bundle
PARSE_REPEATS = 5
RUN_TIMEOUT_S = 240.0
SETTLE_S = 1.0  # pause between runs: the previous task processes have exited
# The dag-processor re-parses every file every 5 s in AirflowStack (tuned for tests); on
# 2 cores that lands at random inside runs of either kind and only adds noise. The first
# parse, failure callbacks and the task runner's own parse are not affected by this setting.
REPARSE_INTERVAL_S = 600
# A LocalExecutor worker runs one task at a time, and the Airflow 3.3 supervisor often keeps
# it ~5 s after a short task has ended (apparently its 5 s min_heartbeat_interval). With
# AirflowStack's 4 workers a 10-task chain then waits seconds for a free worker at random
# hops; Airflow's default parallelism (32) leaves a free worker for every task.
PARALLELISM = 32
# Each worker pays 100-300 ms once, on its first task (queued -> running), and the
# workers take turns; so warm up until every worker has had a task.
WARMUP_RUNS = -(-PARALLELISM // (len(DAG_IDS) * len(STEPS)))


log = logger("overhead")


# -- the two DAGs --------------------------------------------------------------------


def workflow_yaml() -> str:
    lines = [
        "name: overhead",
        "version: 1",
        "description: 10 sequential demo.noop steps, each passing the previous output on.",
        "owner: bench-team",
        "tags: [bench]",
        "params:",
        "  value: {type: string, default: hello}",
        "defaults:",
        "  retry: {max_attempts: 3, backoff: {initial: 1s, multiplier: 2, max: 30s}}",
        "  timeout: 10m",
        "steps:",
    ]
    for i, step in enumerate(STEPS):
        source = "params.value" if i == 0 else f"steps.{STEPS[i - 1]}.output.value"
        lines.append(f"  - id: {step}")
        if i:
            lines.append(f"    needs: [{STEPS[i - 1]}]")
        lines += [
            "    tool: demo.noop",
            f'    args: {{value: "{{{{ {source} }}}}"}}',
            "    idempotency: natural",
        ]
    return "\n".join(lines) + "\n"


# retries=2 and retry_delay=1s are what max_attempts: 3, initial: 1s give the Ledgerflow
# tasks; execution_timeout is the workflow's 10m; both DAGs use the default pool.
PLAIN_DAG = '''"""Hand-written Airflow DAG: the 10 sequential demo.noop calls of workflows/overhead."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG, Param

from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.demo import noop


def step(prev, ti, params, dag_run):
    value = params["value"] if prev is None else ti.xcom_pull(task_ids=prev)["value"]
    run_id = f"{dag_run.dag_id}/{dag_run.run_id}"
    ctx = ToolContext(
        run_id=run_id,
        step_key=ti.task_id,
        workflow="plain_overhead",
        version=1,
        try_number=ti.try_number,
        idempotency_key=f"{run_id}:{ti.task_id}",
    )
    return noop(ctx, value=value)


with DAG(
    dag_id="plain_overhead",
    description="10 sequential demo.noop steps, each passing the previous output on.",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["bench", "plain"],
    params={"value": Param("hello", type=["string", "null"])},
    default_args={"owner": "bench-team"},
    max_active_runs=16,
):
    prev = None
    for i in range(1, 11):
        task = PythonOperator(
            task_id=f"s{i:02d}",
            python_callable=step,
            op_kwargs={"prev": prev.task_id if prev is not None else None},
            retries=2,
            retry_delay=timedelta(seconds=1),
            execution_timeout=timedelta(minutes=10),
        )
        if prev is not None:
            prev >> task
        prev = task
'''


def plain_dag_source(dag_id: str) -> str:
    """The plain DAG above under another id (bench/compensation.py uses it as its baseline)."""
    return PLAIN_DAG.replace('"plain_overhead"', f'"{dag_id}"')


# Modules of the plain DAG file, imported by a plugin file in every component (the bench's
# own): the Ledgerflow plugin preloads the step code (``ledgerflow.preload``), and this
# gives the hand-written DAG the same head start, so the ratio compares the work of a
# task, not which DAG's imports happen to be warm.
PLAIN_PRELOAD = (
    "airflow.providers.standard.operators.python",
    "ledgerflow.tools.context",
    "ledgerflow.tools.demo",
)


NO_PRELOAD_ENV = "LEDGERFLOW_BENCH_NO_PRELOAD"  # --no-preload, passed on to the children


def preload_all() -> None:
    """What a task process inherits on this bench's stack: both plugins' imports."""
    import importlib

    if os.environ.get(NO_PRELOAD_ENV):
        return
    from ledgerflow.preload import preload

    preload()
    for name in PLAIN_PRELOAD:
        importlib.import_module(name)


def write_plugins(folder: Path, preload: bool = True) -> Path:
    """The stack's plugins folder: the Ledgerflow plugin (as in ``docker-compose.yml`` and
    the e2e tests) and the plain DAG's preload; empty with ``--no-preload``."""
    folder.mkdir(parents=True)
    if not preload:
        return folder
    shutil.copy(ROOT / "plugins" / "ledgerflow_plugin.py", folder)
    lines = [f"import {name}  # noqa: F401" for name in PLAIN_PRELOAD]
    (folder / "plain_dag_preload.py").write_text(
        '"""Bench only: the plain DAG\'s imports, preloaded (see bench/overhead.py)."""\n\n'
        + "\n".join(lines)
        + "\n"
    )
    return folder


def write_dags(dags: Path) -> dict[str, Path]:
    ledgerflow = write_workflow(dags, "overhead", workflow_yaml())
    (dags / "plain_overhead.py").write_text(PLAIN_DAG)
    return {"ledgerflow": ledgerflow, "plain": dags / "plain_overhead.py"}


# -- small helpers -------------------------------------------------------------------


def ts(value: str | None) -> datetime | None:
    return None if not value else datetime.fromisoformat(value)


def secs(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


def diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# -- the measured runs ---------------------------------------------------------------


def wait_callback(ledger: Any, ledger_run: str, timeout: float = 60.0) -> datetime | None:
    """The scheduler's listener (``ledgerflow.run_listener``) marks the ledger run; wait for
    it so it does not run inside the next measured run. Returns when it landed."""
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ledger.engine.connect() as conn:
            row = conn.execute(
                text("SELECT status, updated_at FROM lf_runs WHERE run_id = :r"), {"r": ledger_run}
            ).first()
        if row is not None and row.status != "running":
            return row.updated_at  # type: ignore[no-any-return]
        time.sleep(0.2)
    log(f"warning: the ledger run {ledger_run} was not finished in {timeout}s")
    return None


def one_run(stack: Any, ledger: Any, kind: str, label: str) -> dict[str, Any]:
    dag_id = DAG_IDS[kind]
    value = f"{kind}-{label}"
    t0 = time.monotonic()
    run_id = stack.trigger(dag_id, {"value": value})
    state = stack.wait_for_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - t0
    run = stack.run(dag_id, run_id)
    tis = stack.task_instances(dag_id, run_id)
    bad = [(t["task_id"], t["state"], t["try_number"]) for t in tis if t["state"] != "success"]
    retried = [(t["task_id"], t["try_number"]) for t in tis if t["try_number"] != 1]
    if state != "success" or bad or len(tis) != len(STEPS):
        raise SystemExit(
            f"{dag_id}/{run_id} ended {state}: {bad or tis}; logs under {stack.logs_dir}"
        )
    xcom = stack.api(
        "GET",
        f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{STEPS[-1]}"
        "/xcomEntries/return_value",
    )
    if value not in str(xcom.get("value")):
        raise SystemExit(f"{dag_id}/{run_id}: {STEPS[-1]} returned {xcom.get('value')!r}")
    callback_s = None
    if kind == "ledgerflow":
        landed = wait_callback(ledger, f"{dag_id}/{run_id}")
        callback_s = secs(landed, ts(run["end_date"]))
    start, end = ts(run["start_date"]), ts(run["end_date"])
    ti_starts = [ts(t["start_date"]) for t in tis]
    ti_ends = [ts(t["end_date"]) for t in tis]
    return {
        "kind": kind,
        "label": label,
        "dag_id": dag_id,
        "run_id": run_id,
        "run_s": secs(end, start),
        "tasks_s": secs(max(e for e in ti_ends if e), min(s for s in ti_starts if s)),
        "queued_to_start_s": secs(start, ts(run.get("queued_at"))),
        "wall_s": wall,
        "callback_lag_s": callback_s,
        "retried": retried,
        "run": {k: run.get(k) for k in ("queued_at", "start_date", "end_date")},
        "tis": [
            {
                k: t.get(k)
                for k in (
                    "id",
                    "task_id",
                    "try_number",
                    "scheduled_when",
                    "queued_when",
                    "start_date",
                    "end_date",
                    "pid",
                )
            }
            for t in tis
        ],
    }


# -- after the runs: per-task split from Airflow's timestamps, the task logs, the ledger --


def describe(result: dict[str, Any]) -> str:
    return f"DagRun {result['run_s']:.2f} s, tasks {result['tasks_s']:.2f} s"


def measured_runs(
    stack: Any,
    ledger: Any,
    one_run: Callable[[Any, Any, str, str], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    log: Callable[[str], None],
    runs: int,
    kinds: Sequence[str],
    warmup: int,
    settle: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Warm-up rounds, then ``runs`` measured runs of each kind, interleaved a, b, a, b,
    one at a time and ``settle`` s apart: (measured, warm-ups, the load average at the
    start and end of the measured ones). bench/compensation.py runs its kinds this way too."""
    results: list[dict[str, Any]] = []
    warmups: list[dict[str, Any]] = []
    load = {"start": os.getloadavg()[0], "end": 0.0}
    width = max(map(len, kinds))
    for label, warm, order in rounds(runs, kinds, warmup=warmup, alternate=False):
        if label == "1":
            load["start"] = os.getloadavg()[0]
        for kind in order:
            result = one_run(stack, ledger, kind, label)
            (warmups if warm else results).append(result)
            what = f"warm-up {label}" if warm else f"run {label}/{runs}"
            log(f"{what} {kind:{width}s} {describe(result)} (load {os.getloadavg()[0]:.1f})")
            time.sleep(settle)
    load["end"] = os.getloadavg()[0]
    return results, warmups, load


def executor_figures(
    stack: Any, results: list[dict[str, Any]], load: dict[str, float]
) -> dict[str, Any]:
    """The load, how long each LocalExecutor workload held its worker, and the longest
    wait of a measured task from queued to running."""
    return {
        "load": load,
        "workload_s": workload_durations(stack.log_path("scheduler")),
        "max_queued_to_start_s": max(
            secs(ts(t["start_date"]), ts(t["queued_when"])) or 0.0
            for r in results
            for t in r["tis"]
        ),
    }


def task_log(logs_dir: Path, dag_id: str, run_id: str, task_id: str, try_number: int) -> list[Any]:
    path = (
        logs_dir
        / f"dag_id={dag_id}"
        / f"run_id={run_id}"
        / f"task_id={task_id}"
        / f"attempt={try_number}.log"
    )
    events = []
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except OSError:
        return []
    return events


def split_task(events: list[dict[str, Any]], start: datetime | None, end: datetime | None) -> dict:
    """Phases of one task process from its own log (the task runner's structured events).

    boot + startup + execute + post = the TI's start_date -> end_date."""

    def first(event: str) -> dict[str, Any] | None:
        return next((e for e in events if e.get("event") == event), None)

    pre = first("::group::Pre Execute")
    parsed = first("Worker startup parse complete")
    # ``::endgroup::`` closes "Pre Execute" right before ``execute()`` is called, and
    # "Post Execute" opens as soon as it has returned.
    t_pre, t_begin, t_post = (
        ts(e["timestamp"]) if e else None
        for e in (pre, first("::endgroup::"), first("::group::Post Execute"))
    )
    return {
        "boot_s": secs(t_pre, start),  # TI marked running -> the task process logs
        "startup_s": secs(t_begin, t_pre),  # bundle, DAG file parse, context
        "parse_s": parsed["dag_file_parse_ms"] / 1000 if parsed else None,
        "execute_s": secs(t_post, t_begin),
        "post_s": secs(end, t_post),  # XCom push, finalizers, success reported
        "_begin": t_begin,
        "_post": t_post,
    }


# Components of a run, in the order they are printed; a run's gap_s + ti_s over its tasks
# plus tail_s add up to its DagRun start_date -> end_date.
COMPONENTS_ROWS = (
    ("hop gap: previous end -> task running", "gap_s"),
    ("  previous end -> scheduled", "to_scheduled_s"),
    ("  scheduled -> queued", "scheduled_to_queued_s"),
    ("  queued -> running (executor, supervisor)", "queued_to_start_s"),
    ("task: running -> end (TI start->end)", "ti_s"),
    ("  running -> task process logs", "boot_s"),
    ("  start-up: bundle, parse, context", "startup_s"),
    ("    of which DAG file parse", "parse_s"),
    ("  execute()", "execute_s"),
    ("    up to the attempt row", "before_attempt_s"),
    ("    attempt row -> checkpoint", "attempt_s"),
    ("    commit -> execute() returns", "after_attempt_s"),
    ("  post execute: XCom push, report success", "post_s"),
    ("last task end -> DagRun end (once per run)", "tail_s"),
)


def put(rows: dict[str, list[float]], name: str, value: float | None) -> None:
    if value is not None:
        rows[name].append(value)


def analyse(results: list[dict[str, Any]], logs_dir: Path, ledger: Any) -> dict[str, Any]:
    """Split every measured task with Airflow's timestamps, its log and the ledger.

    Returns per kind ``typical`` (median over all tasks) and ``per_hop`` (median over runs
    of the run's total / number of steps, so these add up to the DagRun duration)."""
    from sqlalchemy import text

    samples: dict[str, list[dict[str, list[float]]]] = {k: [] for k in KINDS}
    for result in results:
        kind = result["kind"]
        rows: dict[str, list[float]] = defaultdict(list)
        tis = {t["task_id"]: t for t in result["tis"]}
        prev_end = ts(result["run"]["start_date"])
        attempts: dict[str, Any] = {}
        if kind == "ledgerflow":
            with ledger.engine.connect() as conn:
                for row in conn.execute(
                    text(
                        "SELECT step_key, started_at, ended_at FROM lf_attempts "
                        "WHERE run_id = :r AND status = 'completed'"
                    ),
                    {"r": f"{result['dag_id']}/{result['run_id']}"},
                ):
                    attempts[row.step_key] = row

        for step in STEPS:
            ti = tis[step]
            start, end = ts(ti["start_date"]), ts(ti["end_date"])
            sched, queued = ts(ti["scheduled_when"]), ts(ti["queued_when"])
            put(rows, "gap_s", secs(start, prev_end))
            put(rows, "to_scheduled_s", secs(sched, prev_end))
            put(rows, "scheduled_to_queued_s", secs(queued, sched))
            put(rows, "queued_to_start_s", secs(start, queued))
            put(rows, "ti_s", secs(end, start))
            phases = split_task(
                task_log(logs_dir, result["dag_id"], result["run_id"], step, ti["try_number"]),
                start,
                end,
            )
            begin, post = phases.pop("_begin"), phases.pop("_post")
            for name, value in phases.items():
                put(rows, name, value)
            att = attempts.get(step)
            if att is not None:
                # execute() starts -> the attempt row: spec lookup, engine, migrate check,
                # run row, checkpoint lookup, outputs of earlier steps, rendering the args
                put(rows, "before_attempt_s", secs(att.started_at, begin))
                # the attempt: its row, the tool call, the checkpoint (before the commit)
                put(rows, "attempt_s", secs(att.ended_at, att.started_at))
                # commit, JSON round trip of the output, the log line -> execute() returns
                put(rows, "after_attempt_s", secs(post, att.ended_at))
            prev_end = end
        put(rows, "tail_s", secs(ts(result["run"]["end_date"]), prev_end))
        samples[kind].append(rows)

    n = len(STEPS)
    out: dict[str, Any] = {}
    for kind, runs in samples.items():
        names = {name for rows in runs for name in rows}
        out[kind] = {
            "typical": {
                name: med(v for rows in runs for v in rows.get(name, [])) for name in names
            },
            "per_hop": {
                name: med(sum(rows[name]) / n for rows in runs if rows.get(name)) for name in names
            },
        }
    return out


def workload_durations(scheduler_log: Path) -> list[float]:
    """How long each LocalExecutor worker was busy per task (the supervisor's own figure)."""
    found = []
    try:
        for line in scheduler_log.read_text(errors="replace").splitlines():
            if "Workload finished" in line:
                match = re.search(r"duration=([0-9.]+)", line)
                if match:
                    found.append(float(match.group(1)))
    except OSError:
        pass
    return found


# -- breakdown (1): the task runner's parse of one DAG file, in a fresh process -------------


def child_parse(dag_file: str, bundle_path: str) -> None:
    # What a task process already has when it parses its DAG file.
    import airflow.sdk.execution_time.task_runner  # noqa: F401
    from airflow.dag_processing.dagbag import BundleDagBag

    preload_all()

    before = set(sys.modules)
    c0 = time.process_time()
    t0 = time.perf_counter()
    bag = BundleDagBag(
        dag_folder=dag_file,
        safe_mode=False,
        load_op_links=False,
        bundle_path=Path(bundle_path),
        bundle_name=BUNDLE,
    )
    t1 = time.perf_counter()
    cpu = time.process_time() - c0
    new = sorted(set(sys.modules) - before)
    print(
        json.dumps(
            {
                "parse_s": t1 - t0,
                "cpu_s": cpu,
                "dags": sorted(bag.dags),
                "import_errors": {k: v[-1500:] for k, v in bag.import_errors.items()},
                "new_modules": len(new),
                "new_top_packages": sorted({m.split(".")[0] for m in new}),
            }
        )
    )


def parse_costs(files: dict[str, Path], dags: Path, home: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for r in range(PARSE_REPEATS):
        for kind in KINDS if r % 2 == 0 else tuple(reversed(KINDS)):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child-parse"]
            cmd += [str(files[kind]), str(dags)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if proc.returncode != 0 or not lines:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"parse child for {kind} failed ({proc.returncode})")
            result = json.loads(lines[-1])
            if result["import_errors"] or DAG_IDS[kind] not in result["dags"]:
                raise SystemExit(f"parse child for {kind}: {result}")
            out[kind].append(result)
            log(f"parse {r + 1}/{PARSE_REPEATS} {kind:10s} {1000 * result['parse_s']:.0f} ms")
    return {
        kind: {
            "parse_s_median": statistics.median(x["parse_s"] for x in items),
            "cpu_s_median": statistics.median(x["cpu_s"] for x in items),
            "parse_s": [x["parse_s"] for x in items],
            "new_modules": items[0]["new_modules"],
            "new_top_packages": items[0]["new_top_packages"],
        }
        for kind, items in out.items()
    }


# -- breakdown (2b): one step's ledger work in a fresh process, call by call ------------


def child_step(dag_file: str, bundle_path: str, run_id: str) -> None:
    """What ``StepOperator.execute`` does for step s02 in a task process, timed.

    Like a task process, this one has the task runner, psycopg2 (with ``extras``),
    SQLAlchemy's Postgres dialect and the parsed DAG file loaded before the clock starts, and makes its own engine and connection. Two views of
    the same time: by call (every public ``Ledger`` method, outermost calls only, and the
    tool) and by kind of wait (opening the connection, SQL statements, commits)."""
    import functools
    import inspect

    import airflow.sdk.execution_time.task_runner  # noqa: F401

    # The workers are forks of the scheduler, which has these for its own Postgres engine
    import psycopg2.extras  # noqa: F401
    import sqlalchemy.dialects.postgresql.psycopg2  # noqa: F401
    from airflow.dag_processing.dagbag import BundleDagBag
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    preload_all()

    BundleDagBag(
        dag_folder=dag_file,
        safe_mode=False,
        load_op_links=False,
        bundle_path=Path(bundle_path),
        bundle_name=BUNDLE,
    )
    from ledgerflow.factory import spec_for_dag
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.protocol import RunRef, execute_step
    from ledgerflow.tools.registry import Tool

    by_call: dict[str, float] = defaultdict(float)
    by_wait: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    statements: list[tuple[str, float]] = []
    depth = [0]

    def timed(owner: Any, name: str, label: str, sink: dict[str, float], nest: bool) -> None:
        fn = getattr(owner, name)

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            depth[0] += nest
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= nest
                if not nest or depth[0] == 0:
                    sink[label] += time.perf_counter() - t
                    counts[label] += 1

        setattr(owner, name, wrapper)

    for name, fn in list(vars(Ledger).items()):
        # ``begin`` is a context manager: its commit is timed below, with the others
        if not name.startswith("_") and inspect.isfunction(fn) and name != "begin":
            timed(Ledger, name, f"Ledger.{name}", by_call, True)
    timed(Tool, "call", "tool call (noop)", by_call, True)

    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        conn.info["bench_t"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        elapsed = time.perf_counter() - conn.info.pop("bench_t", time.perf_counter())
        statements.append((" ".join(statement.split())[:70], elapsed))

    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)

    t0 = time.perf_counter()
    spec = spec_for_dag(DAG_IDS["ledgerflow"])
    step = spec.step(STEPS[1])
    t1 = time.perf_counter()
    ledger = Ledger.from_airflow()
    by_call["Ledger.from_airflow (URL, engine)"] = time.perf_counter() - t1
    dialect = type(ledger.engine.dialect)
    timed(dialect, "connect", "open the connection", by_wait, False)
    timed(dialect, "do_commit", "commits", by_wait, False)
    timed(dialect, "do_rollback", "rollbacks", by_wait, False)
    t2 = time.perf_counter()
    result = execute_step(
        ledger,
        spec,
        step,
        RunRef(run_id=run_id, dag_id=spec.dag_id),
        params={"value": "cold"},
        try_number=1,
        max_attempts=3,
    )
    t3 = time.perf_counter()
    assert result.status == "completed", result
    by_wait["SQL statements"] = sum(d for _, d in statements)
    counts["SQL statements"] = len(statements)
    print(
        json.dumps(
            {
                "total_s": t3 - t0,
                "execute_step_s": t3 - t2,
                "by_call_s": by_call,
                "by_wait_s": by_wait,
                "counts": counts,
                "statements": statements,
            }
        )
    )


def cold_steps(files: dict[str, Path], dags: Path, home: Path, ledger: Any, url: str) -> dict:
    from ledgerflow.steps.protocol import RunRef, execute_step
    from ledgerflow.workflow.validate import load_workflow

    spec = load_workflow(files["ledgerflow"].with_suffix(".yaml"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "AIRFLOW_CONN_LEDGERFLOW_DB": url,
        }
    )
    items = []
    for i in range(PARSE_REPEATS):
        run_id = f"{spec.dag_id}/bench_cold_{i}_{os.getpid()}"
        # s01 here (warm, untimed), so that s02 in the child is a step in the middle of a run
        execute_step(
            ledger, spec, spec.step(STEPS[0]), RunRef(run_id, spec.dag_id), params={"value": "x"}
        )
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-step"]
        cmd += [str(files["ledgerflow"]), str(dags), run_id]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"step child failed ({proc.returncode})")
        items.append(json.loads(lines[-1]))
        log(f"cold step {i + 1}/{PARSE_REPEATS}: {1000 * items[-1]['total_s']:.0f} ms")

    def medians(field: str) -> dict[str, float]:
        names = {name: None for x in items for name in x[field]}
        values = {n: statistics.median(x[field].get(n, 0.0) for x in items) for n in names}
        return dict(sorted(values.items(), key=lambda kv: -kv[1]))

    total = statistics.median(x["total_s"] for x in items)
    by_call, by_wait = medians("by_call_s"), medians("by_wait_s")
    return {
        "total_s_median": total,
        "by_call_s": by_call,
        "by_call_other_s": total - sum(by_call.values()),
        "by_wait_s": by_wait,
        "by_wait_python_s": total - sum(by_wait.values()),
        "counts": medians("counts"),
        "statements_first_child": items[0]["statements"],
        "runs": [{k: v for k, v in x.items() if k != "statements"} for x in items],
    }


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run the same 10-step sequential workflow as a Ledgerflow DAG and as a "
        "hand-written Airflow DAG on one real Airflow, interleaved; compare DagRun durations.",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="measured runs per DAG, interleaved (default 5)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave the Airflow stack running and print its URL"
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "overhead.json", help="where to write the results"
    )
    parser.add_argument(
        "--no-preload",
        action="store_true",
        help="no plugins: neither the Ledgerflow plugin nor the plain DAG's preload (every "
        "task process imports its DAG's modules itself)",
    )
    parser.add_argument("--child-parse", nargs=2, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--child-step", nargs=3, metavar="ARG", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_parse:
        child_parse(*args.child_parse)
        return 0
    if args.child_step:
        child_step(*args.child_step)
        return 0
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.runs < 5:
        log(f"warning: --runs {args.runs}; the benchmark asks for at least 5 runs each")
    if args.no_preload:
        os.environ[NO_PRELOAD_ENV] = "1"

    t_begin = time.monotonic()
    base = new_base("overhead")
    files = write_dags(base / "dags")
    extra_env = {"AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(REPARSE_INTERVAL_S)}
    with deployment(
        "overhead",
        base,
        DAG_IDS.values(),
        log,
        plugins=write_plugins(base / "plugins", preload=not args.no_preload),
        parallelism=PARALLELISM,
        extra_env=extra_env,
        remove_base=False,  # the parse costs below use its DAG files
    ) as env:
        stack, ledger = env.stack, env.ledger
        results, warmups, load = measured_runs(
            stack, ledger, one_run, describe, log, args.runs, KINDS, WARMUP_RUNS, SETTLE_S
        )
        log("reading task logs and the ledger")
        per_task = analyse(results, stack.logs_dir, ledger)
        extra = {"preload": not args.no_preload, **executor_figures(stack, results, load)}
        log("one step's ledger work in a fresh process, call by call")
        extra["cold_step"] = cold_steps(
            files, base / "dags", base / "step_home", ledger, env.ledger_url
        )
        env.keep = args.keep

    log("parse cost of each DAG file in a fresh process (as the task runner parses it)")
    parse = parse_costs(files, base / "dags", base / "parse_home")
    report = summarise(args, results, warmups, per_task, parse, extra)
    report["seconds_total"] = time.monotonic() - t_begin
    log(f"results in {args.json} ({report['seconds_total']:.0f} s in all)")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    finish(args.json, report, "overhead_ratio", report["overhead_ratio"])
    return 0


def summarise(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    warmups: list[dict[str, Any]],
    per_task: dict[str, Any],
    parse: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    runs = {k: [r for r in results if r["kind"] == k] for k in KINDS}
    n = len(STEPS)
    med_run = {k: statistics.median(r["run_s"] for r in v) for k, v in runs.items()}
    med_tasks = {k: statistics.median(r["tasks_s"] for r in v) for k, v in runs.items()}
    ratio = med_run["ledgerflow"] / med_run["plain"]
    ratio_tasks = med_tasks["ledgerflow"] / med_tasks["plain"]
    hop = {k: per_task[k]["per_hop"] for k in KINDS}
    typ = {k: per_task[k]["typical"] for k in KINDS}

    print(
        f"overhead benchmark: {n}-step sequential workflow, {args.runs} measured runs per DAG "
        f"after {WARMUP_RUNS} warm-up runs each, interleaved, one at a time; durations from "
        "Airflow's timestamps; "
        + ("both DAGs' modules preloaded by plugins" if extra["preload"] else "no plugins")
    )
    print(f"{'run':>4s} {'kind':12s} {'DagRun s':>9s} {'tasks s':>8s} {'DagRun s/hop':>13s}")
    for r in results:
        print(
            f"{r['label']:>4s} {r['kind']:12s} {r['run_s']:9.2f} {r['tasks_s']:8.2f} "
            f"{r['run_s'] / n:13.3f}"
        )
    for k in KINDS:
        print(
            f"median {k:10s}: DagRun start->end {med_run[k]:.2f} s ({med_run[k] / n:.3f} s/hop); "
            f"first task start -> last task end {med_tasks[k]:.2f} s "
            f"({med_tasks[k] / n:.3f} s/hop)"
        )
    pairs = [
        a["run_s"] / b["run_s"] for a, b in zip(runs["ledgerflow"], runs["plain"], strict=True)
    ]
    print(
        "spread: DagRun min-max "
        + ", ".join(
            f"{k} {min(r['run_s'] for r in v):.2f}-{max(r['run_s'] for r in v):.2f} s"
            for k, v in runs.items()
        )
        + f"; ratio within each interleaved pair: median {statistics.median(pairs):.3f}, "
        f"{min(pairs):.2f}-{max(pairs):.2f}"
    )
    print(
        f"ratio of medians ledgerflow/plain: DagRun {ratio:.3f}, first-to-last task "
        f"{ratio_tasks:.3f}; target <= {TARGET_RATIO:.2f}: "
        f"{'met' if ratio <= TARGET_RATIO else 'MISSED'}; difference per hop "
        f"{1000 * (med_run['ledgerflow'] - med_run['plain']) / n:+.0f} ms"
    )

    print(
        "where a hop's time goes (ms): 'per hop' = median over runs of the run's total / "
        f"{n} (adds up to the DagRun); 'typical' = median over all tasks"
    )
    print(
        f"  {'':44s} {'per hop:':>8s} {'lf':>6s} {'plain':>6s} {'diff':>6s}   "
        f"{'typical:':>8s} {'lf':>6s} {'plain':>6s} {'diff':>6s}"
    )
    for label, key in COMPONENTS_ROWS:
        ha, hb = hop["ledgerflow"].get(key), hop["plain"].get(key)
        ta, tb = typ["ledgerflow"].get(key), typ["plain"].get(key)
        print(
            f"  {label:44s} {'':8s} {ms(ha, 6)} {ms(hb, 6)} {ms(diff(ha, hb), 6)}   "
            f"{'':8s} {ms(ta, 6)} {ms(tb, 6)} {ms(diff(ta, tb), 6)}"
        )
    busy = extra["workload_s"]
    slow = [d for d in busy if d >= 4.5]
    launch = extra["max_queued_to_start_s"]
    print(
        f"executor: {len(slow)}/{len(busy)} LocalExecutor workloads (warm-ups included) held "
        f"their worker >= 4.5 s for tasks of typically {ms(typ['plain'].get('ti_s'), 0)} ms "
        f"(the Airflow supervisor, apparently its 5 s min_heartbeat_interval); with parallelism "
        f"{PARALLELISM} a measured task waited at most {1000 * launch:.0f} ms from queued to "
        "running"
    )

    plf, ppl = parse["ledgerflow"], parse["plain"]
    print(
        f"breakdown 1, parse per task: BundleDagBag of the one DAG file in a fresh process "
        f"with the task runner loaded, median of {PARSE_REPEATS}: ledgerflow "
        f"{1000 * plf['parse_s_median']:.0f} ms (CPU {1000 * plf['cpu_s_median']:.0f}, "
        f"{plf['new_modules']} new modules), plain {1000 * ppl['parse_s_median']:.0f} ms "
        f"(CPU {1000 * ppl['cpu_s_median']:.0f}, {ppl['new_modules']} new modules): "
        f"{1000 * (plf['parse_s_median'] - ppl['parse_s_median']):+.0f} ms; in the workers "
        f"(dag_file_parse_ms of the task logs, typical): {ms(typ['ledgerflow'].get('parse_s'), 0)} "
        f"vs {ms(typ['plain'].get('parse_s'), 0)} ms"
    )
    lf, pl = typ["ledgerflow"], typ["plain"]
    print(
        f"breakdown 2, ledger work per step (typical): execute() {ms(lf.get('execute_s'), 0)} ms "
        f"(ledgerflow: engine, migrate check, run row, checkpoint lookup, outputs, attempt row, "
        f"noop, checkpoint, commit) vs {ms(pl.get('execute_s'), 0)} ms (plain: xcom_pull + "
        f"noop): {ms(diff(lf.get('execute_s'), pl.get('execute_s')), 0)} ms; of it "
        f"{ms(lf.get('before_attempt_s'), 0)} ms before the attempt row, "
        f"{ms(lf.get('attempt_s'), 0)} ms lf_attempts started_at->ended_at, "
        f"{ms(lf.get('after_attempt_s'), 0)} ms after"
    )
    cold = extra["cold_step"]
    counts = cold["counts"]
    print(
        f"breakdown 2b, one step in a fresh process as a task runs it (s02 of a run, after the "
        f"DAG file is parsed), median of {PARSE_REPEATS}: {ms(cold['total_s_median'], 0)} ms; "
        "by call: "
        + ", ".join(f"{name} {ms(v, 0)}" for name, v in cold["by_call_s"].items())
        + f", other {ms(cold['by_call_other_s'], 0)} ms; by wait: "
        + ", ".join(
            f"{name} {ms(v, 0)} ({counts.get(name, 0):.0f})"
            for name, v in cold["by_wait_s"].items()
        )
        + f", Python {ms(cold['by_wait_python_s'], 0)} ms (first use in the process: imports, "
        "engine and dialect set-up, statement compilation, the tool's argument model)"
    )
    callbacks = [r["callback_lag_s"] for r in runs["ledgerflow"]]
    load = extra["load"]
    print(
        f"not in the DagRun: the scheduler's listener finishes the ledger run "
        f"{ms(med(callbacks), 0)} ms after end_date; load average {load['start']:.1f} -> "
        f"{load['end']:.1f} on {os.cpu_count()} CPUs"
    )
    return {
        "benchmark": "overhead",
        "steps": n,
        "runs": args.runs,
        "target_ratio": TARGET_RATIO,
        "overhead_ratio": ratio,
        "ratio_first_to_last_task": ratio_tasks,
        "ratio_per_pair": pairs,
        "median_run_s": med_run,
        "median_first_to_last_task_s": med_tasks,
        "median_run_s_per_hop": {k: v / n for k, v in med_run.items()},
        "breakdown_per_hop_s": hop,
        "breakdown_typical_task_s": typ,
        "parse": parse,
        "callback_lag_s_median": med(callbacks),
        "workload_s": busy,
        "parallelism": PARALLELISM,
        "preload": extra["preload"],
        "warmup_runs": WARMUP_RUNS,
        "reparse_interval_s": REPARSE_INTERVAL_S,
        "load": load,
        "results": results,
        "warmups": warmups,
        "cold_step": cold,
        "git": git_revision(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    sys.exit(main())
