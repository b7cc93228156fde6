"""Soak on Celery (issue 14, not in CI): many runs of a keyed workflow on a CeleryExecutor
deployment with 2 workers, Celery workers SIGKILLed at random, and the ledger's Postgres
restarted once (as by a crash) midway; then the counts of what it left behind.

One Airflow deployment (``AirflowStack(executor="celery")``, the broker a virtual host of
the machine's RabbitMQ) whose ledger lives on a Postgres of its own
(:class:`ledgerflow.testing.private_services.PrivatePostgres`, so that restarting it
disturbs nothing else on the machine), and a loopback HTTP API that keeps one effect per
``Idempotency-Key`` (:class:`ledgerflow.testing.http_peer.CountingPeer`).

The workflow: ``charge`` (a keyed POST, 0.3 s at the API) and ``ship`` (a row of
``demo_shipments`` written with its checkpoint, in the ledger's database), fused into one
task. A feeder keeps at most ``--in-flight`` runs queued or running; every
``--kill-every`` seconds (+-50 %) one worker, chosen at random, is SIGKILLed and started
again; when half the runs have ended, the ledger's Postgres stops (immediate
mode: every connection cut), stays down ``--pg-down`` seconds and starts again.

Counts, per order: ``terminal`` (its DagRun ended), ``duplicates`` (charges at the API or
shipment rows beyond one), ``lost`` (not succeeded in Airflow or in the ledger, or an
effect missing). Last line: ``runs=<n> terminal=<n> duplicates=<n> lost=<n>
runs_per_min=<x> load_avg=<1-minute load average at the end>``.

    ../.venv/bin/python soak.py              # 5,000 runs (hours on a 2-core machine)
    ../.venv/bin/python soak.py --runs 200   # a short soak
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
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

log = logger("soak")

WORKFLOW = """
name: soak
version: 1
max_active_runs: {in_flight}
params:
  order_id: {{type: string, required: true}}
defaults:
  retry: {{max_attempts: 8, backoff: {{initial: 2s, multiplier: 2, max: 15s}}}}
steps:
  - id: charge
    segment: order
    tool: http
    args: {{url: "{url}/charge", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "charge-{{{{ params.order_id }}}}"}}
  - id: ship
    needs: [charge]
    segment: order
    tool: demo.create_shipment
    args: {{order_id: "{{{{ params.order_id }}}}", address: "1 Loop Rd"}}
    idempotency: {{key: "ship-{{{{ params.order_id }}}}"}}
"""
DAG = "soak__v1"


def _count(stack: Any, state: str) -> int:
    import httpx

    for _ in range(30):
        with contextlib.suppress(httpx.TransportError):
            page = stack.api(
                "GET", f"/api/v2/dags/{DAG}/dagRuns", params={"state": state, "limit": 1}
            )
            return int(page["total_entries"])
        time.sleep(1)
    raise RuntimeError("the api-server did not answer for 30 s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5000, help="runs in all (default 5000)")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="slots per worker (default 4)")
    parser.add_argument(
        "--in-flight", type=int, default=100, help="runs queued or running at most (default 100)"
    )
    parser.add_argument(
        "--kill-every", type=float, default=60.0, help="seconds between worker kills (default 60)"
    )
    parser.add_argument(
        "--pg-down", type=float, default=5.0, help="seconds the ledger's Postgres is down"
    )
    parser.add_argument("--seed", type=int, default=14, help="random seed of the kills")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds in all")
    parser.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args(argv)

    from sqlalchemy import text

    from ledgerflow.testing.http_peer import CountingPeer
    from ledgerflow.testing.private_services import PrivatePostgres

    rng = random.Random(args.seed)
    report: dict[str, Any] = {"git": git_revision(), "runs": args.runs, "workers": args.workers}
    base = new_base("soak")
    orders = [f"soak-{n}" for n in range(args.runs)]
    kills: Counter[str] = Counter()
    with CountingPeer(delay=0.05, delays={"/charge": 0.3}) as peer, PrivatePostgres() as pg:
        ledger_url = pg.create_database("lf_soak_ledger")
        write_workflow(
            base / "dags", "soak", WORKFLOW.format(url=peer.url, in_flight=args.in_flight)
        )
        with deployment(
            "soak",
            base,
            [DAG],
            log,
            parallelism=args.workers * args.concurrency,
            extra_env={
                "LEDGERFLOW_DEMO_TOOLS": "1",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
                "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": str(args.in_flight),
            },
            stack_options={
                "executor": "celery",
                "celery_workers": args.workers,
                "worker_concurrency": args.concurrency,
            },
            ledger_url=ledger_url,
        ) as env:
            env.ledger.migrate(demo=True)
            stack = env.stack
            run_ids: dict[str, str] = {}
            restarted = False
            t0 = time.monotonic()
            deadline = t0 + args.timeout
            next_kill = t0 + args.kill_every * rng.uniform(0.5, 1.5)
            last_report = t0
            ended = 0
            while time.monotonic() < deadline:
                ended = _count(stack, "success") + _count(stack, "failed")
                room = args.in_flight - (len(run_ids) - ended)
                for order in orders[len(run_ids) : len(run_ids) + max(0, room)]:
                    run_ids[order] = stack.trigger(DAG, {"order_id": order})
                if not restarted and ended >= args.runs // 2:
                    log(f"restarting the ledger's Postgres ({args.pg_down:g} s down)")
                    pg.restart(down_for=args.pg_down)
                    restarted = True
                now = time.monotonic()
                if now >= next_kill and ended < args.runs:
                    victim = rng.choice(stack.workers)
                    stack.restart(victim, wait=False)
                    kills[victim] += 1
                    next_kill = now + args.kill_every * rng.uniform(0.5, 1.5)
                if now - last_report >= 30:
                    minutes = (now - t0) / 60
                    log(
                        f"{ended}/{args.runs} ended, {len(run_ids)} triggered, "
                        f"{ended / minutes:.1f} runs/min, kills {dict(kills)}"
                    )
                    last_report = now
                if ended >= args.runs:
                    break
                time.sleep(2)
            elapsed = time.monotonic() - t0
            states = Counter(
                {s: _count(stack, s) for s in ("success", "failed", "running", "queued")}
            )
            ledger_states = settled_statuses(env.ledger, DAG)
            with env.ledger.engine.connect() as conn:
                shipments = Counter(
                    row.order_id
                    for row in conn.execute(text("SELECT order_id FROM demo_shipments"))
                )
        charges = Counter(
            body["order"] for path, body in peer.effects.values() if path == "/charge"
        )
    terminal = states["success"] + states["failed"]
    duplicates = sum(n - 1 for n in charges.values() if n > 1)
    duplicates += sum(n - 1 for n in shipments.values() if n > 1)
    missing = {o for o in orders if not charges.get(o) or not shipments.get(o)}
    lost = max(
        len(orders) - states["success"],
        len(orders) - ledger_states.get("succeeded", 0),
        len(missing),
    )
    load = os.getloadavg()
    rate = terminal * 60 / elapsed if elapsed else 0.0
    report.update(
        {
            "seconds": round(elapsed, 1),
            "airflow": dict(states),
            "ledger": dict(ledger_states),
            "kills": dict(kills),
            "postgres_restarted": restarted,
            "terminal": terminal,
            "duplicates": duplicates,
            "lost": lost,
            "runs_per_min": round(rate, 2),
            "loadavg": [round(x, 2) for x in load],
        }
    )
    write_results(args.json, report)
    print(
        f"airflow {dict(states)}; ledger {dict(ledger_states)}; worker kills {dict(kills)}; "
        f"ledger Postgres restarted: {restarted}; {elapsed / 60:.1f} min"
    )
    print(
        f"runs={args.runs} terminal={terminal} duplicates={duplicates} lost={lost} "
        f"runs_per_min={rate:.1f} load_avg={load[0]:.2f}"
    )
    return 0 if duplicates == 0 and lost == 0 and terminal == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
