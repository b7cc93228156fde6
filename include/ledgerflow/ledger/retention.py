"""Retention: old finished runs leave the ledger; what idempotency needs stays.

``prune`` removes, for every run that finished (succeeded or failed, its saga done) before
``now - older_than``: its row, checkpoints (inputs and outputs), attempts, events,
approvals, LLM calls, quality results, compensations and dead letters. Effects (the
idempotency keys and their recorded results) stay until ``effect_horizon`` has passed
since they were made, whatever happened to their run: a late retry, or the same business
key sent again, still finds them.

Never touched: a running run, a run with an open dead letter (someone still has to retry
or close it), and every run up the retry chain of a running run (a running retry reuses
their checkpoints). Each batch of runs is re-read under a row lock (Postgres) and must
still be finished: a run cleared in Airflow meanwhile is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select

from ledgerflow.ledger import schema as t

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from ledgerflow.ledger.store import Ledger

BATCH = 500
FINISHED = ("succeeded", "failed", "cancelled")
# Per run, children first (no foreign keys, but a reader never sees orphans this way).
RUN_TABLES = (
    t.steps,
    t.attempts,
    t.events,
    t.approval_decisions,
    t.approvals,
    t.llm_calls,
    t.quality_results,
    t.compensations,
    t.dead_letters,
)


@dataclass
class Pruned:
    """What a prune removed (or, ``dry_run``, would remove), by table."""

    older_than: datetime
    effects_before: datetime
    dry_run: bool
    runs: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    protected: int = 0  # finished runs kept for a running retry or an open dead letter

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        out = [
            f"{verb} {self.runs} finished runs that ended before {self.older_than:%Y-%m-%d %H:%M} UTC"
        ]
        for table, n in self.rows.items():
            out.append(f"  {table}: {n} rows")
        out.append(
            f"kept {self.protected} old finished runs (a running retry reuses them, or a "
            "dead letter is open)"
        )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "older_than": self.older_than.isoformat(),
            "effects_before": self.effects_before.isoformat(),
            "dry_run": self.dry_run,
            "runs": self.runs,
            "rows": self.rows,
            "protected": self.protected,
        }


def protected_runs(conn: Connection) -> set[str]:
    """Runs up the retry chains of running runs, and runs with an open dead letter."""
    r = t.runs
    keep = set(
        conn.execute(
            select(t.dead_letters.c.run_id).where(t.dead_letters.c.status == "open")
        ).scalars()
    )
    frontier = {
        row.retry_of
        for row in conn.execute(
            select(r.c.retry_of).where(r.c.status == "running", r.c.retry_of.is_not(None))
        )
    }
    seen: set[str] = set()
    while frontier:
        seen |= frontier
        parents = conn.execute(
            select(r.c.retry_of).where(r.c.run_id.in_(sorted(frontier)), r.c.retry_of.is_not(None))
        ).scalars()
        frontier = {p for p in parents if p not in seen}
    return keep | seen


def prune(
    ledger: Ledger,
    *,
    older_than: timedelta,
    effect_horizon: timedelta,
    now: datetime | None = None,
    dry_run: bool = False,
) -> Pruned:
    from ledgerflow.ledger._engine import now as ledger_now

    current = now or ledger_now()
    cutoff = current - older_than
    effects_cutoff = current - effect_horizon
    result = Pruned(older_than=cutoff, effects_before=effects_cutoff, dry_run=dry_run)
    r = t.runs
    old = (
        select(r.c.run_id)
        .where(
            r.c.status.in_(FINISHED),
            r.c.updated_at < cutoff,
            (r.c.saga.is_(None)) | (r.c.saga != "compensating"),
        )
        .order_by(r.c.run_id)
    )
    with ledger.engine.connect() as conn:
        keep = protected_runs(conn)
        candidates = [x for x in conn.execute(old).scalars() if x not in keep]
        result.protected = len(keep.intersection(conn.execute(old).scalars()))
    for start in range(0, len(candidates), BATCH):
        batch = candidates[start : start + BATCH]
        with ledger.begin() as conn:
            locked = select(r.c.run_id).where(
                r.c.run_id.in_(batch), r.c.status.in_(FINISHED), r.c.updated_at < cutoff
            )
            if ledger.dialect == "postgresql":
                locked = locked.with_for_update()
            still = sorted(conn.execute(locked).scalars())
            if not still:
                continue
            for table in RUN_TABLES:
                n = _remove(conn, table, table.c.run_id.in_(still), dry_run)
                result.rows[table.name] = result.rows.get(table.name, 0) + n
            n = _remove(conn, r, r.c.run_id.in_(still), dry_run)
            result.rows[r.name] = result.rows.get(r.name, 0) + n
            result.runs += n
    # Effects past the horizon, unless their run is still running or protected.
    e = t.effects
    with ledger.begin() as conn:
        live = select(r.c.run_id).where(r.c.status == "running")
        keep = protected_runs(conn)
        where = [e.c.created_at < effects_cutoff, e.c.run_id.not_in(live)]
        if keep:
            where.append(e.c.run_id.not_in(sorted(keep)))
        from sqlalchemy import and_

        result.rows[e.name] = _remove(conn, e, and_(*where), dry_run)
    for table in (*RUN_TABLES, r, e):
        result.rows.setdefault(table.name, 0)
    return result


def _remove(conn: Connection, table: Any, where: Any, dry_run: bool) -> int:
    if dry_run:
        return int(conn.execute(select(func.count()).select_from(table).where(where)).scalar() or 0)
    return int(conn.execute(delete(table).where(where)).rowcount or 0)
