"""Benchmark: from an approval decision to the next task's start, Ledgerflow vs Airflow.

Target: ``approval_resume_ratio`` < 1.0 (Ledgerflow's median latency over Airflow's own
``ApprovalOperator``'s, both measured on the same Airflow in this script).

One real Airflow 3 deployment (``AirflowStack``: api-server with the Ledgerflow plugin,
scheduler, dag-processor, triggerer, LocalExecutor, Postgres metadata; the ledger on its
own Postgres database). Two DAGs of the same shape, an approval then one task:

* ``approval_latency__v1`` - a Ledgerflow workflow: ``ask`` (``kind: approval``) then
  ``next`` (``demo.noop``); decided through ``POST /ledgerflow/api/approvals/{id}/decision``;
* ``airflow_approval`` - a hand-written DAG: providers-standard ``ApprovalOperator`` then a
  ``PythonOperator``; decided through Airflow's own
  ``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/ask/-1/hitlDetails``.

Each round triggers both DAGs, waits until both approvals are parked (Ledgerflow's task
``deferred``, Airflow's ``awaiting_input``), then decides them one after the other. The
latency of one decision is Airflow's own ``start_date`` of the ``next`` task minus the
wall-clock time just before the decision call (same machine, same clock).

Why Ledgerflow's is faster: the api-server that takes the decision also ends the parked
task (its checkpoint completed, the branch's XCom set), so the scheduler can start the
next task at once; Airflow's ``ApprovalOperator`` is resumed on a worker first
(``execute_complete``). ``--via ledger`` measures the other path: the decision written
straight into the ledger, the trigger woken by Postgres NOTIFY ending the task.

The last line is ``approval_resume_ratio=<median ours / median airflow's>``.
"""

from __future__ import annotations

import argparse
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
    rounds,
    write_workflow,
)

OURS, THEIRS = "approval_latency__v1", "airflow_approval"

WORKFLOW = """
name: approval_latency
version: 1
max_active_runs: 100
steps:
  - id: ask
    kind: approval
    subject: "Benchmark approval {{ run.id }}"
    payload: {run: "{{ run.id }}"}
    approvers: {roles: [admin]}
    deadline: 1h
  - id: next
    needs: [ask]
    tool: demo.noop
    args: {value: "{{ steps.ask.output.decision }}"}
    idempotency: natural
"""

PLAIN = '''
"""Airflow's own approval, then one task (the baseline of bench/approval_latency.py)."""
import pendulum
from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG


def after(**_):
    return {"value": "approved"}


with DAG(
    dag_id="airflow_approval",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=100,
):
    ask = ApprovalOperator(task_id="ask", subject="Benchmark approval", body="Approve?")
    ask >> PythonOperator(task_id="next", python_callable=after)
'''


log = logger("approval_latency")


def write_dags(dags: Path) -> None:
    write_workflow(dags, "approval_latency", WORKFLOW)
    (dags / "airflow_approval.py").write_text(PLAIN)


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def ti(stack: Any, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
    result: dict[str, Any] = stack.api(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"
    )
    return result


def wait_state(stack: Any, dag_id: str, run_id: str, task_id: str, states: set[str]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if ti(stack, dag_id, run_id, task_id)["state"] in states:
                return
        except Exception:  # not created yet
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{dag_id}/{run_id} {task_id} never reached {states}")


def decide_ours(stack: Any, ledger: Any, run_id: str, via: str) -> float:
    from ledgerflow.ledger import approvals

    approval = approvals.for_step(ledger, f"{OURS}/{run_id}", "ask")
    assert approval is not None
    t0 = time.time()
    if via == "api":
        stack.api(
            "POST",
            f"/ledgerflow/api/approvals/{approval.id}/decision",
            json={"decision": "approve", "comment": "bench"},
        )
    else:  # straight into the ledger: the trigger, woken by NOTIFY, ends the task
        approvals.decide(ledger, approval.id, decision="approved", by="bench", comment="bench")
    return t0


def decide_theirs(stack: Any, run_id: str) -> float:
    t0 = time.time()
    stack.api(
        "PATCH",
        f"/api/v2/dags/{THEIRS}/dagRuns/{run_id}/taskInstances/ask/-1/hitlDetails",
        json={"chosen_options": ["Approve"]},
    )
    return t0


def latency(stack: Any, dag_id: str, run_id: str, t0: float) -> float:
    if stack.wait_for_run(dag_id, run_id, timeout=180) != "success":
        raise RuntimeError(f"{dag_id}/{run_id} did not succeed")
    return ts(ti(stack, dag_id, run_id, "next")["start_date"]) - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Decision -> next task start, Ledgerflow's approval step vs Airflow's "
        "ApprovalOperator, on one real Airflow."
    )
    parser.add_argument("--rounds", type=int, default=12, help="approvals per kind (>= 10)")
    parser.add_argument(
        "--via",
        choices=("api", "ledger"),
        default="api",
        help="how Ledgerflow's decision is taken: the REST endpoint (default; the api-server "
        "ends the task) or a direct ledger write (NOTIFY wakes the trigger, which ends it)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "approval_latency.json")
    args = parser.parse_args(argv)
    if args.rounds < 10:
        log(f"warning: --rounds {args.rounds}; the benchmark asks for at least 10")

    base = new_base("approval")
    write_dags(base / "dags")
    ours: list[float] = []
    theirs: list[float] = []
    with deployment("approval", base, [OURS, THEIRS], log, parallelism=16) as env:
        stack, ledger = env.stack, env.ledger
        # Round w1 warms both paths up; the order alternates, so that neither always
        # decides on a busier machine.
        for label, warm, order in rounds(args.rounds, ("ours", "theirs"), warmup=1):
            a = stack.trigger(OURS)
            b = stack.trigger(THEIRS)
            wait_state(stack, OURS, a, "ask", {"deferred"})
            wait_state(stack, THEIRS, b, "ask", {"awaiting_input", "deferred"})
            time.sleep(1.0)  # let both parked tasks' processes exit
            got: dict[str, float] = {}
            for who in order:
                if who == "ours":
                    got[who] = latency(stack, OURS, a, decide_ours(stack, ledger, a, args.via))
                else:
                    got[who] = latency(stack, THEIRS, b, decide_theirs(stack, b))
            la, lb = got["ours"], got["theirs"]
            if warm:
                log(f"warm-up: ours {la:.3f} s, airflow {lb:.3f} s")
                continue
            ours.append(la)
            theirs.append(lb)
            log(f"round {label}/{args.rounds}: ours {la:.3f} s, airflow {lb:.3f} s")

    med_ours, med_theirs = statistics.median(ours), statistics.median(theirs)
    ratio = med_ours / med_theirs
    report = {
        "rounds": args.rounds,
        "via": args.via,
        "ours_s": ours,
        "airflow_s": theirs,
        "median_ours_s": med_ours,
        "median_airflow_s": med_theirs,
        "approval_resume_ratio": ratio,
    }
    print(f"decision (ledgerflow via {args.via}) -> next task start, median of {args.rounds}:")
    print(
        f"  ledgerflow approval step   {med_ours * 1000:8.0f} ms  (min {min(ours) * 1000:.0f}, max {max(ours) * 1000:.0f})"
    )
    print(
        f"  airflow ApprovalOperator   {med_theirs * 1000:8.0f} ms  (min {min(theirs) * 1000:.0f}, max {max(theirs) * 1000:.0f})"
    )
    finish(args.json, report, "approval_resume_ratio", ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
