"""The repairs ``ledgerflow doctor --fix`` makes: each a guarded status change that its
lifecycle machine allows (``WHERE status IN machine.sources(new)``), in one transaction
with a ``doctor_repaired`` event saying who, what and why. A repair whose record has moved
on meanwhile (a live writer got there first) changes nothing and returns False: running
it twice is harmless.

Never a success: a run ends the way Airflow says it ended (``failed`` when Airflow no
longer knows it), an attempt is ``lost``, a step ``failed``, a saga that cannot finish
``compensation_failed``. A claimed effect is never changed (see ``ledgerflow.doctor``).
"""

from __future__ import annotations

from sqlalchemy import Connection, select, update

from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import now
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import (
    ATTEMPT,
    SAGA,
    STEP,
    AttemptStatus,
    CompensationStatus,
    SagaStatus,
    StepStatus,
)

EVENT = "doctor_repaired"


def record(
    ledger: Ledger,
    conn: Connection,
    run_id: str,
    step_key: str | None,
    *,
    cause: str,
    what: str,
    why: str,
    by: str,
) -> None:
    """The repair's own event: the cause, what was changed, why, and who ran the doctor."""
    ledger._event(
        conn, run_id, step_key, EVENT, {"cause": cause, "what": what, "why": why, "by": by}
    )


def end_run(ledger: Ledger, run_id: str, status: str, *, why: str, by: str) -> bool:
    """The run ends as Airflow says (``finish_run``: the run machine, its own event)."""
    with ledger.begin() as conn:
        before = ledger._run_status(conn, run_id)
        ledger.finish_run(run_id, status, conn=conn)
        if ledger._run_status(conn, run_id) == before:
            return False
        record(
            ledger, conn, run_id, None, cause="run_ended", what=f"run -> {status}", why=why, by=by
        )
    return True


def lose_attempt(
    ledger: Ledger, run_id: str, step_key: str, attempt_id: int, *, why: str, by: str
) -> bool:
    """A running attempt whose task is gone is ``lost`` (what ``begin_attempt`` says of
    it when a later try starts)."""
    with ledger.begin() as conn:
        changed = conn.execute(
            update(t.attempts)
            .where(
                t.attempts.c.id == attempt_id,
                t.attempts.c.status.in_(ATTEMPT.sources(AttemptStatus.LOST)),
            )
            .values(status=AttemptStatus.LOST.value, error_type="Lost", error=why, ended_at=now())
        ).rowcount
        if not changed:
            return False
        record(
            ledger,
            conn,
            run_id,
            step_key,
            cause="attempt_lost",
            what=f"attempt {attempt_id} -> lost",
            why=why,
            by=by,
        )
    return True


def fail_step(ledger: Ledger, run_id: str, step_key: str, *, why: str, by: str) -> bool:
    """A step left ``running``/``retrying`` in a run that ended is ``failed``: nothing will
    attempt it again in this run (a cleared task or a retry run still may)."""
    new = StepStatus.FAILED.value
    with ledger.begin() as conn:
        changed = conn.execute(
            update(t.steps)
            .where(
                t.steps.c.run_id == run_id,
                t.steps.c.step_key == step_key,
                t.steps.c.status.in_([s for s in STEP.sources(new) if s != new]),
            )
            .values(status=new, error=why, completed_at=now())
        ).rowcount
        if not changed:
            return False
        ledger._event(conn, run_id, step_key, "step_failed", {"error_type": "Lost", "error": why})
        record(
            ledger,
            conn,
            run_id,
            step_key,
            cause="step_stranded",
            what="step -> failed",
            why=why,
            by=by,
        )
    return True


def end_saga(
    ledger: Ledger, run_id: str, *, unfinished: list[str], why: str, by: str
) -> str | None:
    """A saga that can never finish ends. Compensations left ``running`` are ``failed``;
    then, when nothing is ``unfinished`` (a completed step that no compensation record
    covers), the saga's own rule decides (``finish_saga``); else it is
    ``compensation_failed``: something may not have been undone, a person must look.
    Returns the outcome, None when the saga had ended meanwhile."""
    with ledger.begin() as conn:
        saga = conn.execute(select(t.runs.c.saga).where(t.runs.c.run_id == run_id)).scalar()
        if saga != SagaStatus.COMPENSATING.value:
            return None
        running = conn.execute(
            select(t.compensations.c.step_key, t.compensations.c.tool).where(
                t.compensations.c.run_id == run_id,
                t.compensations.c.status == CompensationStatus.RUNNING.value,
            )
        ).all()
        for step_key, tool in running:
            ledger.record_compensation(
                run_id,
                step_key,
                CompensationStatus.FAILED.value,
                tool=tool,
                detail=f"lost: {why}",
                conn=conn,
            )
        if unfinished:
            outcome = SagaStatus.COMPENSATION_FAILED.value
            SAGA.check(saga, outcome, run_id)
            changed = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.saga == saga)
                .values(saga=outcome, updated_at=now())
            ).rowcount
            if not changed:
                return None
            ledger._event(conn, run_id, None, f"saga_{outcome}", {"not_undone": unfinished})
        else:
            outcome = ledger.finish_saga(run_id, conn=conn) or ""
        what = f"saga -> {outcome}" + (
            f" ({len(running)} compensation(s) -> failed)" if running else ""
        )
        record(ledger, conn, run_id, None, cause="saga_stuck", what=what, why=why, by=by)
    return outcome


def abandon_approvals(ledger: Ledger, run_id: str, *, why: str, by: str) -> int:
    """Pending approvals of a run that ended can no longer resume it: ``abandoned``."""
    from ledgerflow.ledger.approval_outcomes import abandon_for_run

    with ledger.begin() as conn:
        n = abandon_for_run(ledger, run_id, f"{why} (ledgerflow doctor)", conn=conn)
        if n:
            record(
                ledger,
                conn,
                run_id,
                None,
                cause="approval_stranded",
                what=f"{n} approval(s) -> abandoned",
                why=why,
                by=by,
            )
    return n
