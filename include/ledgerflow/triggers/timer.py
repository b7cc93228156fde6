"""The timer trigger: a parked wait step, waiting in the triggerer for its fire time.

It holds no worker slot. Its kwargs (run, step, fire time, the ledger's connection id,
never a URL) are all it needs, so Airflow's trigger table carries it across a triggerer
restart: the new triggerer runs it again and it fires at the same planned time (at once
when that has passed). At the fire time it completes the step's checkpoint in the ledger
(``ledger.timers.fire``: once, however many times it runs) and ends the task right here
with the step's output as its XCom, so no worker has to start just to finish a timer.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)

# A long wait sleeps in slices, reading the clock after each: a host clock that jumps
# (NTP, a suspended VM) moves the fire time no further than one slice.
SLICE_S = 60.0
PREPARE_S = 2.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class TimerTrigger(BaseTrigger):
    def __init__(
        self, run_id: str, step_key: str, planned: str, conn_id: str | None = None
    ) -> None:
        super().__init__()
        if conn_id is not None and "://" in conn_id:
            from ledgerflow.errors import LedgerError

            raise LedgerError("TimerTrigger takes the ledger's connection id, not a URL")
        self.run_id = run_id
        self.step_key = step_key
        self.planned = datetime.fromisoformat(planned)
        self.conn_id = conn_id
        # Replaced by tests to drive run() with a fake clock.
        self._now: Callable[[], datetime] = _utcnow
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "ledgerflow.triggers.timer.TimerTrigger",
            {
                "run_id": self.run_id,
                "step_key": self.step_key,
                "planned": self.planned.isoformat(),
                "conn_id": self.conn_id,
            },
        )

    def resolve_ledger_url(self) -> str:
        from ledgerflow.ledger._engine import embedded_url, resolve_url

        if self.conn_id is None:
            return embedded_url()
        return resolve_url(self.conn_id, required=True)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.triggers.base import TaskSuccessEvent

        from ledgerflow.ledger import timers
        from ledgerflow.ledger.store import Ledger

        # The ledger's connection is looked up shortly before the fire time (not when a
        # wait of days begins: a password may change meanwhile), so it costs no lag.
        await self._sleep_until(PREPARE_S)
        # In a thread: a connection lookup in the triggerer talks to its supervisor.
        url = await asyncio.to_thread(self.resolve_ledger_url)
        ledger = Ledger(url, conn_id=self.conn_id)
        await self._sleep_until(0.0)
        fired = self._now()
        output = await self._db(ledger, timers.fire, ledger, self.run_id, self.step_key, fired)
        log.info("timer %s/%s fired (lag %s ms)", self.run_id, self.step_key, output["lag_ms"])
        yield TaskSuccessEvent(xcoms={"return_value": output})

    async def _sleep_until(self, before: float) -> None:
        """Sleep until ``before`` seconds ahead of the planned time."""
        while (left := (self.planned - self._now()).total_seconds() - before) > 0:
            await self._sleep(min(left, SLICE_S))

    async def _db(self, ledger: Any, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` in a thread, riding out a ledger that is briefly unreachable (a
        Postgres restart): the timer fires late rather than failing its task."""
        from ledgerflow.ledger.outage import RECONNECT_FIRST_S, RECONNECT_MAX_S, lost_connection

        delay = RECONNECT_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except Exception as exc:
                if not lost_connection(exc):
                    raise
                log.warning(
                    "timer %s/%s: the ledger is unreachable (%s); retrying in %.1f s",
                    self.run_id,
                    self.step_key,
                    type(exc).__name__,
                    delay,
                )
                ledger.engine.dispose()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_S)
