"""cancel: who cancelled a run, when, why, and whether its saga was asked for

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("lf_runs", sa.Column("cancelled_by", sa.String(250)))
    op.add_column("lf_runs", sa.Column("cancelled_at", sa.DateTime(timezone=True)))
    op.add_column("lf_runs", sa.Column("cancel_reason", sa.Text))
    op.add_column("lf_runs", sa.Column("cancel_compensate", sa.Boolean))


def downgrade() -> None:
    op.drop_column("lf_runs", "cancel_compensate")
    op.drop_column("lf_runs", "cancel_reason")
    op.drop_column("lf_runs", "cancelled_at")
    op.drop_column("lf_runs", "cancelled_by")
