"""What ``ledgerflow doctor`` reads from the ledger: every record still open (a run
``running``, an attempt ``running``, a step ``running``/``retrying``, a saga
``compensating``, an effect ``pending``, an approval ``pending``), in a few queries.

Open statuses come from the lifecycle machines, not from a list: a run status that ends a
run (``succeeded``, ``failed``, any added later) is simply not open."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import (
    APPROVAL,
    ATTEMPT,
    RUN,
    EffectStatus,
    RunStatus,
    SagaStatus,
    StepStatus,
)

# A run is open while its status can still end: every status a running run may move to,
# other than running itself, is an end (succeeded, failed, and any end added later).
RUN_ENDS = frozenset(RUN.transitions[RunStatus.RUNNING.value]) - {RunStatus.RUNNING.value}
RUN_OPEN = frozenset(RUN.statuses) - RUN_ENDS
ATTEMPT_OPEN = frozenset(ATTEMPT.statuses) - ATTEMPT.terminal
APPROVAL_OPEN = frozenset(APPROVAL.statuses) - APPROVAL.terminal
STEP_OPEN = frozenset({StepStatus.RUNNING.value, StepStatus.RETRYING.value})
_IN = 500  # ids per IN (...) list


def open_records(ledger: Ledger) -> dict[str, Any]:
    a, s = t.attempts, t.steps
    with ledger.engine.connect() as conn:
        attempts = [
            dict(r)
            for r in conn.execute(
                select(
                    a.c.id,
                    a.c.run_id,
                    a.c.step_key,
                    a.c.try_number,
                    a.c.pid,
                    a.c.hostname,
                    a.c.started_at,
                    s.c.step_id,
                    s.c.map_index,
                    s.c.idempotency_key,
                )
                .select_from(
                    a.outerjoin(s, (s.c.run_id == a.c.run_id) & (s.c.step_key == a.c.step_key))
                )
                .where(a.c.status.in_(sorted(ATTEMPT_OPEN)))
                .order_by(a.c.id)
            ).mappings()
        ]
        steps = [
            dict(r)
            for r in conn.execute(
                select(s.c.run_id, s.c.step_key, s.c.status)
                .where(s.c.status.in_(sorted(STEP_OPEN)))
                .order_by(s.c.run_id, s.c.step_key)
            ).mappings()
        ]
        effects = [
            dict(r)
            for r in conn.execute(
                select(
                    t.effects.c.idempotency_key,
                    t.effects.c.tool,
                    t.effects.c.run_id,
                    t.effects.c.step_key,
                )
                .where(t.effects.c.status == EffectStatus.PENDING.value)
                .order_by(t.effects.c.id)
            ).mappings()
        ]
        approvals = [
            dict(r)
            for r in conn.execute(
                select(
                    t.approvals.c.id,
                    t.approvals.c.run_id,
                    t.approvals.c.step_key,
                    t.approvals.c.workflow,
                )
                .where(t.approvals.c.status.in_(sorted(APPROVAL_OPEN)))
                .order_by(t.approvals.c.id)
            ).mappings()
        ]
        wanted = {r["run_id"] for rows in (attempts, steps, effects, approvals) for r in rows}
        cols = (
            t.runs.c.run_id,
            t.runs.c.dag_id,
            t.runs.c.workflow,
            t.runs.c.version,
            t.runs.c.status,
            t.runs.c.saga,
            t.runs.c.updated_at,
        )
        runs = {
            r["run_id"]: dict(r)
            for r in conn.execute(
                select(*cols).where(
                    t.runs.c.status.in_(sorted(RUN_OPEN))
                    | (t.runs.c.saga == SagaStatus.COMPENSATING.value)
                )
            ).mappings()
        }
        rest = sorted(wanted - set(runs))
        for i in range(0, len(rest), _IN):
            for r in conn.execute(
                select(*cols).where(t.runs.c.run_id.in_(rest[i : i + _IN]))
            ).mappings():
                runs[r["run_id"]] = dict(r)
    return {
        "runs": runs,
        "attempts": attempts,
        "steps": steps,
        "effects": effects,
        "approvals": approvals,
    }


def not_undone(ledger: Ledger, run_id: str, spec: Any) -> list[str]:
    """Completed steps of the run that may need undoing and have no compensation record:
    those that declare ``compensate`` (every completed one when the spec is unknown)."""
    from ledgerflow.spec.models import ToolStep

    with ledger.engine.connect() as conn:
        done = conn.execute(
            select(t.steps.c.step_key, t.steps.c.step_id).where(
                t.steps.c.run_id == run_id, t.steps.c.status == StepStatus.COMPLETED.value
            )
        ).all()
        recorded = set(
            conn.execute(
                select(t.compensations.c.step_key).where(t.compensations.c.run_id == run_id)
            ).scalars()
        )
    undoable = None
    if spec is not None:
        undoable = {
            s.id for s in spec.steps if isinstance(s, ToolStep) and s.compensate is not None
        }
    return sorted(
        key
        for key, step_id in done
        if key not in recorded and (undoable is None or step_id in undoable)
    )
