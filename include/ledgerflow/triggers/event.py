"""The event trigger: a parked ``kind: event`` step waits here for its delivery or its
deadline, holding no worker slot.

It wakes on the Postgres ``NOTIFY`` a delivery sends when it commits, through the ONE
listening connection every approval and event trigger of a triggerer shares
(``triggers.approval.Listener``), with a slow poll as a safety net (SQLite only polls).
At the deadline it marks the wait ``expired`` (a conditional update: a delivery that
commits first wins). It then ends the task itself, without a worker: the step's
checkpoint completed (the payload, or the deadline's default or branch) or failed (the
saga started), in the ledger first. A delivery through the REST API ends the task from
the api-server at once; the trigger gives it ``API_FIRST_S`` before doing it itself.

Everything is read from the ledger, so a trigger restarted on another triggerer (a
kill -9) finds the same wait and ends the task exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ledgerflow.ledger.outage import RECONNECT_FIRST_S, RECONNECT_MAX_S, lost_connection
from ledgerflow.triggers.approval import API_FIRST_S, Listener, _utcnow, _wait_for

log = logging.getLogger(__name__)


class EventTrigger(BaseTrigger):
    """Fires when event wait ``wait_id`` ends (a delivery, its deadline, a withdrawal).

    Like ``ApprovalTrigger`` it carries the ledger's connection id, never its URL."""

    def __init__(self, wait_id: int, conn_id: str | None = None, poll_interval: float = 30.0):
        super().__init__()
        if conn_id is not None and "://" in conn_id:
            from ledgerflow.errors import LedgerError

            raise LedgerError("EventTrigger takes the ledger's connection id, not a URL")
        self.wait_id = int(wait_id)
        self.conn_id = conn_id
        self.poll_interval = float(poll_interval)
        # Replaced by tests to drive run() with a fake clock.
        self._now: Callable[[], datetime] = _utcnow
        self._wait: Callable[[asyncio.Event, float], Awaitable[None]] = _wait_for

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "ledgerflow.triggers.event.EventTrigger",
            {"wait_id": self.wait_id, "conn_id": self.conn_id, "poll_interval": self.poll_interval},
        )

    def resolve_ledger_url(self) -> str:
        from ledgerflow.ledger._engine import embedded_url, resolve_url

        if self.conn_id is None:
            return embedded_url()
        return resolve_url(self.conn_id, required=True)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from ledgerflow.ledger import event_waits
        from ledgerflow.ledger.store import Ledger

        url = await asyncio.to_thread(self.resolve_ledger_url)
        ledger = Ledger(url, conn_id=self.conn_id)
        listener = Listener.shared(url) if url.startswith("postgresql") else None
        note = f"{event_waits.NOTE_PREFIX}{self.wait_id}"
        wake = listener.register(note) if listener else asyncio.Event()
        try:
            while True:
                wake.clear()  # before reading: a NOTIFY after the read sets it again
                wait = await self._db(ledger, event_waits.get, ledger, self.wait_id)
                if not wait.waiting:
                    yield await self._end(ledger, wait)
                    return
                now = self._now()
                if now >= wait.deadline:
                    await self._db(ledger, event_waits.expire, ledger, self.wait_id, now)
                    continue
                remaining = (wait.deadline - now).total_seconds()
                poll = self.poll_interval * random.uniform(0.8, 1.0)
                await self._wait(wake, min(remaining, poll))
        finally:
            if listener is not None:
                listener.unregister(note, wake)

    async def _end(self, ledger: Any, wait: Any) -> TriggerEvent:
        if wait.resolved_by in ("api", "webhook") and wait.resolved_at is not None:
            # The api-server that took the delivery ends the task itself (then this
            # trigger is cancelled while it waits here); if it could not, we do.
            left = (wait.resolved_at + timedelta(seconds=API_FIRST_S) - self._now()).total_seconds()
            if left > 0:
                await self._wait(asyncio.Event(), min(left, API_FIRST_S))
        return await self._db(ledger, task_end_event, ledger, wait, "triggerer")  # type: ignore[no-any-return]

    async def _db(self, ledger: Any, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` in a thread, riding out a ledger that is away for a while."""
        delay = RECONNECT_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except Exception as exc:
                if not lost_connection(exc):
                    raise
                log.warning(
                    "event wait %s: the ledger is unreachable (%s); retrying in %.1f s",
                    self.wait_id,
                    type(exc).__name__,
                    delay,
                )
                ledger.engine.dispose()
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_S)


def task_end_xcoms(wait: Any, output: Any) -> dict[str, Any]:
    """The step's output, and the scheduler's "followed" list when the step branches."""
    from airflow.sdk.bases.skipmixin import XCOM_SKIPMIXIN_FOLLOWED, XCOM_SKIPMIXIN_KEY

    xcoms: dict[str, Any] = {"return_value": output}
    follow = wait.follow or {}
    if follow.get("expired") is not None:
        xcoms[XCOM_SKIPMIXIN_KEY] = {XCOM_SKIPMIXIN_FOLLOWED: follow[wait.status]}
    return xcoms


def task_end_event(ledger: Any, wait: Any, via: str, *, xcoms: bool = True) -> Any:
    """The event that ends an ended wait's task without a worker, after recording the
    step's outcome in the ledger (once, whoever comes first)."""
    from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

    from ledgerflow.ledger import event_outcomes
    from ledgerflow.lifecycle import EventWaitStatus

    if wait.status == EventWaitStatus.WITHDRAWN.value:
        log.warning("event wait %s was withdrawn: the step ends failed", wait.id)
        return TaskFailedEvent()
    if wait.fails_step:
        log.warning("%s: the step fails", event_outcomes.fail(ledger, wait.id, via))
        return TaskFailedEvent()
    output = event_outcomes.complete(ledger, wait.id, via)
    return TaskSuccessEvent(xcoms=task_end_xcoms(wait, output) if xcoms else None)


def end_task_now(ledger: Any, wait: Any) -> bool:
    """From the api-server, right after a delivery: record the step's outcome and end the
    deferred Airflow task (its row locked, then ``handle_event_submit``), so the next
    task is scheduled without waiting for the triggerer. False when the task is not
    deferred (yet): the trigger (or the worker) ends it then."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalars(
            select(TaskInstance)
            .where(
                TaskInstance.dag_id == wait.dag_id,
                TaskInstance.run_id == wait.airflow_run_id,
                TaskInstance.task_id == wait.task_id,
                TaskInstance.map_index == -1,
            )
            .with_for_update()
        ).one_or_none()
        if ti is None or ti.state != TaskInstanceState.DEFERRED:
            return False
        # No XComs from here (the trigger may insert the same rows at this moment); the
        # branch not taken is skipped directly, as approvals do.
        event = task_end_event(ledger, wait, "api", xcoms=False)
        handle_event_submit(event, task_instance=ti, session=session)
        follow = wait.follow or {}
        if follow.get("expired") is not None and not wait.fails_step:
            from ledgerflow.triggers.approval_end import skip_tasks

            everyone = set(follow.get("received") or []) | set(follow["expired"])
            skip_tasks(session, ti, everyone - set(follow.get(wait.status) or []))
    return True
