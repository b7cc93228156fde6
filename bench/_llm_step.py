"""What an LLM step costs on top of its model, run by the kernel inside a task process.

``measure_llm_overhead(...)`` returns the median per-step overhead in ms (for
``bench/fused.py`` and ``bench/llm_overhead.py``); ``measure_llm_step(...)`` returns every
figure.

How it measures, the way Airflow runs a task:

* a fresh interpreter plays the worker: it imports Airflow's task runner and calls
  ``ledgerflow.preload.preload(llm=...)`` as the Ledgerflow plugin does in every component,
  loads the workflow and starts the loopback OpenAI peer (``think_ms`` per answer, the
  model's own time);
* per round it forks a child (after ``gc.freeze()``, as the LocalExecutor does before it
  forks), as Airflow forks a task process (``supervise``). The child
  runs one run of a workflow of ``steps`` chained LLM steps (distinct ids, one JSON
  Schema, repairs and checks like ``ticket_triage``'s) through the kernel
  (``execute_llm_step`` -> ``run_step``) on a Postgres ledger, one after another, as a
  fused segment would, and times each step;
* the model's time of a step is what the peer spent on that step's requests (each prompt
  names its run and step), so the overhead is everything else: the kernel and the
  ledger, the connection and the hook, the agent, pydantic-ai and the HTTP client.

The child's first step carries what a process pays once (the model's HTTP client, the
first run of pydantic-ai, anything not preloaded): ``first_overhead_ms``, the cost of a lone
LLM task before Airflow's own task start-up. ``overhead_ms`` is the median over every
step of every round (a fused segment's figure). The connection comes from an
``AIRFLOW_CONN_*`` variable, as in the demo and the compose stack.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CONN_ID = "ledgerflow_bench_llm"
ANSWER = {"category": "billing", "priority": "high", "summary": "Charged twice.", "confidence": 0.9}
WORKFLOW = "llm_bench"


@dataclass(frozen=True)
class LlmStepFigures:
    overhead_ms: float  # median over every step of every round
    first_overhead_ms: float  # median over rounds of each child's first step
    step_ms: float  # median wall time of a step
    model_ms: float  # median time the peer spent on a step's requests
    cpu_ms: float  # median CPU time of a step in the child
    steps: int
    rounds: int
    think_ms: float
    preload_llm: bool
    load: float


def measure_llm_overhead(
    *,
    steps: int = 10,
    rounds: int = 3,
    think_ms: float = 50.0,
    preload_llm: bool = True,
    ledger_url: str | None = None,
) -> float:
    """The median per-step overhead (ms) of an LLM step inside a task process."""
    return measure_llm_step(
        steps=steps,
        rounds=rounds,
        think_ms=think_ms,
        preload_llm=preload_llm,
        ledger_url=ledger_url,
    ).overhead_ms


def measure_llm_step(
    *,
    steps: int = 10,
    rounds: int = 3,
    think_ms: float = 50.0,
    preload_llm: bool = True,
    ledger_url: str | None = None,
) -> LlmStepFigures:
    """Every figure (see the module); ``ledger_url`` is a migrated ledger (SQLAlchemy URL),
    else a fresh Postgres database is made and dropped."""
    if ledger_url is None:
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.testing.postgres import fresh_database

        with fresh_database("lf_bench_llm_step") as pg:
            url = pg.replace("postgresql://", "postgresql+psycopg2://", 1)
            Ledger(url).migrate()
            return _in_fresh_interpreter(steps, rounds, think_ms, preload_llm, url)
    return _in_fresh_interpreter(steps, rounds, think_ms, preload_llm, ledger_url)


def _in_fresh_interpreter(
    steps: int, rounds: int, think_ms: float, preload_llm: bool, ledger_url: str
) -> LlmStepFigures:
    args = {
        "steps": steps,
        "rounds": rounds,
        "think_ms": think_ms,
        "preload_llm": preload_llm,
        "ledger_url": ledger_url,
    }
    with tempfile.TemporaryDirectory(prefix="lf_llm_step_") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(AIRFLOW_HOME=home, AIRFLOW__CORE__LOAD_EXAMPLES="False")
        done = subprocess.run(
            [sys.executable, __file__, json.dumps(args)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{done.stderr[-3000:]}")
    samples = json.loads(done.stdout.strip().splitlines()[-1])
    overheads = [s["wall"] - s["model"] for s in samples]
    firsts = [s["wall"] - s["model"] for s in samples if s["index"] == 0]
    return LlmStepFigures(
        overhead_ms=round(statistics.median(overheads) * 1000, 2),
        first_overhead_ms=round(statistics.median(firsts) * 1000, 2),
        step_ms=round(statistics.median(s["wall"] for s in samples) * 1000, 2),
        model_ms=round(statistics.median(s["model"] for s in samples) * 1000, 2),
        cpu_ms=round(statistics.median(s["cpu"] for s in samples) * 1000, 2),
        steps=steps,
        rounds=rounds,
        think_ms=think_ms,
        preload_llm=preload_llm,
        load=os.getloadavg()[0],
    )


def _workflow(steps: int) -> str:
    schema = {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": ["billing", "technical", "account", "other"]},
            "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
            "summary": {"type": "string", "minLength": 1, "maxLength": 300},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["category", "priority", "summary", "confidence"],
        "additionalProperties": False,
    }
    body: dict[str, Any] = {
        "name": WORKFLOW,
        "version": 1,
        "params": {"ticket": {"type": "string", "default": "I was charged twice."}},
        "steps": [],
    }
    for i in range(steps):
        step: dict[str, Any] = {
            "id": f"ask_{i}",
            "kind": "llm",
            "conn_id": CONN_ID,
            "system_prompt": "You triage support tickets. Answer with the JSON asked for.",
            # The marker (run and step) lets the peer's timings be told apart per step.
            "prompt": f"[{{{{ run.id }}}}/ask_{i}] Classify: {{{{ params.ticket }}}}",
            "output_schema": schema,
            "model_settings": {"temperature": 0, "max_tokens": 300},
            "repair_attempts": 1,
            "checks": [{"expr": "output.confidence >= 0.7", "message": "confidence below 0.7"}],
        }
        if i:
            step["needs"] = [f"ask_{i - 1}"]
        body["steps"].append(step)
    return json.dumps(body)


def _worker(args: dict[str, Any]) -> None:
    """The fresh interpreter: preload like a worker, then fork one task process per round."""
    import logging

    # What a worker has imported before it forks a task process (it runs ``supervise``).
    import airflow.sdk.execution_time.supervisor
    import airflow.sdk.execution_time.task_runner  # noqa: F401

    from ledgerflow.preload import preload

    try:
        preload(llm=args["preload_llm"])
    except TypeError:  # a checkout from before preload(llm=...): its own preload
        preload()

    from ledgerflow.testing.openai_peer import OpenAIPeer
    from ledgerflow.workflow.validate import load_workflow

    for name in ("httpx", "httpx2", "airflow.task.hooks"):
        logging.getLogger(name).setLevel(logging.WARNING)
    folder = Path(tempfile.mkdtemp(prefix="lf_llm_wf_")) / "workflows" / WORKFLOW
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(_workflow(args["steps"]), encoding="utf-8")
    spec = load_workflow(folder / "v1.yaml")
    samples: list[dict[str, Any]] = []
    with OpenAIPeer() as peer:
        peer.default = json.dumps(ANSWER)
        peer.think_s = args["think_ms"] / 1000
        os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = peer.connection_uri()
        # Airflow's LocalExecutor freezes the collector before it forks its workers: the
        # objects the parent imported are not traversed again by each child's collections.
        gc.freeze()
        batch = uuid.uuid4().hex[:8]  # a ledger may be measured more than once
        for r in range(args["rounds"]):
            run_id = f"{WORKFLOW}__v1/{batch}-r{r}"
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the task process
                os.close(read)
                code = 0
                try:
                    timed = _task(spec, run_id, args["ledger_url"])
                    os.write(write, json.dumps(timed).encode())
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            os.close(write)
            with os.fdopen(read, "rb") as pipe:
                timed = json.loads(pipe.read() or b"[]")
            _, status = os.waitpid(pid, 0)
            if status != 0 or not timed:
                raise RuntimeError(f"round {r}: the task process failed ({status})")
            for index, (step_id, wall, cpu) in enumerate(timed):
                marker = f"[{run_id}/{step_id}]"
                model = sum(s for text, s in list(peer.served) if marker in text)
                samples.append(
                    {"index": index, "step": step_id, "wall": wall, "cpu": cpu, "model": model}
                )
    print(json.dumps(samples))


def _task(spec: Any, run_id: str, ledger_url: str) -> list[tuple[str, float, float]]:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.kernel import RunRef
    from ledgerflow.steps.llm import execute_llm_step

    ledger = Ledger(ledger_url)
    run = RunRef(run_id=run_id, dag_id=f"{WORKFLOW}__v1")
    timed = []
    for step in spec.steps:
        c0, t0 = time.process_time(), time.perf_counter()
        result = execute_llm_step(ledger, spec, step, run, params={"ticket": "Charged twice."})
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if result.path != "main":
            raise RuntimeError(f"step {step.id}: {result}")
        timed.append((step.id, wall, cpu))
    return timed


NOOP_WORKFLOW = """name: llm_bench_noop
version: 1
steps:
  - id: noop
    tool: demo.noop
    args: {value: x}
    idempotency: natural
"""


def measure_lone_llm_task(
    *, runs: int = 5, think_ms: float = 50.0, preload_llm: bool = True
) -> dict[str, Any]:
    """A workflow of one LLM step on real Airflow processes (``bench/harness.deployment``),
    and beside it a workflow of one ``demo.noop`` tool step: Airflow's own cost of a task.
    ``runs`` runs of each, interleaved, one at a time, after two warm-up runs of each. A
    task's duration is Airflow's (its start to its end: the task process's start-up, the
    DAG file's parse, the step); the LLM task's overhead is its duration minus the model's
    time at the peer, and what the LLM step adds to a task is that minus the noop task's
    duration. ``preload_llm`` is the deployment's ``[ledgerflow] preload_llm`` (``auto``,
    which preloads in the scheduler, or ``false``)."""
    from datetime import datetime

    from harness import deployment, logger, new_base, write_workflow
    from ledgerflow.testing.openai_peer import OpenAIPeer

    log = logger("llm_task")
    base = new_base("llm_task")
    write_workflow(base / "dags", WORKFLOW, _workflow(1))
    write_workflow(base / "dags", "llm_bench_noop", NOOP_WORKFLOW)
    figures: dict[str, list[float]] = {"llm": [], "model": [], "noop": []}

    def task_seconds(stack: Any, dag_id: str, task_id: str) -> tuple[str, float]:
        run_id = stack.trigger(dag_id, {})
        state = stack.wait_for_run(dag_id, run_id, timeout=300)
        if state != "success":
            raise RuntimeError(f"{dag_id} run {run_id} ended {state}")
        (ti,) = [t for t in stack.task_instances(dag_id, run_id) if t["task_id"] == task_id]
        start = datetime.fromisoformat(ti["start_date"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(ti["end_date"].replace("Z", "+00:00"))
        return run_id, (end - start).total_seconds()

    with OpenAIPeer() as peer:
        peer.default = json.dumps(ANSWER)
        peer.think_s = think_ms / 1000
        env = {
            f"AIRFLOW_CONN_{CONN_ID.upper()}": peer.connection_uri(),
            "AIRFLOW__LEDGERFLOW__PRELOAD_LLM": "auto" if preload_llm else "false",
        }
        dag_ids = [f"{WORKFLOW}__v1", "llm_bench_noop__v1"]
        with deployment("llm_task", base, dag_ids, log, extra_env=env) as dep:
            for i in range(runs + 2):
                order = ("llm", "noop") if i % 2 == 0 else ("noop", "llm")
                for kind in order:
                    if kind == "noop":
                        _, noop = task_seconds(dep.stack, "llm_bench_noop__v1", "noop")
                        continue
                    run_id, llm = task_seconds(dep.stack, f"{WORKFLOW}__v1", "ask_0")
                    marker = f"[{WORKFLOW}__v1/{run_id}/ask_0]"
                    model = sum(t for text, t in list(peer.served) if marker in text)
                log(
                    f"round {i}: LLM task {llm:.3f} s (model {model:.3f} s), noop task {noop:.3f} s"
                )
                if i >= 2:
                    figures["llm"].append(llm)
                    figures["model"].append(model)
                    figures["noop"].append(noop)

    def median_ms(values: Any) -> float:
        return round(statistics.median(values) * 1000, 1)

    llm, model, noop = figures["llm"], figures["model"], figures["noop"]
    return {
        "llm_task_ms": median_ms(llm),
        "model_ms": median_ms(model),
        "llm_task_minus_model_ms": median_ms(a - m for a, m in zip(llm, model, strict=True)),
        "noop_task_ms": median_ms(noop),
        "llm_step_beyond_a_task_ms": median_ms(
            a - m - n for a, m, n in zip(llm, model, noop, strict=True)
        ),
        "runs": runs,
        "preload_llm": preload_llm,
        "load": os.getloadavg()[0],
    }


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--think-ms", type=float, default=50.0)
    parser.add_argument("--no-preload-llm", action="store_true")
    parser.add_argument(
        "--airflow", type=int, default=0, metavar="RUNS", help="also a lone LLM task on Airflow"
    )
    args = parser.parse_args()
    if args.airflow:
        print(
            json.dumps(
                measure_lone_llm_task(
                    runs=args.airflow, think_ms=args.think_ms, preload_llm=not args.no_preload_llm
                )
            )
        )
    figures = measure_llm_step(
        steps=args.steps,
        rounds=args.rounds,
        think_ms=args.think_ms,
        preload_llm=not args.no_preload_llm,
    )
    print(json.dumps(asdict(figures)))
    print(f"llm_step_overhead_ms={figures.overhead_ms:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        _worker(json.loads(sys.argv[1]))
    else:
        main()
