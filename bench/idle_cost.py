"""Benchmark: what ``[scheduler] scheduler_idle_sleep_time`` buys and what it costs.

The setting ``docs/latency.md`` recommends (0.05 s, Airflow's default is 1 s), measured on
one real Airflow (``harness.deployment``, LocalExecutor, Postgres metadata): for each
value, the scheduler is restarted with it, then

* buys: the median length of a 5-step ``demo.noop`` chain (Airflow's ``queued_at`` ->
  ``end_date``), ``--runs`` runs one after the other;
* costs: with nothing to run, the CPU the scheduler's process tree uses (psutil, over
  ``--idle`` seconds, as % of one core) and the transactions the metadata database commits
  per second in that window (``pg_stat_database``: every component's, so the other
  components' share is in the figure of every value alike).

The last line is ``idle_scheduler_cpu_pct=<% of a core at 0.05 s>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    deployment,
    finish,
    logger,
    new_base,
    write_workflow,
)

DAG_ID = "idle_chain__v1"
WORKFLOW = "name: idle_chain\nversion: 1\nsteps:\n" + "".join(
    f"  - id: s{i}\n    tool: demo.noop\n    idempotency: natural\n"
    + (f"    needs: [s{i - 1}]\n" if i > 1 else "")
    for i in range(1, 6)
)
SETTING = "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME"
log = logger("idle_cost")


def _ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children, now."""
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def commits(db_url: str) -> int:
    import sqlalchemy as sa

    url = sa.make_url(db_url)
    engine = sa.create_engine(url.set(drivername="postgresql+psycopg2"))
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text(
                        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                        "WHERE datname = :d"
                    ),
                    {"d": url.database},
                ).scalar_one()
            )
    finally:
        engine.dispose()


def measure(stack: Any, value: str, runs: int, idle: float) -> dict[str, Any]:
    stack.env[SETTING] = value
    stack.restart("scheduler")
    time.sleep(5)  # the restarted scheduler's first loops (adoption, checks)
    lengths = []
    for _ in range(runs):
        run_id = stack.trigger(DAG_ID)
        if stack.wait_for_run(DAG_ID, run_id, timeout=180) != "success":
            raise RuntimeError(f"{DAG_ID}/{run_id} failed")
        run = stack.run(DAG_ID, run_id)
        lengths.append(_ts(run["end_date"]) - _ts(run["queued_at"]))
        time.sleep(1)
    time.sleep(6)  # the last run's task processes exit
    pid = stack.pid("scheduler")
    cpu0, tx0, t0 = tree_cpu(pid), commits(stack.db_url), time.monotonic()
    time.sleep(idle)
    cpu1, tx1, t1 = tree_cpu(pid), commits(stack.db_url), time.monotonic()
    out = {
        "idle_sleep_s": float(value),
        "run_s": lengths,
        "median_run_s": statistics.median(lengths),
        "idle_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "idle_tx_per_s": (tx1 - tx0) / (t1 - t0),
    }
    log(
        f"idle sleep {value} s: 5-step run {out['median_run_s']:.2f} s, idle scheduler "
        f"{out['idle_cpu_pct']:.1f}% of a core, metadata DB {out['idle_tx_per_s']:.0f} tx/s"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", default="1,0.2,0.05", help="idle sleeps to compare (s)")
    parser.add_argument("--runs", type=int, default=5, help="5-step runs per value")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window (s)")
    parser.add_argument("--json", type=Path, default=RESULTS / "idle_cost.json")
    args = parser.parse_args(argv)
    base = new_base("idle_cost")
    write_workflow(base / "dags", "idle_chain", WORKFLOW)
    with deployment("idle_cost", base, [DAG_ID], log) as env:
        stack = env.stack
        stack.wait_for_run(DAG_ID, stack.trigger(DAG_ID), timeout=180)  # warm-up
        results = [measure(stack, v, args.runs, args.idle) for v in args.values.split(",")]
    print("[scheduler] scheduler_idle_sleep_time: 5-step run (median) | idle cost")
    for r in results:
        print(
            f"  {r['idle_sleep_s']:>5g} s   {r['median_run_s']:6.2f} s   | scheduler "
            f"{r['idle_cpu_pct']:5.1f}% of a core, metadata DB {r['idle_tx_per_s']:5.0f} tx/s"
        )
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    chosen = next((r for r in results if r["idle_sleep_s"] == 0.05), results[-1])
    report = {"results": results, "loadavg": os.getloadavg()}
    finish(args.json, report, "idle_scheduler_cpu_pct", chosen["idle_cpu_pct"], ".1f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
