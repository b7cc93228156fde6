"""The approval trigger: waits in the triggerer for a decision or a deadline.

It holds no worker slot. It wakes on a Postgres ``NOTIFY`` that the decision sends when
it commits, with a slow poll as a safety net (SQLite, which has no NOTIFY, only polls).
Every approval trigger of one triggerer process shares ONE listening connection (see
``Listener``): a triggerer may hold a thousand parked approvals, and Postgres allows
about a hundred connections.

At the deadline the trigger applies the declared outcome: an escalation (new
approvers, new deadline; it then keeps waiting) or a decision by ``ledgerflow:deadline``.
Both are conditional updates, so a trigger that runs twice, or on two triggerers at
once, changes the approval at most once, and a person's decision that commits first wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from ledgerflow.ledger.outage import RECONNECT_FIRST_S, RECONNECT_MAX_S, lost_connection

log = logging.getLogger(__name__)

DEADLINE_DECISIONS = {"approve": "approved", "reject": "rejected", "fail": "expired"}
DEADLINE_USER = "ledgerflow:deadline"
# A person's decision is ended by the api-server that stored it (``end_task_now``); its
# NOTIFY wakes the trigger at the same moment. The trigger waits this long after the
# decision before ending the task itself (when the api-server could not: the task was
# not deferred yet, or the server died), so the outcome is recorded by the server.
API_FIRST_S = 5.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Listener:
    """One ``LISTEN ledgerflow_approvals`` connection shared by every approval trigger
    and every event-wait trigger (``triggers.event``) of an event loop. Waiters register
    an approval id (or ``"event:<wait id>"``) and get an ``asyncio.Event`` that is set
    when its NOTIFY arrives (and for everyone after a reconnect, since notifications
    sent while disconnected are lost)."""

    # Per event loop (weakly: a loop that is gone takes its listeners with it; keying by
    # id(loop) would hand a new loop, which may reuse the id, a dead loop's listener).
    _by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Listener]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.waiters: dict[int | str, set[asyncio.Event]] = {}
        self.task: asyncio.Task[None] | None = None
        self.connections = 0  # how many times it (re)connected; tests read it

    @classmethod
    def shared(cls, sqlalchemy_url: str) -> Listener:
        dsn = "postgresql://" + sqlalchemy_url.split("://", 1)[1]
        listeners = cls._by_loop.setdefault(asyncio.get_running_loop(), {})
        listener = listeners.get(dsn)
        if listener is None:
            listener = listeners[dsn] = cls(dsn)
        return listener

    def register(self, approval_id: int | str) -> asyncio.Event:
        event = asyncio.Event()
        self.waiters.setdefault(approval_id, set()).add(event)
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._listen())
        return event

    def unregister(self, approval_id: int | str, event: asyncio.Event) -> None:
        events = self.waiters.get(approval_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self.waiters[approval_id]
        if not self.waiters and self.task is not None:
            self.task.cancel()  # the last waiter left: close the connection
            self.task = None

    def _wake(self, approval_id: int | str) -> None:
        for event in self.waiters.get(approval_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self.waiters.values():
            for event in events:
                event.set()

    async def _listen(self) -> None:
        import psycopg

        from ledgerflow.ledger.approvals import CHANNEL

        delay = 1.0
        while self.waiters:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connections += 1
                    delay = 1.0
                    self._wake_all()  # re-check whatever was decided while not listening
                    async for note in conn.notifies():
                        try:
                            payload = note.payload
                            # An event wait's note is "event:<id>"; an approval's its id.
                            self._wake(payload if payload.startswith("event:") else int(payload))
                        except ValueError:
                            log.warning("ignoring notification %r", note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the poll keeps working meanwhile
                log.warning(
                    "approval listener lost its connection (%s); retry in %.0fs", exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)


class ApprovalTrigger(BaseTrigger):
    """Fires when approval ``approval_id`` is decided (by a person or by its deadline).

    It carries the id of the ledger's Airflow connection (``conn_id``; None for the
    embedded SQLite file), never its URL: Airflow stores a trigger's kwargs in its
    trigger table, and a URL holds the ledger's password. The triggerer resolves the
    connection itself (it has the same connections and environment as the workers).
    ``ledger_url`` is read only from triggers deferred by an earlier release.
    """

    def __init__(
        self,
        approval_id: int,
        conn_id: str | None = None,
        poll_interval: float = 30.0,
        ti_id: str | None = None,
        ledger_url: str | None = None,
    ) -> None:
        super().__init__()
        if conn_id is not None and "://" in conn_id:
            from ledgerflow.errors import LedgerError

            raise LedgerError(
                "ApprovalTrigger takes the ledger's connection id, not a URL "
                "(a URL with its password would be stored in Airflow's trigger table)"
            )
        self.approval_id = int(approval_id)
        self.conn_id = conn_id
        self.ledger_url = ledger_url
        self.poll_interval = float(poll_interval)
        # The task instance whose Required Actions entry mirrors this approval (None: not
        # listed in Airflow, or a trigger serialized by an older release).
        self.ti_id = ti_id
        self._refused: Any = None  # the Airflow response already refused (recorded once)
        self._reopen = False  # an Airflow response was one decision short of the quorum
        # Replaced by tests to drive run() with a fake clock.
        self._now: Callable[[], datetime] = _utcnow
        self._wait: Callable[[asyncio.Event, float], Awaitable[None]] = _wait_for

    def serialize(self) -> tuple[str, dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "approval_id": self.approval_id,
            "conn_id": self.conn_id,
            "poll_interval": self.poll_interval,
            "ti_id": self.ti_id,
        }
        if self.ledger_url is not None:  # an earlier release's trigger, as it was stored
            kwargs["ledger_url"] = self.ledger_url
        return ("ledgerflow.triggers.approval.ApprovalTrigger", kwargs)

    def resolve_ledger_url(self) -> str:
        """The ledger's URL, looked up here (in the triggerer), never carried."""
        from ledgerflow.ledger._engine import embedded_url, resolve_url

        if self.ledger_url is not None:
            return self.ledger_url
        if self.conn_id is None:
            return embedded_url()
        # The worker found this connection: if the triggerer cannot, that is an error,
        # not a reason to wait on another (empty) ledger.
        return resolve_url(self.conn_id, required=True)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from ledgerflow.ledger import approvals
        from ledgerflow.ledger.store import Ledger

        # In a thread: a connection lookup in the triggerer talks to its supervisor.
        url = await asyncio.to_thread(self.resolve_ledger_url)
        ledger = Ledger(url, conn_id=self.conn_id)
        listener = Listener.shared(url) if url.startswith("postgresql") else None
        wake = listener.register(self.approval_id) if listener else asyncio.Event()
        try:
            while True:
                wake.clear()  # before reading: a NOTIFY after the read sets it again
                approval = await self._db(ledger, approvals.get, ledger, self.approval_id)
                if approval.pending and self.ti_id is not None:
                    approval = await self._airflow_response(ledger, approval)
                    if self._reopen:
                        # One decision of a quorum, answered in Airflow while the task was
                        # not deferred: its entry now holds that answer and refuses the
                        # others; the task's resume re-parks it, which reopens the entry.
                        yield TriggerEvent(
                            {"approval_id": approval.id, "status": "pending", "reopen": True}
                        )
                        return
                if not approval.pending:
                    yield await self._event(ledger, approval)
                    return
                now = self._now()
                if now >= approval.deadline:
                    await self._db(ledger, self._at_deadline, ledger, approval, now)
                    continue
                remaining = (approval.deadline - now).total_seconds()
                # Jitter spreads the safety-net polls of many parked approvals.
                poll = self.poll_interval * random.uniform(0.8, 1.0)
                await self._wait(wake, min(remaining, poll))
        finally:
            if listener is not None:
                listener.unregister(self.approval_id, wake)

    async def _db(self, ledger: Any, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)`` in a thread, riding out a ledger that is unreachable for a
        while (a Postgres restart, a failover): the wait goes on, with a bounded backoff,
        instead of the trigger ending without an event and failing its task."""
        delay = RECONNECT_FIRST_S
        while True:
            try:
                return await asyncio.to_thread(call, *args)
            except Exception as exc:
                if not lost_connection(exc):
                    raise
                log.warning(
                    "approval %s: the ledger is unreachable (%s); retrying in %.1f s",
                    self.approval_id,
                    type(exc).__name__,
                    delay,
                )
                ledger.engine.dispose()  # pooled connections died with the server
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _airflow_response(self, ledger: Any, approval: Any) -> Any:
        """A response given in Airflow's Required Actions while the task was not deferred
        (else Airflow resumes the task with it): applied to the ledger like our page's."""
        from asgiref.sync import sync_to_async

        from ledgerflow.triggers import required_action as ra

        resp = await sync_to_async(ra.read_response)(self.ti_id)
        if resp is None or resp.responded_by_user is None:  # none, or our own close
            return approval
        chosen, by, _ = ra.response_fields(resp)
        if (chosen, by) == self._refused:
            return approval
        outcome, approval = await self._db(ledger, ra.apply, ledger, approval, resp)
        if outcome == "refused":
            self._refused = (chosen, by)
        self._reopen = outcome == "partial"
        return approval

    async def _event(self, ledger: Any, approval: Any) -> TriggerEvent:
        """The decision ends the task right here (its outcome recorded in the ledger; on
        success the branch's "followed" XCom set): no worker has to resume it. Only a
        request without follow lists (made by an older release) resumes on a worker."""
        from ledgerflow.triggers.approval_end import task_end_event

        if self.ti_id is not None:
            from asgiref.sync import sync_to_async

            from ledgerflow.triggers.required_action import close_from_trigger

            await sync_to_async(close_from_trigger)(self.ti_id, approval)
        if approval.ends_without_worker:
            if approval.decided_by not in (None, DEADLINE_USER) and approval.decided_at:
                # The api-server's turn first (API_FIRST_S): when it ends the task, this
                # trigger is cancelled while it waits; otherwise it ends the task now.
                end = approval.decided_at + timedelta(seconds=API_FIRST_S)
                left = (end - self._now()).total_seconds()
                if left > 0:
                    await self._wait(asyncio.Event(), min(left, API_FIRST_S))
            return await self._db(ledger, task_end_event, ledger, approval, "triggerer")  # type: ignore[no-any-return]
        return TriggerEvent(
            {
                "approval_id": approval.id,
                "status": approval.status,
                "decided_by": approval.decided_by,
            }
        )

    @staticmethod
    def _at_deadline(ledger: Any, approval: Any, now: datetime) -> None:
        from ledgerflow.ledger import approval_notices, approvals, escalation

        outcome = approval.at_deadline
        if isinstance(outcome, dict):
            escalated = escalation.escalate(ledger, approval, now)
            if escalated is not None:
                log.info(
                    "approval %s escalated to %s until %s",
                    approval.id,
                    escalated.approvers,
                    escalated.deadline,
                )
                approval_notices.notify(ledger, escalated)
            return
        # A person (or another copy of this trigger) may have decided first: that stands.
        with contextlib.suppress(approvals.ApprovalConflict):
            approvals.decide(
                ledger,
                approval.id,
                decision=DEADLINE_DECISIONS[outcome],
                by=DEADLINE_USER,
                comment=f"no decision before the deadline; declared outcome: {outcome}",
                settle=True,  # the declared outcome, however many approvals came before
            )


async def _wait_for(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout=max(seconds, 0.0))
