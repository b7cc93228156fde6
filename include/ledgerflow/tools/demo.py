"""Tools of the example workflows. They write real rows to demo tables in the ledger DB.

Those tables (``demo_*``) are the ``demo`` branch of the ledger's migrations
(``ledger/migrations/versions/demo01_demo_tables.py``), applied only where these tools
are on (``LEDGERFLOW_DEMO_TOOLS=1``) or by ``ledgerflow migrate --demo``: a production
ledger does not have them.

Every effect here is ``transactional``: it goes through ``ctx.db``, so it commits in the
same transaction as the step's checkpoint and happens exactly once, however often the
task is retried or killed.
"""

from __future__ import annotations

import os
import time
from decimal import Decimal
from typing import Any

from sqlalchemy import text

from ledgerflow.errors import (
    BlockedByFlag,
    NonRetryableError,
    PaymentDeclined,
    ShipmentUnavailable,
    ToolError,
)
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import tool


@tool("demo.reserve_inventory", transactional=True, compensate="demo.release_inventory")
def reserve_inventory(ctx: ToolContext, order_id: str, sku: str, qty: int = 1) -> dict[str, Any]:
    """Reserve ``qty`` units of ``sku`` for an order."""
    db = ctx.require_db()
    row = db.execute(
        text("SELECT on_hand, reserved FROM demo_inventory WHERE sku = :sku"), {"sku": sku}
    ).first()
    if row is None:
        raise NonRetryableError(f"unknown sku {sku!r}")
    if row.on_hand - row.reserved < qty:
        raise NonRetryableError(
            f"not enough {sku}: {row.on_hand - row.reserved} left, {qty} wanted"
        )
    db.execute(
        text("UPDATE demo_inventory SET reserved = reserved + :qty WHERE sku = :sku"),
        {"qty": qty, "sku": sku},
    )
    reservation_id = db.execute(
        text(
            "INSERT INTO demo_reservations (order_id, sku, qty, status, idempotency_key) "
            "VALUES (:order_id, :sku, :qty, 'reserved', :key) RETURNING id"
        ),
        {"order_id": order_id, "sku": sku, "qty": qty, "key": ctx.idempotency_key},
    ).scalar_one()
    return {"reservation_id": reservation_id, "sku": sku, "qty": qty}


@tool("demo.release_inventory", transactional=True)
def release_inventory(ctx: ToolContext, reservation_id: int) -> dict[str, Any]:
    """Undo a reservation (the compensation of ``demo.reserve_inventory``)."""
    db = ctx.require_db()
    row = db.execute(
        text("SELECT sku, qty, status FROM demo_reservations WHERE id = :id"),
        {"id": reservation_id},
    ).first()
    if row is None or row.status == "released":
        return {"released": False}
    db.execute(
        text("UPDATE demo_inventory SET reserved = reserved - :qty WHERE sku = :sku"),
        {"qty": row.qty, "sku": row.sku},
    )
    db.execute(
        text("UPDATE demo_reservations SET status = 'released' WHERE id = :id"),
        {"id": reservation_id},
    )
    return {"released": True}


@tool("demo.charge_payment", transactional=True, compensate="demo.refund_payment")
def charge_payment(
    ctx: ToolContext,
    order_id: str,
    amount: Decimal,
    decline: bool = False,
    slow_seconds: float = 0.0,
) -> dict[str, Any]:
    """Charge the customer's card (a row in ``demo_payments``)."""
    if decline:
        raise PaymentDeclined(f"card declined for order {order_id}")
    db = ctx.require_db()
    payment_id = db.execute(
        text(
            "INSERT INTO demo_payments (order_id, amount, status, idempotency_key) "
            "VALUES (:order_id, :amount, 'captured', :key) RETURNING id"
        ),
        {"order_id": order_id, "amount": str(amount), "key": ctx.idempotency_key},
    ).scalar_one()
    if slow_seconds:
        time.sleep(slow_seconds)  # a slow gateway: the window in which crash tests kill us
    return {"payment_id": payment_id, "amount": str(amount)}


@tool("demo.refund_payment", transactional=True)
def refund_payment(ctx: ToolContext, payment_id: int, fail_times: int = 0) -> dict[str, Any]:
    """Refund a payment (the compensation of ``demo.charge_payment``).

    ``fail_times``: the demo's switch for a flaky refund API (the first N tries fail).
    """
    if ctx.try_number <= fail_times:
        raise ToolError(f"refund API unavailable (try {ctx.try_number} of the first {fail_times})")
    db = ctx.require_db()
    changed = db.execute(
        text("UPDATE demo_payments SET status = 'refunded' WHERE id = :id AND status = 'captured'"),
        {"id": payment_id},
    ).rowcount
    return {"refunded": bool(changed)}


@tool("demo.create_shipment", transactional=True, compensate="demo.cancel_shipment")
def create_shipment(
    ctx: ToolContext, order_id: str, address: str, fail: bool = False
) -> dict[str, Any]:
    """Book a shipment with the carrier (a row in ``demo_shipments``)."""
    if fail:
        raise ShipmentUnavailable(f"carrier refused the shipment for order {order_id}")
    shipment_id = (
        ctx.require_db()
        .execute(
            text(
                "INSERT INTO demo_shipments (order_id, address, status, idempotency_key) "
                "VALUES (:order_id, :address, 'booked', :key) RETURNING id"
            ),
            {"order_id": order_id, "address": address, "key": ctx.idempotency_key},
        )
        .scalar_one()
    )
    return {"shipment_id": shipment_id}


@tool("demo.cancel_shipment", transactional=True)
def cancel_shipment(ctx: ToolContext, shipment_id: int) -> dict[str, Any]:
    """Cancel a booked shipment (the compensation of ``demo.create_shipment``)."""
    changed = (
        ctx.require_db()
        .execute(
            text(
                "UPDATE demo_shipments SET status = 'cancelled' WHERE id = :id AND status = 'booked'"
            ),
            {"id": shipment_id},
        )
        .rowcount
    )
    return {"cancelled": bool(changed)}


@tool("demo.send_email", transactional=True)
def send_email(ctx: ToolContext, to: str, subject: str, body: str) -> dict[str, Any]:
    """Queue an email (a row in ``demo_emails``, the demo's outbox)."""
    email_id = (
        ctx.require_db()
        .execute(
            text(
                "INSERT INTO demo_emails (recipient, subject, body) VALUES (:to, :subject, :body) RETURNING id"
            ),
            {"to": to, "subject": subject, "body": body},
        )
        .scalar_one()
    )
    return {"email_id": email_id}


@tool("demo.sales_totals", behaviour="read_only", transactional=True)
def sales_totals(ctx: ToolContext) -> dict[str, Any]:
    """Count captured payments and their revenue."""
    row = (
        ctx.require_db()
        .execute(
            text(
                "SELECT COUNT(*) AS n, COALESCE(SUM(amount), 0) AS total FROM demo_payments WHERE status = 'captured'"
            )
        )
        .one()
    )
    return {"orders": int(row.n), "revenue": str(row.total)}


@tool("demo.store_report", behaviour="natural", transactional=True)
def store_report(
    ctx: ToolContext, report_date: str, orders: int, revenue: Decimal
) -> dict[str, Any]:
    """Write (or overwrite) the report of one day: an upsert, so running it twice is harmless."""
    ctx.require_db().execute(
        text(
            "INSERT INTO demo_reports (report_date, orders, revenue, created_at) "
            "VALUES (:d, :orders, :revenue, CURRENT_TIMESTAMP) ON CONFLICT (report_date) DO UPDATE "
            "SET orders = excluded.orders, revenue = excluded.revenue"
        ),
        {"d": report_date, "orders": orders, "revenue": str(revenue)},
    )
    return {"report_date": report_date, "orders": orders, "revenue": str(revenue)}


@tool("demo.noop", behaviour="natural")
def noop(ctx: ToolContext, value: Any = None) -> dict[str, Any]:
    """Return its input; used by benchmarks to measure the engine, not the tool."""
    return {"value": value}


@tool("demo.task_process", behaviour="read_only")
def task_process(ctx: ToolContext) -> dict[str, Any]:
    """Where the step runs: its process, and the process that preloaded the step code
    (``ledgerflow.preload.PRELOADED_IN``), which is an ancestor when the component that
    forked the task had loaded the plugin, as it should."""
    from ledgerflow import preload

    return {"pid": os.getpid(), "preloaded_in": preload.PRELOADED_IN}


@tool("demo.sleep", behaviour="natural")
def sleep(ctx: ToolContext, seconds: float, first_tries: int = 1_000_000) -> dict[str, Any]:
    """Sleep ``seconds`` on the first ``first_tries`` tries (a slow dependency), then return."""
    slept = seconds if ctx.try_number <= first_tries else 0.0
    time.sleep(slept)
    return {"slept": slept}


@tool("demo.fail_while", behaviour="read_only")
def fail_while(ctx: ToolContext, flag: str = "", value: Any = None) -> dict[str, Any]:
    """Fail (at once, no retry) while the file ``flag`` exists; else return ``value``.

    A failure an operator can fix between a run and its retry (delete the file), which a
    param cannot be: a retry run keeps the original params."""
    import os

    if flag and os.path.exists(flag):
        raise BlockedByFlag(f"blocked while {flag} exists")
    return {"value": value}


@tool("demo.route_ticket", behaviour="natural")
def route_ticket(
    ctx: ToolContext, ticket_id: str, category: str, priority: str, by: str = "llm"
) -> dict[str, Any]:
    """Put a classified ticket in its queue (``<category>-<priority>``)."""
    return {"ticket_id": ticket_id, "queue": f"{category}-{priority}", "by": by}


@tool("demo.classify_ticket_rules", behaviour="read_only")
def classify_ticket_rules(
    ctx: ToolContext, ticket_id: str, ticket: str, reason: str | None = None
) -> dict[str, Any]:
    """The rules-based classifier: the ticket triage's fallback when the LLM's answer is
    invalid or not confident; low-confidence results go to the human review queue."""
    from ledgerflow.rules_model import classify

    result = classify(ticket, _TRIAGE_SCHEMA)
    queue = "review" if result["confidence"] < 0.7 else f"{result['category']}-{result['priority']}"
    return {**result, "ticket_id": ticket_id, "queue": queue, "by": "rules", "llm_reason": reason}


_TRIAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "category": {"type": "string"},
        "priority": {"type": "string"},
        "summary": {"type": "string"},
        "confidence": {"type": "number"},
    },
}
