"""Acme's tools: a shipping quote (read-only), a courier booking with its undo, a label.

The booking writes to a table in the ledger's own database through ``ctx.require_db()``
(``transactional=True``): the row commits in the same transaction as the step's
checkpoint, so a crash or a retry never books twice. A tool that calls another system
would instead send ``ctx.idempotency_key`` with the request (see the built-in ``http``).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from sqlalchemy import text

from ledgerflow import ToolContext, tool
from ledgerflow.errors import NonRetryableError, ToolError

RATES = {"domestic": Decimal("4.50"), "eu": Decimal("9.90"), "world": Decimal("24.00")}
PER_KG = Decimal("1.20")

_TABLE = (
    "CREATE TABLE IF NOT EXISTS acme_courier_bookings ("
    "idempotency_key VARCHAR(300) PRIMARY KEY, order_id VARCHAR(100) NOT NULL, "
    "price NUMERIC(10, 2) NOT NULL, status VARCHAR(20) NOT NULL)"
)


@tool("acme.quote_shipping", behaviour="read_only")
def quote_shipping(ctx: ToolContext, weight_kg: float, zone: str = "domestic") -> dict[str, Any]:
    """The price of shipping a parcel: a base rate per zone plus a rate per kilogram."""
    if zone not in RATES:
        raise NonRetryableError(f"unknown zone {zone!r}; zones: {', '.join(sorted(RATES))}")
    if weight_kg <= 0:
        raise NonRetryableError(f"weight_kg must be positive, got {weight_kg}")
    price = RATES[zone] + PER_KG * Decimal(str(weight_kg))
    return {"zone": zone, "price": str(price.quantize(Decimal("0.01")))}


@tool("acme.book_courier", transactional=True, compensate="acme.cancel_courier")
def book_courier(ctx: ToolContext, order_id: str, price: Decimal) -> dict[str, Any]:
    """Book the courier for an order at the quoted price (one booking per idempotency key)."""
    db = ctx.require_db()
    db.execute(text(_TABLE))
    db.execute(
        text(
            "INSERT INTO acme_courier_bookings (idempotency_key, order_id, price, status) "
            "VALUES (:key, :order_id, :price, 'booked')"
        ),
        {"key": ctx.idempotency_key, "order_id": order_id, "price": str(price)},  # any driver
    )
    return {"booking": ctx.idempotency_key, "order_id": order_id, "price": str(price)}


@tool("acme.cancel_courier", transactional=True)
def cancel_courier(ctx: ToolContext, booking: str) -> dict[str, Any]:
    """Undo a booking (the compensation of ``acme.book_courier``)."""
    db = ctx.require_db()
    db.execute(text(_TABLE))
    changed = db.execute(
        text(
            "UPDATE acme_courier_bookings SET status = 'cancelled' "
            "WHERE idempotency_key = :booking AND status = 'booked'"
        ),
        {"booking": booking},
    ).rowcount
    return {"booking": booking, "cancelled": bool(changed)}


@tool("acme.print_label", behaviour="natural")
def print_label(
    ctx: ToolContext, order_id: str, booking: str, printer_online: bool = True
) -> dict[str, Any]:
    """Print the parcel's label (printing it twice is harmless: ``natural``). With
    ``printer_online: false`` it fails, so the example shows its booking undone."""
    if not printer_online:
        raise ToolError(f"label printer offline (order {order_id})")
    return {"label": f"{order_id} / {booking}"}
