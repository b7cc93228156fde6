"""saga state and compensation records

Revision ID: 0003
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("lf_runs", sa.Column("saga", sa.String(40)))
    op.add_column("lf_runs", sa.Column("failed_step", sa.String(250)))
    op.create_table(
        "lf_compensations",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("step_key", sa.String(250), primary_key=True),
        sa.Column("tool", sa.String(200)),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lf_compensations")
    op.drop_column("lf_runs", "failed_step")
    op.drop_column("lf_runs", "saga")
