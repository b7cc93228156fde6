"""The ledger's Alembic migrations on SQLite and Postgres: a ledger made by the code before
Alembic is adopted with every row, a new ledger has exactly the tables the code uses
(and no demo tables outside the demo), every revision goes down and up again, and the
SQL printed for a DBA builds the same ledger."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, event, inspect, text

from ledgerflow.errors import LedgerError
from ledgerflow.ledger import schema
from ledgerflow.ledger.store import Ledger

LEGACY = Path(__file__).parent / "legacy" / "ledger_v8.py"
CLI = Path(sys.executable).with_name("ledgerflow")
T0 = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)
# The newest revision of the ledger branch, as the version table records it.
HEAD = f"{schema.LATEST:04d}"


def production_env() -> dict[str, str]:
    """This process's environment without the demo's switch (the suite turns it on)."""
    demo = ("LEDGERFLOW_DEMO_TOOLS", "AIRFLOW__LEDGERFLOW__DEMO_TOOLS")
    return {k: v for k, v in os.environ.items() if k not in demo}


def legacy_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ledger_v8", LEGACY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tables(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(inspect(conn).get_table_names())


def drift(engine: Engine) -> list[Any]:
    """What differs between the database's lf_ tables and ``schema.metadata`` (Alembic's
    comparison: tables, columns, types, nullability, indexes, unique constraints)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    skip = {schema.VERSION_TABLE, schema.LEGACY_VERSION_TABLE}

    def include(name: str | None, kind: str, _parent: Any) -> bool:
        return kind != "table" or (bool(name) and name.startswith("lf_") and name not in skip)  # type: ignore[union-attr]

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"include_name": include, "compare_type": True}
        )
        return list(compare_metadata(context, schema.metadata))


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the version tables, in a stable order."""
    out = {}
    with engine.connect() as conn:
        for name in sorted(tables(engine) - {schema.VERSION_TABLE}):
            rows = conn.execute(text(f"SELECT * FROM {name}")).all()
            out[name] = sorted((tuple(r) for r in rows), key=repr)
    return out


def write_rows(engine: Engine, old: ModuleType) -> None:
    """Rows in the tables the old code made, written through its own table objects."""
    with engine.begin() as conn:
        conn.execute(
            old.runs.insert().values(
                run_id="checkout__v1/r1", dag_id="checkout__v1", workflow="checkout", version=1,
                params='{"order_id": "o-1"}', trigger_kind="manual", status="failed",
                created_at=T0, updated_at=T0, saga="compensated", failed_step="ship",
                retry_from=None, spec_hash="ab" * 32,
            )
        )  # fmt: skip
        conn.execute(
            old.runs.insert().values(
                run_id="checkout__v1/r2", dag_id="checkout__v1", workflow="checkout", version=1,
                params="{}", trigger_kind="retry", retry_of="checkout__v1/r1", status="running",
                created_at=T0, updated_at=T0, retry_from="ship",
            )
        )  # fmt: skip
        conn.execute(
            old.steps.insert().values(
                run_id="checkout__v1/r1", step_key="charge", step_id="charge", status="completed",
                attempts=1, idempotency_key="k-charge", output='{"payment_id": 1}',
                started_at=T0, completed_at=T0,
            )
        )  # fmt: skip
        conn.execute(
            old.effects.insert().values(
                idempotency_key="k-charge", tool="demo.charge_payment", run_id="checkout__v1/r1",
                step_key="charge", status="completed", result="{}", created_at=T0,
            )
        )  # fmt: skip
        conn.execute(
            old.approvals.insert().values(
                run_id="checkout__v1/r1", step_key="ok", dag_id="checkout__v1", task_id="ok",
                workflow="checkout", version=1, subject="s", body="b", payload="{}",
                payload_hash="0" * 64, approvers="{}", deadline=T0, at_deadline="reject",
                status="pending", created_at=T0, updated_at=T0,
            )
        )  # fmt: skip
        conn.execute(
            old.events.insert().values(run_id="checkout__v1/r1", kind="run_started", at=T0)
        )
        conn.execute(
            text(
                "INSERT INTO demo_payments (order_id, amount, status, idempotency_key) "
                "VALUES ('o-1', 12.50, 'refunded', 'k-charge')"
            )
        )


# tables of revisions after 0008
AFTER_0008 = (
    "lf_auth_failures",
    "lf_slo_alerts",
    "lf_approval_decisions",
    "lf_notifications",
    "lf_notify_routes",
    "lf_event_waits",
    "lf_event_deliveries",
    "lf_rate_buckets",
)
# Columns of lf_runs added after 0008 (0012: a run's cancel), last in each row.
CANCEL_COLUMNS = ("cancelled_by", "cancelled_at", "cancel_reason", "cancel_compensate")


def test_a_ledger_made_before_alembic_is_adopted_with_every_row(ledger_url: str) -> None:
    """A ledger created and filled by the code before Alembic (lf_schema_version at 8),
    in a database that also holds Airflow's ``alembic_version``: migrating stamps it at
    0008 (and the demo branch, whose tables it has) without touching a table or a row,
    then brings it to the newest revision (indexes only since 0008),
    leaves Airflow's table alone, and the result matches the code's tables exactly; the
    code reads the old rows, and the adopted demo branch can be removed."""
    old = legacy_module()
    engine = create_engine(ledger_url)
    assert old.migrate_legacy(engine) == 8
    write_rows(engine, old)
    with engine.begin() as conn:  # Airflow's own version table, as in a shared database
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('29ce7909c52b')"))
    before = snapshot(engine)

    ledger = Ledger(ledger_url)
    assert ledger.revisions() == set()
    assert ledger.migrate(demo=False) == schema.LATEST
    assert ledger.revisions() == {HEAD, schema.DEMO_HEAD}
    now = snapshot(engine)
    # Revisions after 0008 only add indexes and tables (empty), and 0013 the column
    # lf_approvals.required (appended; 1 on the old rows: they needed one decision):
    # every table the old code had is otherwise as it was.
    assert {t: now.pop(t) for t in AFTER_0008} == {t: [] for t in AFTER_0008}
    assert [row[-1] for row in now["lf_approvals"]] == [1] * len(before["lf_approvals"])
    now["lf_approvals"] = [row[:-1] for row in now["lf_approvals"]]
    assert [row[-len(CANCEL_COLUMNS) :] for row in now["lf_runs"]] == [
        (None,) * len(CANCEL_COLUMNS)
    ] * len(before["lf_runs"])
    now["lf_runs"] = [row[: -len(CANCEL_COLUMNS)] for row in now["lf_runs"]]
    assert now == before  # alembic_version and lf_schema_version included
    assert drift(engine) == []
    assert ledger.run("checkout__v1/r1")["saga"] == "compensated"  # type: ignore[index]
    assert [r["run_id"] for r in ledger.retries_of("checkout__v1/r1")] == ["checkout__v1/r2"]

    ledger.migrate_to("demo@base")
    assert not {t for t in tables(engine) if t.startswith("demo_")}
    assert ledger.revisions() == {HEAD}
    after = {k: v for k, v in snapshot(engine).items() if k not in AFTER_0008}
    after["lf_approvals"] = [row[:-1] for row in after["lf_approvals"]]  # 0013's column
    after["lf_runs"] = [row[: -len(CANCEL_COLUMNS)] for row in after["lf_runs"]]
    assert {k: v for k, v in before.items() if not k.startswith("demo_")} == after


def test_a_ledger_made_before_alembic_at_an_older_version_is_upgraded(ledger_url: str) -> None:
    """A ledger of the old code at version 5 (no LLM calls, quality results, retry
    columns) is adopted at 0005 and upgraded to the newest revision, its rows kept."""
    old = legacy_module()
    engine = create_engine(ledger_url)
    with engine.begin() as conn:  # what 1..5 created in the release that stopped at 5
        old.schema_version.create(conn)
        for version, _title, apply in old.MIGRATIONS[:5]:
            apply(conn)
            conn.execute(old.schema_version.insert().values(version=version, applied_at=T0))
        conn.execute(text("DROP INDEX lf_runs_retry_of"))
        for column in ("retry_from", "spec_hash"):
            conn.execute(text(f"ALTER TABLE lf_runs DROP COLUMN {column}"))
        conn.execute(
            text(
                "INSERT INTO lf_runs (run_id, dag_id, workflow, version, status, created_at, "
                "updated_at) VALUES ('w__v1/a', 'w__v1', 'w', 1, 'succeeded', :t, :t)"
            ),
            {"t": T0},
        )
    assert {"lf_llm_calls", "lf_quality_results"} & tables(engine) == set()

    ledger = Ledger(ledger_url)
    ledger.migrate(demo=False)
    assert ledger.schema_version() == schema.LATEST
    assert drift(engine) == []
    assert ledger.run("w__v1/a")["status"] == "succeeded"  # type: ignore[index]


def test_a_new_ledger_has_the_code_tables_and_no_demo_tables(ledger_url: str) -> None:
    """``migrate()`` outside the demo makes exactly the tables ``schema.metadata``
    describes, with our own version table and nothing named demo_*; the demo's
    ``migrate(demo=True)`` adds the demo branch and its seeded inventory."""
    ledger = Ledger(ledger_url)
    ledger.migrate(demo=False)
    names = tables(ledger.engine)
    assert names == {t.name for t in schema.metadata.sorted_tables} | {schema.VERSION_TABLE}
    assert drift(ledger.engine) == []
    assert ledger.revisions() == {HEAD}

    ledger.migrate(demo=True)
    assert ledger.revisions() == {HEAD, schema.DEMO_HEAD}
    with ledger.engine.connect() as conn:
        skus = conn.execute(text("SELECT sku FROM demo_inventory ORDER BY sku")).scalars()
        assert list(skus) == ["sku-book", "sku-lamp", "sku-mug"]


def test_every_revision_goes_down_and_up_again(ledger_url: str) -> None:
    """Down to 0007 drops only 0010's tables and 0008's columns (the run stays), down to base leaves only
    the version table, and up again gives the same tables as a new ledger."""
    ledger = Ledger(ledger_url)
    ledger.migrate(demo=True)
    ledger.ensure_run(
        run_id="w__v1/x", dag_id="w__v1", workflow="w", version=1, params={},
        trigger_kind="manual", spec_hash="cd" * 32,
    )  # fmt: skip
    reverted: list[tuple[str, bool]] = []
    ledger.migrate_to("0007", progress=lambda rev, _title, up: reverted.append((rev, up)))
    # Every revision above 0007 is reverted, newest first.
    from ledgerflow.ledger._migrate import scripts

    above = [r.revision for r in scripts().iterate_revisions("ledger@head", "0007")]
    assert above[0] == HEAD and above[-1] == "0008"
    assert reverted == [(rev, False) for rev in above]
    with ledger.engine.connect() as conn:
        columns = {c["name"] for c in inspect(conn).get_columns("lf_runs")}
        assert conn.execute(text("SELECT run_id FROM lf_runs")).scalars().all() == ["w__v1/x"]
    assert {"retry_from", "spec_hash"} & columns == set()
    assert ledger.revisions() == {"0007", schema.DEMO_HEAD}

    ledger.migrate_to("base")
    assert tables(ledger.engine) == {schema.VERSION_TABLE}
    assert ledger.revisions() == set()
    Ledger(ledger_url).migrate(demo=False)
    assert drift(ledger.engine) == []


def test_the_sql_for_a_dba_builds_the_same_ledger(ledger_url: str) -> None:
    """``ledgerflow migrate --sql`` prints SQL for the ledger's dialect without touching
    the database (which stays empty); run by hand, that SQL builds a ledger the code
    finds at its version, with the code's tables."""
    env = production_env()
    result = subprocess.run(
        [str(CLI), "migrate", "--sql", "--url", ledger_url],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    sql = result.stdout
    assert "CREATE TABLE lf_runs" in sql and "demo_" not in sql
    engine = create_engine(ledger_url)
    assert tables(engine) == set()
    raw = engine.raw_connection()
    try:
        if engine.dialect.name == "sqlite":
            raw.driver_connection.executescript(sql)  # type: ignore[union-attr]
        else:
            raw.driver_connection.autocommit = True  # type: ignore[union-attr]
            with raw.cursor() as cur:
                cur.execute(sql)
    finally:
        raw.close()
    ledger = Ledger(ledger_url)
    assert ledger.revisions() == {HEAD}
    assert drift(engine) == []


def test_migrate_makes_demo_tables_only_where_the_demo_tools_are_on(ledger_url: str) -> None:
    """``ledgerflow migrate`` in a production environment (no LEDGERFLOW_DEMO_TOOLS)
    creates no demo_* table; with the demo's switch on, it does."""
    env = production_env()
    run = [str(CLI), "migrate", "--url", ledger_url]
    result = subprocess.run(run, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (
        f"applying migration {schema.LATEST}/{schema.LATEST}" in result.stderr
        and "demo01" not in result.stderr
    )
    engine = create_engine(ledger_url)
    assert [t for t in tables(engine) if t.startswith("demo_")] == []
    result = subprocess.run(
        run, capture_output=True, text=True, env={**env, "LEDGERFLOW_DEMO_TOOLS": "1"}, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "applying migration demo01" in result.stderr
    assert "(with the demo tables)" in result.stdout
    assert {t for t in tables(engine) if t.startswith("demo_")} >= {"demo_payments"}


def test_a_legacy_ledger_with_a_gap_is_refused_by_name(tmp_path: Path) -> None:
    """A pre-Alembic ledger whose lf_schema_version misses a migration below its highest
    (6 missing, 7 and 8 applied) cannot be matched to one revision: migrate refuses with
    an error naming the versions, and changes nothing."""
    url = f"sqlite:///{tmp_path / 'gap.db'}"
    old = legacy_module()
    engine = create_engine(url)
    old.migrate_legacy(engine)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM lf_schema_version WHERE version = 6"))
    with pytest.raises(LedgerError, match=r"\[7, 8\] cannot be matched"):
        Ledger(url).migrate(demo=False)
    assert Ledger(url).revisions() == set()
    assert schema.VERSION_TABLE not in tables(engine)


def test_0009_adds_only_the_indexes_of_a_steps_reads(ledger_url: str) -> None:
    """0009 adds the two indexes a step's reads use (outputs by step id, open dead letters
    by step key) and nothing else: down to 0008 removes just them, up again restores them,
    and the result matches the code's tables."""
    ledger = Ledger(ledger_url)
    ledger.migrate(demo=False)
    ledger.migrate_to("0009")  # 0009 alone: the revisions after it add indexes of their own

    def indexes() -> set[tuple[str, str]]:
        with ledger.engine.connect() as conn:
            found = inspect(conn)
            return {
                (table, i["name"])
                for table in found.get_table_names()
                for i in found.get_indexes(table)
                if i["name"]
            }

    ours = {("lf_steps", "lf_steps_step_id"), ("lf_dead_letters", "lf_dead_letters_open")}
    at_head, before = indexes(), tables(ledger.engine)
    assert ours <= at_head
    ledger.migrate_to("0008")
    assert indexes() == at_head - ours
    assert tables(ledger.engine) == before
    assert ledger.revisions() == {"0008"}
    ledger.migrate_to("0009")
    assert indexes() == at_head
    Ledger(ledger_url).migrate(demo=False)
    assert drift(ledger.engine) == []


def test_the_version_is_checked_once_per_process_and_database(ledger_url: str) -> None:
    """Every step calls ``migrate()``: once a process has found a database at the code's
    revision, a ``Ledger`` of the same URL (a new one per task or step) sends no statement
    for it; after ``migrate_to`` moved the database, the next ``migrate()`` checks and
    upgrades it again; another database is checked and migrated on its own."""
    Ledger(ledger_url).migrate(demo=False)
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    ledger = Ledger(ledger_url)
    event.listen(ledger.engine, "before_cursor_execute", record)
    try:
        assert ledger.migrate(demo=False) == schema.LATEST
        assert Ledger(ledger_url).migrate(demo=False) == schema.LATEST
        assert sent == []
        ledger.migrate_to("0007")
        assert ledger.revisions() == {"0007"}
        sent.clear()
        Ledger(ledger_url).migrate(demo=False)
        assert sent  # checked again, and brought back up
        assert ledger.revisions() == {HEAD}
    finally:
        event.remove(ledger.engine, "before_cursor_execute", record)
    with another_database(ledger_url) as other:
        fresh = Ledger(other)
        assert fresh.revisions() == set()
        fresh.migrate(demo=False)
        assert fresh.revisions() == {HEAD}


@contextmanager
def another_database(ledger_url: str) -> Iterator[str]:
    """A new, empty database of the same kind as ``ledger_url``."""
    if ledger_url.startswith("sqlite"):
        yield ledger_url.replace("ledger.db", "another.db")
        return
    from ledgerflow.testing.postgres import fresh_database

    with fresh_database("lf_it") as url:
        yield url.replace("postgresql://", "postgresql+psycopg2://", 1)
