"""Benchmark: 1,000 approvals parked at once in one triggerer.

Target: ``parked_1000_rss_mb`` <= 150 (memory the triggerer adds to hold 1,000 waiting
approvals) with 0 worker slots in use while they wait.

One real Airflow 3 deployment (``AirflowStack``, LocalExecutor, Postgres metadata; the
ledger on its own Postgres database; the triggerer's capacity raised above 1,000). The
workflow ``parked__v1`` is one approval step. The script triggers 1,000 runs, waits until
all 1,000 approval tasks are ``deferred``, and reads:

* the triggerer's resident memory (VmRSS summed over its process tree: the supervisor and
  the trigger runner) with no trigger, with one parked approval, and with 1,000;
* the default pool's running/queued/deferred slots and the task instances by state;
* the listening connections in the ledger database (all approvals share one).

Finally it approves one of them through the REST endpoint and checks that its run ends,
then stops everything.

The last line is ``parked_1000_rss_mb=<RSS with 1,000 parked - RSS with none>``.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
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

DAG_ID = "parked__v1"

WORKFLOW = """
name: parked
version: 1
max_active_runs: 5000
steps:
  - id: ask
    kind: approval
    subject: "Parked approval {{ run.id }}"
    payload: {run: "{{ run.id }}"}
    approvers: {roles: [admin]}
    deadline: 1d
"""


log = logger("parked")


def rss_mb(stack: Any) -> float:
    """Resident memory of the triggerer's process tree, in MB."""
    from ledgerflow.testing.airflow_stack import _tree

    total_kb = 0
    for pid in _tree(stack.pid("triggerer")):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def settled_rss(stack: Any, seconds: float = 10.0) -> float:
    """The median of a few readings once the triggerer has had time to settle."""
    readings = []
    for _ in range(5):
        time.sleep(seconds / 5)
        readings.append(rss_mb(stack))
    return sorted(readings)[len(readings) // 2]


def states(stack: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in ("deferred", "running", "queued", "scheduled", "success", "failed"):
        page = stack.api(
            "GET",
            f"/api/v2/dags/{DAG_ID}/dagRuns/~/taskInstances",
            params={"state": state, "limit": 1},
        )
        counts[state] = int(page["total_entries"])
    return counts


def listeners(ledger: Any) -> int:
    from sqlalchemy import text

    with ledger.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query = 'LISTEN ledgerflow_approvals'"
                )
            ).scalar_one()
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Park N approvals at once in one triggerer; report its memory and the "
        "worker slots in use."
    )
    parser.add_argument("--approvals", type=int, default=1000, help="how many (default 1000)")
    parser.add_argument("--json", type=Path, default=RESULTS / "parked.json")
    args = parser.parse_args(argv)

    base = new_base("parked")
    write_workflow(base / "dags", "parked", WORKFLOW)
    report: dict[str, Any] = {"approvals": args.approvals}
    t_begin = time.monotonic()
    extra_env = {
        "AIRFLOW__TRIGGERER__CAPACITY": str(args.approvals + 200),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": "64",
    }
    with deployment("parked", base, [DAG_ID], log, parallelism=16, extra_env=extra_env) as env:
        stack, ledger = env.stack, env.ledger
        report["rss_idle_mb"] = settled_rss(stack)
        log(f"triggerer RSS with no trigger: {report['rss_idle_mb']:.1f} MB")
        first = stack.trigger(DAG_ID)
        deadline = time.monotonic() + 180
        while states(stack)["deferred"] < 1:
            if time.monotonic() > deadline:
                raise TimeoutError("the first approval never parked")
            time.sleep(0.5)
        report["rss_one_mb"] = settled_rss(stack)
        log(f"triggerer RSS with one parked approval: {report['rss_one_mb']:.1f} MB")

        log(f"triggering {args.approvals - 1} more runs")
        with ThreadPoolExecutor(8) as pool:
            runs = [first, *pool.map(lambda _: stack.trigger(DAG_ID), range(args.approvals - 1))]
        t_parking = time.monotonic()
        last = -1
        while True:
            counts = states(stack)
            if counts["deferred"] != last:
                log(f"parked {counts['deferred']}/{args.approvals} ({counts})")
                last = counts["deferred"]
            if counts["deferred"] >= args.approvals:
                break
            if time.monotonic() - t_parking > 3600:
                raise TimeoutError(f"only {counts['deferred']} parked after an hour")
            time.sleep(5)
        report["parking_s"] = time.monotonic() - t_parking
        report["rss_parked_mb"] = settled_rss(stack, 20.0)
        report["states"] = states(stack)
        pool_info = stack.api("GET", "/api/v2/pools/default_pool")
        report["pool"] = {
            k: pool_info.get(k)
            for k in ("running_slots", "queued_slots", "deferred_slots", "occupied_slots")
        }
        report["listening_connections"] = listeners(ledger)
        log(f"triggerer RSS with {args.approvals} parked: {report['rss_parked_mb']:.1f} MB")

        from ledgerflow.ledger import approvals

        probe = approvals.for_step(ledger, f"{DAG_ID}/{runs[-1]}", "ask")
        assert probe is not None
        stack.api(
            "POST",
            f"/ledgerflow/api/approvals/{probe.id}/decision",
            json={"decision": "approve", "comment": "probe"},
        )
        report["probe_run"] = stack.wait_for_run(DAG_ID, runs[-1], timeout=120)

    added = report["rss_parked_mb"] - report["rss_idle_mb"]
    report["added_mb"] = added
    report["added_over_one_mb"] = report["rss_parked_mb"] - report["rss_one_mb"]
    report["seconds_total"] = time.monotonic() - t_begin
    slots = report["pool"]
    print(f"{args.approvals} approvals parked in {report['parking_s']:.0f} s")
    print(
        f"triggerer RSS: idle {report['rss_idle_mb']:.1f} MB, one parked "
        f"{report['rss_one_mb']:.1f} MB, {args.approvals} parked {report['rss_parked_mb']:.1f} MB"
    )
    print(
        f"task instances: {report['states']}; default pool: {slots}; "
        f"listening connections: {report['listening_connections']}; probe run {report['probe_run']}"
    )
    print(f"worker_slots_in_use={(slots['running_slots'] or 0) + (slots['queued_slots'] or 0)}")
    finish(args.json, report, f"parked_{args.approvals}_rss_mb", added, ".1f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
