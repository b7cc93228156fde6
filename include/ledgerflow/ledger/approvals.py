"""Approval requests and decisions in the ledger.

A request is one row per (run, step): a retried or re-run task finds the same request.
A decision is a conditional update (``WHERE status = 'pending'``), so of any number of
concurrent decisions exactly one is stored; on Postgres it sends ``NOTIFY
ledgerflow_approvals, '<id>'`` in the same transaction, which wakes the waiting trigger
as soon as the decision commits. A quorum approval (``required`` > 1) records each
person's decision (``ledger.quorum``) and changes its status only when the quorum is met
or someone rejects; a decision short of the quorum sends no NOTIFY (nothing to resume).

Every change is also an event in the run's append-only log: request created,
notification sent, escalated, decided (with the approver, the comment and the hash and
snapshot of the payload they were shown).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select, text, update

from ledgerflow import observability
from ledgerflow.errors import ApprovalConflict, ApprovalNotFound
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, dumps, loads, now

CHANNEL = "ledgerflow_approvals"
DECISIONS = ("approved", "rejected")


@dataclass(frozen=True)
class Approval:
    id: int
    run_id: str
    step_key: str
    dag_id: str
    task_id: str
    workflow: str
    version: int
    subject: str
    body: str
    payload: Any
    payload_hash: str
    approvers: dict[str, list[str]]
    level: int
    deadline: datetime
    at_deadline: Any
    follow: dict[str, list[str] | None] | None
    status: str
    decided_by: str | None
    decided_at: datetime | None
    comment: str | None
    seen_hash: str | None
    created_at: datetime
    required: int = 1

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    @property
    def ends_without_worker(self) -> bool:
        """The decision can end the Airflow task by itself (the follow lists were recorded
        with the request): an approve or a branched reject succeeds it, a reject without a
        branch or an expiry with ``at_deadline: fail`` fails it."""
        return self.follow is not None and not self.pending

    @property
    def fails_step(self) -> bool:
        """A reject with no declared branch, a deadline whose outcome is ``fail``, or a
        withdrawal (its run was cancelled: the step never completes)."""
        return self.status in ("expired", "withdrawn") or (
            self.status == "rejected"
            and (self.follow is None or self.follow.get("rejected") is None)
        )

    def failure_reason(self) -> str:
        if self.status == "expired":
            return f"approval {self.id}: no decision before the deadline (at_deadline: fail)"
        if self.status == "withdrawn":
            return f"approval {self.id} withdrawn by {self.decided_by}: {self.comment or ''}"
        return f"approval {self.id} rejected by {self.decided_by}: {self.comment or ''}".rstrip()

    def output(self) -> dict[str, Any]:
        """The approval step's output (its checkpoint; ``steps.<id>.output`` in templates)."""
        return {
            "approval_id": self.id,
            "decision": self.status,
            "approved": self.status == "approved",
            "approver": self.decided_by,
            "comment": self.comment,
            "decided_at": self.decided_at.isoformat() if self.decided_at else None,
            "level": self.level,
            "payload_hash": self.payload_hash,
            "required": self.required,
        }

    @property
    def airflow_run_id(self) -> str:
        return self.run_id.split("/", 1)[1] if "/" in self.run_id else self.run_id

    def may_decide(self, user: str, roles: set[str]) -> bool:
        """Named users and holders of a named role (case-insensitive role names)."""
        wanted = {r.lower() for r in self.approvers.get("roles", [])}
        return user in self.approvers.get("users", []) or bool(wanted & {r.lower() for r in roles})

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for k in ("deadline", "decided_at", "created_at"):
            out[k] = out[k].isoformat() if out[k] is not None else None
        out["airflow_run_id"] = self.airflow_run_id
        return out


def payload_hash(payload: Any) -> str:
    """SHA-256 of the canonical JSON of the payload (sorted keys, no spaces)."""
    return hashlib.sha256(dumps(payload).encode()).hexdigest()


def _aware(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:  # SQLite returns naive UTC
        from datetime import timezone

        return value.replace(tzinfo=timezone.utc)
    return value


def _row(row: Any) -> Approval:
    return Approval(
        id=int(row["id"]),
        run_id=row["run_id"],
        step_key=row["step_key"],
        dag_id=row["dag_id"],
        task_id=row["task_id"],
        workflow=row["workflow"],
        version=int(row["version"]),
        subject=row["subject"],
        body=row["body"],
        payload=loads(row["payload"]),
        payload_hash=row["payload_hash"],
        approvers=loads(row["approvers"]),
        level=int(row["level"]),
        deadline=_aware(row["deadline"]),  # type: ignore[arg-type]
        at_deadline=loads(row["at_deadline"]),
        follow=loads(row["follow"]),
        status=row["status"],
        decided_by=row["decided_by"],
        decided_at=_aware(row["decided_at"]),
        comment=row["comment"],
        seen_hash=row["seen_hash"],
        created_at=_aware(row["created_at"]),  # type: ignore[arg-type]
        required=int(row["required"]),
    )


def request(
    ledger: Ledger,
    *,
    run_id: str,
    step_key: str,
    dag_id: str,
    task_id: str,
    workflow: str,
    version: int,
    subject: str,
    body: str,
    payload: Any,
    approvers: dict[str, list[str]],
    deadline: datetime,
    at_deadline: Any,
    follow: dict[str, list[str] | None] | None = None,
    required: int = 1,
) -> tuple[Approval, bool]:
    """Create the request of a run's approval step once; returns (request, created).
    ``required``: how many approvals end it approved (a quorum, ``ledger.quorum``)."""
    stamp = now()
    with ledger.begin() as conn:
        created = conn.execute(
            ledger._insert(t.approvals)
            .values(
                run_id=run_id,
                step_key=step_key,
                dag_id=dag_id,
                task_id=task_id,
                workflow=workflow,
                version=version,
                subject=subject,
                body=body,
                payload=dumps(payload),
                payload_hash=payload_hash(payload),
                approvers=dumps(approvers),
                level=0,
                deadline=deadline,
                at_deadline=dumps(at_deadline),
                follow=None if follow is None else dumps(follow),
                status="pending",
                created_at=stamp,
                updated_at=stamp,
                required=required,
            )
            .on_conflict_do_nothing()
        ).rowcount
        row = (
            conn.execute(
                select(t.approvals).where(
                    t.approvals.c.run_id == run_id, t.approvals.c.step_key == step_key
                )
            )
            .mappings()
            .one()
        )
        approval = _row(row)
        if created:
            ledger._event(
                conn,
                run_id,
                step_key,
                "approval_requested",
                {
                    "approval_id": approval.id,
                    "approvers": approvers,
                    "required": required,
                    "deadline": deadline.isoformat(),
                    "payload_hash": approval.payload_hash,
                },
            )
    return approval, bool(created)


def get(ledger: Ledger, approval_id: int, conn: Connection | None = None) -> Approval:
    with ledger._read(conn) as conn:
        row = (
            conn.execute(select(t.approvals).where(t.approvals.c.id == approval_id))
            .mappings()
            .first()
        )
    if row is None:
        raise ApprovalNotFound(f"no approval {approval_id}")
    return _row(row)


def statuses(ledger: Ledger, ids: list[int]) -> dict[int, str]:
    """The status of many approvals in one query (the triggerer's safety-net poll)."""
    if not ids:
        return {}
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(t.approvals.c.id, t.approvals.c.status, t.approvals.c.level).where(
                t.approvals.c.id.in_(ids)
            )
        )
        return {int(r.id): f"{r.status}:{r.level}" for r in rows}


def for_step(ledger: Ledger, run_id: str, step_key: str) -> Approval | None:
    with ledger.engine.connect() as conn:
        row = (
            conn.execute(
                select(t.approvals).where(
                    t.approvals.c.run_id == run_id, t.approvals.c.step_key == step_key
                )
            )
            .mappings()
            .first()
        )
    return None if row is None else _row(row)


def listing(
    ledger: Ledger,
    *,
    status: str | None = "pending",
    workflow: str | None = None,
    run_id: str | None = None,
    dag_ids: Collection[str] | None = None,
    limit: int | None = 200,
    offset: int = 0,
) -> list[Approval]:
    """Approvals, newest first; ``status=None`` for all, ``"decided"`` for all but pending;
    ``dag_ids`` keeps those of these DAGs (None: every DAG); ``limit=None``: all."""
    query = _where(select(t.approvals), status, workflow, run_id, dag_ids)
    query = query.order_by(t.approvals.c.id.desc()).offset(offset).limit(limit)
    with ledger.engine.connect() as conn:
        return [_row(r) for r in conn.execute(query).mappings()]


def count(ledger: Ledger, *, status: str | None, workflow: str | None, dag_ids: Any) -> int:
    """How many approvals :func:`listing` would list without a limit."""
    query = _where(select(func.count()).select_from(t.approvals), status, workflow, None, dag_ids)
    with ledger.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def _where(query: Any, status: Any, workflow: Any, run_id: Any, dag_ids: Any) -> Any:
    c = t.approvals.c
    if status is not None:
        query = query.where(c.status != "pending" if status == "decided" else c.status == status)
    if workflow:
        query = query.where(c.workflow == workflow)
    if run_id:
        query = query.where(c.run_id == run_id)
    return query if dag_ids is None else query.where(c.dag_id.in_(sorted(dag_ids)))


def decide(
    ledger: Ledger,
    approval_id: int,
    *,
    decision: str,
    by: str,
    comment: str | None = None,
    seen_hash: str | None = None,
    source: str = "ledgerflow",
    settle: bool = False,
    responded_at: str | None = None,
    conn: Connection | None = None,
) -> Approval:
    """Store a decision if the approval is still pending; else ``ApprovalConflict``.

    ``decision`` is ``approved``/``rejected`` (a person) or ``expired`` (the deadline).
    ``seen_hash`` is the payload hash the approver was shown; when given it must match.
    ``source``: where it was given (``ledgerflow``, or ``airflow``'s Required Actions).
    A person's decision is recorded once per person (``DecidedBefore`` for a second) and
    ends the approval on a reject or when it makes the quorum; short of the quorum the
    approval stays pending (returned as such). ``settle``: the decision ends it whatever
    the quorum (the deadline's declared outcome, ``ledgerflow run --decide``).
    ``responded_at``: when Airflow stored the response this decision applies, kept in
    the event (``ledger.responses``). ``conn``: inside a transaction the caller holds.
    """
    from ledgerflow.ledger import quorum

    if decision not in (*DECISIONS, "expired"):
        raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
    stamp = now()
    outer = conn
    with ledger.begin(outer) as conn:
        # Lock the pending row first (a no-op update): concurrent decisions of a quorum
        # take turns, so the one that makes it sees every other.
        locked = conn.execute(
            update(t.approvals)
            .where(t.approvals.c.id == approval_id, t.approvals.c.status == "pending")
            .values(updated_at=stamp)
        ).rowcount
        current = get(ledger, approval_id, conn)
        if not locked:
            if current.status == "withdrawn":
                raise ApprovalConflict(
                    f"approval {approval_id} was withdrawn: its run was cancelled by "
                    f"{current.decided_by} at {current.decided_at} ({current.comment})"
                )
            raise ApprovalConflict(
                f"approval {approval_id} was already decided ({current.status} by "
                f"{current.decided_by} at {current.decided_at})"
            )
        if seen_hash is not None and seen_hash != current.payload_hash:
            raise ApprovalConflict(
                f"approval {approval_id}: the payload you saw (hash {seen_hash[:12]}...) is not "
                f"the one recorded ({current.payload_hash[:12]}...)"
            )
        outcome: str | None = decision
        if not settle and decision != "expired":
            seen = seen_hash or current.payload_hash
            outcome = quorum.record(
                conn, current, decision=decision, by=by, comment=comment, seen_hash=seen,
                source=source, at=stamp,
            )  # fmt: skip
        data = {
            "approval_id": approval_id,
            "decision": outcome or decision,
            "by": by,
            "at": stamp.isoformat(),
            "comment": comment,
            "source": source,
            "level": current.level,
            "required": current.required,
            "payload_hash": current.payload_hash,
        }
        if responded_at is not None:
            data["responded_at"] = responded_at
        if outcome is None:  # short of the quorum: recorded, still pending, nothing to wake
            ledger._event(conn, current.run_id, current.step_key, "approval_partial", data)
            return get(ledger, approval_id, conn)
        conn.execute(
            update(t.approvals)
            .where(t.approvals.c.id == approval_id, t.approvals.c.status == "pending")
            .values(
                status=outcome,
                decided_by=by,
                decided_at=stamp,
                comment=comment,
                seen_hash=seen_hash or current.payload_hash,
                updated_at=stamp,
            )
        )
        data["payload"] = current.payload
        ledger._event(conn, current.run_id, current.step_key, "approval_decided", data)
        if ledger.dialect == "postgresql":
            conn.execute(
                text("SELECT pg_notify(:channel, :id)"),
                {"channel": CHANNEL, "id": str(approval_id)},
            )
    observability.approval_waited(current.workflow, stamp - current.created_at, outcome)
    return get(ledger, approval_id, outer)


# Reached from here too, and living in modules of their own: what a decision does to
# its step (approval_outcomes), the notices to the approvers (approval_notices), the
# deadline's escalation chain (escalation).
_ELSEWHERE = {
    "abandon_for_run": "approval_outcomes",
    "complete": "approval_outcomes",
    "fail": "approval_outcomes",
    "notify": "approval_notices",
    "notify_once": "approval_notices",
    "escalate": "escalation",
    "deadline_chain": "escalation",
}


def __getattr__(name: str) -> Any:
    if name in _ELSEWHERE:
        import importlib

        module = importlib.import_module(f"ledgerflow.ledger.{_ELSEWHERE[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CHANNEL",
    "Approval",
    "ApprovalConflict",
    "ApprovalNotFound",
    "decide",
    "for_step",
    "get",
    "listing",
    "payload_hash",
    "request",
    "statuses",
]
