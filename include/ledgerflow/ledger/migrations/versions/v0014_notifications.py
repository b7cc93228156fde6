"""notifications: the outbox of notices to send, and each run's notify targets

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lf_notify_routes",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("routes", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "lf_notifications",
        sa.Column("id", sa.String(400), primary_key=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("step_key", sa.String(250)),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("link", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("next_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True)),
    )
    op.create_index("lf_notifications_due", "lf_notifications", ["status", "next_at"])
    op.create_index("lf_notifications_run", "lf_notifications", ["run_id"])


def downgrade() -> None:
    op.drop_index("lf_notifications_run", table_name="lf_notifications")
    op.drop_index("lf_notifications_due", table_name="lf_notifications")
    op.drop_table("lf_notifications")
    op.drop_table("lf_notify_routes")
