"""The sql tool's tables reach Airflow's hook lineage collector (real Postgres).

Airflow collects hook lineage only when a plugin registers a ``HookLineageReader`` (the
OpenLineage provider does); otherwise the collector is a ``NoOpCollector``. Each case
runs in a fresh interpreter whose plugins folder holds such a reader, or none, as a
task process would see it, and prints what the collector gathered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import create_engine, text

pytestmark = pytest.mark.integration

READER_PLUGIN = """
from airflow.plugins_manager import AirflowPlugin
from airflow.sdk.lineage import HookLineageReader


class LineageReaderPlugin(AirflowPlugin):
    name = "lf_test_lineage_reader"
    hook_lineage_readers = [HookLineageReader]
"""

RUN_STEP = """
import json, sys
from ledgerflow.ledger.store import Ledger
from ledgerflow.workflow.validate import load_workflow
from ledgerflow.steps.protocol import RunRef, execute_step
from airflow.sdk.lineage import get_hook_lineage_collector

ledger_url, workflow = sys.argv[1], sys.argv[2]
spec = load_workflow(workflow)
ledger = Ledger(ledger_url)
ledger.migrate()
step, ref = spec.steps[0], RunRef("lin__v1/r", "lin__v1")
if getattr(step, "kind", None) == "quality":
    from ledgerflow.steps.quality import run_quality

    result = run_quality(ledger, spec, step, ref, params={})
else:
    result = execute_step(ledger, spec, step, ref, params={})
collected = get_hook_lineage_collector().collected_assets
print(json.dumps({
    "status": result.status,
    "collector": type(get_hook_lineage_collector()).__name__,
    "inputs": sorted(i.asset.uri for i in collected.inputs),
    "outputs": sorted(o.asset.uri for o in collected.outputs),
    "sql_jobs": [e.value.get("sql") for e in collected.extra if e.key == "sql_job"],
}))
"""

TABLES = """
CREATE SCHEMA "Sales";
CREATE TABLE customers (id int PRIMARY KEY, region text);
CREATE TABLE orders (id int, customer_id int, total numeric);
CREATE TABLE "Sales"."Region Totals" (region text, total numeric, run_key text);
INSERT INTO customers VALUES (1, 'eu'), (2, 'us');
INSERT INTO orders VALUES (10, 1, 5), (11, 2, 7), (12, 1, 1);
"""

STATEMENT = (
    "WITH per_region AS (SELECT c.region, o.total FROM orders o JOIN public.customers c "
    "ON c.id = o.customer_id) "
    'INSERT INTO "Sales"."Region Totals" (region, total, run_key) '
    "SELECT region, sum(total), :idempotency_key FROM per_region GROUP BY region"
)


@pytest.fixture
def warehouse(pg_url: str) -> str:
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.begin() as conn:
        conn.exec_driver_sql(TABLES)
    engine.dispose()
    return pg_url


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "plugins"
    folder.mkdir()
    yield folder


def workflow(tmp_path: Path, statement: str, conn_id: str | None = None) -> Path:
    path = tmp_path / "wf.yaml"
    args: dict[str, Any] = {"statement": statement}
    if conn_id:
        args["conn_id"] = conn_id
    path.write_text(
        json.dumps(
            {
                "name": "lin",
                "version": 1,
                "steps": [{"id": "load", "tool": "sql", "args": args, "idempotency": "natural"}],
            }
        )
    )
    return path


def run_step(
    ledger_url: str, wf: Path, plugins: Path, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins), **(extra_env or {})}
    done = subprocess.run(
        [sys.executable, "-c", RUN_STEP, ledger_url, str(wf)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def uri(pg_url: str, schema: str, table: str) -> str:
    parts = urlsplit(pg_url)
    return f"postgres://{parts.hostname}:{parts.port or 5432}{parts.path}/{schema}/{table}"


def test_sql_step_on_the_ledger_reports_its_tables(
    warehouse: str, tmp_path: Path, plugins: Path
) -> None:
    """With a lineage reader registered, a sql step on a Postgres ledger reports the
    tables it reads (a join inside a CTE; the CTE's own name is no table) and the quoted,
    schema-qualified table it writes, as the Postgres provider's asset URIs."""
    (plugins / "reader.py").write_text(READER_PLUGIN)
    ledger_url = warehouse.replace("postgresql://", "postgresql+psycopg2://", 1)
    out = run_step(ledger_url, workflow(tmp_path, STATEMENT), plugins)
    assert out["status"] == "completed"
    assert out["collector"] == "HookLineageCollector"
    assert out["inputs"] == [
        uri(warehouse, "public", "customers"),
        uri(warehouse, "public", "orders"),
    ]
    assert out["outputs"] == [uri(warehouse, "Sales", "Region Totals")]
    engine = create_engine(ledger_url)
    with engine.connect() as conn:
        rows = conn.execute(text('SELECT count(*) FROM "Sales"."Region Totals"')).scalar_one()
    engine.dispose()
    assert rows == 2


def test_sql_step_through_a_connection_reports_its_tables(
    warehouse: str, tmp_path: Path, plugins: Path, sqlite_url: str
) -> None:
    """Through another Postgres connection (its DbApiHook), the step's tables are
    reported next to the SQL job the hook reports itself; the ledger may be SQLite."""
    (plugins / "reader.py").write_text(READER_PLUGIN)
    statement = (
        "UPDATE orders SET total = total + 1 "
        "WHERE customer_id IN (SELECT id FROM customers WHERE region = 'eu')"
    )
    out = run_step(
        sqlite_url,
        workflow(tmp_path, statement, conn_id="lf_it_warehouse"),
        plugins,
        {"AIRFLOW_CONN_LF_IT_WAREHOUSE": warehouse},
    )
    assert out["status"] == "completed"
    assert out["inputs"] == [uri(warehouse, "public", "customers")]
    assert out["outputs"] == [uri(warehouse, "public", "orders")]
    assert out["sql_jobs"] == [statement]


def test_without_a_reader_nothing_is_collected(
    warehouse: str, tmp_path: Path, plugins: Path
) -> None:
    """No registered reader: Airflow's collector is a no-op and the step runs as before."""
    ledger_url = warehouse.replace("postgresql://", "postgresql+psycopg2://", 1)
    out = run_step(ledger_url, workflow(tmp_path, STATEMENT), plugins)
    assert out["status"] == "completed"
    assert out["collector"] == "NoOpCollector"
    assert out["inputs"] == out["outputs"] == []


def test_a_statement_the_parser_cannot_read_reports_nothing_and_runs(
    warehouse: str, tmp_path: Path, plugins: Path
) -> None:
    """A statement with no table the parser can name (a DO block) completes; no lineage."""
    (plugins / "reader.py").write_text(READER_PLUGIN)
    ledger_url = warehouse.replace("postgresql://", "postgresql+psycopg2://", 1)
    statement = "DO $$ BEGIN PERFORM 1; END $$"
    out = run_step(ledger_url, workflow(tmp_path, statement), plugins)
    assert out["status"] == "completed"
    assert out["inputs"] == out["outputs"] == []


def test_a_quality_step_reports_the_tables_it_reads(
    warehouse: str, tmp_path: Path, plugins: Path, sqlite_url: str
) -> None:
    """A quality step's table, or the tables its query reads, are its inputs."""
    (plugins / "reader.py").write_text(READER_PLUGIN)
    wf = tmp_path / "qc.yaml"
    wf.write_text(
        json.dumps(
            {
                "name": "lin",
                "version": 1,
                "steps": [
                    {
                        "id": "check",
                        "kind": "quality",
                        "dataset": {
                            "conn_id": "lf_it_warehouse",
                            "query": "SELECT c.region FROM customers c "
                            'JOIN "Sales"."Region Totals" t ON t.region = c.region',
                        },
                        "expectations": [{"not_null": "region"}],
                    }
                ],
            }
        )
    )
    out = run_step(sqlite_url, wf, plugins, {"AIRFLOW_CONN_LF_IT_WAREHOUSE": warehouse})
    assert out["status"] == "completed"
    assert out["inputs"] == [
        uri(warehouse, "Sales", "Region Totals"),
        uri(warehouse, "public", "customers"),
    ]
    assert out["outputs"] == []
