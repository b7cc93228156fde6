"""Quorum approvals: one row per person's decision, and what those rows add up to.

An approval asks for ``required`` approvals (1 unless the step says ``required: M``).
Each person's decision is a row of ``lf_approval_decisions`` with what that person was
shown (the subject, the body and the payload, and the payload's hash); a person decides
once (a unique key: a second decision is ``DecidedBefore``, a 409 on the API). The
approval stays ``pending`` until ``required`` approvals are recorded (then ``approved``)
or anyone rejects (then ``rejected``). Decisions count across escalation levels: a
decision stands once recorded; escalation changes who may decide from then on.

``approvals.decide`` calls :func:`record` in its transaction after it locked the
approval's row, so of two concurrent decisions the second sees the first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, insert, select

from ledgerflow.errors import DecidedBefore
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import dumps, loads

if TYPE_CHECKING:
    from ledgerflow.ledger.approvals import Approval
    from ledgerflow.ledger.store import Ledger


@dataclass(frozen=True)
class Decision:
    """One person's decision on an approval, with what that person was shown."""

    approval_id: int
    level: int
    by: str
    decision: str
    comment: str | None
    source: str
    seen_hash: str
    seen: dict[str, Any]
    at: datetime

    def as_dict(self, *, with_seen: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "by": self.by,
            "decision": self.decision,
            "at": self.at.isoformat(),
            "comment": self.comment,
            "source": self.source,
            "level": self.level,
            "seen_hash": self.seen_hash,
        }
        if with_seen:
            out["seen"] = self.seen
        return out


def _decision(row: Any) -> Decision:
    at = row["decided_at"]
    if at.tzinfo is None:  # SQLite returns naive UTC
        at = at.replace(tzinfo=timezone.utc)
    return Decision(
        approval_id=int(row["approval_id"]),
        level=int(row["level"]),
        by=row["decided_by"],
        decision=row["decision"],
        comment=row["comment"],
        source=row["source"],
        seen_hash=row["seen_hash"],
        seen=loads(row["seen"]),
        at=at,
    )


def record(
    conn: Connection,
    approval: Approval,
    *,
    decision: str,
    by: str,
    comment: str | None,
    seen_hash: str,
    source: str,
    at: datetime,
) -> str | None:
    """Store ``by``'s decision (the approval's row is locked by the caller); return the
    approval's new status: ``rejected`` on a reject, ``approved`` when this approval
    makes the quorum, None while it is still short of it."""
    d = t.approval_decisions
    before = conn.execute(
        select(d.c.decision, d.c.decided_at).where(
            d.c.approval_id == approval.id, d.c.decided_by == by
        )
    ).first()
    if before is not None:
        raise DecidedBefore(
            f"approval {approval.id}: {by} already decided ({before.decision} at "
            f"{before.decided_at}); a person counts once toward its {approval.required} "
            "approvals"
        )
    conn.execute(
        insert(d).values(
            approval_id=approval.id,
            run_id=approval.run_id,
            level=approval.level,
            decided_by=by,
            decision=decision,
            comment=comment,
            source=source,
            seen_hash=seen_hash,
            seen=dumps(
                {"subject": approval.subject, "body": approval.body, "payload": approval.payload}
            ),
            decided_at=at,
        )
    )
    if decision == "rejected":
        return "rejected"
    approved = conn.execute(
        select(func.count())
        .select_from(d)
        .where(d.c.approval_id == approval.id, d.c.decision == "approved")
    ).scalar_one()
    return "approved" if int(approved) >= approval.required else None


def decisions(ledger: Ledger, approval_id: int, conn: Connection | None = None) -> list[Decision]:
    """Every person's decision on an approval, in the order they were taken."""
    d = t.approval_decisions
    query = select(d).where(d.c.approval_id == approval_id).order_by(d.c.id)
    with ledger._read(conn) as conn:
        return [_decision(r) for r in conn.execute(query).mappings()]


def approvals_so_far(ledger: Ledger, ids: Iterable[int]) -> dict[int, int]:
    """How many approvals each approval has recorded (the listing's "1 of 2")."""
    ids = sorted(set(ids))
    if not ids:
        return {}
    d = t.approval_decisions
    query = (
        select(d.c.approval_id, func.count())
        .where(d.c.approval_id.in_(ids), d.c.decision == "approved")
        .group_by(d.c.approval_id)
    )
    with ledger.engine.connect() as conn:
        counted = {int(i): int(n) for i, n in conn.execute(query)}
    return {i: counted.get(i, 0) for i in ids}


def escalated_approvers(
    current: dict[str, list[str]], added: dict[str, list[str]], mode: str
) -> dict[str, list[str]]:
    """The approvers after an escalation: the new ones (``replace``, the default and
    what every release before quorums did) or the current ones and the new ones
    (``add``: the first approvers can still decide)."""
    if mode != "add":
        return {"users": list(added.get("users", [])), "roles": list(added.get("roles", []))}
    return {
        key: list(dict.fromkeys([*current.get(key, []), *added.get(key, [])]))
        for key in ("users", "roles")
    }
