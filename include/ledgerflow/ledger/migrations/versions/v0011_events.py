"""event steps: the waits of ``kind: event`` steps and the event deliveries

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "lf_event_waits",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("payload_schema", sa.Text),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("on_deadline", sa.Text, nullable=False),
        sa.Column("default_payload", sa.Text),
        sa.Column("follow", sa.Text),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("delivery_id", _ID),
        sa.Column("payload", sa.Text),
        sa.Column("resolved_by", sa.String(40)),
        sa.Column("resolved_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "step_key", name="lf_event_waits_step"),
    )
    op.create_index("lf_event_waits_match", "lf_event_waits", ["name", "key", "status"])
    op.create_index("lf_event_waits_run", "lf_event_waits", ["run_id", "status"])
    op.create_table(
        "lf_event_deliveries",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("event_id", sa.String(250), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("received_by", sa.String(250)),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("consumed_by_run", sa.String(250)),
        sa.Column("consumed_by_step", sa.String(250)),
        sa.Column("consumed_at", sa.DateTime(timezone=True)),
        sa.Column("detail", sa.Text),
        sa.UniqueConstraint("event_id", name="lf_event_deliveries_event_id"),
    )
    op.create_index("lf_event_deliveries_match", "lf_event_deliveries", ["name", "key", "status"])


def downgrade() -> None:
    op.drop_index("lf_event_deliveries_match", table_name="lf_event_deliveries")
    op.drop_table("lf_event_deliveries")
    op.drop_index("lf_event_waits_run", table_name="lf_event_waits")
    op.drop_index("lf_event_waits_match", table_name="lf_event_waits")
    op.drop_table("lf_event_waits")
