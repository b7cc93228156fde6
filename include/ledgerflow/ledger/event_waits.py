"""Event waits and event deliveries in the ledger (``kind: event`` steps).

A *wait* is one row per (run, step), written when the step starts; a *delivery* is one
row per event id (unique), so a redelivery counts once. Matching is by event name and
correlation key:

* a delivery while waits are parked wakes every one of them (each gets the payload;
  the first is recorded as its consumer) after it fits each one's schema (else nothing
  is stored and the caller answers 422, naming the field);
* a delivery with no wait parked is kept until ``expires_at`` (``[ledgerflow]
  event_ttl``); the next wait for that name and key takes it, exactly once (a
  conditional update), after checking it against its own schema: one that does not fit
  is marked ``rejected`` and the wait goes on waiting. Without a wait the schema is not
  known yet, so a kept delivery is validated when a wait takes it.

Both sides take the same lock (a Postgres advisory lock on the name and key; SQLite's
write lock), so a delivery and a wait starting at the same moment always meet. Every
change of a wait sends ``NOTIFY ledgerflow_approvals, 'event:<id>'`` on Postgres, which
wakes its trigger through the listening connection that approvals use.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, select, text, update

from ledgerflow.errors import EventPayloadInvalid, LedgerError
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, dumps, loads, now
from ledgerflow.lifecycle import EventDeliveryStatus as V
from ledgerflow.lifecycle import EventWaitStatus as W

NOTE_PREFIX = "event:"


@dataclass(frozen=True)
class Wait:
    id: int
    run_id: str
    step_key: str
    dag_id: str
    task_id: str
    workflow: str
    name: str
    key: str
    schema: dict[str, Any] | None
    deadline: datetime
    on_deadline: Any  # "fail" | "continue" | {"branch": step}
    default: Any
    follow: dict[str, list[str] | None] | None
    status: str
    delivery_id: int | None
    payload: Any
    resolved_by: str | None
    resolved_at: datetime | None

    @property
    def waiting(self) -> bool:
        return self.status == W.WAITING.value

    @property
    def fails_step(self) -> bool:
        return self.status == W.EXPIRED.value and self.on_deadline == "fail"

    @property
    def takes_branch(self) -> bool:
        return self.status == W.EXPIRED.value and isinstance(self.on_deadline, dict)

    def output(self) -> Any:
        """The step's output: the payload; at the deadline, ``default`` (or None)."""
        return self.payload if self.status == W.RECEIVED.value else self.default

    @property
    def airflow_run_id(self) -> str:
        return self.run_id.split("/", 1)[1]


@dataclass
class Delivered:
    """What a delivery did: ``delivered`` (woke ``woke``), ``kept`` or ``duplicate``."""

    status: str
    delivery_id: int
    woke: list[Wait] = field(default_factory=list)


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _wait(row: Any) -> Wait:
    return Wait(
        id=int(row["id"]),
        run_id=row["run_id"],
        step_key=row["step_key"],
        dag_id=row["dag_id"],
        task_id=row["task_id"],
        workflow=row["workflow"],
        name=row["name"],
        key=row["key"],
        schema=loads(row["payload_schema"]),
        deadline=_aware(row["deadline"]),  # type: ignore[arg-type]
        on_deadline=loads(row["on_deadline"]),
        default=loads(row["default_payload"]),
        follow=loads(row["follow"]),
        status=row["status"],
        delivery_id=row["delivery_id"],
        payload=loads(row["payload"]),
        resolved_by=row["resolved_by"],
        resolved_at=_aware(row["resolved_at"]),
    )


def _lock(ledger: Ledger, conn: Connection, name: str, key: str) -> None:
    """Serialise deliveries and new waits of one (name, key) (SQLite: its write lock)."""
    if ledger.dialect == "postgresql":
        digest = hashlib.sha256(f"{name}\0{key}".encode()).digest()
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:k)"),
            {"k": int.from_bytes(digest[:8], "big", signed=True)},
        )


def _notify(ledger: Ledger, conn: Connection, wait_id: int) -> None:
    if ledger.dialect == "postgresql":
        from ledgerflow.ledger.approvals import CHANNEL

        conn.execute(
            text("SELECT pg_notify(:channel, :id)"),
            {"channel": CHANNEL, "id": f"{NOTE_PREFIX}{wait_id}"},
        )


def get(ledger: Ledger, wait_id: int, conn: Connection | None = None) -> Wait:
    with ledger._read(conn) as conn:
        row = conn.execute(select(t.event_waits).where(t.event_waits.c.id == wait_id))
        found = row.mappings().first()
    if found is None:
        raise LedgerError(f"no event wait {wait_id}")
    return _wait(found)


def for_step(ledger: Ledger, run_id: str, step_key: str) -> Wait | None:
    with ledger._read(None) as conn:
        row = conn.execute(
            select(t.event_waits).where(
                t.event_waits.c.run_id == run_id, t.event_waits.c.step_key == step_key
            )
        )
        found = row.mappings().first()
    return None if found is None else _wait(found)


def waiting(ledger: Ledger) -> list[Wait]:
    """Every wait still waiting (``ledgerflow run`` delivers to them)."""
    with ledger._read(None) as conn:
        rows = conn.execute(
            select(t.event_waits)
            .where(t.event_waits.c.status == W.WAITING.value)
            .order_by(t.event_waits.c.id)
        )
        return [_wait(r) for r in rows.mappings()]


def open_wait(
    ledger: Ledger,
    *,
    run_id: str,
    step_key: str,
    dag_id: str,
    task_id: str,
    workflow: str,
    name: str,
    key: str,
    schema: dict[str, Any] | None,
    deadline: datetime,
    on_deadline: Any,
    default: Any = None,
    follow: dict[str, list[str] | None] | None = None,
) -> Wait:
    """The wait of a run's event step, created once (a retried or cleared task finds the
    same one); a kept delivery of its name and key is taken at once if one fits."""
    stamp = now()
    with ledger.begin() as conn:
        _lock(ledger, conn, name, key)
        created = conn.execute(
            ledger._insert(t.event_waits)
            .values(
                run_id=run_id,
                step_key=step_key,
                dag_id=dag_id,
                task_id=task_id,
                workflow=workflow,
                name=name,
                key=key,
                payload_schema=None if schema is None else dumps(schema),
                deadline=deadline,
                on_deadline=dumps(on_deadline),
                default_payload=None if default is None else dumps(default),
                follow=None if follow is None else dumps(follow),
                status=W.WAITING.value,
                created_at=stamp,
            )
            .on_conflict_do_nothing()
        ).rowcount
        found = conn.execute(
            select(t.event_waits).where(
                t.event_waits.c.run_id == run_id, t.event_waits.c.step_key == step_key
            )
        )
        wait = _wait(found.mappings().one())
        if created:
            ledger._event(
                conn,
                run_id,
                step_key,
                "event_wait_started",
                {"wait_id": wait.id, "event": name, "key": key, "deadline": deadline.isoformat()},
            )
        if wait.waiting:
            wait = _take_kept(ledger, conn, wait, stamp)
    return wait


def _take_kept(ledger: Ledger, conn: Connection, wait: Wait, stamp: datetime) -> Wait:
    from ledgerflow.spec.events import payload_error

    d = t.event_deliveries
    rows = conn.execute(
        select(d)
        .where(d.c.name == wait.name, d.c.key == wait.key, d.c.status == V.KEPT.value)
        .order_by(d.c.id)
    ).mappings()
    for row in list(rows):
        expires = _aware(row["expires_at"])
        assert expires is not None
        payload = loads(row["payload"])
        if row["allowed_dags"] is not None and wait.dag_id not in loads(row["allowed_dags"]):
            # Its sender may not wake this DAG's runs: it stays kept for a wait it may wake.
            ledger._event(
                conn,
                wait.run_id,
                wait.step_key,
                "event_delivery_not_taken",
                {
                    "event_id": row["event_id"],
                    "sender": row["received_by"],
                    "why": f"its sender may not trigger {wait.dag_id}",
                },
            )
            continue
        problem = None if expires > stamp else "expired"
        if problem is None:
            problem = payload_error(wait.schema, payload)
        if problem is not None:
            status = V.EXPIRED if problem == "expired" else V.REJECTED
            conn.execute(
                update(d)
                .where(d.c.id == row["id"], d.c.status == V.KEPT.value)
                .values(status=status.value, detail=problem)
            )
            if status is V.REJECTED:
                ledger._event(
                    conn,
                    wait.run_id,
                    wait.step_key,
                    "event_delivery_rejected",
                    {"event_id": row["event_id"], "error": problem},
                )
            continue
        taken = conn.execute(
            update(d)
            .where(d.c.id == row["id"], d.c.status == V.KEPT.value)
            .values(
                status=V.CONSUMED.value,
                consumed_by_run=wait.run_id,
                consumed_by_step=wait.step_key,
                consumed_at=stamp,
            )
        ).rowcount
        if taken and _receive(ledger, conn, wait, row, payload, "kept", stamp):
            return get(ledger, wait.id, conn)
    return wait


def _receive(
    ledger: Ledger,
    conn: Connection,
    wait: Wait,
    delivery: Any,
    payload: Any,
    via: str,
    stamp: datetime,
) -> bool:
    """``wait`` receives ``payload`` (once: only while it is waiting)."""
    w = t.event_waits
    won = conn.execute(
        update(w)
        .where(w.c.id == wait.id, w.c.status == W.WAITING.value)
        .values(
            status=W.RECEIVED.value,
            delivery_id=delivery["id"],
            payload=dumps(payload),
            resolved_by=via,
            resolved_at=stamp,
        )
    ).rowcount
    if won:
        ledger._event(
            conn,
            wait.run_id,
            wait.step_key,
            "event_received",
            {"wait_id": wait.id, "event_id": delivery["event_id"], "via": via},
        )
        _notify(ledger, conn, wait.id)
    return bool(won)


def deliver(
    ledger: Ledger,
    *,
    name: str,
    key: str,
    event_id: str,
    payload: Any,
    source: str = "api",
    by: str | None = None,
    ttl: timedelta | None = None,
    authorize: Callable[[Wait], None] | None = None,
    reach: Callable[[], list[str]] | None = None,
) -> Delivered:
    """Store one delivery once per ``event_id``: wake the waits parked for it, or keep it.

    Raises ``EventPayloadInvalid`` (nothing stored) when the payload does not fit the
    schema of a wait parked for it, and whatever ``authorize(wait)`` raises for a wait
    the caller may not wake (nothing stored either). ``reach()``: the DAGs whose runs
    the sender may wake, asked only when the delivery is kept (no wait yet) and stored
    with it: a later wait of another DAG does not take it (None: any DAG)."""
    from ledgerflow.spec.events import payload_problem

    if ttl is None:
        from ledgerflow import settings

        ttl = settings.get("event_ttl")
    assert ttl is not None
    d, w = t.event_deliveries, t.event_waits
    stamp = now()
    with ledger.begin() as conn:
        _lock(ledger, conn, name, key)
        seen = conn.execute(select(d.c.id).where(d.c.event_id == event_id)).scalar()
        if seen is not None:
            return Delivered("duplicate", int(seen))
        parked = [
            _wait(r)
            for r in conn.execute(
                select(w)
                .where(w.c.name == name, w.c.key == key, w.c.status == W.WAITING.value)
                .order_by(w.c.id)
            ).mappings()
        ]
        for wait in parked:
            if authorize is not None:
                authorize(wait)
            problem = payload_problem(wait.schema, payload)
            if problem is not None:
                error = EventPayloadInvalid(
                    f"event {name!r} (key {key!r}) does not fit the schema of step "
                    f"{wait.step_key!r} of {wait.run_id}: {problem[0]}: {problem[1]}"
                )
                error.field = problem[0]
                raise error
        first = parked[0] if parked else None
        allowed = None if first is not None or reach is None else sorted(reach())
        inserted = conn.execute(
            ledger._insert(d)
            .values(
                name=name,
                key=key,
                event_id=event_id,
                payload=dumps(payload),
                source=source,
                received_by=by,
                received_at=stamp,
                expires_at=stamp + ttl,
                status=(V.CONSUMED if first else V.KEPT).value,
                consumed_by_run=first.run_id if first else None,
                consumed_by_step=first.step_key if first else None,
                consumed_at=stamp if first else None,
                allowed_dags=None if allowed is None else dumps(allowed),
            )
            .on_conflict_do_nothing()
        ).rowcount
        row = conn.execute(select(d).where(d.c.event_id == event_id)).mappings().one()
        if not inserted:  # the same id under another name and key, at the same moment
            return Delivered("duplicate", int(row["id"]))
        woke = [
            wait for wait in parked if _receive(ledger, conn, wait, row, payload, source, stamp)
        ]
        woke = [get(ledger, wait.id, conn) for wait in woke]
    return Delivered("delivered" if woke else "kept", int(row["id"]), woke)


def expire(ledger: Ledger, wait_id: int, at: datetime) -> bool:
    """The deadline passed: ``waiting -> expired`` (once; a delivery that came first wins)."""
    w = t.event_waits
    with ledger.begin() as conn:
        won = conn.execute(
            update(w)
            .where(w.c.id == wait_id, w.c.status == W.WAITING.value, w.c.deadline <= at)
            .values(status=W.EXPIRED.value, resolved_by="deadline", resolved_at=at)
        ).rowcount
        if won:
            wait = get(ledger, wait_id, conn)
            ledger._event(
                conn,
                wait.run_id,
                wait.step_key,
                "event_deadline",
                {"wait_id": wait_id, "on_deadline": wait.on_deadline},
            )
            _notify(ledger, conn, wait_id)
    return bool(won)


def withdraw(ledger: Ledger, run_id: str, reason: str = "", conn: Connection | None = None) -> int:
    """Withdraw the run's parked event waits (a cancelled run): no delivery or deadline
    changes them any more, and their triggers wake and end. Returns how many."""
    return len(withdraw_waits(ledger, run_id, reason=reason, conn=conn))


def withdraw_waits(
    ledger: Ledger,
    run_id: str,
    *,
    by: str | None = None,
    reason: str = "",
    conn: Connection | None = None,
) -> list[dict[str, Any]]:
    """:func:`withdraw`, returning one ``{"kind": "event", "id", "step"}`` per wait
    withdrawn (what a cancel's registry of wait kinds expects)."""
    w = t.event_waits
    stamp = now()
    withdrawn: list[dict[str, Any]] = []
    with ledger.begin(conn) as conn:
        rows = conn.execute(
            select(w.c.id, w.c.step_key).where(w.c.run_id == run_id, w.c.status == W.WAITING.value)
        ).all()
        for wait_id, step_key in rows:
            won = conn.execute(
                update(w)
                .where(w.c.id == wait_id, w.c.status == W.WAITING.value)
                .values(status=W.WITHDRAWN.value, resolved_by="withdrawn", resolved_at=stamp)
            ).rowcount
            if won:
                withdrawn.append({"kind": "event", "id": wait_id, "step": step_key})
                ledger._event(
                    conn,
                    run_id,
                    None,
                    "event_wait_withdrawn",
                    {"wait_id": wait_id, "reason": reason, "by": by},
                )
                _notify(ledger, conn, wait_id)
    return withdrawn
