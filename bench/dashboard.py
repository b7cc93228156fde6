"""Benchmark: the dashboard page and ``ledgerflow slo`` over a ledger of 10,000 runs.

Targets: the page's median <= 1,000 ms, the command's median <= 1,000 ms.

A fresh Postgres ledger is filled through the ledger's own API (``ensure_run``,
``begin_attempt``, ``complete_step``, ``fail_attempt``, approvals, sagas, dead letters,
LLM calls: ``ledgerflow.testing.ledger_runs.populate``) with 10,000 runs of four
workflows spread over the last seven days, their times set on the ledger's clock: most
succeed, some retry a step, some wait for an approval, a few fail (half compensated, each
with a dead letter), some LLM answers fall back, a few are still running. Each workflow
declares an ``slo:``.

Measured, interleaved in rounds after warm-ups (alternating which goes first):

* ``dashboard`` - ``GET /ledgerflow/dashboard`` (every workflow, the 7-day window: the
  objectives, indicators and 64 charts) through the app's ASGI interface in this process,
  with Airflow's authentication replaced by a caller who may read the four DAGs (what
  Airflow adds per request, the token check and the readable-DAG lookup, is not in it);
* ``runs_page`` - ``GET /ledgerflow/runs`` (the newest 100 runs): the baseline page;
* ``slo`` - the command ``ledgerflow slo --url ...`` as a user runs it (a new process:
  interpreter start, imports, the queries, the report);
* ``runs_cli`` - ``ledgerflow runs --limit 1``: the floor of a command that reads the
  ledger (the same imports of SQLAlchemy and the ledger, a connection, one query);
* ``cli_floor`` - ``ledgerflow --version`` (the same interpreter start and imports of the
  entry point, no ledger): the command's floor;
* ``slo_report`` - the same report in this process (``slo.report``), without start-up.

The last line is ``dashboard_ms_p50=<n> slo_ms_p50=<n>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from harness import RESULTS, git_revision, logger, rounds, write_results

log = logger("dashboard")
WORKFLOWS = ("checkout", "onboarding", "ticket_triage", "nightly_report")
SLO = "slo: {completion_p95: 20s, success_rate: 99%, human_wait_p95: 1h, first_step_p95: 5s}"
CLI = Path(sys.executable).with_name("ledgerflow")


def write_dags(folder: Path) -> None:
    for name in WORKFLOWS:
        path = folder / "workflows" / name / "v1.yaml"
        path.parent.mkdir(parents=True)
        path.write_text(
            f"name: {name}\nversion: 1\n{SLO}\nsteps:\n"
            "  - id: reserve\n    tool: demo.noop\n    idempotency: natural\n"
        )


def fill(url: str, runs: int) -> float:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.testing.ledger_runs import populate

    ledger = Ledger(url)
    ledger.migrate()
    now = datetime.now(timezone.utc)
    started = time.perf_counter()
    populate(
        ledger,
        runs=runs,
        start=now - timedelta(days=7) + timedelta(minutes=5),
        span=timedelta(days=7) - timedelta(minutes=30),
        workflows=WORKFLOWS,
        progress=lambda n: log(
            f"  {n}/{runs} runs written ({time.perf_counter() - started:.0f} s)"
        ),
    )
    with ledger.engine.begin() as conn:  # fresh statistics, as autovacuum would have them
        from sqlalchemy import text

        conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


class Pages:
    """The app's routes over ASGI, one client for every request (as a browser keeps one)."""

    def __init__(self, url: str) -> None:
        import httpx

        from ledgerflow.api import create_app
        from ledgerflow.api._auth import Caller, current_user
        from ledgerflow.ledger.store import Ledger

        app = create_app(Ledger(url))
        dags = frozenset(f"{w}__v1" for w in WORKFLOWS)
        app.dependency_overrides[current_user] = lambda: Caller("bench", frozenset(), dags)
        from ledgerflow.api import _runs

        # The runs routes ask Airflow's auth manager for the readable DAGs: the same caller.
        _runs._readable_dags = lambda _user: dags  # type: ignore[assignment]
        from airflow.api_fastapi.core_api.security import get_user

        app.dependency_overrides[get_user] = lambda: _User()
        self.loop = asyncio.new_event_loop()
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench"
        )

    def get(self, path: str) -> tuple[float, float, int]:
        started, cpu = time.perf_counter(), time.process_time()
        resp = self.loop.run_until_complete(self.client.get(path))
        took, cpu = time.perf_counter() - started, time.process_time() - cpu
        if resp.status_code != 200:
            raise RuntimeError(f"{path}: {resp.status_code} {resp.text[:300]}")
        return took, cpu, len(resp.content)


class _User:
    def get_name(self) -> str:
        return "bench"


def run_cli(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time, and the CPU time of the process (user + system)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([str(CLI), *args], capture_output=True, text=True, env=env, check=False)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode not in (0, 1):  # 1: an objective is breached (the data has failures)
        raise RuntimeError(f"ledgerflow {args[0]}: {done.returncode} {done.stderr[-500:]}")
    return took, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "dashboard.json")
    parser.add_argument(
        "--url",
        help="measure this ledger, filled by an earlier run of this script (kept as it is) "
        "instead of a new database",
    )
    args = parser.parse_args()

    from ledgerflow.testing.postgres import fresh_database

    report: dict[str, Any] = {"runs": args.runs, "load_before": os.getloadavg()}
    given = contextlib.nullcontext(args.url) if args.url else fresh_database("lf_bench_dashboard")
    with given as raw, tempfile.TemporaryDirectory() as tmp:
        url = raw.replace("postgresql://", "postgresql+psycopg2://", 1)
        dags = Path(tmp) / "dags"
        write_dags(dags)
        os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags)
        if args.url:
            report["fill_s"] = 0.0
            log(f"measuring the ledger at {args.url} as it is")
        else:
            log(f"writing {args.runs} runs through the ledger's API on Postgres ...")
            report["fill_s"] = round(fill(url, args.runs), 1)
            log(f"  done in {report['fill_s']} s")
        from sqlalchemy import create_engine, text

        with create_engine(url).connect() as conn:
            counts = {
                table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
                for table in ("lf_runs", "lf_steps", "lf_attempts", "lf_events", "lf_approvals")
            }
        report["rows"] = counts
        log(f"  rows: {counts}")

        from ledgerflow import slo
        from ledgerflow.ledger.store import Ledger

        ledger = Ledger(url)
        pages = Pages(url)
        env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
        kinds = ("dashboard", "runs_page", "slo", "runs_cli", "cli_floor", "slo_report")
        samples: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}
        size = 0
        for label, warm, order in rounds(args.rounds, kinds, warmup=args.warmup):
            took: dict[str, float] = {}
            used: dict[str, float] = {}
            for kind in order:
                if kind == "dashboard":
                    took[kind], used[kind], size = pages.get("/dashboard")
                elif kind == "runs_page":
                    took[kind], used[kind], _ = pages.get("/runs")
                elif kind == "slo":
                    took[kind], used[kind] = run_cli(["slo", "--url", url, "-o", "plain"], env)
                elif kind == "runs_cli":
                    argv = ["runs", "--url", url, "--limit", "1", "-o", "plain"]
                    took[kind], used[kind] = run_cli(argv, env)
                elif kind == "cli_floor":
                    took[kind], used[kind] = run_cli(["--version"], env)
                else:
                    started, spent = time.perf_counter(), time.process_time()
                    slo.report(ledger, slos=slo.load_slos()).as_dict()
                    took[kind] = time.perf_counter() - started
                    used[kind] = time.process_time() - spent
            if not warm:
                for kind, value in took.items():
                    samples[kind].append(value)
                    cpu[kind].append(used[kind])
            log(
                f"round {label}: "
                + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in sorted(took.items()))
            )
        report["load_after"] = os.getloadavg()
        medians = {k: 1000 * statistics.median(v) for k, v in samples.items()}
        report["ms_p50"] = {k: round(v, 1) for k, v in medians.items()}
        cpu_ms = {k: 1000 * statistics.median(v) for k, v in cpu.items()}
        report["cpu_ms_p50"] = {k: round(v, 1) for k, v in cpu_ms.items()}
        report["samples_ms"] = {k: [round(1000 * x, 1) for x in v] for k, v in samples.items()}
        report["dashboard_bytes"] = size
        plan = ledger_plan(ledger)
        report["plan"] = plan

    print(f"ledger: {args.runs} runs on Postgres ({counts}), filled in {report['fill_s']} s")
    print(f"medians of {args.rounds} rounds after {args.warmup} warm-ups (ms; wall, and CPU")
    print("of this process or the command's; the database server's CPU is not in it):")
    rows = (
        ("dashboard", "dashboard page", f"{size:,} bytes of HTML"),
        ("runs_page", "runs page", "the baseline page"),
        ("slo", "ledgerflow slo", "a new process"),
        ("runs_cli", "ledgerflow runs", "--limit 1: a ledger command's floor"),
        ("cli_floor", "ledgerflow --version", "the command's floor: start-up and imports"),
        ("slo_report", "slo report", "the same report in this process"),
    )
    for kind, name, about in rows:
        print(f"  {name:<22} wall {medians[kind]:7.1f}  cpu {cpu_ms[kind]:7.1f}   ({about})")
    print(
        f"  ratios: dashboard / runs page {medians['dashboard'] / medians['runs_page']:.1f} "
        f"(wall); ledgerflow slo / ledgerflow runs {medians['slo'] / medians['runs_cli']:.1f} "
        f"(wall), {cpu_ms['slo'] / cpu_ms['runs_cli']:.1f} (CPU)"
    )
    print(f"main query plan: {plan}")
    print(
        f"load average before {tuple(round(x, 2) for x in report['load_before'])}, after "
        f"{tuple(round(x, 2) for x in report['load_after'])} on {os.cpu_count()} CPUs; "
        f"commit {git_revision()}"
    )
    report["git"] = git_revision()
    write_results(args.json, report)
    print(f"dashboard_ms_p50={medians['dashboard']:.0f} slo_ms_p50={medians['slo']:.0f}")
    return 0


def ledger_plan(ledger: Any) -> str:
    """How Postgres reads a one-day window's runs (the index of migration 0010; a 7-day
    window holds every run here, which a sequential scan reads best)."""
    from sqlalchemy import text

    since = datetime.now(timezone.utc) - timedelta(days=1)
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            text("EXPLAIN SELECT run_id FROM lf_runs WHERE created_at >= :since"),
            {"since": since},
        ).scalars()
        return " / ".join(r.strip() for r in rows)


if __name__ == "__main__":
    sys.exit(main())
