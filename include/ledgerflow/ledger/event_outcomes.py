"""What an ended event wait does to its step: complete it (the payload, or the
deadline's ``default``/branch) or fail it (``on_deadline: fail``), exactly once, whoever
records it first (the api-server that took the delivery, the trigger, or a worker)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.errors import LedgerError
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.event_waits import Wait, _wait
from ledgerflow.ledger.store import Ledger


def _locked(ledger: Ledger, conn: Connection, wait_id: int) -> tuple[Wait, Any]:
    """The ended wait (its row locked) and its step's checkpoint row."""
    lock = select(t.event_waits).where(t.event_waits.c.id == wait_id)
    if ledger.dialect == "postgresql":
        lock = lock.with_for_update()
    row = conn.execute(lock).mappings().first()
    if row is None:
        raise LedgerError(f"no event wait {wait_id}")
    wait = _wait(row)
    if wait.waiting:
        raise LedgerError(f"event wait {wait_id} has not ended")
    step = (
        conn.execute(
            select(t.steps).where(
                t.steps.c.run_id == wait.run_id, t.steps.c.step_key == wait.step_key
            )
        )
        .mappings()
        .first()
    )
    return wait, step


def _attempt(ledger: Ledger, conn: Connection, wait: Wait) -> int:
    """The step's running attempt, or a new one (a later try marked it lost)."""
    attempt_id = conn.execute(
        select(t.attempts.c.id)
        .where(
            t.attempts.c.run_id == wait.run_id,
            t.attempts.c.step_key == wait.step_key,
            t.attempts.c.status == "running",
        )
        .order_by(t.attempts.c.id.desc())
        .limit(1)
    ).scalar()
    if attempt_id is None:  # none running (marked lost by a later try): a new one
        attempt_id = ledger.begin_attempt(
            run_id=wait.run_id,
            step_key=wait.step_key,
            step_id=wait.step_key,
            map_index=-1,
            try_number=0,
            args={"event": wait.name, "key": wait.key},
            idempotency_key=f"event:{wait.id}",
            conn=conn,
        )
    return int(attempt_id)


def failure_reason(wait: Wait) -> str:
    return (
        f"event {wait.name!r} (key {wait.key!r}) did not arrive before the deadline "
        f"({wait.deadline.isoformat()}); on_deadline: fail"
    )


def complete(ledger: Ledger, wait_id: int, via: str) -> Any:
    """Complete the step of an ended wait once; return its output."""
    from ledgerflow.ledger.store import _checkpoint

    with ledger.begin() as conn:
        wait, step = _locked(ledger, conn, wait_id)
        if step is not None and step["status"] == "completed":
            return _checkpoint(step).output
        output = wait.output()
        ledger.complete_step(
            conn,
            run_id=wait.run_id,
            step_key=wait.step_key,
            attempt_id=_attempt(ledger, conn, wait),
            output=output,
            reused=False,
        )
        ledger._event(
            conn,
            wait.run_id,
            wait.step_key,
            "event_step_completed",
            {"wait_id": wait.id, "status": wait.status, "via": via},
        )
        return output


def fail(ledger: Ledger, wait_id: int, via: str) -> str:
    """Fail the step of a wait whose deadline fails it (once), and start the saga."""
    from ledgerflow.errors import NonRetryableError

    with ledger.begin() as conn:
        wait, step = _locked(ledger, conn, wait_id)
        reason = failure_reason(wait)
        if step is not None and step["status"] == "failed":
            return reason
        ledger.fail_attempt(
            run_id=wait.run_id,
            step_key=wait.step_key,
            attempt_id=_attempt(ledger, conn, wait),
            error=NonRetryableError(reason),
            final=True,
            conn=conn,
        )
        ledger._event(
            conn,
            wait.run_id,
            wait.step_key,
            "event_step_failed",
            {"wait_id": wait.id, "via": via},
        )
    # What the task's failure callback does, done here too: the saga must not wait for it.
    ledger.start_saga(wait.run_id, wait.step_key)
    return reason
