"""Throughput on Celery: N runs of a 5-step keyed workflow, and the same shape as a
hand-written Airflow DAG, on one CeleryExecutor deployment with 2 workers (issue 14).

One Airflow deployment (``AirflowStack(executor="celery", celery_workers=2)``: RabbitMQ on
127.0.0.1:5672, the metadata database as the result backend) and a loopback HTTP API that
keeps one effect per ``Idempotency-Key`` (``ledgerflow.testing.http_peer.CountingPeer``):

* ``ours``: a Ledgerflow workflow of 5 ``http`` steps in a chain, each keyed
  (``tp-s<i>-<order>``): checkpoints, attempts and effects in the ledger;
* ``plain``: a hand-written DAG of 5 ``@task``s in a chain, each POSTing the same request
  with the same kind of key (httpx), no ledger: what Airflow itself costs.

Each kind: trigger ``--runs`` runs (``max_active_runs`` 16 both), wait until every run has
ended, runs per minute = runs / (last end - first trigger). The kinds alternate halves
(ours, plain, plain, ours) so neither always has the quieter machine. Then it counts, per
run of ours: ``duplicates`` (effects at the API beyond one per step) and ``lost`` (runs not
succeeded in Airflow or in the ledger, or a step without its effect).

Last line: ``throughput_ratio=<ours/plain runs per minute> runs_per_min=<ours>
duplicates=<n> lost=<n>``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness import (
    RESULTS,
    deployment,
    git_revision,
    logger,
    new_base,
    settled_statuses,
    write_results,
    write_workflow,
)

STEPS = 5
MAX_ACTIVE = 16
log = logger("throughput")

PLAIN = '''"""The hand-written baseline of bench/throughput.py: 5 keyed POSTs in a chain."""
import httpx
import pendulum
from airflow.sdk import DAG, task

URL = "{url}"

with DAG(
    "tp_plain",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs={max_active},
):
    previous = None
    for i in range(1, {steps} + 1):

        @task(task_id=f"s{{i}}", retries=2)
        def post(i=i, dag_run=None):
            order = dag_run.conf["order_id"]
            reply = httpx.post(
                f"{{URL}}/plain/s{{i}}",
                json={{"order": order}},
                headers={{"Idempotency-Key": f"plain-s{{i}}-{{order}}"}},
                timeout=60,
            )
            reply.raise_for_status()
            return reply.json()

        current = post()
        if previous is not None:
            previous >> current
        previous = current
'''


def ours_yaml(url: str) -> str:
    lines = [
        "name: tp",
        "version: 1",
        f"max_active_runs: {MAX_ACTIVE}",
        "params:",
        "  order_id: {type: string, required: true}",
        "steps:",
    ]
    for i in range(1, STEPS + 1):
        lines += [
            f"  - id: s{i}",
            *([f"    needs: [s{i - 1}]"] if i > 1 else []),
            "    tool: http",
            f'    args: {{url: "{url}/ours/s{i}", json: {{order: "{{{{ params.order_id }}}}"}}}}',
            f'    idempotency: {{key: "tp-s{i}-{{{{ params.order_id }}}}"}}',
        ]
    return "\n".join(lines) + "\n"


def _count(stack: Any, dag_id: str, state: str) -> int:
    page = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"state": state, "limit": 1})
    return int(page["total_entries"])


def measure(stack: Any, dag_id: str, orders: list[str], timeout: float) -> dict[str, Any]:
    """Trigger a run per order, wait until all ended; the runs per minute."""
    import httpx

    before = {s: _count(stack, dag_id, s) for s in ("success", "failed")}
    t0 = time.monotonic()
    for n, order in enumerate(orders, 1):
        stack.trigger(dag_id, {"order_id": order})
        if n % 100 == 0:
            log(f"{dag_id}: {n}/{len(orders)} triggered")
    deadline = t0 + timeout
    ended = {"success": 0, "failed": 0}
    last_report = 0.0
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):  # a busy api-server: ask again
            ended = {s: _count(stack, dag_id, s) - before[s] for s in ("success", "failed")}
        if sum(ended.values()) >= len(orders):
            break
        if time.monotonic() - last_report > 30:
            log(f"{dag_id}: {ended} of {len(orders)} ended")
            last_report = time.monotonic()
        time.sleep(1.0)
    elapsed = time.monotonic() - t0
    return {
        "runs": len(orders),
        "succeeded": ended["success"],
        "failed": ended["failed"],
        "seconds": round(elapsed, 2),
        "runs_per_min": round(len(orders) * 60 / elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=1000, help="runs of each kind (default 1000)")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="task slots per worker (default 4)"
    )
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per half")
    parser.add_argument("--json", type=Path, default=RESULTS / "throughput.json")
    parser.add_argument("--keep", action="store_true", help="leave the stack running")
    args = parser.parse_args(argv)

    from ledgerflow.testing.http_peer import CountingPeer

    report: dict[str, Any] = {"git": git_revision(), "runs": args.runs, "workers": args.workers}
    base = new_base("throughput")
    with CountingPeer() as peer:
        write_workflow(base / "dags", "tp", ours_yaml(peer.url))
        (base / "dags" / "tp_plain.py").write_text(
            PLAIN.format(url=peer.url, steps=STEPS, max_active=MAX_ACTIVE)
        )
        slots = args.workers * args.concurrency
        with deployment(
            "throughput",
            base,
            ["tp__v1", "tp_plain"],
            log,
            parallelism=slots,
            stack_options={
                "executor": "celery",
                "celery_workers": args.workers,
                "worker_concurrency": args.concurrency,
            },
        ) as env:
            env.keep = args.keep
            half = args.runs // 2
            halves = [("ours", 0, half), ("plain", 0, half)]
            halves += [("plain", half, args.runs), ("ours", half, args.runs)]
            results: dict[str, list[dict[str, Any]]] = {"ours": [], "plain": []}
            for kind, lo, hi in halves:
                if hi <= lo:
                    continue
                dag_id = "tp__v1" if kind == "ours" else "tp_plain"
                orders = [f"{kind}-{n}" for n in range(lo, hi)]
                log(f"{kind}: runs {lo}..{hi - 1}")
                results[kind].append(measure(env.stack, dag_id, orders, args.timeout))
                log(f"{kind}: {results[kind][-1]}")

            ledger_states = settled_statuses(env.ledger, "tp__v1")
        effects: Counter[tuple[str, str]] = Counter()
        for path, body in peer.effects.values():
            if path.startswith("/ours/"):
                effects[(body["order"], path)] += 1
    per_kind = {}
    for kind, parts in results.items():
        runs = sum(p["runs"] for p in parts)
        seconds = sum(p["seconds"] for p in parts)
        per_kind[kind] = {
            "runs": runs,
            "succeeded": sum(p["succeeded"] for p in parts),
            "failed": sum(p["failed"] for p in parts),
            "seconds": round(seconds, 2),
            "runs_per_min": round(runs * 60 / seconds, 2) if seconds else 0.0,
        }
    ours = per_kind["ours"]
    orders = [f"ours-{n}" for n in range(args.runs)]
    duplicates = sum(n - 1 for n in effects.values() if n > 1)
    missing = {o for o in orders for i in range(1, STEPS + 1) if effects[(o, f"/ours/s{i}")] == 0}
    lost = max(ours["runs"] - ours["succeeded"], len(missing))
    lost = max(lost, ours["runs"] - ledger_states.get("succeeded", 0))
    ratio = ours["runs_per_min"] / per_kind["plain"]["runs_per_min"]
    load = os.getloadavg()
    report.update(
        {
            "kinds": per_kind,
            "ledger_runs": dict(ledger_states),
            "duplicates": duplicates,
            "lost": lost,
            "throughput_ratio": round(ratio, 3),
            "loadavg": [round(x, 2) for x in load],
        }
    )
    write_results(args.json, report)
    print(
        f"ours:  {ours['runs']} runs in {ours['seconds']:.0f} s = {ours['runs_per_min']:.1f}/min"
        f" ({ours['failed']} failed)\n"
        f"plain: {per_kind['plain']['runs']} runs in {per_kind['plain']['seconds']:.0f} s = "
        f"{per_kind['plain']['runs_per_min']:.1f}/min\n"
        f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        f"throughput_ratio={ratio:.3f} runs_per_min={ours['runs_per_min']:.1f} "
        f"duplicates={duplicates} lost={lost}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
