"""Benchmark: a retry run resumes, it does not restart.

Target: ``resume_ratio`` <= 0.15 (median DagRun duration of the retry run / of a full run).

One real Airflow 3 deployment (``ledgerflow.testing.airflow_stack.AirflowStack``:
api-server, scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata) with
the ledger on a separate fresh Postgres database. Its dags folder holds one 20-step
sequential workflow, ``resume/v1.yaml``: ``s01..s20``, each ``demo.noop`` passing the
previous step's output on, except ``s19``, a ``demo.fail_while`` that fails (at once, no
retry) while the run's ``flag`` file exists. A retry keeps the original params, so the
flag is how the cause of the failure gets fixed between a run and its retry.

Each round: (1) a full successful run (no flag file); (2) a run with the flag file, which
fails at s19; (3) the flag removed, its retry through ``POST /ledgerflow/api/runs/{id}/retry``
(the api-server creates the new DagRun with s01-s18 already reused), which runs s19 and
s20. A run's duration is Airflow's own (DagRun ``start_date`` -> ``end_date``); the
retry's time from the POST to the ledger's ``succeeded`` is printed too. One untimed
warm-up round first (every LocalExecutor worker pays its first task once).

The last line is ``resume_ratio=<median retry DagRun duration / median full DagRun duration>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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

TARGET_RATIO = 0.15
DAG_ID = "resume__v1"
STEPS = [f"s{i:02d}" for i in range(1, 21)]
FAIL_AT = "s19"
RUN_TIMEOUT_S = 300.0
# As in bench/overhead.py: no periodic re-parse during the runs, and enough executor
# workers that no hop waits for a free one.
REPARSE_INTERVAL_S = 600
PARALLELISM = 32


log = logger("resume", clock=False)


def workflow() -> str:
    lines = [
        "name: resume",
        "version: 1",
        "description: 20 steps in a row; s19 fails while the flag file exists (bench/resume).",
        "max_active_runs: 4",
        "params:",
        "  flag: {type: string, default: ''}",
        "steps:",
    ]
    previous = None
    for step in STEPS:
        value = "start" if previous is None else f"{{{{ steps.{previous}.output.value }}}}"
        lines.append(f"  - id: {step}")
        if previous:
            lines.append(f"    needs: [{previous}]")
        if step == FAIL_AT:
            lines.append("    tool: demo.fail_while")
            lines.append(f'    args: {{flag: "{{{{ params.flag }}}}", value: "{value}"}}')
            lines.append("    retry: {max_attempts: 1}")
        else:
            lines.append("    tool: demo.noop")
            lines.append(f'    args: {{value: "{value}"}}')
            lines.append("    idempotency: natural")
        previous = step
    return "\n".join(lines) + "\n"


def ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def duration(run: dict[str, Any]) -> float:
    start, end = ts(run["start_date"]), ts(run["end_date"])
    assert start is not None and end is not None, run
    return (end - start).total_seconds()


def wait_ledger(ledger: Any, run_id: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = ledger.run(run_id)
        if row is not None and row["status"] != "running":
            return str(row["status"])
        time.sleep(0.1)
    raise TimeoutError(f"{run_id}: no final status in the ledger after {timeout:.0f} s")


def one_round(stack: Any, ledger: Any, flag: Path, label: str) -> dict[str, Any]:
    """A full run, a run failing at s19, and the retry of the latter."""
    flag.unlink(missing_ok=True)
    full_id = stack.trigger(DAG_ID, {"flag": str(flag)})
    state = stack.wait_for_run(DAG_ID, full_id, RUN_TIMEOUT_S)
    if state != "success":
        raise SystemExit(f"round {label}: the full run ended {state}")
    full = stack.run(DAG_ID, full_id)
    wait_ledger(ledger, f"{DAG_ID}/{full_id}")

    flag.touch()
    failing_id = stack.trigger(DAG_ID, {"flag": str(flag)})
    state = stack.wait_for_run(DAG_ID, failing_id, RUN_TIMEOUT_S)
    if state != "failed":
        raise SystemExit(f"round {label}: the failing run ended {state}")
    original = f"{DAG_ID}/{failing_id}"
    wait_ledger(ledger, original)
    flag.unlink()

    asked = time.monotonic()
    started = stack.api("POST", f"/ledgerflow/api/runs/{original}/retry", json={})
    answered = time.monotonic()
    retry_id = started["dag_run_id"]
    state = stack.wait_for_run(DAG_ID, retry_id, RUN_TIMEOUT_S)
    if state != "success":
        raise SystemExit(f"round {label}: the retry run ended {state}")
    wait_ledger(ledger, started["run_id"])
    request_to_success = time.monotonic() - asked
    retry = stack.run(DAG_ID, retry_id)
    ran = sorted({a["step_key"] for a in ledger.attempts(started["run_id"])})
    if ran != ["s19", "s20"] or len(started["reused"]) != 18:
        raise SystemExit(f"round {label}: the retry ran {ran}, reused {started['reused']}")
    return {
        "label": label,
        "full_s": duration(full),
        "failing_s": duration(stack.run(DAG_ID, failing_id)),
        "retry_s": duration(retry),
        "retry_post_s": answered - asked,
        "retry_request_to_success_s": request_to_success,
        "retry_ran": ran,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time a retry run of a 20-step workflow that failed at step 19, next to a "
        "full successful run of the same workflow, on one real Airflow.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "resume.json", help="where to write the results"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")

    base = new_base("resume")
    write_workflow(base / "dags", "resume", workflow())
    flag = base / "s19-broken"
    rounds: list[dict[str, Any]] = []
    extra_env = {"AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(REPARSE_INTERVAL_S)}
    with deployment(
        "resume", base, [DAG_ID], log, parallelism=PARALLELISM, extra_env=extra_env
    ) as env:
        stack, ledger = env.stack, env.ledger
        warm = one_round(stack, ledger, flag, "warm-up")
        log(f"warm-up: full {warm['full_s']:.2f} s, retry {warm['retry_s']:.2f} s")
        for r in range(args.rounds):
            result = one_round(stack, ledger, flag, str(r + 1))
            rounds.append(result)
            log(
                f"round {r + 1}/{args.rounds}: full {result['full_s']:.2f} s, retry "
                f"{result['retry_s']:.2f} s (load {os.getloadavg()[0]:.1f})"
            )

    full = statistics.median(r["full_s"] for r in rounds)
    retry = statistics.median(r["retry_s"] for r in rounds)
    ratio = retry / full
    print("bench/resume: 20 sequential steps, the failing run stops at s19")
    print(f"{'round':>6} {'full run s':>11} {'failing s':>10} {'retry s':>8} {'POST->done s':>13}")
    for r in rounds:
        print(
            f"{r['label']:>6} {r['full_s']:11.2f} {r['failing_s']:10.2f} {r['retry_s']:8.2f} "
            f"{r['retry_request_to_success_s']:13.2f}"
        )
    print(f"median full run (DagRun start -> end): {full:.2f} s")
    print(f"median retry run (DagRun start -> end): {retry:.2f} s; it ran s19, s20 only")
    print(
        f"median retry request -> ledger succeeded: "
        f"{statistics.median(r['retry_request_to_success_s'] for r in rounds):.2f} s "
        f"(POST answered in {statistics.median(r['retry_post_s'] for r in rounds):.2f} s)"
    )
    print(
        f"target: resume_ratio <= {TARGET_RATIO} -> {'met' if ratio <= TARGET_RATIO else 'NOT met'}"
    )
    report = {"rounds": rounds, "full_s": full, "retry_s": retry, "ratio": ratio}
    finish(args.json, report, "resume_ratio", ratio)
    return 0


if __name__ == "__main__":
    sys.exit(main())
