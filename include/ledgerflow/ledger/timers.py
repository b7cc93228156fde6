"""Durable timers (wait steps) in the ledger: parked once, fired once.

A wait step's planned fire time is written when it first parks (a ``timer_parked`` event
of the step), so a task that runs again (cleared while parked, a worker lost before it
deferred) waits for the same moment, not a new one. Firing completes the step's
checkpoint with ``{"planned", "fired", "lag_ms"}`` and a ``timer_fired`` event in one
transaction; whoever fires second (a trigger run again after a triggerer restart, the
worker resuming after the trigger) finds the step completed and returns the same output.
No new table: the step's row, its attempt and its events hold everything.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.errors import RunCancelled
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import loads, now
from ledgerflow.ledger.store import Ledger

PARKED = "timer_parked"
FIRED = "timer_fired"
WITHDRAWN = "timer_withdrawn"  # the run was cancelled while the timer was parked


def idempotency_key(run_id: str, step_key: str) -> str:
    return f"timer:{run_id}/{step_key}"


def planned_at(conn: Connection, run_id: str, step_key: str) -> datetime | None:
    """The fire time recorded when the step first parked in this run (None: never)."""
    data = conn.execute(
        select(t.events.c.data)
        .where(
            t.events.c.run_id == run_id,
            t.events.c.step_key == step_key,
            t.events.c.kind == PARKED,
        )
        .order_by(t.events.c.id.desc())
        .limit(1)
    ).scalar()
    if data is None:
        return None
    return datetime.fromisoformat(loads(data)["planned"])


def park(
    ledger: Ledger,
    conn: Connection,
    *,
    run_id: str,
    step_key: str,
    step_id: str,
    planned: datetime,
    args: Any,
    try_number: int,
    first: bool,
) -> datetime:
    """In the prologue's transaction: the step's fire time (recorded now unless an
    earlier try of this run recorded one, which stands) and its running attempt."""
    recorded = planned_at(conn, run_id, step_key)
    if recorded is None:
        recorded = planned
        ledger._event(conn, run_id, step_key, PARKED, {"planned": planned.isoformat(), **args})
    ledger.begin_attempt(
        run_id=run_id,
        step_key=step_key,
        step_id=step_id,
        map_index=-1,
        try_number=try_number,
        args=args,
        idempotency_key=idempotency_key(run_id, step_key),
        first=first,
        conn=conn,
    )
    return recorded


def fire(ledger: Ledger, run_id: str, step_key: str, at: datetime | None = None) -> dict[str, Any]:
    """Complete the parked step once (its output: planned, fired ``at``, lag_ms); a step
    already completed returns its recorded output. Called by the trigger at the fire time
    (``at``: when it woke) and by the worker that resumes after it."""
    with ledger.begin() as conn:
        lock = select(t.steps).where(t.steps.c.run_id == run_id, t.steps.c.step_key == step_key)
        if ledger.dialect == "postgresql":
            lock = lock.with_for_update()
        row = conn.execute(lock).mappings().first()
        if row is not None and row["status"] == "completed":
            return dict(loads(row["output"]) or {})
        planned = planned_at(conn, run_id, step_key)
        if planned is None:
            raise RuntimeError(f"timer {run_id}/{step_key} was never parked")
        withdrawn = conn.execute(
            select(t.events.c.data).where(
                t.events.c.run_id == run_id,
                t.events.c.step_key == step_key,
                t.events.c.kind == WITHDRAWN,
            )
        ).first()
        if withdrawn is not None:
            raise RunCancelled(f"timer {run_id}/{step_key} was withdrawn: its run was cancelled")
        fired = at or now()
        output = {
            "planned": planned.isoformat(),
            "fired": fired.isoformat(),
            "lag_ms": round((fired - planned).total_seconds() * 1000),
        }
        attempt_id = conn.execute(
            select(t.attempts.c.id)
            .where(
                t.attempts.c.run_id == run_id,
                t.attempts.c.step_key == step_key,
                t.attempts.c.status == "running",
            )
            .order_by(t.attempts.c.id.desc())
            .limit(1)
        ).scalar()
        if attempt_id is None:  # marked lost by a later try: the firing is an attempt of its own
            attempt_id = ledger.begin_attempt(
                run_id=run_id,
                step_key=step_key,
                step_id=row["step_id"] if row is not None else step_key,
                map_index=-1,
                try_number=0,
                args=loads(row["args"]) if row is not None else None,
                idempotency_key=idempotency_key(run_id, step_key),
                conn=conn,
            )
        ledger.complete_step(
            conn,
            run_id=run_id,
            step_key=step_key,
            attempt_id=int(attempt_id),
            output=output,
            reused=False,
        )
        ledger._event(conn, run_id, step_key, FIRED, output)
        return output


def withdraw(
    ledger: Ledger, conn: Connection, run_id: str, *, by: str, reason: str
) -> list[dict[str, Any]]:
    """A cancel's part for timers (registered in ``ledgerflow.cancel``): each timer of the
    run that parked and has not fired gets a ``timer_withdrawn`` event. Nothing else is
    needed: its task instance becomes ``failed`` and Airflow removes its trigger; a
    trigger that fires at that very moment finds the step ended by the cancel and no
    later step runs (a cancelled run's forward steps neither start nor commit)."""
    rows = conn.execute(
        select(t.events.c.step_key, t.events.c.kind).where(
            t.events.c.run_id == run_id,
            t.events.c.kind.in_((PARKED, FIRED, WITHDRAWN)),
        )
    ).all()
    parked = {step for step, kind in rows if kind == PARKED}
    ended = {step for step, kind in rows if kind != PARKED}
    withdrawn = []
    for step in sorted(parked - ended):
        ledger._event(conn, run_id, step, WITHDRAWN, {"by": by, "reason": reason})
        withdrawn.append({"kind": "wait", "id": step, "step": step})
    return withdrawn
