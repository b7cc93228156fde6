"""Circuit breakers in the ledger: every worker sees the same state.

closed --(N consecutive failures)--> open --(cooldown over, one caller wins)--> half_open
half_open --(trial succeeds)--> closed;  half_open --(trial fails)--> open again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, or_, select, update

from ledgerflow import observability
from ledgerflow.errors import BreakerOpen
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.spec.models import BreakerSpec


@dataclass(frozen=True)
class Pass:
    """The call may go ahead; ``trial``: it is the half-open breaker's one trial call."""

    trial: bool


def acquire(ledger: Ledger, conn: Connection, name: str, spec: BreakerSpec) -> Pass:
    """Pass, or raise ``BreakerOpen``. Call inside the attempt's transaction."""
    stamp = now()
    row = conn.execute(select(t.breakers).where(t.breakers.c.name == name)).mappings().first()
    if row is None or row["state"] == "closed":
        return Pass(trial=False)
    until = _aware(row["open_until"]) or stamp
    if row["state"] == "open" and until <= stamp:
        won = conn.execute(
            update(t.breakers)
            .where(t.breakers.c.name == name, t.breakers.c.state == "open")
            .values(state="half_open", open_until=stamp + spec.cooldown, updated_at=stamp)
        ).rowcount
        if won:
            ledger.record_event(f"breaker:{name}", None, "breaker_half_open", None, conn=conn)
            return Pass(trial=True)
    if row["state"] == "half_open" and until <= stamp:
        # The trial's caller vanished (killed mid-call): let this one try instead.
        conn.execute(
            update(t.breakers)
            .where(t.breakers.c.name == name)
            .values(open_until=stamp + spec.cooldown, updated_at=stamp)
        )
        return Pass(trial=True)
    raise BreakerOpen(name, max(until, stamp + timedelta(seconds=1)))


def record(ledger: Ledger, name: str, spec: BreakerSpec, *, success: bool, trial: bool) -> None:
    """After a call: reset on success; count a failure, opening the breaker at N (or at once
    when the half-open trial failed)."""
    stamp = now()
    with ledger.begin() as conn:
        if success:
            changed = conn.execute(
                update(t.breakers)
                .where(
                    t.breakers.c.name == name,
                    or_(t.breakers.c.failures > 0, t.breakers.c.state != "closed"),
                )
                .values(state="closed", failures=0, open_until=None, updated_at=stamp)
            ).rowcount
            if changed and trial:
                ledger.record_event(f"breaker:{name}", None, "breaker_closed", None, conn=conn)
            return
        conn.execute(
            ledger._insert(t.breakers)
            .values(name=name, state="closed", failures=0, updated_at=stamp)
            .on_conflict_do_nothing()
        )
        failures = conn.execute(
            update(t.breakers)
            .where(t.breakers.c.name == name)
            .values(failures=t.breakers.c.failures + 1, updated_at=stamp)
            .returning(t.breakers.c.failures, t.breakers.c.state)
        ).one()
        if trial or (failures[1] == "closed" and failures[0] >= spec.failures):
            conn.execute(
                update(t.breakers)
                .where(t.breakers.c.name == name)
                .values(state="open", open_until=stamp + spec.cooldown, updated_at=stamp)
            )
            ledger.record_event(
                f"breaker:{name}", None, "breaker_opened", {"failures": failures[0]}, conn=conn
            )
            observability.breaker_opened(name)


def states(ledger: Ledger) -> list[dict[str, object]]:
    with ledger.engine.connect() as conn:
        return [
            dict(r) for r in conn.execute(select(t.breakers).order_by(t.breakers.c.name)).mappings()
        ]


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite gives naive datetimes back
        from datetime import timezone

        return value.replace(tzinfo=timezone.utc)
    return value
