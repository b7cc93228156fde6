"""event deliveries kept for a later wait: the DAGs their sender may trigger

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # JSON list of DAG ids; NULL: any (a signed webhook's delivery, or one made in-process).
    op.add_column("lf_event_deliveries", sa.Column("allowed_dags", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("lf_event_deliveries", "allowed_dags")
