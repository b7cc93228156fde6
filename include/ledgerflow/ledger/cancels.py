"""A run's cancel in the ledger: one transaction that ends the run ``cancelled``, stops
what it was doing (running attempts ``lost``, their steps ``failed``), withdraws what
it waits for (each kind's withdraw function, ``ledgerflow.cancel``), and, when asked,
starts its saga. ``ledgerflow.cancel`` adds the Airflow side.

The run's row is locked for the transaction (Postgres), and a forward step commits only
while its run is not cancelled (``RunsMixin.live_run``, the same lock): a step that
completes at the same moment either completes before the cancel (the cancel then sees it
completed) or not at all (its transaction rolls back), never both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from ledgerflow.errors import CancelRefused
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import now
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import (
    RUN,
    ApprovalStatus,
    AttemptStatus,
    RunStatus,
    SagaStatus,
    StepStatus,
)

# ``withdraw(ledger, conn, run_id, by=..., reason=...)`` -> one dict per wait withdrawn.
Withdraw = Callable[..., list[dict[str, Any]]]


@dataclass(frozen=True)
class RunCancel:
    """A cancelled run as the ledger recorded it. ``already``: it was cancelled before
    this call, which changed nothing."""

    run_id: str
    dag_id: str
    by: str
    at: datetime
    reason: str
    compensate: bool
    already: bool = False
    stopped: list[str] = field(default_factory=list)  # steps whose attempt was running
    withdrawn: list[dict[str, Any]] = field(default_factory=list)
    saga: str | None = None

    @property
    def dag_run_id(self) -> str:
        return self.run_id.split("/", 1)[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dag_id": self.dag_id,
            "status": RunStatus.CANCELLED.value,
            "cancelled_by": self.by,
            "cancelled_at": self.at.isoformat(),
            "reason": self.reason,
            "compensate": self.compensate,
            "already_cancelled": self.already,
            "stopped": self.stopped,
            "withdrawn": self.withdrawn,
            "saga": self.saga,
        }


def cancel_run(
    ledger: Ledger,
    run_id: str,
    *,
    by: str,
    reason: str,
    compensate: bool,
    withdrawers: Sequence[Withdraw] = (),
) -> RunCancel:
    """Cancel a running run (``CancelRefused`` for an unknown or ended one). A run that
    is cancelled already is returned as recorded (``already``), nothing changed."""
    ledger.migrate()
    stamp = now()
    with ledger.begin() as conn:
        lock = select(t.runs).where(t.runs.c.run_id == run_id)
        if ledger.dialect == "postgresql":
            lock = lock.with_for_update()
        row = conn.execute(lock).mappings().first()
        if row is None:
            raise CancelRefused(
                f"no run {run_id!r} in the ledger (ids look like <dag_id>/<airflow run id>; "
                "`ledgerflow runs` lists them)",
                reason="unknown_run",
            )
        if row["status"] == RunStatus.CANCELLED.value:
            return _recorded(row)
        if row["status"] != RunStatus.RUNNING.value:
            raise CancelRefused(
                f"run {run_id} already ended ({row['status']}): there is nothing to cancel"
                + ("; `ledgerflow retry` starts it again" if row["status"] == "failed" else ""),
                reason="ended",
            )
        RUN.check(row["status"], RunStatus.CANCELLED.value, run_id)
        conn.execute(
            update(t.runs)
            .where(t.runs.c.run_id == run_id, t.runs.c.status == RunStatus.RUNNING.value)
            .values(
                status=RunStatus.CANCELLED.value,
                cancelled_by=by,
                cancelled_at=stamp,
                cancel_reason=reason,
                cancel_compensate=compensate,
                updated_at=stamp,
            )
        )
        stopped = _stop_attempts(conn, run_id, by, stamp)
        withdrawn: list[dict[str, Any]] = []
        for withdraw in withdrawers:
            withdrawn.extend(withdraw(ledger, conn, run_id, by=by, reason=reason))
        saga = row["saga"]
        if compensate and saga is None:
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.saga.is_(None))
                .values(saga=SagaStatus.COMPENSATING.value, failed_step=None)
            )
            saga = SagaStatus.COMPENSATING.value
            ledger._event(conn, run_id, None, "saga_compensating", {"cause": "cancel"})
        ledger._event(
            conn,
            run_id,
            None,
            "run_cancelled",
            {
                "by": by,
                "reason": reason,
                "compensate": compensate,
                "stopped": stopped,
                "withdrawn": withdrawn,
            },
        )
    from ledgerflow import observability

    observability.run_finished(run_id, RunStatus.CANCELLED.value)
    return RunCancel(
        run_id=run_id,
        dag_id=str(row["dag_id"]),
        by=by,
        at=stamp,
        reason=reason,
        compensate=compensate,
        stopped=stopped,
        withdrawn=withdrawn,
        saga=saga,
    )


def _recorded(row: Any) -> RunCancel:
    return RunCancel(
        run_id=str(row["run_id"]),
        dag_id=str(row["dag_id"]),
        by=str(row["cancelled_by"] or ""),
        at=row["cancelled_at"] or row["updated_at"],
        reason=str(row["cancel_reason"] or ""),
        compensate=bool(row["cancel_compensate"]),
        already=True,
        saga=row["saga"],
    )


def _stop_attempts(conn: Connection, run_id: str, by: str, stamp: datetime) -> list[str]:
    """Running attempts become ``lost`` (their process is being killed) and their steps
    ``failed``: neither can complete any more."""
    steps = sorted(
        conn.execute(
            update(t.attempts)
            .where(t.attempts.c.run_id == run_id, t.attempts.c.status == AttemptStatus.RUNNING)
            .values(
                status=AttemptStatus.LOST.value,
                ended_at=stamp,
                error_type="RunCancelled",
                error=f"the run was cancelled by {by}",
            )
            .returning(t.attempts.c.step_key)
        ).scalars()
    )
    conn.execute(
        update(t.steps)
        .where(
            t.steps.c.run_id == run_id,
            t.steps.c.status.in_([StepStatus.RUNNING.value, StepStatus.RETRYING.value]),
        )
        .values(status=StepStatus.FAILED.value, error=f"the run was cancelled by {by}")
    )
    return list(dict.fromkeys(steps))


def withdraw_approvals(
    ledger: Ledger, conn: Connection, run_id: str, *, by: str, reason: str
) -> list[dict[str, Any]]:
    """The run's pending approvals become ``withdrawn`` (the canceller as ``decided_by``,
    the reason as ``comment``): one conditional update, so a decision at the same moment
    wins or loses cleanly, and a decision after it is refused (``ApprovalConflict``)."""
    pending = ApprovalStatus.PENDING.value
    rows = conn.execute(
        select(t.approvals.c.id, t.approvals.c.step_key).where(
            t.approvals.c.run_id == run_id, t.approvals.c.status == pending
        )
    ).all()
    if not rows:
        return []
    stamp = now()
    ids = [r.id for r in rows]
    won = set(
        conn.execute(
            update(t.approvals)
            .where(t.approvals.c.id.in_(ids), t.approvals.c.status == pending)
            .values(
                status=ApprovalStatus.WITHDRAWN.value,
                decided_by=by,
                decided_at=stamp,
                comment=f"run cancelled: {reason}",
                updated_at=stamp,
            )
            .returning(t.approvals.c.id)
        ).scalars()
    )
    withdrawn = []
    for approval_id, step_key in rows:
        if approval_id in won:
            ledger._event(
                conn,
                run_id,
                step_key,
                "approval_withdrawn",
                {"approval_id": approval_id, "by": by, "reason": reason},
            )
            withdrawn.append({"kind": "approval", "id": approval_id, "step": step_key})
    return withdrawn


__all__ = ["RunCancel", "Withdraw", "cancel_run", "withdraw_approvals"]
