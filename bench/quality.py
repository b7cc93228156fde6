"""Benchmark: a quality step's validation of 1,000,000 Postgres rows with 5 expectations.

A fresh database on 127.0.0.1:5432 (``LEDGERFLOW_TEST_PG`` to override) gets a table
``bench_orders`` of ``--rows`` rows generated server-side (``generate_series``), with a
small fraction of bad rows (``--bad-fraction``: null emails, duplicate ids, negative
amounts, unknown statuses, malformed emails) so the failure paths run too: GX then also
fetches the samples of unexpected values. Load time is the INSERT ... SELECT plus ANALYZE.

Validation is ``ledgerflow.quality.runner.validate`` exactly as a quality step calls it
(ephemeral GX context, SQL datasource, the table validated in place) with five
expectations: not_null(email), unique(id), between(amount, 0..1000),
in_set(status, [paid, shipped, refunded]), match_regex(email). One untimed warm-up (it
pays the GX import), then ``--rounds`` timed rounds interleaved with a baseline: the
same five checks written by hand as SQL counts (the floor any validator has to pay).

Last line: ``quality_rows_per_s=<rows / median validation seconds>``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from harness import (  # bench/ is on sys.path when run as a script
    finish,
    logger,
)
from ledgerflow.quality.catalog import parse_expectation
from ledgerflow.quality.runner import SqlDataset, validate
from ledgerflow.testing.postgres import fresh_database

EXPECTATIONS = [
    {"not_null": "email"},
    {"unique": "id"},
    {"between": {"column": "amount", "min": 0, "max": 1000}},
    {"in_set": {"column": "status", "values": ["paid", "shipped", "refunded"]}},
    {"match_regex": {"column": "email", "regex": "^[^@]+@[^@]+$"}},
]

BASELINE_SQL = """
SELECT
  (SELECT COUNT(*) FROM bench_orders WHERE email IS NULL) AS nulls,
  (SELECT COUNT(*) FROM (SELECT id FROM bench_orders GROUP BY id HAVING COUNT(*) > 1) d) AS dups,
  (SELECT COUNT(*) FROM bench_orders WHERE amount < 0 OR amount > 1000) AS out_of_range,
  (SELECT COUNT(*) FROM bench_orders WHERE status NOT IN ('paid', 'shipped', 'refunded')) AS bad_status,
  (SELECT COUNT(*) FROM bench_orders WHERE email !~ '^[^@]+@[^@]+$') AS bad_email
"""


log = logger("quality", clock=False)


def load(url: str, rows: int, bad_fraction: float) -> float:
    every = max(2, round(1 / bad_fraction)) if bad_fraction > 0 else rows + 1
    engine = create_engine(url)
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE bench_orders (id BIGINT, email TEXT, amount NUMERIC(12, 2), "
                "status TEXT, created_at TIMESTAMPTZ)"
            )
        )
        # Bad rows: every ``every``-th row breaks one expectation, in turn.
        conn.execute(
            text(
                """
                INSERT INTO bench_orders
                SELECT
                  CASE WHEN g % :every = 0 AND (g / :every) % 5 = 1 THEN g - 1 ELSE g END,
                  CASE WHEN g % :every = 0 AND (g / :every) % 5 = 0 THEN NULL
                       WHEN g % :every = 0 AND (g / :every) % 5 = 4 THEN 'customer' || g
                       ELSE 'customer' || g || '@shop.example' END,
                  CASE WHEN g % :every = 0 AND (g / :every) % 5 = 2 THEN -1 ELSE (g % 100000) / 100.0 END,
                  CASE WHEN g % :every = 0 AND (g / :every) % 5 = 3 THEN 'lost'
                       WHEN g % 3 = 0 THEN 'shipped' ELSE 'paid' END,
                  now() - (g || ' seconds')::interval
                FROM generate_series(1, :rows) AS g
                """
            ),
            {"rows": rows, "every": every},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE bench_orders"))
    seconds = time.perf_counter() - started
    engine.dispose()
    return seconds


def baseline(url: str) -> tuple[float, dict[str, int]]:
    engine = create_engine(url)
    started = time.perf_counter()
    with engine.connect() as conn:
        counts = dict(conn.execute(text(BASELINE_SQL)).mappings().one())
    seconds = time.perf_counter() - started
    engine.dispose()
    return seconds, {k: int(v) for k, v in counts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bad-fraction", type=float, default=0.001)
    parser.add_argument("--json", default="bench/results/quality.json")
    args = parser.parse_args()

    expectations = [parse_expectation(item)[0] for item in EXPECTATIONS]
    assert all(expectations)
    with fresh_database("lf_bench_quality") as raw_url:
        url = raw_url.replace("postgresql://", "postgresql+psycopg2://", 1)
        log(f"loading {args.rows:,} rows ...")
        load_s = load(url, args.rows, args.bad_fraction)
        dataset = SqlDataset(url=url, label="table bench_orders", table="bench_orders")
        log("warm-up validation (imports Great Expectations) ...")
        started = time.perf_counter()
        report = validate(dataset, expectations)  # type: ignore[arg-type]
        first_s = time.perf_counter() - started
        times: list[float] = []
        cpu: list[float] = []
        base_times: list[float] = []
        counts: dict[str, int] = {}
        for n in range(args.rounds):
            b, counts = baseline(url)
            base_times.append(b)
            cpu_before = resource.getrusage(resource.RUSAGE_SELF)
            started = time.perf_counter()
            report = validate(dataset, expectations)  # type: ignore[arg-type]
            times.append(time.perf_counter() - started)
            cpu_after = resource.getrusage(resource.RUSAGE_SELF)
            cpu.append(
                cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
            )
            log(f"round {n + 1}: validate {times[-1]:.2f} s, hand-written SQL {b:.2f} s")
    median = statistics.median(times)
    base = statistics.median(base_times)
    rate = args.rows / median
    failed = {f["expectation"]: f["unexpected_count"] for f in report["failed"]}
    figures = {
        "rows": args.rows,
        "expectations": len(expectations),
        "load_s": round(load_s, 3),
        "first_validation_s": round(first_s, 3),
        "validation_s_median": round(median, 3),
        "validation_s_all": [round(t, 3) for t in times],
        "validation_cpu_s_median": round(statistics.median(cpu), 3),
        "baseline_sql_s_median": round(base, 3),
        "ratio_to_baseline": round(median / base, 2) if base else None,
        "row_count_seen": report["row_count"],
        "failed": failed,
        "baseline_counts": counts,
        "loadavg": os.getloadavg(),
        "quality_rows_per_s": round(rate),
    }
    print(f"rows                     {args.rows:,} ({len(expectations)} expectations)")
    print(f"load (insert + analyze)  {load_s:.2f} s")
    print(f"first validation         {first_s:.2f} s (includes importing GX)")
    print(f"validation, median       {median:.2f} s over {args.rounds} rounds (CPU in this process {statistics.median(cpu):.2f} s)")  # fmt: skip
    print(f"hand-written SQL, median {base:.2f} s (ratio {median / base:.2f}x)")
    print(f"rows seen by GX          {report['row_count']:,}")
    print(f"failed expectations      {failed}")
    print(f"same checks by SQL       {counts}")
    print(f"load average             {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finish(Path(args.json), figures, "quality_rows_per_s", rate, ".0f")
    return 0


if __name__ == "__main__":
    sys.exit(main())
