"""Benchmark: how long a saga's compensations take, in plain Airflow hops.

Target: ``compensation_hops`` <= 1.5 (median time per compensated step, from the failing
step's end to the last compensation's end / 4, over the median plain Airflow hop).

One real Airflow 3 deployment (``ledgerflow.testing.airflow_stack.AirflowStack``:
api-server, scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata) with
the ledger on a separate fresh Postgres database (``AIRFLOW_CONN_LEDGERFLOW_DB``). Its
dags folder holds:

* ``saga``  - ``workflows/saga5/v1.yaml`` + its two-line shim: 5 sequential steps
  ``s01..s05``. ``s01..s04`` are ``demo.noop`` (natural idempotency), each with a
  ``compensate`` of ``demo.noop`` (``args: {value: "undo {{ steps.<id>.output.value }}"}``);
  ``s05`` is ``demo.create_shipment`` with ``fail: true``, keyed, ``retry: {max_attempts:
  1}``: it fails at once, its failure callback starts the saga, and the teardown tasks
  ``compensate__s04 -> s03 -> s02 -> s01`` run in that order, then ``saga__finish``;
* ``plain`` - ``plain_chain.py``: a hand-written ``airflow.sdk`` DAG of 10 sequential
  ``PythonOperator`` tasks calling ``ledgerflow.tools.demo.noop`` (the plain DAG of
  ``bench/overhead.py``), to measure the plain Airflow hop on the same stack.

Both are warmed up (``WARMUP_RUNS`` runs each, until every executor worker has had a
task), then run ``--runs`` times each, interleaved (saga, plain, saga, plain...), one run
at a time. Every figure comes from Airflow's own task instance timestamps (REST):

* compensation window = ``s05``'s ``end_date`` -> the last ``compensate__*`` task's
  ``end_date``; per compensated step = window / number of compensations that ran (4);
  the same up to ``saga__finish``'s end is reported too;
* plain hop = (last task's ``end_date`` - first task's ``end_date``) / 9: the mean of
  "previous task ends -> next task ends" over the chain, the same shape as a compensation
  hop (the DagRun / 10 of ``bench/overhead.py`` is printed beside it).

Each measured saga run is checked in the ledger (``lf_runs.saga = 'compensated'``,
``failed_step = 's05'`` and exactly the 4 ``completed`` rows in ``lf_compensations``);
the script stops with an error otherwise.

Then, to say where a compensation hop's time goes: Airflow's timestamps (previous end ->
scheduled -> queued -> running -> end), the task logs (the task runner's events: start-up,
``dag_file_parse_ms``, ``execute()``, post-execute) and the ledger (the ``lf_events`` rows
``compensation_running`` / ``compensation_completed`` and the ``lf_attempts`` row of the
compensation step) split each hop, next to the same split of the plain hops.

Stack settings as in ``bench/overhead.py`` (see there): Airflow's default parallelism (32
LocalExecutor workers) and no periodic re-parse of the dags folder during the runs.

The last line is ``compensation_hops=<median(window / 4) / median plain hop>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

# bench/ is on sys.path when run as a script: share the helpers of bench/overhead.py
from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    deployment,
    finish,
    git_revision,
    logger,
    med,
    ms,
    new_base,
    write_workflow,
)
from overhead import (
    diff,
    executor_figures,
    measured_runs,
    plain_dag_source,
    secs,
    split_task,
    task_log,
)

TARGET_HOPS = 1.5
FORWARD = [f"s{i:02d}" for i in range(1, 6)]
FAILING = FORWARD[-1]
COMPENSATED = FORWARD[:-1]  # s01..s04 declare a compensate
# The order they run in: reverse of the forward order.
COMP_TASKS = [f"compensate__{s}" for s in reversed(COMPENSATED)]
FINISH = "saga__finish"
SAGA_TASKS = [*FORWARD, *COMP_TASKS, FINISH]
PLAIN_STEPS = [f"s{i:02d}" for i in range(1, 11)]
DAG_IDS = {"saga": "saga5__v1", "plain": "plain_chain"}
KINDS = tuple(DAG_IDS)
RUN_TIMEOUT_S = 240.0
SETTLE_S = 1.0  # pause between runs: the previous task processes have exited
# As in bench/overhead.py: no periodic re-parse during the runs (on 2 cores it lands at
# random inside runs of either kind), and Airflow's default parallelism, so that a task
# never waits for a LocalExecutor worker the Airflow supervisor still holds (~5 s after a
# short task).
REPARSE_INTERVAL_S = 600
PARALLELISM = 32
# Each worker pays 100-300 ms once, on its first task: warm up until every worker has had one.
WARMUP_RUNS = -(-PARALLELISM // (len(SAGA_TASKS) + len(PLAIN_STEPS)))
HELD_S = 4.5  # a task's end reported this late: the supervisor's 5 s select timeout


log = logger("compensation")


# -- the two DAGs --------------------------------------------------------------------


def workflow_yaml() -> str:
    lines = [
        "name: saga5",
        "version: 1",
        "description: 4 demo.noop steps with a demo.noop compensate each, then a step that fails.",
        "owner: bench-team",
        "tags: [bench]",
        "params:",
        "  value: {type: string, default: hello}",
        "defaults:",
        "  retry: {max_attempts: 3, backoff: {initial: 1s, multiplier: 2, max: 30s}}",
        "  timeout: 10m",
        "steps:",
    ]
    for i, step in enumerate(COMPENSATED):
        source = "params.value" if i == 0 else f"steps.{COMPENSATED[i - 1]}.output.value"
        lines.append(f"  - id: {step}")
        if i:
            lines.append(f"    needs: [{COMPENSATED[i - 1]}]")
        lines += [
            "    tool: demo.noop",
            f'    args: {{value: "{{{{ {source} }}}}"}}',
            "    idempotency: natural",
            "    compensate:",
            "      tool: demo.noop",
            f'      args: {{value: "undo {{{{ steps.{step}.output.value }}}}"}}',
        ]
    lines += [
        f"  - id: {FAILING}",
        f"    needs: [{COMPENSATED[-1]}]",
        "    tool: demo.create_shipment",
        "    args: {order_id: x, address: y, fail: true}",
        '    idempotency: {key: "{{ run.id }}"}',
        "    retry: {max_attempts: 1}",
    ]
    return "\n".join(lines) + "\n"


# The plain DAG of bench/overhead.py: retries=2 and retry_delay=1s as the Ledgerflow tasks.
PLAIN_DAG = plain_dag_source("plain_chain")  # the same baseline DAG as bench/overhead.py


def write_dags(dags: Path) -> dict[str, Path]:
    saga = write_workflow(dags, "saga5", workflow_yaml())
    (dags / "plain_chain.py").write_text(PLAIN_DAG)
    return {"saga": saga, "plain": dags / "plain_chain.py"}


# -- small helpers -------------------------------------------------------------------


def ts(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value) if value else None


def mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# -- the measured runs ---------------------------------------------------------------


def ledger_rows(ledger: Any, sql: str, **binds: Any) -> list[Any]:
    from sqlalchemy import text

    with ledger.engine.connect() as conn:
        return list(conn.execute(text(sql), binds))


def wait_callback(ledger: Any, ledger_run: str, timeout: float = 60.0) -> datetime | None:
    """The DAG's failure callback (in the dag-processor) marks the ledger run; wait for it so
    it does not run inside the next measured run. Returns when it landed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = ledger_rows(
            ledger, "SELECT status, updated_at FROM lf_runs WHERE run_id = :r", r=ledger_run
        )
        if rows and rows[0].status != "running":
            return rows[0].updated_at  # type: ignore[no-any-return]
        time.sleep(0.2)
    log(f"warning: the ledger run {ledger_run} was not finished by the DAG callback in {timeout}s")
    return None


def check_saga(ledger: Any, ledger_run: str) -> dict[str, Any]:
    """Fail loudly unless the ledger says the run was compensated, s01..s04 each once."""
    runs = ledger_rows(
        ledger, "SELECT saga, failed_step, status FROM lf_runs WHERE run_id = :r", r=ledger_run
    )
    comps = {
        r.step_key: r.status
        for r in ledger_rows(
            ledger, "SELECT step_key, status FROM lf_compensations WHERE run_id = :r", r=ledger_run
        )
    }
    saga = runs[0].saga if runs else None
    failed_step = runs[0].failed_step if runs else None
    if (
        saga != "compensated"
        or failed_step != FAILING
        or comps != dict.fromkeys(COMPENSATED, "completed")
    ):
        raise SystemExit(
            f"{ledger_run} did not compensate as expected: lf_runs.saga={saga!r}, "
            f"failed_step={failed_step!r}, lf_compensations={comps}"
        )
    return {"saga": saga, "failed_step": failed_step, "compensations": comps}


def keep_ti(t: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "task_id",
        "state",
        "try_number",
        "scheduled_when",
        "queued_when",
        "start_date",
        "end_date",
        "pid",
    )
    return {k: t.get(k) for k in keys}


def one_run(stack: Any, ledger: Any, kind: str, label: str) -> dict[str, Any]:
    dag_id = DAG_IDS[kind]
    t0 = time.monotonic()
    run_id = stack.trigger(dag_id, {"value": f"{kind}-{label}"})
    state = stack.wait_for_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
    wall = time.monotonic() - t0
    run = stack.run(dag_id, run_id)
    tis = {t["task_id"]: t for t in stack.task_instances(dag_id, run_id)}
    got = {k: (t["state"], t["try_number"]) for k, t in tis.items()}
    if kind == "plain":
        want = dict.fromkeys(PLAIN_STEPS, ("success", 1))
        want_state = "success"
    else:
        want = {s: ("success", 1) for s in [*COMPENSATED, *COMP_TASKS, FINISH]}
        want[FAILING] = ("failed", 1)
        want_state = "failed"
    if state != want_state or got != want:
        raise SystemExit(
            f"{dag_id}/{run_id} ended {state} (wanted {want_state}); task states "
            f"{got}, wanted {want}; logs under {stack.logs_dir}"
        )
    result: dict[str, Any] = {
        "kind": kind,
        "label": label,
        "dag_id": dag_id,
        "run_id": run_id,
        "run_s": secs(ts(run["end_date"]), ts(run["start_date"])),
        "wall_s": wall,
        "run": {k: run.get(k) for k in ("queued_at", "start_date", "end_date")},
        "tis": [keep_ti(tis[t]) for t in (PLAIN_STEPS if kind == "plain" else SAGA_TASKS)],
    }
    end = {k: ts(t["end_date"]) for k, t in tis.items()}
    if kind == "plain":
        hop = secs(end[PLAIN_STEPS[-1]], end[PLAIN_STEPS[0]])
        assert hop is not None
        result["plain_hop_s"] = hop / (len(PLAIN_STEPS) - 1)
        result["per_dagrun_hop_s"] = result["run_s"] / len(PLAIN_STEPS)
        return result
    ledger_run = f"{dag_id}/{run_id}"
    ran = [t for t in COMP_TASKS if tis[t]["state"] == "success"]
    last = max(end[t] for t in ran if end[t] is not None)  # type: ignore[type-var]
    window = secs(last, end[FAILING])
    assert window is not None
    order = [end[t] for t in COMP_TASKS]
    if order != sorted(order):  # type: ignore[type-var]
        raise SystemExit(f"{ledger_run}: compensations did not end in reverse order: {order}")
    landed = wait_callback(ledger, ledger_run)
    result.update(
        {
            "ledger": check_saga(ledger, ledger_run),
            "compensations_ran": len(ran),
            "window_s": window,
            "per_comp_s": window / len(ran),
            "to_finish_s": secs(end[FINISH], end[FAILING]),
            "fail_end_to_run_end_s": secs(ts(run["end_date"]), end[FAILING]),
            "callback_lag_s": secs(landed, ts(run["end_date"])),
        }
    )
    return result


# -- after the runs: split every hop with Airflow's timestamps, the task logs, the ledger --


# The split of one hop (previous task's end -> this task's end), in the order printed;
# gap_s + ti_s = hop_s, boot + startup + execute + post = ti_s, and for a compensation the
# five ledger rows add up to execute_s.
HOP_ROWS = (
    ("hop: previous task end -> this task end", "hop_s"),
    ("gap: previous end -> task running", "gap_s"),
    ("  previous end -> scheduled (scheduler)", "to_scheduled_s"),
    ("  scheduled -> queued (scheduler)", "scheduled_to_queued_s"),
    ("  queued -> running (executor, supervisor)", "queued_to_start_s"),
    ("task: running -> end (TI start->end)", "ti_s"),
    ("  running -> task process logs", "boot_s"),
    ("  start-up: bundle, DAG file parse, context", "startup_s"),
    ("    of which DAG file parse", "parse_s"),
    ("  execute()", "execute_s"),
    ("    spec, ledger, saga/checkpoint -> 'running'", "comp_pre_s"),
    ("    'running' row -> attempt row (execute_step)", "comp_setup_s"),
    ("    attempt: tool, checkpoint", "comp_attempt_s"),
    ("    attempt end -> 'completed' row", "comp_record_s"),
    ("    'completed' row -> execute() returns", "comp_return_s"),
    ("  post execute: XCom push, report success", "post_s"),
)


def split_hop(
    ti: dict[str, Any], prev_end: datetime | None, logs_dir: Path, dag_id: str, run_id: str
) -> tuple[dict[str, float | None], datetime | None, datetime | None]:
    start, end = ts(ti["start_date"]), ts(ti["end_date"])
    sched, queued = ts(ti["scheduled_when"]), ts(ti["queued_when"])
    row: dict[str, float | None] = {
        "hop_s": secs(end, prev_end),
        "gap_s": secs(start, prev_end),
        "to_scheduled_s": secs(sched, prev_end),
        "scheduled_to_queued_s": secs(queued, sched),
        "queued_to_start_s": secs(start, queued),
        "ti_s": secs(end, start),
    }
    phases = split_task(
        task_log(logs_dir, dag_id, run_id, ti["task_id"], ti["try_number"]), start, end
    )
    begin, post = phases.pop("_begin"), phases.pop("_post")
    row.update(phases)
    return row, begin, post


def analyse(results: list[dict[str, Any]], logs_dir: Path, ledger: Any) -> dict[str, Any]:
    """Every compensation hop and every plain hop (s02..s10) split; failing-step timings."""
    hops: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    runs: dict[str, list[dict[str, float | None]]] = {k: [] for k in KINDS}
    failing: list[dict[str, float | None]] = []
    for result in results:
        kind, dag_id, run_id = result["kind"], result["dag_id"], result["run_id"]
        tis = {t["task_id"]: t for t in result["tis"]}
        rows: list[dict[str, Any]] = []
        if kind == "plain":
            prev_end = ts(tis[PLAIN_STEPS[0]]["end_date"])
            for step in PLAIN_STEPS[1:]:
                row, _, _ = split_hop(tis[step], prev_end, logs_dir, dag_id, run_id)
                rows.append({"task_id": step, "position": len(rows) + 1, **row})
                prev_end = ts(tis[step]["end_date"])
        else:
            ledger_run = f"{dag_id}/{run_id}"
            events: dict[tuple[str, str], datetime] = {}
            for r in ledger_rows(
                ledger,
                "SELECT step_key, kind, at FROM lf_events WHERE run_id = :r ORDER BY id",
                r=ledger_run,
            ):
                events.setdefault((r.step_key or "", r.kind), r.at)
            attempts = {
                r.step_key: r
                for r in ledger_rows(
                    ledger,
                    "SELECT step_key, status, started_at, ended_at FROM lf_attempts "
                    "WHERE run_id = :r",
                    r=ledger_run,
                )
            }
            fail_ti = tis[FAILING]
            fail_att = attempts.get(FAILING)
            callback = events.get((FAILING, "saga_compensating"))
            failing.append(
                {
                    "ti_s": secs(ts(fail_ti["end_date"]), ts(fail_ti["start_date"])),
                    "attempt_end_to_saga_started_s": secs(
                        callback, fail_att.ended_at if fail_att else None
                    ),
                    "saga_started_to_ti_end_s": secs(ts(fail_ti["end_date"]), callback),
                }
            )
            prev_end = ts(fail_ti["end_date"])
            for task_id in COMP_TASKS:
                step = task_id.removeprefix("compensate__")
                row, begin, post = split_hop(tis[task_id], prev_end, logs_dir, dag_id, run_id)
                running = events.get((step, "compensation_running"))
                completed = events.get((step, "compensation_completed"))
                att = attempts.get(task_id)
                row.update(
                    {
                        "comp_pre_s": secs(running, begin),
                        "comp_setup_s": secs(att.started_at if att else None, running),
                        "comp_attempt_s": secs(
                            att.ended_at if att else None, att.started_at if att else None
                        ),
                        "comp_record_s": secs(completed, att.ended_at if att else None),
                        "comp_return_s": secs(post, completed),
                    }
                )
                rows.append({"task_id": task_id, "position": len(rows) + 1, **row})
                prev_end = ts(tis[task_id]["end_date"])
            fin, _, _ = split_hop(tis[FINISH], prev_end, logs_dir, dag_id, run_id)
            result["finish_hop"] = fin
        result["hops"] = rows
        hops[kind].extend(rows)
        names = {k for r in rows for k in r if k.endswith("_s")}
        runs[kind].append({n: mean(r.get(n) for r in rows) for n in names})

    out: dict[str, Any] = {}
    for kind in KINDS:
        names = {n for r in hops[kind] for n in r if n.endswith("_s")}
        out[kind] = {
            # median over all hops of the kind
            "typical": {n: med(r.get(n) for r in hops[kind]) for n in names},
            # median over runs of the run's mean per hop (these add up to the hop)
            "per_hop": {n: med(r.get(n) for r in runs[kind]) for n in names},
        }
    out["by_position"] = {
        str(p): {
            "task_id": COMP_TASKS[p - 1],
            **{n: med(r.get(n) for r in hops["saga"] if r["position"] == p) for _, n in HOP_ROWS},
        }
        for p in range(1, len(COMP_TASKS) + 1)
    }
    out["finish_hop"] = {
        n: med(r["finish_hop"].get(n) for r in results if r["kind"] == "saga")
        for _, n in HOP_ROWS[:10]
    }
    out["failing_step"] = {n: med(f[n] for f in failing) for n in failing[0]} if failing else {}
    # Runs whose failed task got its end_date only ~5 s after its callback (see the README)
    out["failing_step"]["held_runs"] = sum(
        (f["saga_started_to_ti_end_s"] or 0.0) >= HELD_S for f in failing
    )
    out["failing_step"]["runs"] = len(failing)
    return out


# -- main ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time a 5-step saga's 4 compensations on one real Airflow, in plain "
        "Airflow hops measured on the same stack, interleaved.",
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="measured runs per DAG, interleaved (default 5)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS / "compensation.json",
        help="where to write the results",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.runs < 5:
        log(f"warning: --runs {args.runs}; the benchmark asks for at least 5 runs")

    t_begin = time.monotonic()
    base = new_base("compensation")
    write_dags(base / "dags")
    extra_env = {"AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(REPARSE_INTERVAL_S)}
    with deployment(
        "compensation",
        base,
        DAG_IDS.values(),
        log,
        plugins=None,
        parallelism=PARALLELISM,
        extra_env=extra_env,
    ) as env:
        stack, ledger = env.stack, env.ledger
        results, warmups, load = measured_runs(
            stack, ledger, one_run, describe, log, args.runs, KINDS, WARMUP_RUNS, SETTLE_S
        )
        log("reading task logs and the ledger")
        per_hop = analyse(results, stack.logs_dir, ledger)
        extra = executor_figures(stack, results, load)

    report = summarise(args, results, warmups, per_hop, extra)
    report["seconds_total"] = time.monotonic() - t_begin
    log(f"results in {args.json} ({report['seconds_total']:.0f} s in all)")
    finish(args.json, report, "compensation_hops", report["compensation_hops"])
    return 0


def describe(result: dict[str, Any]) -> str:
    if result["kind"] == "plain":
        return f"DagRun {result['run_s']:.2f} s, hop {1000 * result['plain_hop_s']:.0f} ms"
    return (
        f"DagRun {result['run_s']:.2f} s, compensations {result['window_s']:.2f} s "
        f"({1000 * result['per_comp_s']:.0f} ms each), to {FINISH} {result['to_finish_s']:.2f} s"
    )


def summarise(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    warmups: list[dict[str, Any]],
    per_hop: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    sagas = [r for r in results if r["kind"] == "saga"]
    plains = [r for r in results if r["kind"] == "plain"]
    n_comp = len(COMP_TASKS)
    med_window = statistics.median(r["window_s"] for r in sagas)
    med_per_comp = statistics.median(r["per_comp_s"] for r in sagas)
    med_finish = statistics.median(r["to_finish_s"] for r in sagas)
    med_hop = statistics.median(r["plain_hop_s"] for r in plains)
    med_dagrun_hop = statistics.median(r["per_dagrun_hop_s"] for r in plains)
    hops = med_per_comp / med_hop
    per_run_hops = [s["per_comp_s"] / p["plain_hop_s"] for s, p in zip(sagas, plains, strict=True)]

    print(
        f"compensation benchmark: {len(FORWARD)}-step saga ({', '.join(COMPENSATED)} demo.noop "
        f"with a demo.noop compensate each, {FAILING} fails at once), {n_comp} compensations; "
        f"{args.runs} measured runs per DAG after {WARMUP_RUNS} warm-up runs each, interleaved "
        f"with a {len(PLAIN_STEPS)}-task plain Airflow chain, one at a time; Airflow's timestamps"
    )
    print(
        f"{'run':>4s} {'window s':>9s} {'per comp s':>11s} {'->finish s':>11s} "
        f"{'saga DagRun s':>14s} {'plain hop s':>12s} {'plain DagRun s':>15s} {'hops':>6s}"
    )
    for s, p, h in zip(sagas, plains, per_run_hops, strict=True):
        print(
            f"{s['label']:>4s} {s['window_s']:9.2f} {s['per_comp_s']:11.3f} "
            f"{s['to_finish_s']:11.2f} {s['run_s']:14.2f} {p['plain_hop_s']:12.3f} "
            f"{p['run_s']:15.2f} {h:6.2f}"
        )
    print(
        f"median compensation window ({FAILING} end -> last compensate__* end): "
        f"{med_window:.2f} s = {med_per_comp:.3f} s per compensated step ({n_comp} ran); "
        f"{FAILING} end -> {FINISH} end: {med_finish:.2f} s "
        f"({med_finish / (n_comp + 1):.3f} s per task)"
    )
    print(
        f"median plain hop (task end -> next task end, {len(PLAIN_STEPS)}-task chain): "
        f"{med_hop:.3f} s; DagRun / {len(PLAIN_STEPS)} (bench/overhead.py's per hop): "
        f"{med_dagrun_hop:.3f} s"
    )
    print(
        f"compensation hops per compensated step: {hops:.3f} (per interleaved pair: "
        f"{min(per_run_hops):.2f}-{max(per_run_hops):.2f}); target <= {TARGET_HOPS:.1f}: "
        f"{'met' if hops <= TARGET_HOPS else 'MISSED'}; difference per compensated step "
        f"{1000 * (med_per_comp - med_hop):+.0f} ms"
    )

    comp, plain = per_hop["saga"], per_hop["plain"]
    print(
        "where a hop's time goes (ms): 'per hop' = median over runs of the run's mean per hop "
        f"({n_comp} compensation hops from {FAILING}'s end; plain s02..s10); 'typical' = "
        "median over all hops"
    )
    print(
        f"  {'':48s} {'per hop:':>8s} {'comp':>6s} {'plain':>6s} {'diff':>6s}   "
        f"{'typical:':>8s} {'comp':>6s} {'plain':>6s} {'diff':>6s}"
    )
    for label, key in HOP_ROWS:
        ha, hb = comp["per_hop"].get(key), plain["per_hop"].get(key)
        ta, tb = comp["typical"].get(key), plain["typical"].get(key)
        print(
            f"  {label:48s} {'':8s} {ms(ha, 6)} {ms(hb, 6)} {ms(diff(ha, hb), 6)}   "
            f"{'':8s} {ms(ta, 6)} {ms(tb, 6)} {ms(diff(ta, tb), 6)}"
        )
    pos = per_hop["by_position"]
    fin = per_hop["finish_hop"]
    print(
        "by position (median ms: hop = gap + task; gap to scheduled; execute): "
        + "; ".join(
            f"{p['task_id']} {ms(p['hop_s'], 0)} = {ms(p['gap_s'], 0)} + {ms(p['ti_s'], 0)}"
            f" ({ms(p['to_scheduled_s'], 0)}; {ms(p['execute_s'], 0)})"
            for p in pos.values()
        )
        + f"; then {FINISH} {ms(fin.get('hop_s'), 0)} = {ms(fin.get('gap_s'), 0)} + "
        f"{ms(fin.get('ti_s'), 0)}"
    )
    failing = per_hop["failing_step"]
    print(
        f"before the window ({FAILING}, median): task {ms(failing.get('ti_s'), 0)} ms; its "
        f"failed attempt row -> failure callback's saga start "
        f"{ms(failing.get('attempt_end_to_saga_started_s'), 0)} ms; saga start -> TI end_date "
        f"{ms(failing.get('saga_started_to_ti_end_s'), 0)} ms, >= {HELD_S} s in "
        f"{failing.get('held_runs')}/{failing.get('runs')} runs (Airflow sets a failed task's "
        "end_date once the supervisor has seen the process exit, often ~5 s late: its "
        "min_heartbeat_interval); not in the window, which starts at that end_date"
    )
    busy = extra["workload_s"]
    slow = [d for d in busy if d >= 4.5]
    callbacks = [r["callback_lag_s"] for r in sagas]
    load = extra["load"]
    print(
        f"executor: {len(slow)}/{len(busy)} LocalExecutor workloads (warm-ups included) held "
        f"their worker >= 4.5 s; with parallelism {PARALLELISM} a measured task waited at most "
        f"{1000 * extra['max_queued_to_start_s']:.0f} ms from queued to running"
    )
    print(
        f"not in the window: the DAG failure callback (dag-processor) finishes the ledger run "
        f"{ms(med(callbacks), 0)} ms after the DagRun's end_date; load average "
        f"{load['start']:.1f} -> {load['end']:.1f} on {os.cpu_count()} CPUs"
    )
    return {
        "benchmark": "compensation",
        "forward_steps": len(FORWARD),
        "compensations": n_comp,
        "runs": args.runs,
        "target_hops": TARGET_HOPS,
        "compensation_hops": hops,
        "hops_per_pair": per_run_hops,
        "median_window_s": med_window,
        "median_per_compensated_step_s": med_per_comp,
        "median_to_finish_s": med_finish,
        "median_plain_hop_s": med_hop,
        "median_plain_dagrun_per_task_s": med_dagrun_hop,
        "median_saga_dagrun_s": statistics.median(r["run_s"] for r in sagas),
        "median_plain_dagrun_s": statistics.median(r["run_s"] for r in plains),
        "breakdown": per_hop,
        "callback_lag_s_median": med(callbacks),
        "workload_s": busy,
        "parallelism": PARALLELISM,
        "warmup_runs": WARMUP_RUNS,
        "reparse_interval_s": REPARSE_INTERVAL_S,
        "load": load,
        "results": results,
        "warmups": warmups,
        "workflow_yaml": workflow_yaml(),
        "git": git_revision(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


if __name__ == "__main__":
    sys.exit(main())
