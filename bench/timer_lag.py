"""Benchmark: a durable timer's lag, from its planned fire time to the next task's start.

Target: ``timer_lag_ms_p50`` <= 1000.

One real Airflow 3 deployment (``AirflowStack``: api-server with the Ledgerflow plugin,
scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata; the ledger on its
own Postgres database) runs ``timer_lag__v1``: ``pause`` (``kind: wait``, ``until`` a
moment given as a param) then ``next`` (``demo.noop``). ``measure_timer_lag`` triggers
``n`` runs whose moments are a little apart, far enough ahead that every timer is parked
in the triggerer before it is due; once they have all run, the lag of each is Airflow's
own ``start_date`` of ``next`` minus the planned fire time recorded in the ledger (same
machine, same clock). A timer that was not parked before its time (the machine too slow
to start its task) fired on a worker instead: it is left out and counted.

The lag is what the path costs: the trigger wakes at the planned time, completes the
step in the ledger and ends the task from the triggerer (no worker resumes it); then
the scheduler queues ``next`` and the executor starts it.

``bench/event_latency.py`` imports ``measure_timer_lag`` and ``write_timer_workflow``.
The last line is ``timer_lag_ms_p50=<median ms>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from harness import RESULTS, deployment, finish, logger, new_base, write_workflow

DAG = "timer_lag__v1"

WORKFLOW = """
name: timer_lag
version: 1
max_active_runs: 200
params:
  at: {type: string, required: true}
steps:
  - id: pause
    kind: wait
    until: "{{ params.at }}"
  - id: next
    needs: [pause]
    tool: demo.noop
    args: {value: "{{ steps.pause.output.planned }}"}
    idempotency: natural
"""

log = logger("timer_lag")


def write_timer_workflow(dags: Path) -> None:
    """The benchmark's workflow, in a dags folder (``workflows/timer_lag/v1.yaml``)."""
    write_workflow(dags, "timer_lag", WORKFLOW)


def _ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _state(stack: Any, run_id: str, task_id: str) -> dict[str, Any]:
    """A task instance of the run, through Airflow's REST API (retried: an api-server on
    a loaded machine may answer late)."""
    for attempt in range(6):
        try:
            found: dict[str, Any] = stack.api(
                "GET", f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}"
            )
            return found
        except Exception:
            time.sleep(1.0 + attempt)
    raise RuntimeError(f"{DAG}/{run_id} {task_id}: no answer from the api-server")


def _wait_done(ledger: Any, ledger_run: str, timeout: float) -> None:
    """Until the run's ``next`` step completed, read in the ledger (polling the ledger
    rather than the api-server keeps the measured path's machine quieter)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ledger.checkpoint(ledger_run, "next")
        if found is not None and found.status == "completed":
            return
        time.sleep(0.5)
    raise TimeoutError(f"{ledger_run}: next did not complete in {timeout:.0f} s")


def measure_timer_lag(
    stack: Any,
    ledger: Any,
    n: int,
    *,
    lead: float | None = None,
    spacing: float = 2.0,
    details: dict[str, Any] | None = None,
) -> list[float]:
    """Park ``n`` timers of ``timer_lag__v1`` (deployed on ``stack``, its ledger
    ``ledger``), due ``lead`` seconds from now and ``spacing`` apart; return each timer's
    lag in ms (planned fire time -> ``next`` task start), leaving out the timers not
    parked before their time. ``details``: filled with the triggerer-side lags and the
    number left out."""
    from ledgerflow.ledger import timers

    ledger.migrate()  # a fresh ledger database gets its tables here, not at the first task
    lead = lead if lead is not None else 30.0 + 2.0 * n
    start = datetime.now(timezone.utc) + timedelta(seconds=lead)
    runs = []
    for i in range(n):
        at = start + timedelta(seconds=i * spacing)
        runs.append(stack.trigger(DAG, {"at": at.isoformat()}))
    log(f"{n} runs triggered; the first timer is due in {lead:.0f} s")
    lags: list[float] = []
    fired_lags: list[float] = []
    ended_lags: list[float] = []
    late = 0
    for run_id in runs:
        ledger_run = f"{DAG}/{run_id}"
        _wait_done(ledger, ledger_run, lead + 300)
        events = {e["kind"]: e for e in ledger.events(ledger_run) if e["step_key"] == "pause"}
        parked, fired = events[timers.PARKED], events[timers.FIRED]
        planned = datetime.fromisoformat(fired["data"]["planned"])
        if parked["at"] >= planned:
            late += 1  # its task started after its time: it never waited in the triggerer
            continue
        begun = _ts(_state(stack, run_id, "next")["start_date"])
        ended = _ts(_state(stack, run_id, "pause")["end_date"])
        lags.append((begun - planned).total_seconds() * 1000)
        fired_lags.append(float(fired["data"]["lag_ms"]))
        ended_lags.append((ended - planned).total_seconds() * 1000)
    if details is not None:
        details.update(
            {
                "triggerer_lag_ms": fired_lags,
                "task_ended_lag_ms": ended_lags,
                "not_parked_in_time": late,
            }
        )
    if late:
        log(f"{late} of {n} timers were not parked before their time (left out)")
    return lags


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="A wait step's planned fire time -> the next task's start, on one real "
        "Airflow (median over --timers parked timers)."
    )
    parser.add_argument("--timers", type=int, default=24, help="timers parked at once (>= 20)")
    parser.add_argument("--lead", type=float, default=None, help="seconds until the first is due")
    parser.add_argument(
        "--spacing", type=float, default=2.0, help="seconds between two timers' fire times"
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "timer_lag.json")
    args = parser.parse_args(argv)
    if args.timers < 20:
        log(f"warning: --timers {args.timers}; the benchmark asks for at least 20")
    base = new_base("timer")
    write_timer_workflow(base / "dags")
    details: dict[str, Any] = {}
    with deployment("timer", base, [DAG], log, parallelism=16) as env:
        log("warm-up: 2 timers")
        measure_timer_lag(env.stack, env.ledger, 2, lead=40.0)
        cpu0 = time.process_time()
        lags = measure_timer_lag(
            env.stack,
            env.ledger,
            args.timers,
            lead=args.lead,
            spacing=args.spacing,
            details=details,
        )
        cpu = time.process_time() - cpu0
    if not lags:
        raise SystemExit("no timer was parked before its time: raise --lead")
    p50 = statistics.median(lags)
    ordered = sorted(lags)
    p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
    fired = details.get("triggerer_lag_ms") or [0.0]
    report = {
        "timers": args.timers,
        "measured": len(lags),
        "not_parked_in_time": details.get("not_parked_in_time", 0),
        "lag_ms": lags,
        "timer_lag_ms_p50": p50,
        "timer_lag_ms_p90": p90,
        "triggerer_lag_ms_p50": statistics.median(fired),
        "task_ended_lag_ms": details.get("task_ended_lag_ms"),
        "task_ended_lag_ms_p50": statistics.median(details.get("task_ended_lag_ms") or [0.0]),
        # The baseline: Airflow's own hop from the wait task's end to the next task's start.
        "airflow_hop_ms_p50": statistics.median(
            [a - b for a, b in zip(lags, details.get("task_ended_lag_ms") or [], strict=False)]
            or [0.0]
        ),
        "load_average": os.getloadavg(),
        "script_cpu_s": cpu,
    }
    print(f"planned fire time -> next task start, {len(lags)} parked timers:")
    print(f"  median {p50:8.0f} ms   p90 {p90:.0f} ms   min {min(lags):.0f}   max {max(lags):.0f}")
    print(
        f"  of which the trigger's own lag (planned -> step completed): median {report['triggerer_lag_ms_p50']:.0f} ms"
    )
    print(
        f"  planned -> the wait task ended in Airflow (the triggerer's event handled): "
        f"median {report['task_ended_lag_ms_p50']:.0f} ms"
    )
    print(
        f"  baseline, Airflow's hop (wait task ended -> next task started): "
        f"median {report['airflow_hop_ms_p50']:.0f} ms"
    )
    print(f"  load average {os.getloadavg()[0]:.1f}")
    finish(args.json, report, "timer_lag_ms_p50", p50, fmt=".0f")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
