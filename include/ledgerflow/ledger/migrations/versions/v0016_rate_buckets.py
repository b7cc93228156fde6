"""rate limits: one token bucket per limited tool or step, shared by every worker

Revision ID: 0016
Revises: 0014
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lf_rate_buckets",
        sa.Column("name", sa.String(300), primary_key=True),
        # The theoretical arrival time: when the bucket's next call may start (epoch seconds).
        sa.Column("tat", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lf_rate_buckets")
