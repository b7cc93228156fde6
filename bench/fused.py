"""Fused segments against one task per step and a hand-written Airflow DAG (issue 12).

One Airflow deployment on Postgres, the same 20-step chain of ``demo.noop`` three ways:

* ``fused``: ``execution: fused`` (all 20 steps in one Airflow task, each checkpointed);
* ``tasks``: one Airflow task per step (Ledgerflow's default);
* ``plain``: a hand-written DAG of 20 PythonOperators calling the same tool function
  (no ledger), the baseline of what Airflow itself costs.

Interleaved rounds (the order alternates). Then, on the same deployment:

* ``sync_trigger_ms``: ``POST /ledgerflow/api/workflows/checkout/runs?wait=30s`` on the
  shipped checkout (v2, fused), from the call to the answer with the run's result;
* ``success_tail_s``: a successful saga workflow (the checkout), from its last step's
  end to the DagRun's end;
* ``llm_step_overhead_ms``: an LLM step's duration minus the model's time, run by the
  kernel inside one process as in a fused segment (a loopback model peer), with the task
  start-up of a lone LLM task reported beside it.

Last line: ``fused_ms_per_step=<n> fused_speedup=<n> sync_trigger_ms_p50=<n>
success_tail_s=<n> llm_step_overhead_ms=<n>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    deployment,
    git_revision,
    logger,
    med,
    new_base,
    rounds,
    write_results,
    write_workflow,
)

STEPS = 20
log = logger("fused")


def chain_yaml(name: str, execution: str) -> str:
    lines = [
        f"name: {name}",
        "version: 1",
        f"execution: {execution}",
        "params:",
        "  value: {type: string, default: hello}",
        "defaults:",
        "  retry: {max_attempts: 3, backoff: {initial: 1s}}",
        "steps:",
    ]
    for i in range(1, STEPS + 1):
        lines.append(f"  - id: s{i:02d}")
        if i > 1:
            lines.append(f"    needs: [s{i - 1:02d}]")
        source = "params.value" if i == 1 else f"steps.s{i - 1:02d}.output.value"
        lines += [
            "    tool: demo.noop",
            f'    args: {{value: "{{{{ {source} }}}}"}}',
            "    idempotency: natural",
        ]
    return "\n".join(lines) + "\n"


def ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def run_seconds(stack: Any, dag_id: str, run_id: str) -> float | None:
    run = stack.run(dag_id, run_id)
    start, end = ts(run.get("start_date")), ts(run.get("end_date"))
    return (end - start).total_seconds() if start and end else None


def per_step_ms(ledger: Any, run_id: str) -> list[float]:
    """Inside a segment: the time from one step's checkpoint to the next one's."""
    from sqlalchemy import text

    with ledger.engine.connect() as conn:
        done = [
            r[0]
            for r in conn.execute(
                text(
                    "SELECT completed_at FROM lf_steps WHERE run_id = :r AND status = 'completed' "
                    "ORDER BY completed_at"
                ),
                {"r": run_id},
            )
        ]
    return [(b - a).total_seconds() * 1000 for a, b in pairwise(done)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    parser.add_argument("--sync-calls", type=int, default=10, help="REST calls with wait")
    parser.add_argument(
        "--llm-steps", type=int, default=10, help="LLM steps per task process (3 processes)"
    )
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args(argv)

    from overhead import plain_dag_source, write_plugins

    base = new_base("fused")
    dags = base / "dags"
    write_workflow(dags, "chain_fused", chain_yaml("chain_fused", "fused"))
    write_workflow(dags, "chain_tasks", chain_yaml("chain_tasks", "tasks"))
    plain = plain_dag_source("chain_plain").replace("range(1, 11)", f"range(1, {STEPS + 1})")
    (dags / "chain_plain.py").write_text(plain)
    root = Path(__file__).resolve().parents[1]
    checkout = dags / "workflows" / "checkout"
    checkout.mkdir(parents=True)
    for name in ("v1.yaml", "v1.py", "v2.yaml", "v2.py"):
        (checkout / name).write_text((root / "dags/workflows/checkout" / name).read_text())
    plugins = write_plugins(base / "plugins")
    kinds = {"fused": "chain_fused__v1", "tasks": "chain_tasks__v1", "plain": "chain_plain"}
    report: dict[str, Any] = {"steps": STEPS, "load_before": os.getloadavg()}
    with deployment(
        "fused",
        base,
        [*kinds.values(), "checkout__v1", "checkout__v2"],
        log,
        plugins=plugins,
    ) as env:
        env.keep = args.keep
        stack, ledger = env.stack, env.ledger
        seconds: dict[str, list[float]] = {k: [] for k in kinds}
        steps_ms: list[float] = []
        for label, warm, order in rounds(args.rounds, list(kinds), warmup=args.warmup):
            for kind in order:
                dag_id = kinds[kind]
                run_id = stack.trigger(dag_id, {"value": f"r{label}"})
                state = stack.wait_for_run(dag_id, run_id, timeout=600)
                if state != "success":
                    raise SystemExit(f"{dag_id} {run_id} ended {state}")
                took = run_seconds(stack, dag_id, run_id)
                log(f"round {label} {kind}: {took:.2f} s")
                if warm or took is None:
                    continue
                seconds[kind].append(took)
                if kind == "fused":
                    steps_ms += per_step_ms(ledger, f"{dag_id}/{run_id}")
        report["run_s"] = {k: med(v) for k, v in seconds.items()}
        report["run_s_all"] = seconds
        fused_ms = med(steps_ms) or 0.0
        speedup = statistics.median(
            t / f for t, f in zip(seconds["tasks"], seconds["fused"], strict=False)
        )
        report["fused_ms_per_step"] = fused_ms
        report["fused_speedup"] = speedup
        extra = measure_the_rest(env, args, report)
    report["load_after"] = os.getloadavg()
    report["git"] = git_revision()
    write_results(RESULTS / "fused.json", report)
    print_report(report)
    print(
        f"fused_ms_per_step={fused_ms:.2f} fused_speedup={speedup:.1f} "
        f"sync_trigger_ms_p50={extra['sync_trigger_ms_p50']:.0f} "
        f"success_tail_s={extra['success_tail_s']:.2f} "
        f"llm_step_overhead_ms={extra['llm_step_overhead_ms']:.1f}"
    )
    return 0


def measure_the_rest(
    env: Any, args: argparse.Namespace, report: dict[str, Any]
) -> dict[str, float]:
    """The REST call with wait, the success tail and the LLM step, on the same deployment."""
    out: dict[str, float] = {}
    from success_tail import measure_success_tail
    from sync_trigger import measure_sync_trigger

    calls = [{"order_id": f"sync-{i}"} for i in range(args.sync_calls)]
    sync_ms = measure_sync_trigger(env.stack, "checkout", calls)
    report["sync_trigger_ms"] = sync_ms
    out["sync_trigger_ms_p50"] = med(sync_ms) or float("nan")
    stamp = int(time.time())
    tails = measure_success_tail(
        env.stack, "checkout__v2", 5, params=lambda i: {"order_id": f"tail-{stamp}-{i}"}
    )
    report["success_tail_s_all"] = tails
    out["success_tail_s"] = med(tails) or float("nan")
    from _llm_step import measure_llm_step

    url = env.ledger_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    llm = measure_llm_step(steps=args.llm_steps, rounds=3, ledger_url=url)
    report["llm"] = {k: v for k, v in vars(llm).items() if not k.startswith("_")}
    out["llm_step_overhead_ms"] = float(llm.overhead_ms)
    return out


def print_report(report: dict[str, Any]) -> None:
    run_s = report["run_s"]
    print(f"{STEPS}-step chain, median run time (DagRun start -> end):")
    for kind, value in run_s.items():
        print(f"  {kind:6} {value:8.2f} s" if value is not None else f"  {kind:6}        -")
    print(f"fused: {report['fused_ms_per_step']:.2f} ms per step (checkpoint to checkpoint)")
    print(f"fused speedup over one task per step: {report['fused_speedup']:.1f}x")
    print(f"load average before {report['load_before']}, after {report['load_after']}")


if __name__ == "__main__":
    sys.exit(main())
