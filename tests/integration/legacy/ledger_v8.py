"""Frozen: the ledger schema and migration path of Ledgerflow before Alembic (commit 961124d).

The upgrade tests build a ledger with exactly this code (``migrate_legacy`` at the end:
the loop of that commit's ``Ledger.migrate``), write rows, then upgrade it with today's
code. Above it: ``include/ledgerflow/ledger/schema.py`` of that commit, unchanged but
for this docstring and one import (Engine). Do not edit: it is what deployed ledgers look
like.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

metadata = MetaData()

_ID = BigInteger().with_variant(Integer, "sqlite")

runs = Table(
    "lf_runs",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("dag_id", String(250), nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("params", Text, nullable=False, server_default="{}"),
    Column("trigger_kind", String(40), nullable=False, server_default="manual"),
    Column("retry_of", String(250)),
    Column("status", String(40), nullable=False, server_default="running"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The saga: none, compensating, compensated or compensation_failed (migration 3).
    Column("saga", String(40)),
    Column("failed_step", String(250)),
    # A retry run: the step it re-runs from (None: resume where the lineage stopped), and
    # the SHA-256 of the workflow file the run started on (migration 8).
    Column("retry_from", String(100)),
    Column("spec_hash", String(64)),
    Index("lf_runs_workflow", "workflow", "version"),
    Index("lf_runs_retry_of", "retry_of"),
)

# One row per step (or per item of a for_each step): the checkpoint.
steps = Table(
    "lf_steps",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("step_key", String(250), primary_key=True),
    Column("step_id", String(100), nullable=False),
    Column("map_index", Integer, nullable=False, server_default="-1"),
    Column("status", String(40), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("idempotency_key", String(500)),
    Column("args", Text),
    Column("output", Text),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
)

attempts = Table(
    "lf_attempts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("try_number", Integer, nullable=False),
    Column("status", String(40), nullable=False),
    Column("error_type", String(250)),
    Column("error", Text),
    Column("pid", Integer),
    Column("hostname", String(250)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Index("lf_attempts_step", "run_id", "step_key"),
)

# The world-changing calls. The unique key is what makes a retry harmless.
effects = Table(
    "lf_effects",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(500), nullable=False),
    Column("tool", String(200), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("status", String(40), nullable=False),
    Column("result", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    UniqueConstraint("idempotency_key", name="lf_effects_key"),
)

dead_letters = Table(
    "lf_dead_letters",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error_type", String(250), nullable=False),
    Column("error", Text, nullable=False),
    Column("args", Text),
    Column("idempotency_key", String(500)),
    Column("status", String(40), nullable=False, server_default="open"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("run_id", "step_key", name="lf_dead_letters_step"),
)

# Append-only: rows are inserted, never updated or deleted.
events = Table(
    "lf_events",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250)),
    Column("kind", String(60), nullable=False),
    Column("data", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("lf_events_run", "run_id", "id"),
)

# One row per forward step of a failed run: what the saga did about it.
compensations = Table(
    "lf_compensations",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("step_key", String(250), primary_key=True),
    Column("tool", String(200)),
    Column("status", String(40), nullable=False),
    Column("detail", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Circuit breakers, shared by every worker.
breakers = Table(
    "lf_breakers",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("state", String(20), nullable=False),
    Column("failures", Integer, nullable=False),
    Column("open_until", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# One row per approval step of a run: the request, what the approver saw, the decision.
approvals = Table(
    "lf_approvals",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("dag_id", String(250), nullable=False),
    Column("task_id", String(250), nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("payload_hash", String(64), nullable=False),
    # The approvers and deadline of the current escalation level; the rest of the chain.
    Column("approvers", Text, nullable=False),
    Column("level", Integer, nullable=False, server_default="0"),
    Column("deadline", DateTime(timezone=True), nullable=False),
    Column("at_deadline", Text, nullable=False),
    # Task ids to follow after each decision ({"approved": [...], "rejected": [...] | null}):
    # lets the decision end the Airflow task directly, without a worker.
    Column("follow", Text),
    # pending -> approved | rejected | expired (the deadline's outcome, by "deadline")
    Column("status", String(20), nullable=False),
    Column("decided_by", String(250)),
    Column("decided_at", DateTime(timezone=True)),
    Column("comment", Text),
    Column("seen_hash", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("run_id", "step_key", name="lf_approvals_step"),
    Index("lf_approvals_status", "status", "workflow"),
)

# One row per LLM call, keyed by the step's idempotency key: the prompt, the model, every
# raw response (repairs included), the validated output or the validation errors, tokens,
# latency and the path the step took. A retry finds the row and makes no second call.
llm_calls = Table(
    "lf_llm_calls",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(500), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("model", String(250)),
    Column("system_prompt", Text),
    Column("prompt", Text, nullable=False),
    Column("responses", Text, nullable=False),
    # valid | invalid (still not fitting the schema after the repairs)
    Column("status", String(20), nullable=False),
    Column("output", Text),
    Column("errors", Text),
    Column("requests", Integer, nullable=False, server_default="0"),
    Column("input_tokens", Integer, nullable=False, server_default="0"),
    Column("output_tokens", Integer, nullable=False, server_default="0"),
    Column("latency_ms", Integer, nullable=False, server_default="0"),
    # main | fallback, and why (validation errors or the failed check)
    Column("path", String(20), nullable=False),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("idempotency_key", name="lf_llm_calls_key"),
    Index("lf_llm_calls_run", "run_id", "step_key"),
)

# One row per validation a quality step ran (a retried task adds a row): the outcome,
# GX's statistics, and each failed expectation with a sample of the unexpected values.
quality_results = Table(
    "lf_quality_results",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("try_number", Integer, nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("dataset", Text, nullable=False),
    Column("success", Boolean, nullable=False),
    # passed | failed (on_failure: fail) | warned | branched
    Column("outcome", String(20), nullable=False),
    Column("row_count", BigInteger),
    Column("evaluated", Integer, nullable=False),
    Column("failed_count", Integer, nullable=False),
    Column("statistics", Text, nullable=False),
    Column("failed", Text, nullable=False),
    Column("results", Text, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("lf_quality_results_step", "run_id", "step_key"),
)

schema_version = Table(
    "lf_schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(
        conn, tables=[runs, steps, attempts, effects, dead_letters, events], checkfirst=True
    )


def _v2_demo(conn: Connection) -> None:
    """Tables the example workflows write to (inventory, payments, shipments...)."""
    serial = (
        "INTEGER PRIMARY KEY AUTOINCREMENT"
        if conn.dialect.name == "sqlite"
        else "BIGSERIAL PRIMARY KEY"
    )
    for ddl in (
        "CREATE TABLE IF NOT EXISTS demo_inventory (sku VARCHAR(100) PRIMARY KEY, "
        "on_hand INTEGER NOT NULL, reserved INTEGER NOT NULL DEFAULT 0)",
        f"CREATE TABLE IF NOT EXISTS demo_reservations (id {serial}, order_id VARCHAR(100) NOT NULL, "
        "sku VARCHAR(100) NOT NULL, qty INTEGER NOT NULL, status VARCHAR(40) NOT NULL, "
        "idempotency_key VARCHAR(500) NOT NULL UNIQUE)",
        f"CREATE TABLE IF NOT EXISTS demo_payments (id {serial}, order_id VARCHAR(100) NOT NULL, "
        "amount NUMERIC(12, 2) NOT NULL, status VARCHAR(40) NOT NULL, "
        "idempotency_key VARCHAR(500) NOT NULL UNIQUE)",
        f"CREATE TABLE IF NOT EXISTS demo_shipments (id {serial}, order_id VARCHAR(100) NOT NULL, "
        "address TEXT NOT NULL, status VARCHAR(40) NOT NULL, "
        "idempotency_key VARCHAR(500) NOT NULL UNIQUE)",
        f"CREATE TABLE IF NOT EXISTS demo_emails (id {serial}, recipient VARCHAR(200) NOT NULL, "
        "subject TEXT NOT NULL, body TEXT NOT NULL)",
        f"CREATE TABLE IF NOT EXISTS demo_reports (id {serial}, report_date VARCHAR(40) NOT NULL UNIQUE, "
        "orders INTEGER NOT NULL, revenue NUMERIC(14, 2) NOT NULL, created_at VARCHAR(40) NOT NULL)",
    ):
        conn.execute(text(ddl))
    for sku in ("sku-book", "sku-lamp", "sku-mug"):
        conn.execute(
            text(
                "INSERT INTO demo_inventory (sku, on_hand, reserved) VALUES (:sku, 1000, 0) "
                "ON CONFLICT (sku) DO NOTHING"
            ),
            {"sku": sku},
        )


def _v3_saga(conn: Connection) -> None:
    from sqlalchemy import inspect

    have = {c["name"] for c in inspect(conn).get_columns("lf_runs")}
    for name, kind in (("saga", "VARCHAR(40)"), ("failed_step", "VARCHAR(250)")):
        if name not in have:  # databases created before this migration
            conn.execute(text(f"ALTER TABLE lf_runs ADD COLUMN {name} {kind}"))
    compensations.create(conn, checkfirst=True)


def _v8_retries(conn: Connection) -> None:
    from sqlalchemy import inspect

    have = {c["name"] for c in inspect(conn).get_columns("lf_runs")}
    for name, kind in (("retry_from", "VARCHAR(100)"), ("spec_hash", "VARCHAR(64)")):
        if name not in have:
            conn.execute(text(f"ALTER TABLE lf_runs ADD COLUMN {name} {kind}"))
    next(i for i in runs.indexes if i.name == "lf_runs_retry_of").create(conn, checkfirst=True)


MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "ledger tables", _v1),
    (2, "demo tables of the example workflows", _v2_demo),
    (3, "saga state and compensation records", _v3_saga),
    (4, "circuit breakers", lambda conn: breakers.create(conn, checkfirst=True)),
    (5, "approvals", lambda conn: approvals.create(conn, checkfirst=True)),
    (6, "LLM calls", lambda conn: llm_calls.create(conn, checkfirst=True)),
    (7, "quality results", lambda conn: quality_results.create(conn, checkfirst=True)),
    (8, "retry runs (retry_from, index on retry_of) and each run's spec hash", _v8_retries),
]
LATEST = max(version for version, _title, _apply in MIGRATIONS)


# ---------------------------------------------------------------------------------------
# Ledger.migrate() of commit 961124d, without its fast path.


def migrate_legacy(engine: Engine) -> int:
    """Apply MIGRATIONS by set, as the code of commit 961124d did."""
    from datetime import datetime, timezone

    from sqlalchemy import select

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
        schema_version.create(conn, checkfirst=True)
        applied = set(conn.execute(select(schema_version.c.version)).scalars())
        for version, _title, apply in MIGRATIONS:
            if version not in applied:
                apply(conn)
                conn.execute(
                    schema_version.insert().values(
                        version=version, applied_at=datetime.now(timezone.utc)
                    )
                )
    return LATEST
