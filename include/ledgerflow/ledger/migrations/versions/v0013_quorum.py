"""quorum approvals: how many approvals an approval needs, and one row per decision

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Requests made before this revision needed one decision: the default says so.
    op.add_column(
        "lf_approvals",
        sa.Column("required", sa.Integer, nullable=False, server_default="1"),
    )
    op.create_table(
        "lf_approval_decisions",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column(
            "approval_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("level", sa.Integer, nullable=False),
        sa.Column("decided_by", sa.String(250), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("source", sa.String(40), nullable=False),
        sa.Column("seen_hash", sa.String(64), nullable=False),
        sa.Column("seen", sa.Text, nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("approval_id", "decided_by", name="lf_approval_decisions_once"),
    )


def downgrade() -> None:
    op.drop_table("lf_approval_decisions")
    with op.batch_alter_table("lf_approvals") as batch:
        batch.drop_column("required")
