"""LLM calls

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lf_llm_calls",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("idempotency_key", sa.String(500), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250), nullable=False),
        sa.Column("model", sa.String(250)),
        sa.Column("system_prompt", sa.Text),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("responses", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("output", sa.Text),
        sa.Column("errors", sa.Text),
        sa.Column("requests", sa.Integer, nullable=False, server_default="0"),
        sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Integer, nullable=False, server_default="0"),
        sa.Column("path", sa.String(20), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("idempotency_key", name="lf_llm_calls_key"),
    )
    op.create_index("lf_llm_calls_run", "lf_llm_calls", ["run_id", "step_key"])


def downgrade() -> None:
    op.drop_index("lf_llm_calls_run", table_name="lf_llm_calls")
    op.drop_table("lf_llm_calls")
