"""demo tables of the example workflows

Inventory, reservations, payments, shipments, an email outbox and the nightly reports,
written by the demo's tools (``ledgerflow.tools.demo``). A branch of its own, applied only
where the demo's tools are on: a production ledger never has these tables.

Revision ID: demo01
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "demo01"
down_revision = None
branch_labels = ("demo",)
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
KEY = sa.String(500)


def upgrade() -> None:
    inventory = op.create_table(
        "demo_inventory",
        sa.Column("sku", sa.String(100), primary_key=True),
        sa.Column("on_hand", sa.Integer, nullable=False),
        sa.Column("reserved", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "demo_reservations",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(100), nullable=False),
        sa.Column("sku", sa.String(100), nullable=False),
        sa.Column("qty", sa.Integer, nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("idempotency_key", KEY, nullable=False, unique=True),
    )
    op.create_table(
        "demo_payments",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(100), nullable=False),
        sa.Column("amount", sa.Numeric(12, 2), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("idempotency_key", KEY, nullable=False, unique=True),
    )
    op.create_table(
        "demo_shipments",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("order_id", sa.String(100), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("idempotency_key", KEY, nullable=False, unique=True),
    )
    op.create_table(
        "demo_emails",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("recipient", sa.String(200), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )
    op.create_table(
        "demo_reports",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("report_date", sa.String(40), nullable=False, unique=True),
        sa.Column("orders", sa.Integer, nullable=False),
        sa.Column("revenue", sa.Numeric(14, 2), nullable=False),
        sa.Column("created_at", sa.String(40), nullable=False),
    )
    op.bulk_insert(
        inventory,
        [
            {"sku": sku, "on_hand": 1000, "reserved": 0}
            for sku in ("sku-book", "sku-lamp", "sku-mug")
        ],
    )


def downgrade() -> None:
    for table in (
        "demo_reports",
        "demo_emails",
        "demo_shipments",
        "demo_payments",
        "demo_reservations",
        "demo_inventory",
    ):
        op.drop_table(table)
