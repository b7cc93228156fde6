"""ledger tables

The runs, their step checkpoints and attempts, effects (unique idempotency key), dead
letters and the append-only event log.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = ("ledger",)
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "lf_runs",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("params", sa.Text, nullable=False, server_default="{}"),
        sa.Column("trigger_kind", sa.String(40), nullable=False, server_default="manual"),
        sa.Column("retry_of", sa.String(250)),
        sa.Column("status", sa.String(40), nullable=False, server_default="running"),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("lf_runs_workflow", "lf_runs", ["workflow", "version"])
    op.create_table(
        "lf_steps",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("step_key", sa.String(250), primary_key=True),
        sa.Column("step_id", sa.String(100), nullable=False),
        sa.Column("map_index", sa.Integer, nullable=False, server_default="-1"),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("idempotency_key", sa.String(500)),
        sa.Column("args", sa.Text),
        sa.Column("output", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("started_at", TS),
        sa.Column("completed_at", TS),
    )
    op.create_table(
        "lf_attempts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250), nullable=False),
        sa.Column("try_number", sa.Integer, nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("error_type", sa.String(250)),
        sa.Column("error", sa.Text),
        sa.Column("pid", sa.Integer),
        sa.Column("hostname", sa.String(250)),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS),
    )
    op.create_index("lf_attempts_step", "lf_attempts", ["run_id", "step_key"])
    op.create_table(
        "lf_effects",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(500), nullable=False),
        sa.Column("tool", sa.String(200), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("completed_at", TS),
        sa.UniqueConstraint("idempotency_key", name="lf_effects_key"),
    )
    op.create_table(
        "lf_dead_letters",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(250), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("args", sa.Text),
        sa.Column("idempotency_key", sa.String(500)),
        sa.Column("status", sa.String(40), nullable=False, server_default="open"),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("run_id", "step_key", name="lf_dead_letters_step"),
    )
    op.create_table(
        "lf_events",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250)),
        sa.Column("kind", sa.String(60), nullable=False),
        sa.Column("data", sa.Text),
        sa.Column("at", TS, nullable=False),
    )
    op.create_index("lf_events_run", "lf_events", ["run_id", "id"])


def downgrade() -> None:
    for table in ("lf_events", "lf_dead_letters", "lf_effects", "lf_attempts", "lf_steps"):
        op.drop_table(table)
    op.drop_index("lf_runs_workflow", table_name="lf_runs")
    op.drop_table("lf_runs")
