"""Rate limits in the ledger: one token bucket per limited tool or step, shared by every
worker (``spec.limits``, ``workflow.limits.rates_of``).

A bucket is one row holding its *theoretical arrival time* (GCRA): the moment its next call
may start. Taking a turn is one atomic statement that moves it on by one interval
(1 / rate) from ``max(tat, now)`` and returns it, so two workers can never get the same
slot, and the caller waits until its slot starts. Calls are spaced evenly (no burst): at
10/s one starts every 100 ms, whichever worker makes it. On Postgres the clock is the
database's (``clock_timestamp()``), the same for every worker of every machine.

A turn taken by a caller that then dies is a slot left unused: the limit still holds.
"""

from __future__ import annotations

import time

from sqlalchemy import text

from ledgerflow.ledger.store import Ledger

_PG = text(
    """
    WITH clock AS (SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now)
    INSERT INTO lf_rate_buckets AS b (name, tat)
    SELECT :name, clock.now + :interval FROM clock
    ON CONFLICT (name) DO UPDATE
      SET tat = GREATEST(b.tat, EXTRACT(EPOCH FROM clock_timestamp())::float8) + :interval
    RETURNING b.tat - :interval AS start, EXTRACT(EPOCH FROM clock_timestamp())::float8 AS now
    """
)
_SQLITE = text(
    """
    INSERT INTO lf_rate_buckets (name, tat) VALUES (:name, :now + :interval)
    ON CONFLICT (name) DO UPDATE SET tat = MAX(lf_rate_buckets.tat, :now) + :interval
    RETURNING tat - :interval AS start, :now AS now
    """
)

MAX_WAIT = 3600.0


def take_slot(ledger: Ledger, name: str, per_second: float) -> tuple[float, float]:
    """Reserve the next slot of the bucket ``name`` (``per_second`` calls a second):
    ``(start, now)``, both in epoch seconds of the database's clock."""
    interval = 1.0 / per_second
    with ledger.begin() as conn:
        if conn.dialect.name == "postgresql":
            row = conn.execute(_PG, {"name": name, "interval": interval}).one()
        else:
            values = {"name": name, "interval": interval, "now": time.time()}
            row = conn.execute(_SQLITE, values).one()
    return float(row.start), float(row.now)


def take_turn(ledger: Ledger, name: str, per_second: float) -> float:
    """Reserve the next slot of the bucket ``name`` and return how many seconds until it
    starts (0: now)."""
    start, now = take_slot(ledger, name, per_second)
    return max(0.0, min(start - now, MAX_WAIT))


def wait_turns(ledger: Ledger, buckets: list[tuple[str, float]]) -> float:
    """Take a turn from each bucket and sleep until the latest one starts; returns the
    seconds waited."""
    waited = 0.0
    for name, per_second in buckets:
        wait = take_turn(ledger, name, per_second)
        if wait > 0:
            time.sleep(wait)
            waited += wait
    return waited
