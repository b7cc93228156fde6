"""Benchmark: what a successful run of a saga workflow pays after its last step.

Target: ``success_tail_s`` <= 0.5 (issue 12: "success costs nothing extra").

A workflow whose steps declare ``compensate`` has teardown tasks (``compensate__<step>``
in reverse order, then ``saga__finish``). On a successful run the last forward task skips
them all as it ends (``steps.saga.success_skips``), so the run ends with its last step;
with ``[ledgerflow] skip_saga_on_success = False`` each of them is scheduled, started on a
worker and skips itself, one after the other (the behaviour before issue 12).

``measure_success_tail(stack, dag_id, runs)`` triggers ``runs`` runs one at a time on a
running stack (``bench/harness.py`` ``deployment``, as ``bench/fused.py`` passes it) and
returns, per run, the seconds from the last forward task's ``end_date`` to the DagRun's
``end_date``, both from Airflow's REST API. A forward task is one that is not a teardown
(``compensate__*``, ``saga__finish``).

``main()`` measures the demo's checkout (4 steps, 3 compensations) on two deployments one
after the other, the baseline (``skip_saga_on_success = False``) first, then the default;
each gets one warm-up run. It prints both medians, their ratio, how many teardown tasks
started on a worker, and the load average. Last line: ``success_tail_s=<median>``.

```sh
.venv/bin/python bench/success_tail.py            # about 5 minutes
.venv/bin/python bench/success_tail.py --runs 3 --no-baseline
```
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    ROOT,
    deployment,
    finish,
    logger,
    med,
    new_base,
)

TARGET_S = 0.5
DAG_ID = "checkout__v1"
RUN_TIMEOUT_S = 240.0
SETTLE_S = 1.0  # between runs: the previous run's task processes have exited
REPARSE_INTERVAL_S = 600  # no periodic re-parse inside the measured runs (bench/overhead.py)
OFF = {"AIRFLOW__LEDGERFLOW__SKIP_SAGA_ON_SUCCESS": "False"}

log = logger("success_tail")


def is_teardown(task_id: str) -> bool:
    return task_id.startswith("compensate__") or task_id == "saga__finish"


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def one_tail(stack: Any, dag_id: str, params: dict[str, Any]) -> dict[str, Any]:
    """Trigger one run, wait for it to succeed, and read its tail from Airflow."""
    run_id = stack.trigger(dag_id, params)
    state = stack.wait_for_run(dag_id, run_id, timeout=RUN_TIMEOUT_S)
    if state != "success":
        raise SystemExit(f"{dag_id} run {run_id} ended {state}: this measures successful runs")
    run = stack.run(dag_id, run_id)
    tis = stack.task_instances(dag_id, run_id)
    forward_ends = [_ts(t["end_date"]) for t in tis if not is_teardown(t["task_id"])]
    last = max(e for e in forward_ends if e is not None)
    end = _ts(run["end_date"])
    assert end is not None
    teardowns = [t for t in tis if is_teardown(t["task_id"])]
    return {
        "run_id": run_id,
        "tail_s": (end - last).total_seconds(),
        "teardowns": len(teardowns),
        "teardowns_started": sum(1 for t in teardowns if (t.get("try_number") or 0) > 0),
    }


def measure_success_tail(
    stack: Any,
    dag_id: str,
    runs: int,
    params: Callable[[int], dict[str, Any]] | None = None,
    *,
    details: list[dict[str, Any]] | None = None,
) -> list[float]:
    """Seconds from the last forward task's end to the DagRun's end, for ``runs``
    successful runs of ``dag_id`` triggered one at a time on ``stack`` (an ``AirflowStack``
    with the DAG parsed). ``params(i)``: the params of run ``i`` (none by default);
    ``details``: filled with one dict per run (run id, tail, teardown tasks that started).
    ``stack`` may also be the ``Deployment`` of ``harness.deployment``."""
    stack = getattr(stack, "stack", stack)  # a harness ``Deployment`` or its stack
    tails = []
    for i in range(runs):
        result = one_tail(stack, dag_id, params(i) if params else {})
        log(
            f"{dag_id} run {i + 1}/{runs}: tail {result['tail_s']:.3f} s, "
            f"{result['teardowns_started']}/{result['teardowns']} teardown tasks started"
        )
        tails.append(result["tail_s"])
        if details is not None:
            details.append(result)
        time.sleep(SETTLE_S)
    return tails


def checkout_params(tag: str) -> Callable[[int], dict[str, Any]]:
    return lambda i: {"order_id": f"tail-{tag}-{i}", "sku": "sku-book", "qty": 1}


def measure(label: str, runs: int, warmup: int, extra_env: dict[str, str]) -> dict[str, Any]:
    """One deployment with the demo's checkout: ``warmup`` runs, then ``runs`` measured."""
    base = new_base(f"tail_{label}")
    shutil.copytree(ROOT / "dags" / "workflows" / "checkout", base / "dags/workflows/checkout")
    env = {"AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": str(REPARSE_INTERVAL_S)}
    with deployment(f"tail_{label}", base, [DAG_ID], log, extra_env={**env, **extra_env}) as dep:
        dep.stack.api("PATCH", f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
        tag = f"{label}-{uuid.uuid4().hex[:6]}"
        measure_success_tail(dep.stack, DAG_ID, warmup, checkout_params(f"{tag}-w"))
        details: list[dict[str, Any]] = []
        tails = measure_success_tail(dep.stack, DAG_ID, runs, checkout_params(tag), details=details)
    return {"tails_s": tails, "median_s": med(tails), "runs": details}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per deployment")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs first")
    parser.add_argument(
        "--no-baseline", action="store_true", help="skip the skip_saga_on_success=False stack"
    )
    parser.add_argument("--json", default=str(RESULTS / "success_tail.json"))
    args = parser.parse_args(argv)

    report: dict[str, Any] = {"dag_id": DAG_ID, "load_before": os.getloadavg()}
    if not args.no_baseline:
        report["baseline"] = measure("off", args.runs, args.warmup, OFF)
    report["fast"] = measure("on", args.runs, args.warmup, {})
    report["load_after"] = os.getloadavg()

    fast = report["fast"]
    print(f"checkout ({DAG_ID}), {args.runs} successful runs per deployment, one at a time")
    rows = [("skip_saga_on_success=True", fast)]
    if "baseline" in report:
        rows.insert(0, ("skip_saga_on_success=False (before)", report["baseline"]))
    for name, figures in rows:
        started = statistics.median(r["teardowns_started"] for r in figures["runs"])
        tails = ", ".join(f"{t:.2f}" for t in figures["tails_s"])
        print(
            f"  {name:36s} median tail {figures['median_s']:.3f} s  "
            f"(runs: {tails}; teardown tasks started per run: {started:g})"
        )
    if "baseline" in report and fast["median_s"]:
        ratio = report["baseline"]["median_s"] / max(fast["median_s"], 1e-3)
        report["ratio"] = ratio
        print(f"  baseline / fast: {ratio:.1f}x")
    print(
        "  load average (1, 5, 15 min): before "
        + " ".join(f"{v:.1f}" for v in report["load_before"])
        + ", after "
        + " ".join(f"{v:.1f}" for v in report["load_after"])
        + f" on {os.cpu_count()} cores"
    )
    print(f"  target: success_tail_s <= {TARGET_S}")
    finish(Path(args.json), report, "success_tail_s", fast["median_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
