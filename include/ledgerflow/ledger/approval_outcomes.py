"""What a decided approval does to its step: complete it, fail it, or, when the run
ended while the approval waited, mark the approval abandoned."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from ledgerflow.errors import ApprovalConflict, ApprovalNotFound
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.approvals import Approval, _row
from ledgerflow.ledger.quorum import decisions
from ledgerflow.ledger.store import Ledger


def _locked_outcome(
    ledger: Ledger, conn: Connection, approval_id: int
) -> tuple[Approval, Any, int | None]:
    """In ``conn``: the decided approval (its row locked, so two processes never record
    its outcome twice), its step's checkpoint row, and the step's running attempt."""
    lock = select(t.approvals).where(t.approvals.c.id == approval_id)
    if ledger.dialect == "postgresql":
        lock = lock.with_for_update()
    row = conn.execute(lock).mappings().first()
    if row is None:
        raise ApprovalNotFound(f"no approval {approval_id}")
    approval = _row(row)
    if approval.pending:
        raise ApprovalConflict(f"approval {approval_id} is not decided yet")
    step = (
        conn.execute(
            select(t.steps).where(
                t.steps.c.run_id == approval.run_id, t.steps.c.step_key == approval.step_key
            )
        )
        .mappings()
        .first()
    )
    attempt_id = conn.execute(
        select(t.attempts.c.id)
        .where(
            t.attempts.c.run_id == approval.run_id,
            t.attempts.c.step_key == approval.step_key,
            t.attempts.c.status == "running",
        )
        .order_by(t.attempts.c.id.desc())
        .limit(1)
    ).scalar()
    return approval, step, attempt_id


def _attempt(ledger: Ledger, conn: Connection, approval: Approval, attempt_id: int | None) -> int:
    """The running attempt, or a new one when none is (e.g. marked lost by a retry)."""
    if attempt_id is not None:
        return int(attempt_id)
    return ledger.begin_attempt(
        run_id=approval.run_id,
        step_key=approval.step_key,
        step_id=approval.step_key,
        map_index=-1,
        try_number=0,
        # The step's inputs: what the approver was shown (as ``ApprovalKind`` renders it).
        args={"subject": approval.subject, "body": approval.body, "payload": approval.payload},
        idempotency_key=f"approval:{approval.id}",
        conn=conn,
    )


def complete(ledger: Ledger, approval_id: int, via: str) -> dict[str, Any]:
    """Complete a decided approval's step checkpoint once; return the step's output.

    Whoever gets here first (the api-server that took the decision, the trigger, or the
    worker) records it; the others find it completed and return the same output.
    """
    from ledgerflow.ledger.store import _checkpoint

    with ledger.begin() as conn:
        approval, step, attempt_id = _locked_outcome(ledger, conn, approval_id)
        if step is not None and step["status"] == "completed":
            return dict(_checkpoint(step).output or {})
        output = approval.output()
        # Every person's decision (a quorum's approvals, or the one decision).
        output["decisions"] = [
            d.as_dict(with_seen=False) for d in decisions(ledger, approval.id, conn)
        ]
        ledger.complete_step(
            conn,
            run_id=approval.run_id,
            step_key=approval.step_key,
            attempt_id=_attempt(ledger, conn, approval, attempt_id),
            output=output,
            reused=False,
        )
        ledger._event(
            conn,
            approval.run_id,
            approval.step_key,
            "approval_completed",
            {"approval_id": approval.id, "decision": approval.status, "via": via},
        )
        return output


def fail(ledger: Ledger, approval_id: int, via: str) -> str:
    """Record a decided approval that fails its step (once): the attempt and the step
    failed, the saga started. Returns the reason. Like ``complete``, whoever comes first
    records it; the others find the step failed."""
    from ledgerflow.errors import NonRetryableError

    with ledger.begin() as conn:
        approval, step, attempt_id = _locked_outcome(ledger, conn, approval_id)
        reason = approval.failure_reason()
        if step is not None and step["status"] == "failed":
            return reason
        ledger.fail_attempt(
            run_id=approval.run_id,
            step_key=approval.step_key,
            attempt_id=_attempt(ledger, conn, approval, attempt_id),
            error=NonRetryableError(reason),
            final=True,
            conn=conn,
        )
        ledger._event(
            conn,
            approval.run_id,
            approval.step_key,
            "approval_failed_step",
            {"approval_id": approval.id, "decision": approval.status, "via": via},
        )
    # What the task's failure callback does, done here too: the saga must not wait for it.
    ledger.start_saga(approval.run_id, approval.step_key)
    return reason


def abandon_for_run(
    ledger: Ledger, run_id: str, reason: str, conn: Connection | None = None
) -> int:
    """The run ended while its approvals waited: they can no longer resume their task.
    Each pending one becomes ``abandoned`` (one conditional update, so a decision taken
    at the same moment wins or loses cleanly), with an ``approval_abandoned`` event.
    Returns how many were abandoned."""
    from ledgerflow.lifecycle import ApprovalStatus

    with ledger.begin(conn) as conn:
        ids = list(
            conn.execute(
                select(t.approvals.c.id).where(
                    t.approvals.c.run_id == run_id,
                    t.approvals.c.status == ApprovalStatus.PENDING.value,
                )
            ).scalars()
        )
        if not ids:
            return 0
        changed = conn.execute(
            update(t.approvals)
            .where(t.approvals.c.id.in_(ids), t.approvals.c.status == ApprovalStatus.PENDING.value)
            .values(status=ApprovalStatus.ABANDONED.value)
        ).rowcount
        for approval_id in ids:
            ledger._event(
                conn,
                run_id,
                None,
                "approval_abandoned",
                {"approval_id": approval_id, "reason": reason},
            )
    return int(changed)
