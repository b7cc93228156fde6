"""operating: authorization failures, SLO alert states, indexes for indicators and prune

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

INDEXES = {
    "lf_runs_created": ("lf_runs", ["created_at"]),
    "lf_runs_ended": ("lf_runs", ["status", "updated_at"]),
    "lf_events_at": ("lf_events", ["at"]),
    "lf_effects_created": ("lf_effects", ["created_at"]),
    "lf_dead_letters_created": ("lf_dead_letters", ["created_at"]),
    "lf_llm_calls_created": ("lf_llm_calls", ["created_at"]),
}


def upgrade() -> None:
    op.create_table(
        "lf_auth_failures",
        sa.Column("minute", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("status", sa.Integer, primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
    )
    op.create_table(
        "lf_slo_alerts",
        sa.Column("workflow", sa.String(100), primary_key=True),
        sa.Column("objective", sa.String(60), primary_key=True),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    for name, (table, columns) in INDEXES.items():
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, _columns) in reversed(INDEXES.items()):
        op.drop_index(name, table_name=table)
    op.drop_table("lf_slo_alerts")
    op.drop_table("lf_auth_failures")
