"""Benchmark: from an event delivery to the next task's start, and the same for an
approval decision, on one real Airflow.

Targets: ``event_resume_ms_p50`` <= 200, ``timer_lag_ms_p50`` <= 1,000.

One real Airflow 3 deployment (``AirflowStack``: api-server with the Ledgerflow plugin,
scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata; the ledger on its
own Postgres database). Two DAGs of the same shape, a wait then one task:

* ``event_latency__v1``: ``settled`` (``kind: event``, key ``{{ params.ref }}``) then
  ``next`` (``demo.noop``); the event is delivered through
  ``POST /ledgerflow/api/events/payment.settled``;
* ``approval_latency__v1`` (bench/approval_latency.py's workflow): ``ask``
  (``kind: approval``) then ``next``; decided through
  ``POST /ledgerflow/api/approvals/{id}/decision``.

Each round triggers both, waits until both are parked (task ``deferred``), then sends
the event and the decision one after the other (the order alternates). The latency is
Airflow's own ``start_date`` of ``next`` minus the wall-clock time just before the call
(same machine, same clock). Both take the same path: the api-server that stores the
delivery (or the decision) ends the parked task itself, so the scheduler can start the
next task at once.

Then, on the same deployment, ``--timers`` timers of ``timer_lag__v1`` (bench/timer_lag.py:
a ``kind: wait`` step then one task) are parked at once; the lag is Airflow's ``start_date``
of the next task minus the timer's planned fire time.

The last line is ``event_resume_ms_p50=<n> timer_lag_ms_p50=<n> approval_resume_ms_p50=<n>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from approval_latency import (  # bench/ is on sys.path when run as a script
    OURS as APPROVAL,
)
from approval_latency import (
    WORKFLOW as APPROVAL_WORKFLOW,
)
from approval_latency import (
    decide_ours,
    ti,
    ts,
)
from harness import (
    RESULTS,
    deployment,
    git_revision,
    logger,
    new_base,
    rounds,
    write_results,
    write_workflow,
)
from timer_lag import DAG as TIMER
from timer_lag import measure_timer_lag, write_timer_workflow

EVENT = "event_latency__v1"

WORKFLOW = """
name: event_latency
version: 1
max_active_runs: 100
params:
  ref: {type: string, required: true}
steps:
  - id: settled
    kind: event
    event: payment.settled
    key: "{{ params.ref }}"
    schema: {type: object, required: [amount], properties: {amount: {type: number}}}
    deadline: 1h
  - id: next
    needs: [settled]
    tool: demo.noop
    args: {value: "{{ steps.settled.output.amount }}"}
    idempotency: natural
"""

log = logger("event_latency")


def deliver(stack: Any, ref: str) -> float:
    t0 = time.time()
    answer = stack.api(
        "POST",
        "/ledgerflow/api/events/payment.settled",
        json={"key": ref, "id": f"bench-{ref}", "payload": {"amount": 1}},
    )
    if answer["status"] != "delivered":
        raise RuntimeError(f"event for {ref} was {answer['status']}, not delivered")
    return t0


def parked(stack: Any, dag_id: str, run_id: str, task_id: str) -> None:
    """Wait until the task is deferred; a task that ended instead stops the benchmark
    with its log (a parked task, not a slow machine, is what is measured)."""
    deadline = time.monotonic() + 300
    state = None
    while time.monotonic() < deadline:
        try:
            state = ti(stack, dag_id, run_id, task_id)["state"]
        except Exception:  # not created yet
            state = None
        if state == "deferred":
            return
        if state in ("failed", "upstream_failed", "success", "skipped"):
            break
        time.sleep(0.2)
    raise RuntimeError(
        f"{dag_id}/{run_id} {task_id} is {state}, not deferred; triggerer log:\n"
        + stack.log_tail("triggerer")
        + "\nscheduler log:\n"
        + stack.log_tail("scheduler")
    )


def latency(stack: Any, dag_id: str, run_id: str, t0: float) -> float:
    if stack.wait_for_run(dag_id, run_id, timeout=180) != "success":
        raise RuntimeError(f"{dag_id}/{run_id} did not succeed")
    return ts(ti(stack, dag_id, run_id, "next")["start_date"]) - t0


def one_round(stack: Any, ledger: Any, order: tuple[str, ...]) -> dict[str, float]:
    """Park one run of each, then end them one after the other; their latencies."""
    ref = uuid.uuid4().hex
    a = stack.trigger(EVENT, {"ref": ref})
    b = stack.trigger(APPROVAL)
    parked(stack, EVENT, a, "settled")
    parked(stack, APPROVAL, b, "ask")
    time.sleep(1.0)  # let both parked tasks' processes exit
    got: dict[str, float] = {}
    for who in order:
        if who == "event":
            got[who] = latency(stack, EVENT, a, deliver(stack, ref))
        else:
            got[who] = latency(stack, APPROVAL, b, decide_ours(stack, ledger, b, "api"))
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Event delivery -> next task start, and approval decision -> next "
        "task start, on one real Airflow (medians)."
    )
    parser.add_argument("--rounds", type=int, default=20, help="deliveries per kind (>= 20)")
    parser.add_argument("--timers", type=int, default=24, help="timers parked at once (>= 20)")
    parser.add_argument("--json", type=Path, default=RESULTS / "event_latency.json")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the deployment's folder (its logs)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 20:
        log(f"warning: --rounds {args.rounds}; the benchmark asks for at least 20")

    base = new_base("events")
    write_workflow(base / "dags", "event_latency", WORKFLOW)
    write_workflow(base / "dags", "approval_latency", APPROVAL_WORKFLOW)
    write_timer_workflow(base / "dags")
    measured: dict[str, list[float]] = {"event": [], "approval": []}
    with deployment(
        "events",
        base,
        [EVENT, APPROVAL, TIMER],
        log,
        parallelism=16,
        remove_base=not args.keep_logs,
    ) as env:
        stack, ledger = env.stack, env.ledger
        for label, warm, order in rounds(args.rounds, ("event", "approval"), warmup=3):
            try:
                got = one_round(stack, ledger, order)
            except RuntimeError as exc:
                if not warm:
                    raise
                # A fresh api-server on a loaded machine may time out a task's first
                # start call (the task then fails before it parks): warm up again.
                log(f"warm-up {label} failed ({str(exc).splitlines()[0]}); again")
                continue
            line = f"event {got['event']:.3f} s, approval {got['approval']:.3f} s"
            if warm:
                log(f"warm-up {label}: {line}")
                continue
            for who, value in got.items():
                measured[who].append(value)
            log(f"round {label}/{args.rounds}: {line}")
        log("timers: a warm-up of 2, then the measured ones")
        measure_timer_lag(stack, ledger, 2, lead=20.0)
        lags = measure_timer_lag(stack, ledger, args.timers)
    if not lags:
        raise SystemExit("no timer was parked before its time")
    timer_ms = statistics.median(lags)

    event_ms = statistics.median(measured["event"]) * 1000
    approval_ms = statistics.median(measured["approval"]) * 1000
    report = {
        "rounds": args.rounds,
        "event_s": measured["event"],
        "approval_s": measured["approval"],
        "event_resume_ms_p50": event_ms,
        "approval_resume_ms_p50": approval_ms,
        "timer_lag_ms": lags,
        "timer_lag_ms_p50": timer_ms,
        "load_average": os.getloadavg(),
        "git": git_revision(),
    }
    write_results(args.json, report)
    print(f"delivery/decision -> next task start, median of {args.rounds}:")
    for who in ("event", "approval"):
        values = measured[who]
        print(
            f"  {who:<9} {statistics.median(values) * 1000:8.0f} ms  "
            f"(min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"
        )
    print(f"  timer lag {timer_ms:8.0f} ms  ({len(lags)} parked timers)")
    print(f"  load average {os.getloadavg()[0]:.1f}")
    print(
        f"event_resume_ms_p50={event_ms:.0f} timer_lag_ms_p50={timer_ms:.0f} "
        f"approval_resume_ms_p50={approval_ms:.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
