"""Benchmark: what an LLM step costs on top of the model call it makes.

Target: ``llm_overhead_ms`` <= 20 (median per call).

One loopback OpenAI chat-completions server (``ledgerflow.testing.openai_peer``) answers
every request with the same valid triage JSON. Two ways of asking it, interleaved call by
call (a, b, a, b...):

* ``direct`` - pydantic-ai alone: one ``Agent`` on the model that common.ai's
  ``PydanticAIHook`` resolves from the same ``pydanticai`` connection, the same output
  type (prompted JSON with the step's schema) and instructions, ``run_sync(prompt)``;
* ``step``   - ``execute_llm_step`` of the ``ticket_triage`` workflow's ``classify``
  step, a new run each call, the ledger on a fresh Postgres database: checkpoint lookup,
  run registration, attempt, prompt and key rendering, cache lookup, the model call
  (through the hook and the agent the step builds), JSON Schema validation, the call row,
  the checks, the branch decision and the checkpoint.

Both run in this process, after warm-up calls of each. ``llm_overhead_ms`` is
median(step) - median(direct). The step also runs with a cache hit (same key: no model
call) to show the ledger-only path.

Then, the figure of issue 12 (``bench/_llm_step.py``, ``measure_llm_step``): an LLM step
run by the kernel inside a task process forked from a preloaded parent, as Airflow forks
one, ``--steps`` LLM steps of one run one after another (a fused segment), minus the
model's time as the loopback peer measured it (``--think-ms`` per answer). Reported:
the median per-step overhead, and the first step of each task process (what a lone LLM
task pays before Airflow's own task start-up), with and without ``LLM_MODULES`` preloaded.

The last line is ``llm_overhead_ms=<x> llm_step_overhead_ms=<median per-step overhead in a
task process>`` (targets 20 and 100).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict

# bench/ is on sys.path when run as a script
from _llm_step import LlmStepFigures, measure_llm_step
from harness import RESULTS, ROOT, git_revision, write_results

TARGET_MS = 20.0
STEP_TARGET_MS = 100.0
ANSWER = json.dumps(
    {
        "category": "billing",
        "priority": "high",
        "summary": "Charged twice for one order.",
        "confidence": 0.93,
    }
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=60, help="timed calls of each (>= 50)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="LLM steps per task process")
    parser.add_argument("--rounds", type=int, default=3, help="task processes (of each kind)")
    parser.add_argument("--think-ms", type=float, default=50.0, help="the model's time")
    parser.add_argument("--repeats", type=int, default=2, help="of each kind, interleaved")
    args = parser.parse_args()

    import logging

    from ledgerflow.testing.openai_peer import OpenAIPeer
    from ledgerflow.testing.postgres import fresh_database

    # Every request would log a line (httpx, the hook): keep stdout for the report.
    for name in ("httpx", "httpx2", "airflow.task.hooks"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with OpenAIPeer() as peer, fresh_database("lf_bench_llm") as pg:
        peer.default = ANSWER
        os.environ["AIRFLOW_CONN_LEDGERFLOW_LLM"] = peer.connection_uri()
        ledger_url = pg.replace("postgresql://", "postgresql+psycopg2://", 1)
        figures = run(peer, ledger_url, args)
        # Interleaved (a busy machine or a busy Postgres slows whichever runs then).
        in_task: dict[bool, list[LlmStepFigures]] = {False: [], True: []}
        for rep in range(args.repeats):
            for preloaded in (False, True) if rep % 2 == 0 else (True, False):
                in_task[preloaded].append(
                    measure_llm_step(
                        steps=args.steps,
                        rounds=args.rounds,
                        think_ms=args.think_ms,
                        preload_llm=preloaded,
                        ledger_url=ledger_url,
                    )
                )
    report(figures, in_task, args)


def run(peer: object, ledger_url: str, args: argparse.Namespace) -> dict[str, list[float]]:
    from pydantic_ai import Agent

    from ledgerflow.ledger.store import Ledger
    from ledgerflow.llm.call import output_type
    from ledgerflow.llm.local import LedgerflowAIHook
    from ledgerflow.spec.models import KeyedIdempotency, LlmStep
    from ledgerflow.steps.llm import execute_llm_step
    from ledgerflow.steps.protocol import RunRef
    from ledgerflow.workflow.validate import load_workflow

    spec = load_workflow(ROOT / "dags" / "workflows" / "ticket_triage" / "v1.yaml")
    step = spec.step("classify")
    assert isinstance(step, LlmStep)
    # The same step keyed by the ticket: every run after the first finds the answer.
    keyed = step.model_copy(update={"idempotency": KeyedIdempotency(key="{{ params.ticket_id }}")})
    ledger = Ledger(ledger_url)
    ledger.migrate()
    params = {"ticket_id": "B-1", "ticket": "I was charged twice for order 1001."}
    prompt = f"Classify support ticket {params['ticket_id']}.\n\n{params['ticket']}\n"
    hook = LedgerflowAIHook(llm_conn_id=step.conn_id)
    direct_agent = Agent(
        hook.get_conn(),
        output_type=output_type(step),
        instructions=step.system_prompt,
        model_settings={"temperature": 0, "max_tokens": 300},
    )
    counter = iter(range(10**9))

    def direct() -> None:
        result = direct_agent.run_sync(prompt)
        assert result.output["category"] == "billing"

    def step_call(cached: bool = False) -> None:
        result = execute_llm_step(
            ledger,
            spec,
            keyed if cached else step,
            RunRef(run_id=f"ticket_triage__v1/b{next(counter)}", dag_id="ticket_triage__v1"),
            params=params,
        )
        assert result.path == "main", result

    for _ in range(args.warmup):
        direct()
        step_call()
        step_call(cached=True)
    times: dict[str, list[float]] = {"direct": [], "step": [], "step_cached": []}
    cpu: dict[str, list[float]] = {"direct": [], "step": [], "step_cached": []}
    before = peer.calls()  # type: ignore[attr-defined]
    for i in range(args.calls):
        order = [("direct", direct), ("step", step_call)]
        for name, fn in order if i % 2 == 0 else reversed(order):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
            cpu[name].append((time.process_time() - c0) * 1000)
        c0, t0 = time.process_time(), time.perf_counter()
        step_call(cached=True)
        times["step_cached"].append((time.perf_counter() - t0) * 1000)
        cpu["step_cached"].append((time.process_time() - c0) * 1000)
    model_calls = peer.calls() - before  # type: ignore[attr-defined]
    return {**times, **{f"cpu_{k}": v for k, v in cpu.items()}, "model_calls": [model_calls]}


def report(
    figures: dict[str, list[float]],
    in_task: dict[bool, list[LlmStepFigures]],
    args: argparse.Namespace,
) -> None:
    med = {k: statistics.median(v) for k, v in figures.items()}
    overhead = med["step"] - med["direct"]
    print(f"LLM step overhead: {args.calls} calls each, interleaved; load {os.getloadavg()[0]:.2f}")
    print(
        f"  direct pydantic-ai call   median {med['direct']:7.2f} ms  (cpu {med['cpu_direct']:.2f} ms)"
    )
    print(
        f"  LLM step (model called)   median {med['step']:7.2f} ms  (cpu {med['cpu_step']:.2f} ms)"
    )
    print(
        f"  LLM step (recorded answer reused, no model call) median {med['step_cached']:7.2f} ms"
        f"  (cpu {med['cpu_step_cached']:.2f} ms)"
    )
    print(
        f"  requests at the server during the timed calls: {int(figures['model_calls'][0])}"
        f" (expected {2 * args.calls}: the reused answers made none)"
    )
    cpu_overhead = med["cpu_step"] - med["cpu_direct"]
    print(f"  overhead per call: {overhead:.2f} ms (target <= {TARGET_MS:.0f} ms)")
    print(f"  CPU overhead per call: {cpu_overhead:.2f} ms (not inflated by a busy machine)")
    first = in_task[True][0]
    print(
        f"LLM step run by the kernel in a forked task process: {first.rounds} processes x "
        f"{first.steps} steps, model {first.think_ms:.0f} ms per answer, "
        f"{len(in_task[True])} measurements of each kind, interleaved"
    )
    medians: dict[bool, dict[str, float]] = {}
    for preloaded, runs in in_task.items():
        label = "LLM modules preloaded" if preloaded else "not preloaded        "
        for f in runs:
            print(
                f"  {label}: per step {f.step_ms:7.2f} ms - model {f.model_ms:6.2f} ms = overhead "
                f"{f.overhead_ms:7.2f} ms (cpu {f.cpu_ms:.2f} ms); first step of a task process:"
                f" overhead {f.first_overhead_ms:8.2f} ms; load {f.load:.2f}"
            )
        medians[preloaded] = {
            "overhead_ms": statistics.median(f.overhead_ms for f in runs),
            "first_overhead_ms": statistics.median(f.first_overhead_ms for f in runs),
        }
    step_overhead = medians[True]["overhead_ms"]
    print(
        f"  medians, not preloaded -> preloaded: per step {medians[False]['overhead_ms']:.2f} -> "
        f"{step_overhead:.2f} ms (target <= {STEP_TARGET_MS:.0f} ms); first step of a task "
        f"process {medians[False]['first_overhead_ms']:.2f} -> "
        f"{medians[True]['first_overhead_ms']:.2f} ms (Airflow's own task start-up comes on "
        "top: bench/overhead.py)"
    )
    results = {
        "medians_ms": med,
        "calls": args.calls,
        "overhead_ms": overhead,
        "cpu_overhead_ms": cpu_overhead,
        "in_task": {str(k): [asdict(f) for f in v] for k, v in in_task.items()},
        "in_task_medians": {str(k): v for k, v in medians.items()},
        "load": os.getloadavg()[0],
    }
    results.setdefault("git", git_revision())
    write_results(RESULTS / "llm_overhead.json", results)
    print(f"llm_overhead_ms={overhead:.2f} llm_step_overhead_ms={step_overhead:.2f}")


if __name__ == "__main__":
    main()
