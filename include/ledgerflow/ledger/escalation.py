"""An approval's deadline chain: the spec's ``at_deadline`` as the ledger stores it,
and the move to the chain's next level (new approvers, a new deadline) when a
deadline passes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import update

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.approvals import Approval, get
from ledgerflow.ledger.store import Ledger, dumps, now


def escalate(ledger: Ledger, approval: Approval, at: datetime) -> Approval | None:
    """Move a pending approval to its next escalation level (once, whoever asks first).

    Returns the escalated approval, or None when it is no longer pending at that level.
    """
    step = approval.at_deadline
    if not (isinstance(step, dict) and "escalate" in step):
        raise ValueError(f"approval {approval.id} has no escalation left")
    from ledgerflow.ledger.quorum import escalated_approvers

    nxt = step["escalate"]
    mode = nxt.get("mode", "replace")  # a chain stored before modes existed replaced
    approvers = escalated_approvers(approval.approvers, nxt["approvers"], mode)
    deadline = at + timedelta(seconds=float(nxt["deadline"]))
    with ledger.begin() as conn:
        won = conn.execute(
            update(t.approvals)
            .where(
                t.approvals.c.id == approval.id,
                t.approvals.c.status == "pending",
                t.approvals.c.level == approval.level,
            )
            .values(
                level=approval.level + 1,
                approvers=dumps(approvers),
                deadline=deadline,
                at_deadline=dumps(nxt["at_deadline"]),
                updated_at=now(),
            )
        ).rowcount
        if not won:
            return None
        ledger._event(
            conn,
            approval.run_id,
            approval.step_key,
            "approval_escalated",
            {
                "approval_id": approval.id,
                "level": approval.level + 1,
                "approvers": approvers,
                "mode": mode,
                "deadline": deadline.isoformat(),
            },
        )
    return get(ledger, approval.id)


def deadline_chain(at_deadline: Any) -> Any:
    """The spec's ``at_deadline`` as stored JSON: an outcome, or {escalate: {...}} with
    the deadline in seconds."""
    if isinstance(at_deadline, str):
        return at_deadline
    esc = at_deadline.escalate
    return {
        "escalate": {
            "approvers": {"users": list(esc.approvers.users), "roles": list(esc.approvers.roles)},
            "deadline": esc.deadline.total_seconds(),
            "mode": esc.mode,
            "at_deadline": deadline_chain(esc.at_deadline),
        }
    }
