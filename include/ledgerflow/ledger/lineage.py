"""Retry lineage: which completed step of which earlier run a retry run may reuse.

A retry run links to the run it retries (``lf_runs.retry_of``), which may itself be a
retry: the lineage is that chain. A step of a retry run reuses the newest completed
checkpoint of the same step in its lineage, except

* a step the retry re-runs on purpose (``--from STEP``: that step and everything
  downstream of it), in this run or in any run between this one and the checkpoint's
  (a run that re-ran a step declared the older results stale);
* a step whose effect the failed run's saga undid (``lf_compensations`` says
  ``completed``): its output describes something that no longer exists.

Reusing copies the checkpoint into the retry run (attempts 0, the source's idempotency
key and output) with a ``checkpoint_reused_from`` event naming the source run, so the
retry run's own rows are complete: templates, compensations and ``ledgerflow show``
read them like any other.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Checkpoint, Ledger, _checkpoint, dumps, now
from ledgerflow.spec.models import WorkflowSpec

# A lineage longer than this is a loop in the data, not a history of retries.
MAX_DEPTH = 1000


def rerun_steps(spec: WorkflowSpec, from_step: str | None) -> set[str]:
    """``from_step`` and every step downstream of it (through ``needs``)."""
    if from_step is None:
        return set()
    chosen = {from_step}
    changed = True
    while changed:
        changed = False
        for step in spec.steps:
            if step.id not in chosen and chosen.intersection(step.needs):
                chosen.add(step.id)
                changed = True
    return chosen


def chain(ledger: Ledger, run_id: str, conn: Connection | None = None) -> list[dict[str, Any]]:
    """The run and the runs it retries, newest first (stops at a run not in the ledger)."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = run_id
    with ledger._read(conn) as conn:
        while current is not None and current not in seen and len(found) < MAX_DEPTH:
            seen.add(current)
            row = conn.execute(select(t.runs).where(t.runs.c.run_id == current)).mappings().first()
            if row is None:
                break
            found.append(dict(row))
            current = row["retry_of"]
    return found


def descendants(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    """Every retry of the run, of its retries, and so on (breadth first)."""
    out: list[dict[str, Any]] = []
    queue = [run_id]
    seen = {run_id}
    while queue and len(out) < MAX_DEPTH:
        for row in ledger.retries_of(queue.pop(0)):
            if row["run_id"] not in seen:
                seen.add(row["run_id"])
                out.append(row)
                queue.append(row["run_id"])
    return out


def find_reusable(
    conn: Connection,
    spec: WorkflowSpec,
    *,
    retry_of: str,
    retry_from: str | None,
    step_key: str,
    step_id: str,
) -> Checkpoint | None:
    """The completed checkpoint a run retrying ``retry_of`` may reuse for ``step_key``."""
    if step_id in rerun_steps(spec, retry_from):
        return None
    current: str | None = retry_of
    seen: set[str] = set()
    while current is not None and current not in seen and len(seen) < MAX_DEPTH:
        seen.add(current)
        row = (
            conn.execute(
                select(t.steps).where(t.steps.c.run_id == current, t.steps.c.step_key == step_key)
            )
            .mappings()
            .first()
        )
        if row is not None and row["status"] == "completed":
            undone = conn.execute(
                select(t.compensations.c.status).where(
                    t.compensations.c.run_id == current,
                    t.compensations.c.step_key == step_key,
                    t.compensations.c.status == "completed",
                )
            ).first()
            return None if undone is not None else _checkpoint(row)
        run = conn.execute(
            select(t.runs.c.retry_of, t.runs.c.retry_from).where(t.runs.c.run_id == current)
        ).first()
        if run is None or step_id in rerun_steps(spec, run.retry_from):
            return None
        current = run.retry_of
    return None


def adopt(ledger: Ledger, conn: Connection, run_id: str, source: Checkpoint) -> Checkpoint:
    """Copy a completed checkpoint of an earlier run into ``run_id``, with its event."""
    stamp = now()
    conn.execute(
        ledger._insert(t.steps)
        .values(
            run_id=run_id,
            step_key=source.step_key,
            step_id=source.step_id,
            map_index=source.map_index,
            status="completed",
            attempts=0,
            idempotency_key=source.idempotency_key,
            output=dumps(source.output),
            started_at=stamp,
            completed_at=stamp,
        )
        .on_conflict_do_nothing()
    )
    ledger._event(
        conn,
        run_id,
        source.step_key,
        "checkpoint_reused_from",
        {"run_id": source.run_id, "idempotency_key": source.idempotency_key},
    )
    return Checkpoint(
        run_id=run_id,
        step_key=source.step_key,
        step_id=source.step_id,
        map_index=source.map_index,
        status="completed",
        attempts=0,
        idempotency_key=source.idempotency_key,
        output=source.output,
        error=None,
    )
