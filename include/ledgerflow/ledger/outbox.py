"""Notifications in the ledger: the outbox (``lf_notifications``) and each run's targets.

Five events are told to people: an approval requested, escalated or decided, a dead
letter, a saga whose compensation failed. ``Ledger._event`` calls :func:`enqueue` for
them, in the transaction that records the event: one ``pending`` row per target that
wants it (the run's targets, ``lf_notify_routes``, written when the run registers), with
the message as it will be sent (subject, text, link). A crash cannot lose a notice that
its event recorded, and cannot record one twice.

Sending happens after the commit (``Ledger.begin`` calls :func:`after_commit`): a
background thread claims each row (``pending``/``failed`` -> ``sending``, a guarded
update, so one sender wins) and calls the Airflow notifier (``ledger.notifiers``). The
task that recorded the event waits for it at most ``SEND_WAIT_S``: a notifier that is
down or slow never fails the step and delays it by that bound at most. A failed send is
``failed`` with its error and a ``next_at`` (backoff); :func:`send_due` (the maintenance
DAG, ``ledgerflow notifications --retry``) sends what is due again, and takes over a
claim older than ``STALE_CLAIM`` (a sender killed while sending).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, or_, select, update

from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import dumps, loads, now
from ledgerflow.lifecycle import NOTIFICATION, NotificationStatus

log = logging.getLogger("ledgerflow.notifications")

# The ledger's event kinds that notify, and the name of each in ``notify: on:``.
EVENTS = {
    "approval_requested": "approval_requested",
    "approval_escalated": "approval_escalated",
    "approval_decided": "approval_decided",
    "dead_lettered": "dead_letter",
    "saga_compensation_failed": "compensation_failed",
}
APPROVAL_EVENTS = ("approval_requested", "approval_escalated", "approval_decided")

SEND_WAIT_S = 3.0  # how long the recording thread waits for the first send, at most
MAX_ATTEMPTS = 8
BACKOFF_FIRST = timedelta(seconds=30)
BACKOFF_MAX = timedelta(hours=1)
STALE_CLAIM = timedelta(minutes=5)

N = NotificationStatus
_local = threading.local()


# ---------------------------------------------------------------- routes


def save_routes(ledger: Any, run_id: str, routes: dict[str, Any], conn: Connection) -> None:
    """The run's targets (``{"workflow": [...], "steps": {step: [...]}}``), once."""
    conn.execute(
        ledger._insert(t.notify_routes)
        .values(run_id=run_id, routes=dumps(routes), created_at=now())
        .on_conflict_do_nothing()
    )


def _targets(conn: Connection, run_id: str, step_key: str | None, event: str) -> list[dict]:
    raw = conn.execute(
        select(t.notify_routes.c.routes).where(t.notify_routes.c.run_id == run_id)
    ).scalar()
    if raw is None:
        return []
    routes = loads(raw) or {}
    targets = routes.get("workflow") or []
    steps = routes.get("steps") or {}
    if event in APPROVAL_EVENTS and step_key in steps:
        # An approval step's own notify replaces the workflow's for its approval events.
        targets = steps[step_key]
        return [x for x in targets if event in (x.get("on") or APPROVAL_EVENTS)]
    return [x for x in targets if event in (x.get("on") or ())]


# ---------------------------------------------------------------- recording


def enqueue(
    ledger: Any, conn: Connection, run_id: str, step_key: str | None, kind: str, data: Any
) -> list[str]:
    """The outbox rows of one recorded event (in its transaction); their ids."""
    event = EVENTS[kind]
    targets = _targets(conn, run_id, step_key, event)
    if not targets:
        return []
    from ledgerflow.ledger.notifiers import message

    subject, text, link = message(conn, event, run_id, step_key, data or {})
    stamp = now()
    ids = []
    for target in targets:
        nid = uuid.uuid4().hex
        conn.execute(
            t.notifications.insert().values(
                id=nid,
                run_id=run_id,
                step_key=step_key,
                event=event,
                target=f"{target['kind']}:{target['conn_id']}",
                spec=dumps(target),
                subject=subject,
                body=text,
                link=link,
                status=N.PENDING.value,
                attempts=0,
                next_at=stamp,
                created_at=stamp,
                updated_at=stamp,
            )
        )
        ids.append(nid)
    pending = getattr(_local, "ids", None)
    if pending is None:
        pending = _local.ids = []
    pending.extend((conn, nid) for nid in ids)
    return ids


def after_commit(ledger: Any, conn: Connection, committed: bool) -> None:
    """Called by ``Ledger.begin`` when its own transaction on ``conn`` ends: send what it
    recorded (``committed``), or forget it (rolled back). Rows of another transaction
    still open on this thread wait for that one's end."""
    pending = getattr(_local, "ids", None)
    if not pending:
        return
    mine = [nid for c, nid in pending if c is conn]
    if not mine:
        return
    _local.ids = [(c, nid) for c, nid in pending if c is not conn]
    if committed:
        send_soon(ledger, mine)


def send_soon(ledger: Any, ids: list[str], wait: float | None = None) -> None:
    """Send these rows in a background thread; wait for it ``wait`` seconds at most.

    By default (``wait=None``) a process's main thread (a task, the CLI, ``dag.test()``)
    waits ``SEND_WAIT_S`` at most, so that the send is done before a short-lived
    process exits; any other thread (the api-server's routes, the triggerer's database
    calls) returns at once: its process outlives the send, and a decision's next task
    is not held up by a slow notifier. What the thread does not finish stays in the
    outbox for :func:`send_due`."""
    sender = threading.Thread(
        target=_send_quietly, args=(ledger, list(ids)), name="ledgerflow-notify", daemon=True
    )
    sender.start()
    if wait is None:
        wait = SEND_WAIT_S if threading.current_thread() is threading.main_thread() else 0.0
    if wait > 0:
        sender.join(wait)


def send_pending(ledger: Any, run_id: str, step_key: str | None) -> None:
    """Send the step's notices still ``pending`` (as :func:`send_soon`)."""
    c = t.notifications.c
    with ledger.engine.connect() as conn:
        ids = list(
            conn.execute(
                select(c.id).where(
                    c.run_id == run_id, c.step_key == step_key, c.status == N.PENDING.value
                )
            ).scalars()
        )
    if ids:
        send_soon(ledger, ids)


def _send_quietly(ledger: Any, ids: list[str]) -> None:
    try:
        send(ledger, ids)
    except Exception:  # the outbox keeps them: never an error in the recording task
        log.warning("notifications %s not sent now; the outbox keeps them", ids, exc_info=True)


# ---------------------------------------------------------------- sending


def send(ledger: Any, ids: Iterable[str]) -> dict[str, str]:
    """Claim and send each row that is due (``pending``, ``failed`` past ``next_at``, or
    a stale claim); returns {id: status} of those this call sent or failed."""
    done: dict[str, str] = {}
    for nid in ids:
        row = _claim(ledger, nid)
        if row is None:
            continue  # sent, or another sender has it
        done[nid] = _deliver(ledger, row)
    return done


def send_due(ledger: Any, limit: int = 200) -> dict[str, str]:
    """Every row that is due now (the maintenance pass); returns {id: status}."""
    stamp = now()
    c = t.notifications.c
    with ledger.engine.connect() as conn:
        ids = list(
            conn.execute(select(c.id).where(_due(stamp)).order_by(c.next_at).limit(limit)).scalars()
        )
    return send(ledger, ids)


def _due(stamp: datetime) -> Any:
    c = t.notifications.c
    return or_(
        c.status == N.PENDING.value,
        (c.status == N.FAILED.value) & (c.next_at <= stamp),
        (c.status == N.SENDING.value) & (c.updated_at <= stamp - STALE_CLAIM),
    )


def _claim(ledger: Any, nid: str) -> dict[str, Any] | None:
    stamp = now()
    c = t.notifications.c
    with ledger.engine.begin() as conn:
        won = conn.execute(
            update(t.notifications)
            .where(
                c.id == nid,
                c.status.in_(NOTIFICATION.sources(N.SENDING)),
                _due(stamp),
            )
            .values(status=N.SENDING.value, attempts=c.attempts + 1, updated_at=stamp)
        ).rowcount
        if not won:
            return None
        row = conn.execute(select(t.notifications).where(c.id == nid)).mappings().one()
    return dict(row)


def _deliver(ledger: Any, row: dict[str, Any]) -> str:
    from ledgerflow.ledger.notifiers import deliver

    try:
        deliver(loads(row["spec"]), row["subject"], row["body"], row["link"])
    except Exception as exc:  # any notifier error: recorded, retried
        error = f"{type(exc).__name__}: {exc}"[:2000]
        attempts = int(row["attempts"])
        status = N.GAVE_UP if attempts >= MAX_ATTEMPTS else N.FAILED
        delay = min(BACKOFF_FIRST * (2 ** (attempts - 1)), BACKOFF_MAX)
        _finish(ledger, row, N.FAILED, last_error=error, next_at=now() + delay)
        if status is N.GAVE_UP:
            _finish(ledger, row, N.GAVE_UP, source=N.FAILED)
        log.warning(
            "notification %s (%s to %s) failed, attempt %s: %s",
            row["id"],
            row["event"],
            row["target"],
            attempts,
            error,
        )
        return status.value
    _finish(ledger, row, N.SENT, sent_at=now(), last_error=None)
    log.info("notification %s (%s) sent to %s", row["id"], row["event"], row["target"])
    return N.SENT.value


def _finish(
    ledger: Any,
    row: dict[str, Any],
    status: NotificationStatus,
    source: Any = N.SENDING,
    **values: Any,
) -> None:
    NOTIFICATION.check(source.value, status.value, row["id"])
    c = t.notifications.c
    with ledger.engine.begin() as conn:
        conn.execute(
            update(t.notifications)
            .where(c.id == row["id"], c.status == source.value)
            .values(status=status.value, updated_at=now(), **values)
        )


# ---------------------------------------------------------------- reading


def listing(ledger: Any, run_id: str | None = None, status: str | None = None) -> list[dict]:
    c = t.notifications.c
    query = select(t.notifications).order_by(c.created_at, c.id)
    if run_id is not None:
        query = query.where(c.run_id == run_id)
    if status is not None:
        query = query.where(c.status == status)
    with ledger.engine.connect() as conn:
        return [_aware(dict(r)) for r in conn.execute(query).mappings()]


def _aware(row: dict[str, Any]) -> dict[str, Any]:
    for k in ("next_at", "created_at", "updated_at", "sent_at"):
        if row.get(k) is not None and row[k].tzinfo is None:  # SQLite: naive UTC
            row[k] = row[k].replace(tzinfo=timezone.utc)
    return row


__all__ = ["EVENTS", "enqueue", "listing", "save_routes", "send", "send_due", "send_soon"]
