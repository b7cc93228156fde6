"""approvals

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "lf_approvals",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250), nullable=False),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("task_id", sa.String(250), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("payload_hash", sa.String(64), nullable=False),
        sa.Column("approvers", sa.Text, nullable=False),
        sa.Column("level", sa.Integer, nullable=False, server_default="0"),
        sa.Column("deadline", TS, nullable=False),
        sa.Column("at_deadline", sa.Text, nullable=False),
        sa.Column("follow", sa.Text),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("decided_by", sa.String(250)),
        sa.Column("decided_at", TS),
        sa.Column("comment", sa.Text),
        sa.Column("seen_hash", sa.String(64)),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.UniqueConstraint("run_id", "step_key", name="lf_approvals_step"),
    )
    op.create_index("lf_approvals_status", "lf_approvals", ["status", "workflow"])


def downgrade() -> None:
    op.drop_index("lf_approvals_status", table_name="lf_approvals")
    op.drop_table("lf_approvals")
