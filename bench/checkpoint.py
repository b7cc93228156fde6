"""Benchmark: step checkpoint cost on Postgres over >= 1,000 steps.

Target: p50 <= 5 ms for one ``execute_step`` of a trivial tool.

``ledgerflow.steps.protocol.execute_step`` is driven directly (no Airflow processes) on a
fresh Postgres database, with the ``demo.noop`` tool, in two variants:

* ``keyed``   - ``idempotency: {key: ...}``: the effect row path (claim, then finish);
* ``natural`` - ``idempotency: natural``: no effect row.

and in two shapes:

* ``long``  - one run of one workflow spec of N steps (each step executed once);
* ``short`` - N/10 runs of a 10-step workflow (the usual shape of a workflow).

Baselines measured in the same loop, interleaved with the steps so that machine noise
hits all of them alike:

* ``tool``  - calling the tool itself with no ledger (``Tool.call``: argument validation
  and the function); execute_step minus this is the checkpoint cost;
* ``render`` - rendering the step's templates (args and idempotency key) with no ledger,
  the CPU part of the protocol that is not database work;
* ``floor`` - one raw ``INSERT ...; COMMIT`` on the same database through psycopg2
  (the cost of one durable write, below which no checkpoint can go);
* ``txn``   - one ``INSERT`` in ``engine.begin()`` on the ledger's own SQLAlchemy engine
  (what every ledger transaction costs before doing anything).

Then an instrumented pass counts SQL statements, commits, rollbacks and pool pings per
step (SQLAlchemy events, cross-checked with the server's ``pg_stat_database``), and, if
p50 is over the target (or with ``--profile``), a cProfile pass shows where the time goes.

The last line is ``checkpoint_ms_p50=<p50 of execute_step, keyed variant, long shape>
checkpoint_growth=<p50 of the last tenth of that run's steps / p50 of its first tenth>``
(flat in the run's length: <= 1.2).
``--sqlite`` runs the same on a SQLite file (for comparison; not the headline figure).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import re
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import (  # bench/ is on sys.path when run as a script
    RESULTS,
    git_revision,
    logger,
    write_results,
)

TARGET_MS = 5.0
TARGET_GROWTH = 1.2
SHORT_STEPS = 10
VARIANTS = ("keyed", "natural")


log = logger("checkpoint", clock=False)


def pcts(ns: list[int]) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds."""
    if not ns:
        return {"n": 0}
    ordered = sorted(ns)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return {
        "n": len(ordered),
        "p50": statistics.median(ordered) / 1e6,
        "p90": at(0.90),
        "p99": at(0.99),
        "mean": statistics.fmean(ordered) / 1e6,
    }


# -- specs ---------------------------------------------------------------------------


def make_spec(name: str, n_steps: int, variant: str) -> Any:
    """A chain of ``n_steps`` demo.noop steps whose args read params and the upstream step."""
    from ledgerflow.spec.models import WorkflowSpec
    from ledgerflow.workflow.validate import referenced_steps

    steps = []
    for i in range(n_steps):
        step: dict[str, Any] = {
            "id": f"s{i:05d}",
            "tool": "demo.noop",
            "args": {"value": "{{ params.order_id }}-" + str(i)},
        }
        if i:
            prev = f"s{i - 1:05d}"
            step["needs"] = [prev]
            step["args"] = {"value": "{{ params.order_id }}-{{ steps." + prev + ".status }}"}
        step["idempotency"] = {"key": "{{ params.order_id }}"} if variant == "keyed" else "natural"
        steps.append(step)
    spec = WorkflowSpec.model_validate(
        {
            "name": name,
            "version": 1,
            "params": {"order_id": {"type": "string", "required": True}},
            "steps": steps,
        }
    )
    # What each step's templates read is recorded when a workflow file is loaded
    # (``validate_spec``, in every process that parses the DAG), not by the step.
    for step in spec.steps:
        referenced_steps(spec, step)
    return spec


class Driver:
    """Runs the steps of one shape, one variant, in order, over fresh runs as needed."""

    def __init__(self, ledger: Any, shape: str, variant: str, n_steps: int, tag: str) -> None:
        from ledgerflow.steps.protocol import RunRef, execute_step

        self.ledger = ledger
        self.execute_step = execute_step
        self.RunRef = RunRef
        self.per_run = n_steps if shape == "long" else SHORT_STEPS
        self.spec = make_spec(f"bench_{shape}_{variant}", self.per_run, variant)
        self.tag = tag
        self.position = 0
        self.run_no = -1
        self.run: Any = None
        self.params: dict[str, Any] = {}

    def step(self) -> tuple[int, int, int]:
        """Execute the next step; returns (wall ns, CPU ns, step index within its run)."""
        i = self.position % self.per_run
        if i == 0:
            self.run_no += 1
            run_id = f"{self.spec.dag_id}/{self.tag}_{self.run_no}_{uuid.uuid4().hex[:6]}"
            self.run = self.RunRef(run_id=run_id, dag_id=self.spec.dag_id)
            self.params = {"order_id": f"order-{self.tag}-{self.run_no}"}
        self.position += 1
        step = self.spec.steps[i]
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        result = self.execute_step(self.ledger, self.spec, step, self.run, params=self.params)
        elapsed = time.perf_counter_ns() - t0
        cpu = time.process_time_ns() - c0
        if result.status != "completed":
            raise RuntimeError(f"step {step.id}: {result.status}")
        return elapsed, cpu, i


# -- baselines -----------------------------------------------------------------------


class ToolBaseline:
    """The tool with no ledger: registry lookup result, args validation, the function."""

    def __init__(self) -> None:
        from ledgerflow.tools.context import ToolContext
        from ledgerflow.tools.registry import get_tool

        self.tool = get_tool("demo.noop")
        self.ctx = ToolContext(
            run_id="r", step_key="s", workflow="w", version=1, try_number=1, idempotency_key="k"
        )
        self.n = 0

    def call(self) -> int:
        self.n += 1
        args = {"value": f"order-{self.n}-completed"}
        t0 = time.perf_counter_ns()
        self.tool.call(self.ctx, args)
        return time.perf_counter_ns() - t0


class RenderBaseline:
    """Template work of one step with no ledger: args and idempotency key, as execute_step."""

    def __init__(self) -> None:
        from ledgerflow.spec.templates import render_value
        from ledgerflow.steps.protocol import RunRef, render_key

        self.render_value = render_value
        self.render_key = render_key
        self.spec = make_spec("bench_render", 2, "keyed")
        self.step = self.spec.steps[1]
        self.run = RunRef(run_id="bench_render__v1/r", dag_id="bench_render__v1")
        self.n = 0

    def call(self) -> int:
        self.n += 1
        context = {
            "params": {"order_id": f"order-{self.n}"},
            "steps": {"s00000": {"status": "completed", "output": {"value": "x"}}},
            "run": {"id": self.run.run_id, "workflow": "bench_render", "version": 1},
        }
        t0 = time.perf_counter_ns()
        self.render_value(self.step.args, context)
        self.render_key(self.spec, self.step, self.run, self.step.id, context)
        return time.perf_counter_ns() - t0


class Floor:
    """One durable write: ``INSERT`` + ``COMMIT`` on the raw driver connection."""

    def __init__(self, url: str, sqlite: bool) -> None:
        self.sqlite = sqlite
        if sqlite:
            import sqlite3

            self.conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS bench_floor (id INTEGER PRIMARY KEY, v TEXT)"
            )
        else:
            import psycopg2

            self.conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://"))
            with self.conn.cursor() as cur:
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS bench_floor (id BIGSERIAL PRIMARY KEY, v TEXT)"
                )
            self.conn.commit()
        self.n = 0

    def call(self) -> int:
        self.n += 1
        t0 = time.perf_counter_ns()
        if self.sqlite:
            self.conn.execute("BEGIN")
            self.conn.execute("INSERT INTO bench_floor (v) VALUES (?)", (f"row-{self.n}",))
            self.conn.execute("COMMIT")
        else:
            with self.conn.cursor() as cur:
                cur.execute("INSERT INTO bench_floor (v) VALUES (%s)", (f"row-{self.n}",))
            self.conn.commit()
        return time.perf_counter_ns() - t0

    def close(self) -> None:
        self.conn.close()


class EngineTxn:
    """One ledger-style transaction: ``with engine.begin(): INSERT`` on the ledger engine."""

    def __init__(self, ledger: Any) -> None:
        from sqlalchemy import text

        self.ledger = ledger
        self.stmt = text("INSERT INTO bench_floor (v) VALUES (:v)")
        self.n = 0

    def call(self) -> int:
        self.n += 1
        t0 = time.perf_counter_ns()
        with self.ledger.begin() as conn:
            conn.execute(self.stmt, {"v": f"txn-{self.n}"})
        return time.perf_counter_ns() - t0


# -- instrumentation -----------------------------------------------------------------

_WS = re.compile(r"\s+")


def normalise(statement: str) -> str:
    s = _WS.sub(" ", statement).strip()
    m = re.match(r"(INSERT INTO \w+|UPDATE \w+|DELETE FROM \w+)", s)
    if m:
        extra = " ON CONFLICT DO NOTHING" if "ON CONFLICT" in s else ""
        extra += " RETURNING" if "RETURNING" in s else ""
        return m.group(1) + extra
    m = re.match(r"SELECT .*? FROM (\w+)", s)
    if m:
        return f"SELECT FROM {m.group(1)}"
    return s[:50]


@contextlib.contextmanager
def instrumented(ledger: Any) -> Iterator[dict[str, Any]]:
    """Count and time statements, pings, commits and rollbacks on the ledger's engine."""
    from sqlalchemy import event

    engine = ledger.engine
    dialect = engine.dialect
    data: dict[str, Any] = {
        "stmt_n": Counter(),
        "stmt_ns": Counter(),
        "calls": Counter(),
        "calls_ns": Counter(),
    }
    starts: dict[int, int] = {}

    def before(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        starts[id(cursor)] = time.perf_counter_ns()

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        key = normalise(statement)
        data["stmt_n"][key] += 1
        data["stmt_ns"][key] += time.perf_counter_ns() - starts.pop(id(cursor), 0)

    def wrap(name: str) -> Callable[..., Any]:
        original = getattr(dialect, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if name == "do_rollback" and args:
                # psycopg2 sends nothing when no transaction is open: count real ones apart.
                raw = getattr(args[0], "dbapi_connection", args[0])
                if hasattr(raw, "in_transaction"):  # sqlite3
                    sent = bool(raw.in_transaction)
                else:  # psycopg2: 0 = TRANSACTION_STATUS_IDLE
                    status = getattr(getattr(raw, "info", None), "transaction_status", None)
                    sent = status != 0
                if sent:
                    data["calls"]["rollback_sent"] += 1
            t0 = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                data["calls"][name] += 1
                data["calls_ns"][name] += time.perf_counter_ns() - t0

        return timed

    def checkout(*_: Any) -> None:
        data["calls"]["pool_checkout"] += 1

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine.pool, "checkout", checkout)
    names = ("do_ping", "do_commit", "do_rollback")
    for name in names:
        setattr(dialect, name, wrap(name))
    try:
        yield data
    finally:
        for name in names:
            with contextlib.suppress(AttributeError):
                delattr(dialect, name)  # back to the class's method
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)
        event.remove(engine.pool, "checkout", checkout)


def pg_xacts(admin_url: str, dbname: str) -> tuple[int, int]:
    import psycopg2

    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute(
                "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s",
                (dbname,),
            )
            row = cur.fetchone()
            return int(row[0]), int(row[1])
    finally:
        conn.close()


def count_pass(
    ledger: Any, url: str, shape: str, variant: str, steps: int, sqlite: bool
) -> dict[str, Any]:
    """Statements, pings, commits and rollbacks per step, with their time per step."""
    driver = Driver(ledger, shape, variant, max(steps, SHORT_STEPS), f"count{shape}{variant}")
    admin_url = dbname = None
    if not sqlite:
        from ledgerflow.testing.postgres import ADMIN_URL

        admin_url, dbname = ADMIN_URL, url.rsplit("/", 1)[1]
        ledger.engine.dispose()  # backends flush their statistics when they exit
        time.sleep(0.6)
        before = pg_xacts(admin_url, dbname)
    total_ns = 0
    with instrumented(ledger) as data:
        for _ in range(steps):
            total_ns += driver.step()[0]
    out: dict[str, Any] = {"steps": steps, "step_ms_mean": total_ns / steps / 1e6}
    per = {k: v / steps for k, v in data["stmt_n"].items()}
    per_ms = {k: data["stmt_ns"][k] / steps / 1e6 for k in data["stmt_n"]}
    calls = {k: v / steps for k, v in data["calls"].items()}
    calls_ms = {k: data["calls_ns"][k] / steps / 1e6 for k in data["calls"]}
    statements = sum(per.values())
    pings = calls.get("do_ping", 0.0)
    commits = calls.get("do_commit", 0.0)
    rollbacks = calls.get("do_rollback", 0.0)
    rollbacks_sent = calls.get("rollback_sent", 0.0)
    out.update(
        {
            "statements_per_step": statements,
            "statements": dict(sorted(per.items(), key=lambda kv: -per_ms[kv[0]])),
            "statement_ms_per_step": dict(sorted(per_ms.items(), key=lambda kv: -kv[1])),
            "pool_checkouts_per_step": calls.get("pool_checkout", 0.0),
            "pings_per_step": pings,
            "commits_per_step": commits,
            "rollbacks_per_step": rollbacks,
            "rollbacks_sent_per_step": rollbacks_sent,
            "ping_ms_per_step": calls_ms.get("do_ping", 0.0),
            "commit_ms_per_step": calls_ms.get("do_commit", 0.0),
            "rollback_ms_per_step": calls_ms.get("do_rollback", 0.0),
        }
    )
    db_ms = (
        sum(per_ms.values())
        + out["ping_ms_per_step"]
        + out["commit_ms_per_step"]
        + out["rollback_ms_per_step"]
    )
    out["db_calls_ms_per_step"] = db_ms
    out["python_ms_per_step"] = out["step_ms_mean"] - db_ms
    if not sqlite:
        # The pre-ping runs in autocommit (its own server transaction, one round trip).
        # psycopg2 sends BEGIN by itself before the first statement of every other
        # transaction, so each COMMIT or ROLLBACK sent also stands for one BEGIN.
        out["transactions_per_step"] = commits + rollbacks_sent
        out["round_trips_per_step"] = statements + pings + 2 * (commits + rollbacks_sent)
        ledger.engine.dispose()
        time.sleep(0.6)
        after = pg_xacts(admin_url, dbname)  # type: ignore[arg-type]
        out["server_xact_commit_per_step"] = (after[0] - before[0]) / steps
        out["server_xact_rollback_per_step"] = (after[1] - before[1]) / steps
    else:
        # SQLite: no network; BEGIN IMMEDIATE is itself a statement here.
        out["round_trips_per_step"] = None
    return out


PACKAGE_GROUPS = (
    ("/sqlalchemy/", "sqlalchemy (Python)"),
    ("/jinja2/", "jinja2 (template compile/render)"),
    ("/json/", "json"),
    ("/pydantic", "pydantic"),
    ("/ledgerflow/", "ledgerflow"),
    ("bench/checkpoint.py", "benchmark loop"),
)


def growth_pass(ledger: Any, steps: int) -> dict[str, Any]:
    """The last tenth of one ``steps``-step run (keyed) against the first tenth of another,
    timed side by side, one step of each in turn: the machine's load then weighs on both
    alike, which it does not on the first and last tenths of one run timed minutes apart.
    The first run is brought to its last tenth untimed."""
    tenth = max(1, steps // 10)
    late = Driver(ledger, "long", "keyed", steps, "growlate")
    log(f"growth pass: {steps - tenth} untimed steps, then {tenth} + {tenth} side by side")
    for _ in range(steps - tenth):
        late.step()
    early = Driver(ledger, "long", "keyed", steps, "growearly")
    samples: dict[str, list[int]] = {"first": [], "last": []}
    for n in range(tenth):
        pair = (("first", early), ("last", late)) if n % 2 else (("last", late), ("first", early))
        for where, driver in pair:
            samples[where].append(driver.step()[0])
    first, last = (statistics.median(samples[w]) / 1e6 for w in ("first", "last"))
    return {
        "steps": steps,
        "tenth": tenth,
        "first_p50": first,
        "last_p50": last,
        "growth": last / first,
    }


def profile_pass(ledger: Any, shape: str, variant: str, steps: int, dump: Path) -> dict[str, Any]:
    driver = Driver(ledger, shape, variant, max(steps, SHORT_STEPS), f"prof{shape}{variant}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        driver.step()
    profiler.disable()
    dump.parent.mkdir(parents=True, exist_ok=True)
    profiler.dump_stats(str(dump))
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]

    def pick(pattern: str) -> list[dict[str, Any]]:
        rows = []
        for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            if re.search(pattern, f"{file}:{func}"):
                rows.append(
                    {
                        "function": f"{Path(file).name}:{line}:{func}",
                        "calls_per_step": nc / steps,
                        "cum_ms_per_step": ct / steps * 1000,
                        "self_ms_per_step": tt / steps * 1000,
                        "cum_share": ct / total if total else 0.0,
                    }
                )
        return sorted(rows, key=lambda r: -r["cum_ms_per_step"])

    ledger_fns = pick(r"ledgerflow/(ledger/\w+|steps/\w+|spec/templates)\.py:")
    hot = pick(
        r"(psycopg2|extensions|sqlalchemy/engine/(base|default)\.py:(_execute_context|do_commit|do_rollback|do_ping|_commit_impl|_rollback_impl)"
        r"|jinja2/environment\.py:(from_string|compile_expression|compile)|pydantic.*validate"
        r"|json/__init__\.py:(dumps|loads)|:\{method 'execute' of|:\{method 'commit' of|:\{method 'rollback' of)"
    )
    # Self time by package: these add up (cumulative times overlap).
    groups: Counter[str] = Counter()
    for (file, _line, func), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{file}:{func}"
        if "psycopg2" in where:
            group = "psycopg2 C calls (waiting on Postgres)"
        elif "sqlite3" in where:
            group = "sqlite3 C calls"
        else:
            group = next(
                (name for key, name in PACKAGE_GROUPS if key in file),
                "other (stdlib, builtins)",
            )
        groups[group] += tt
    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(15)
    return {
        "steps": steps,
        "profiled_ms_per_step": total / steps * 1000,
        "self_ms_per_step_by_package": {
            k: v / steps * 1000 for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "ledgerflow_functions": ledger_fns[:25],
        "hot_calls": hot[:15],
        "top_tottime": buf.getvalue(),
        "dump": str(dump),
    }


# -- main ----------------------------------------------------------------------------


@contextlib.contextmanager
def database(sqlite: bool) -> Iterator[str]:
    if sqlite:
        with tempfile.TemporaryDirectory(prefix="lf_bench_ckpt_") as tmp:
            yield f"sqlite:///{Path(tmp) / 'ledger.db'}"
        return
    from ledgerflow.testing.postgres import fresh_database

    with fresh_database("lf_bench") as url:
        yield url.replace("postgresql://", "postgresql+psycopg2://", 1)


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger(url)
    ledger.migrate()
    floor = Floor(url, args.sqlite)
    txn = EngineTxn(ledger)
    tool = ToolBaseline()
    render = RenderBaseline()
    shapes = ["long", "short"] if args.shape == "both" else [args.shape]
    results: dict[str, Any] = {"shapes": {}}

    # Warm-up: connections, the tool registry, pydantic models, Jinja's environment.
    for shape in shapes:
        for variant in VARIANTS:
            warm = Driver(ledger, shape, variant, SHORT_STEPS, f"warm{shape}{variant}")
            for _ in range(args.warmup):
                warm.step()
    for _ in range(args.warmup):
        floor.call(), txn.call(), tool.call(), render.call()

    for shape in shapes:
        drivers = {v: Driver(ledger, shape, v, args.steps, f"t{shape}{v}") for v in VARIANTS}
        samples: dict[str, list[int]] = defaultdict(list)
        index: dict[str, list[int]] = defaultdict(list)
        log(f"{shape}: {args.steps} steps x {len(VARIANTS)} variants, interleaved with baselines")
        started = time.perf_counter()
        for n in range(args.steps):
            for variant, driver in drivers.items():
                ns, cpu, i = driver.step()
                samples[variant].append(ns)
                samples[f"{variant}_cpu"].append(cpu)
                index[variant].append(i)
            samples["tool"].append(tool.call())
            samples["render"].append(render.call())
            samples["floor"].append(floor.call())
            samples["txn"].append(txn.call())
            if (n + 1) % max(1, args.steps // 5) == 0:
                log(
                    f"  {shape} {n + 1}/{args.steps} steps, keyed p50 so far "
                    f"{statistics.median(samples['keyed']) / 1e6:.2f} ms, "
                    f"{time.perf_counter() - started:.0f} s"
                )
        stats = {k: pcts(v) for k, v in samples.items()}
        stats["loadavg_1m_end"] = os.getloadavg()[0]
        for variant in VARIANTS:
            ns = samples[variant]
            tool_p50 = stats["tool"]["p50"]
            stats[variant]["checkpoint_p50"] = stats[variant]["p50"] - tool_p50
            # How the cost moves with the step's position in its run.
            if shape == "long":
                tenth = max(1, len(ns) // 10)
                first = statistics.median(ns[:tenth]) / 1e6
                last = statistics.median(ns[-tenth:]) / 1e6
                stats[variant]["first_10pct_p50"] = first
                stats[variant]["last_10pct_p50"] = last
                stats[variant]["growth"] = last / first
                # The same ratio for the one-INSERT transaction measured beside each step:
                # how much of the growth is the machine's load moving, not the step.
                txn = samples["txn"]
                stats[variant]["txn_growth"] = statistics.median(txn[-tenth:]) / statistics.median(
                    txn[:tenth]
                )
            else:
                by_pos: dict[int, list[int]] = defaultdict(list)
                for value, pos in zip(ns, index[variant], strict=True):
                    by_pos[pos].append(value)
                stats[variant]["p50_by_position"] = [
                    round(statistics.median(by_pos[p]) / 1e6, 3) for p in sorted(by_pos)
                ]
        # What a step reads before it runs (its run's row, its checkpoint and the outputs
        # its templates name), early and late in the runs just finished: the same cost at
        # any position means the read does not grow with the run.
        driver = drivers["keyed"]
        spec, run_id = driver.spec, driver.run.run_id
        late, early = spec.steps[-1], spec.steps[min(1, len(spec.steps) - 1)]
        reads: dict[str, list[int]] = {"early": [], "late": [], "all": []}
        with ledger.engine.connect() as conn:
            for _ in range(21):
                for where, step in (("early", early), ("late", late)):
                    t0 = time.perf_counter_ns()
                    ledger.run_and_steps(run_id, step.id, set(step.needs), conn)
                    reads[where].append(time.perf_counter_ns() - t0)
                t0 = time.perf_counter_ns()
                ledger.outputs(run_id, conn=conn)
                reads["all"].append(time.perf_counter_ns() - t0)
                conn.rollback()
        stats["step_read"] = {
            "rows": driver.per_run,
            "early_step": early.id,
            "late_step": late.id,
            **{where: pcts(ns) for where, ns in reads.items()},
        }
        results["shapes"][shape] = stats

    if "long" in shapes:
        results["growth_pass"] = growth_pass(ledger, args.steps)

    count_shape = shapes[0]
    results["counts"] = {}
    for variant in VARIANTS:
        log(f"instrumented pass: {count_shape}/{variant}, {args.count_steps} steps")
        results["counts"][variant] = count_pass(
            ledger, url, count_shape, variant, args.count_steps, args.sqlite
        )
    headline_shape = "long" if "long" in results["shapes"] else shapes[0]
    headline = results["shapes"][headline_shape]["keyed"]["p50"]
    results["headline_shape"] = headline_shape
    results["headline_ms"] = headline
    if "long" in results["shapes"]:
        results["growth"] = results["growth_pass"]["growth"]
    if args.profile == "always" or (args.profile == "auto" and headline > TARGET_MS):
        log(f"cProfile pass: {count_shape}/keyed, {args.profile_steps} steps")
        suffix = "_sqlite" if args.sqlite else ""
        results["profile"] = profile_pass(
            ledger,
            count_shape,
            "keyed",
            args.profile_steps,
            RESULTS / f"checkpoint{suffix}.prof",
        )
    floor.close()
    ledger.engine.dispose()
    return results


def report(args: argparse.Namespace, results: dict[str, Any]) -> None:
    db = "SQLite (WAL, synchronous=NORMAL)" if args.sqlite else "Postgres 15 (127.0.0.1)"
    print(f"checkpoint benchmark on {db}: {args.steps} steps per shape and variant")
    for shape, stats in results["shapes"].items():
        what = (
            f"one run of a {args.steps}-step workflow"
            if shape == "long"
            else f"{args.steps // SHORT_STEPS} runs of a {SHORT_STEPS}-step workflow"
        )
        print(
            f"\n[{shape}] {what}; ms per step (wall clock; load average at the end "
            f"{stats['loadavg_1m_end']:.1f} on {os.cpu_count()} CPUs)"
        )
        print(f"  {'':30s} {'p50':>7s} {'p90':>7s} {'p99':>7s} {'mean':>7s} {'CPU p50':>8s}")
        rows = [
            ("execute_step keyed", "keyed"),
            ("execute_step natural", "natural"),
            ("tool alone (no ledger)", "tool"),
            ("templates alone (args + key)", "render"),
            ("txn: engine.begin()+INSERT", "txn"),
            ("floor: INSERT+COMMIT (driver)", "floor"),
        ]
        for label, key in rows:
            s = stats[key]
            cpu = stats.get(f"{key}_cpu", {}).get("p50")
            print(
                f"  {label:30s} {s['p50']:7.3f} {s['p90']:7.3f} {s['p99']:7.3f} {s['mean']:7.3f}"
                + (f" {cpu:8.3f}" if cpu is not None else "")
            )
        for variant in VARIANTS:
            s = stats[variant]
            line = (
                f"  {variant}: checkpoint cost (p50 minus tool p50) {s['checkpoint_p50']:.3f} ms"
                f" = {s['p50'] / stats['floor']['p50']:.1f}x the floor"
            )
            if "first_10pct_p50" in s:
                line += (
                    f"; p50 of first 10% steps {s['first_10pct_p50']:.2f} ms,"
                    f" last 10% {s['last_10pct_p50']:.2f} ms: growth {s['growth']:.2f}"
                    f" (the txn baseline's, same tenths: {s['txn_growth']:.2f})"
                )
            else:
                line += f"; p50 by position in run {s['p50_by_position']}"
            print(line)
        r = stats["step_read"]
        print(
            f"  a step's read (run row, own checkpoint, outputs it names), run of {r['rows']} "
            f"steps: p50 {r['early']['p50']:.3f} ms at {r['early_step']}, "
            f"{r['late']['p50']:.3f} ms at {r['late_step']}; all {r['rows']} outputs: "
            f"{r['all']['p50']:.3f} ms"
        )
    print(f"\nper step, instrumented pass ({next(iter(results['shapes']))} shape):")
    for variant, c in results["counts"].items():
        rt = c["round_trips_per_step"]
        print(
            f"  {variant}: {c['statements_per_step']:.1f} SQL statements, "
            f"{c['pool_checkouts_per_step']:.1f} pool checkouts ({c['pings_per_step']:.1f} pre-ping "
            f"SELECT 1), {c['commits_per_step']:.1f} commits, {c['rollbacks_per_step']:.1f} rollbacks"
            f" ({c['rollbacks_sent_per_step']:.1f} sent to the server)"
            + (f" -> {rt:.0f} round trips" if rt else "")
        )
        if "server_xact_commit_per_step" in c:
            print(
                f"      server (pg_stat_database): {c['server_xact_commit_per_step']:.2f} commits "
                f"(= pings + commits), {c['server_xact_rollback_per_step']:.2f} rollbacks per step"
            )
        print(
            f"      time: step mean {c['step_ms_mean']:.2f} ms = statements "
            f"{sum(c['statement_ms_per_step'].values()):.2f} + commits {c['commit_ms_per_step']:.2f}"
            f" + pings {c['ping_ms_per_step']:.2f} + rollbacks {c['rollback_ms_per_step']:.2f}"
            f" + Python {c['python_ms_per_step']:.2f}"
        )
        for stmt, n in c["statements"].items():
            print(f"      {n:4.1f} x {stmt:45s} {c['statement_ms_per_step'][stmt]:6.3f} ms")
    if "profile" in results:
        p = results["profile"]
        print(
            f"\ncProfile ({p['steps']} steps, {p['profiled_ms_per_step']:.2f} ms/step under the "
            f"profiler): cumulative ms per step of the Ledgerflow functions"
        )
        for row in p["ledgerflow_functions"][:18]:
            print(
                f"  {row['cum_ms_per_step']:7.3f} ms  {row['calls_per_step']:5.1f} calls  "
                f"{row['function']}"
            )
        print("  self time by package (ms per step; these add up):")
        for group, ms in p["self_ms_per_step_by_package"].items():
            print(f"  {ms:7.3f} ms  {group}")
        print("  hot library calls:")
        for row in p["hot_calls"][:10]:
            print(
                f"  {row['cum_ms_per_step']:7.3f} ms  {row['calls_per_step']:5.1f} calls  "
                f"{row['function']}"
            )
        print(f"  full profile: {p['dump']} (python -m pstats)")
    headline = results["headline_ms"]
    print(
        f"\nheadline: p50 of execute_step (keyed, {results['headline_shape']} shape) "
        f"{headline:.3f} ms; target <= {TARGET_MS:.0f} ms: "
        f"{'met' if headline <= TARGET_MS else 'MISSED'}"
    )
    growth = results.get("growth")
    if growth is not None:
        g = results["growth_pass"]
        print(
            f"growth: p50 of the last tenth of a {args.steps}-step run (keyed) "
            f"{g['last_p50']:.3f} ms / p50 of the first tenth {g['first_p50']:.3f} ms, timed "
            f"side by side = {growth:.3f}; target <= {TARGET_GROWTH}: "
            f"{'met' if growth <= TARGET_GROWTH else 'MISSED'}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time ledgerflow.steps.protocol.execute_step per step on a fresh database, "
        "against the tool alone and a raw INSERT+COMMIT.",
    )
    parser.add_argument(
        "--steps", type=int, default=1000, help="timed steps per shape and variant (default 1000)"
    )
    parser.add_argument(
        "--shape",
        choices=["long", "short", "both"],
        default="both",
        help="long: one run of an N-step workflow; short: N/10 runs of a 10-step one",
    )
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file instead of Postgres")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    parser.add_argument(
        "--count-steps",
        type=int,
        default=100,
        help="steps of the instrumented (counting) pass per variant (default 100)",
    )
    parser.add_argument(
        "--profile",
        choices=["auto", "always", "never"],
        default="auto",
        help="cProfile pass: auto = when p50 is over the target (default)",
    )
    parser.add_argument(
        "--profile-steps", type=int, default=200, help="steps to profile (default 200)"
    )
    parser.add_argument("--json", type=Path, help="results file (default bench/results/...)")
    args = parser.parse_args(argv)
    if args.steps < SHORT_STEPS:
        parser.error(f"--steps must be >= {SHORT_STEPS}")
    if args.json is None:
        args.json = RESULTS / ("checkpoint_sqlite.json" if args.sqlite else "checkpoint.json")
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.pop("LEDGERFLOW_FAULT", None)

    with database(args.sqlite) as url:
        log(f"database {url}")
        results = measure(args, url)
    report(args, results)
    results.update(
        {
            "benchmark": "checkpoint",
            "database": "sqlite" if args.sqlite else "postgresql",
            "steps": args.steps,
            "target_ms": TARGET_MS,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    log(f"results in {args.json}")
    results.setdefault("git", git_revision())
    write_results(args.json, results)
    last = f"checkpoint_ms_p50={results['headline_ms']:.3f}"
    if "growth" in results:
        last += f" checkpoint_growth={results['growth']:.3f}"
    print(last)
    return 0


if __name__ == "__main__":
    sys.exit(main())
