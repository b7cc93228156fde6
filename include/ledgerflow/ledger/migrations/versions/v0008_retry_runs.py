"""retry runs (retry_from, index on retry_of) and each run's spec hash

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("lf_runs", sa.Column("retry_from", sa.String(100)))
    op.add_column("lf_runs", sa.Column("spec_hash", sa.String(64)))
    op.create_index("lf_runs_retry_of", "lf_runs", ["retry_of"])


def downgrade() -> None:
    op.drop_index("lf_runs_retry_of", table_name="lf_runs")
    op.drop_column("lf_runs", "spec_hash")
    op.drop_column("lf_runs", "retry_from")
