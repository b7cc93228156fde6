"""Benchmark: from a REST trigger call to the first step running, Ledgerflow vs Airflow.

Target: ``trigger_latency_ratio`` <= 1.05 (the median latency through Ledgerflow's
``POST /ledgerflow/api/workflows/{name}/runs`` over the median through Airflow's own
``POST /api/v2/dags/{dag_id}/dagRuns``, both measured on the same Airflow in this script).

One real Airflow 3 deployment (``AirflowStack``: api-server with the Ledgerflow plugin,
scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata; the ledger on its
own Postgres database) and one Ledgerflow workflow, ``trigger_latency`` (one param, two
``demo.noop`` steps). Both endpoints trigger that same DAG:

* ours: params validated against the workflow's schema, a fresh idempotency key per call
  (so the key lookup, the advisory lock and the ``triggered`` ledger event are all paid);
* Airflow's: ``{"logical_date": null, "conf": {...}}`` as a user would send it.

Rounds alternate which endpoint goes first, and each trigger is measured alone: the next
one is sent only after the previous run has finished. The latency of one trigger is
Airflow's own ``start_date`` of the run's first task minus the wall-clock time just before
the call (same machine, same clock). The HTTP round trip of each call is reported too.

The last line is ``trigger_latency_ratio=<median ours / median airflow's>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    deployment,
    finish,
    logger,
    new_base,
    rounds,
    write_workflow,
)

DAG_ID = "trigger_latency__v1"
OURS_PATH = "/ledgerflow/api/workflows/trigger_latency/runs"
THEIRS_PATH = f"/api/v2/dags/{DAG_ID}/dagRuns"

WORKFLOW = """
name: trigger_latency
version: 1
max_active_runs: 100
params:
  ref: {type: string, required: true}
  size: {type: integer, default: 1}
steps:
  - id: first
    tool: demo.noop
    args: {value: "{{ params.ref }}"}
    idempotency: natural
  - id: second
    needs: [first]
    tool: demo.noop
    args: {value: "{{ params.size }}"}
    idempotency: natural
"""


log = logger("trigger_latency")


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def trigger_ours(client: Any, ref: str) -> tuple[str, float, float]:
    body = {"params": {"ref": ref, "size": 3}, "idempotency_key": f"bench-{ref}"}
    t0 = time.time()
    resp = client.post(OURS_PATH, json=body)
    rtt = time.time() - t0
    if resp.status_code != 201:
        raise RuntimeError(f"ours -> {resp.status_code}: {resp.text}")
    return str(resp.json()["run_id"]), t0, rtt


def trigger_theirs(client: Any, ref: str) -> tuple[str, float, float]:
    body = {"logical_date": None, "conf": {"ref": ref, "size": 3}}
    t0 = time.time()
    resp = client.post(THEIRS_PATH, json=body)
    rtt = time.time() - t0
    if resp.status_code != 200:
        raise RuntimeError(f"airflow -> {resp.status_code}: {resp.text}")
    return str(resp.json()["dag_run_id"]), t0, rtt


def first_step_latency(stack: Any, run_id: str, t0: float) -> float:
    if stack.wait_for_run(DAG_ID, run_id, timeout=180) != "success":
        raise RuntimeError(f"{DAG_ID}/{run_id} did not succeed")
    ti = stack.api("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/first")
    return ts(ti["start_date"]) - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="REST trigger -> first step running: Ledgerflow's trigger endpoint vs "
        "Airflow's own, on one real Airflow, the same workflow."
    )
    parser.add_argument("--rounds", type=int, default=40, help="triggers per endpoint (>= 20)")
    parser.add_argument("--json", type=Path, default=RESULTS / "trigger_latency.json")
    args = parser.parse_args(argv)
    if args.rounds < 20:
        log(f"warning: --rounds {args.rounds}; the benchmark asks for at least 20")

    import httpx

    base = new_base("trigger")
    write_workflow(base / "dags", "trigger_latency", WORKFLOW)
    ours: list[float] = []
    theirs: list[float] = []
    rtt_ours: list[float] = []
    rtt_theirs: list[float] = []
    cpu0 = os.times()
    with deployment("trigger", base, [DAG_ID], log) as env:
        stack = env.stack
        headers = {"Authorization": f"Bearer {stack.token()}"}
        with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
            # Rounds w1 and w2 warm both paths up; the order alternates.
            for label, warm, order in rounds(args.rounds, ("theirs", "ours"), warmup=2):
                got: dict[str, tuple[float, float]] = {}
                for who in order:
                    ref = f"{who}-{label}-{uuid.uuid4().hex[:8]}"
                    fire = trigger_ours if who == "ours" else trigger_theirs
                    run_id, t0, rtt = fire(client, ref)
                    got[who] = (first_step_latency(stack, run_id, t0), rtt)
                    time.sleep(0.5)  # let the finished run's processes exit
                if warm:
                    log(f"warm-up: ours {got['ours'][0]:.3f} s, airflow {got['theirs'][0]:.3f} s")
                    continue
                ours.append(got["ours"][0])
                theirs.append(got["theirs"][0])
                rtt_ours.append(got["ours"][1])
                rtt_theirs.append(got["theirs"][1])
                log(
                    f"round {label}/{args.rounds}: ours {got['ours'][0]:.3f} s "
                    f"(call {got['ours'][1] * 1000:.0f} ms), airflow {got['theirs'][0]:.3f} s "
                    f"(call {got['theirs'][1] * 1000:.0f} ms)"
                )

    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    ratio = med_ours / med_theirs
    # Paired by round (the same moment's load on both): the typical difference.
    paired = statistics.median(a - b for a, b in zip(ours, theirs, strict=True))
    cpu = os.times()
    report = {
        "rounds": args.rounds,
        "ours_s": ours,
        "airflow_s": theirs,
        "call_ours_s": rtt_ours,
        "call_airflow_s": rtt_theirs,
        "median_ours_s": med_ours,
        "median_airflow_s": med_theirs,
        "median_call_ours_s": statistics.median(rtt_ours),
        "median_call_airflow_s": statistics.median(rtt_theirs),
        "median_paired_difference_s": paired,
        "loadavg": os.getloadavg(),
        "bench_cpu_s": (cpu.user - cpu0.user) + (cpu.system - cpu0.system),
        "trigger_latency_ratio": ratio,
    }

    def line(label: str, values: list[float], calls: list[float]) -> str:
        return (
            f"  {label:<36}{statistics.median(values) * 1000:7.0f} ms  (min "
            f"{min(values) * 1000:.0f}, max {max(values) * 1000:.0f}; the call itself "
            f"{statistics.median(calls) * 1000:.0f} ms)"
        )

    print(f"REST trigger -> first step running, median of {args.rounds} per endpoint:")
    print(line("ledgerflow POST .../workflows/{name}/runs", ours, rtt_ours))
    print(line("airflow POST /api/v2/dags/{id}/dagRuns", theirs, rtt_theirs))
    print(f"  median of the per-round differences (ours - airflow's): {paired * 1000:+.0f} ms")
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    finish(args.json, report, "trigger_latency_ratio", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
