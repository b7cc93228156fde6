"""Riding out a ledger that is unreachable for a while (a Postgres restart, a failover).

A statement that fails because the database went away is tried again, with a bounded
backoff, instead of failing what called it: the triggers' waits (asynchronously, in
``ledgerflow.triggers``) and the DAG's end-of-run callback (:func:`ride_out`), whose one
chance to write the run's end would otherwise be lost, leaving the ledger's run
``running`` after Airflow's ended.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 10.0
RIDE_OUT_S = 120.0  # how long a callback keeps trying before it gives up

T = TypeVar("T")


def lost_connection(exc: BaseException) -> bool:
    """An error that says the database went away (not that a statement was wrong)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
    )


def ride_out(
    ledger: Any,
    call: Callable[[], T],
    what: str,
    limit_s: float = RIDE_OUT_S,
    sleep: Callable[[float], None] = time.sleep,
    on_lost: Callable[[], None] | None = None,
) -> T:
    """``call()``, again after each lost connection (the pool's dead connections dropped
    first), with a backoff from ``RECONNECT_FIRST_S`` to ``RECONNECT_MAX_S``, for
    ``limit_s`` seconds at most; then the last error is raised. ``call`` must be
    idempotent: a lost connection may hide a commit that happened. ``on_lost()`` is
    called once, at the first lost connection (someone waiting may stop waiting)."""
    deadline = time.monotonic() + limit_s
    delay = RECONNECT_FIRST_S
    while True:
        try:
            return call()
        except Exception as exc:
            if not lost_connection(exc):
                raise
            if on_lost is not None:
                on_lost()
                on_lost = None
            if time.monotonic() >= deadline:
                raise
            log.warning(
                "%s: the ledger is unreachable (%s); retrying in %.1f s",
                what,
                type(exc).__name__,
                delay,
            )
            ledger.engine.dispose()  # pooled connections died with the server
            sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, RECONNECT_MAX_S)
