"""Runs and their saga in the ledger: registration, end, reopening (an Airflow clear),
the saga's start and outcome, and the compensation records."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from ledgerflow import observability
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._base import LedgerBase, refuse
from ledgerflow.ledger._engine import dumps, now
from ledgerflow.lifecycle import (
    COMPENSATION,
    RUN,
    CompensationStatus,
    EffectStatus,
    IllegalTransition,
    RunStatus,
    SagaStatus,
    StepStatus,
)


class RunsMixin(LedgerBase):
    def ensure_run(
        self,
        *,
        run_id: str,
        dag_id: str,
        workflow: str,
        version: int,
        params: dict[str, Any],
        trigger_kind: str,
        retry_of: str | None = None,
        retry_from: str | None = None,
        spec_hash: str | None = None,
        conn: Connection | None = None,
    ) -> bool:
        """Register a run once; returns True when this call created it."""
        stamp = now()
        with self.begin(conn) as conn:
            result = conn.execute(
                self._insert(t.runs)
                .values(
                    run_id=run_id,
                    dag_id=dag_id,
                    workflow=workflow,
                    version=version,
                    params=dumps(params),
                    trigger_kind=trigger_kind,
                    retry_of=retry_of,
                    retry_from=retry_from,
                    spec_hash=spec_hash,
                    status=RunStatus.RUNNING.value,
                    created_at=stamp,
                    updated_at=stamp,
                )
                .on_conflict_do_nothing()
            )
            created = bool(result.rowcount)
            if created:
                started: dict[str, Any] = {"trigger": trigger_kind}
                if retry_of:
                    started.update(retry_of=retry_of, retry_from=retry_from)
                self._event(conn, run_id, None, "run_started", started)
                observability.run_started(workflow, version, trigger_kind)
        return created

    def finish_run(self, run_id: str, status: str, conn: Connection | None = None) -> None:
        """The run's end as Airflow reports it. Airflow is the truth about a run's state:
        a run that ended one way and now ends the other (a task was cleared and ran
        again) is reopened first, so the change is recorded, not overwritten."""
        with self.begin(conn) as conn:
            current = conn.execute(
                select(t.runs.c.status).where(t.runs.c.run_id == run_id)
            ).scalar()
            if current is None:
                return
            if not RUN.allowed(current, status):
                self.reopen_run(run_id, conn=conn)
                current = RunStatus.RUNNING.value
            RUN.check(current, status, run_id)
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id)
                .values(status=status, updated_at=now())
            )
            if current != status:
                self._event(conn, run_id, None, f"run_{status}", None)
        observability.run_finished(run_id, status)

    def reopen_run(self, run_id: str, conn: Connection | None = None) -> bool:
        """An ended run runs again (a task cleared in Airflow): ``running``, and its saga
        is reset so that a new failure starts a new one (the old outcome is in the
        ``run_reopened`` event). True when this call reopened it."""
        with self.begin(conn) as conn:
            row = conn.execute(
                select(t.runs.c.status, t.runs.c.saga).where(t.runs.c.run_id == run_id)
            ).first()
            if row is None or row.status == RunStatus.RUNNING.value:
                return False
            RUN.check(row.status, RunStatus.RUNNING.value, run_id)
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.status == row.status)
                .values(status=RunStatus.RUNNING.value, saga=None, updated_at=now())
            )
            self._event(
                conn, run_id, None, "run_reopened", {"status": row.status, "saga": row.saga}
            )
        return True

    def run(self, run_id: str) -> dict[str, Any] | None:
        from ledgerflow.ledger._engine import loads

        with self.engine.connect() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).mappings().first()
        return None if row is None else {**row, "params": loads(row["params"])}

    def runs(self, workflow: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = select(t.runs).order_by(t.runs.c.created_at.desc()).limit(limit)
        if workflow:
            query = query.where(t.runs.c.workflow == workflow)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def retries_of(self, run_id: str) -> list[dict[str, Any]]:
        """The runs that retry ``run_id`` (directly), oldest first."""
        query = (
            select(t.runs)
            .where(t.runs.c.retry_of == run_id)
            .order_by(t.runs.c.created_at, t.runs.c.run_id)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def unfinished_runs(self) -> dict[tuple[str, int], int]:
        """``{(workflow, version): runs still running}``."""
        from sqlalchemy import func

        query = (
            select(t.runs.c.workflow, t.runs.c.version, func.count())
            .where(t.runs.c.status == RunStatus.RUNNING.value)
            .group_by(t.runs.c.workflow, t.runs.c.version)
        )
        with self.engine.connect() as conn:
            return {(w, int(v)): int(n) for w, v, n in conn.execute(query)}

    # -- the saga ---------------------------------------------------------------

    def start_saga(self, run_id: str, failed_step: str | None) -> bool:
        """Mark the run's saga ``compensating`` (once); True when this call did it."""
        with self.begin() as conn:
            changed = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.saga.is_(None))
                .values(
                    saga=SagaStatus.COMPENSATING.value, failed_step=failed_step, updated_at=now()
                )
            ).rowcount
            if changed:
                self._event(conn, run_id, failed_step, "saga_compensating", None)
        return bool(changed)

    def finish_saga(self, run_id: str) -> str | None:
        """The saga's outcome from the compensation records: ``compensation_failed`` if
        one failed, ``compensated`` if something was undone, else
        ``nothing_to_compensate`` (the run failed with nothing to undo)."""
        with self.begin() as conn:
            saga = conn.execute(select(t.runs.c.saga).where(t.runs.c.run_id == run_id)).scalar()
            if saga != SagaStatus.COMPENSATING.value:
                return saga  # type: ignore[no-any-return]
            statuses = {
                r[0]
                for r in conn.execute(
                    select(t.compensations.c.status).where(t.compensations.c.run_id == run_id)
                )
            }
            if CompensationStatus.FAILED.value in statuses:
                outcome = SagaStatus.COMPENSATION_FAILED.value
            elif CompensationStatus.COMPLETED.value in statuses:
                outcome = SagaStatus.COMPENSATED.value
            else:
                outcome = SagaStatus.NOTHING_TO_COMPENSATE.value
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.saga == saga)
                .values(saga=outcome, updated_at=now())
            )
            self._event(conn, run_id, None, f"saga_{outcome}", None)
        observability.run_finished(run_id, outcome)
        return outcome

    def record_compensation(
        self,
        run_id: str,
        step_key: str,
        status: str,
        tool: str | None = None,
        detail: str | None = None,
        conn: Connection | None = None,
    ) -> None:
        """A compensation's status. ``completed`` also marks, in the same transaction, the
        step's checkpoint and its effect ``compensated``: undone is a state, not a
        deletion, and neither a retry nor a later run may reuse it."""
        with self.begin(conn) as conn:
            current = conn.execute(
                select(t.compensations.c.status).where(
                    t.compensations.c.run_id == run_id, t.compensations.c.step_key == step_key
                )
            ).scalar()
            COMPENSATION.check(current, status, f"{run_id}/{step_key}")
            values = {"tool": tool, "status": status, "detail": detail, "updated_at": now()}
            insert = self._insert(t.compensations).values(
                run_id=run_id, step_key=step_key, **values
            )
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[t.compensations.c.run_id, t.compensations.c.step_key],
                    set_=values,
                )
            )
            self._event(conn, run_id, step_key, f"compensation_{status}", None)
            if status == CompensationStatus.COMPLETED.value and current != status:
                self._mark_compensated(conn, run_id, step_key)

    def _mark_compensated(self, conn: Connection, run_id: str, step_key: str) -> None:
        key = conn.execute(
            select(t.steps.c.idempotency_key).where(
                t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
            )
        ).scalar()
        changed = conn.execute(
            update(t.steps)
            .where(
                t.steps.c.run_id == run_id,
                t.steps.c.step_key == step_key,
                t.steps.c.status == StepStatus.COMPLETED.value,
            )
            .values(status=StepStatus.COMPENSATED.value)
        ).rowcount
        if not changed:
            current = conn.execute(
                select(t.steps.c.status).where(
                    t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
                )
            ).scalar()
            if current is not None and current != StepStatus.COMPENSATED.value:
                raise IllegalTransition(
                    "step", current, StepStatus.COMPENSATED.value, f"{run_id}/{step_key}"
                )
        if key is not None:
            undone = conn.execute(
                update(t.effects)
                .where(
                    t.effects.c.idempotency_key == key,
                    t.effects.c.status == EffectStatus.DONE.value,
                )
                .values(status=EffectStatus.COMPENSATED.value)
            ).rowcount
            if undone:
                self._event(conn, run_id, step_key, "effect_compensated", {"key": key})

    def compensations(self, run_id: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.compensations).where(t.compensations.c.run_id == run_id)
            ).mappings()
            return {r["step_key"]: dict(r) for r in rows}


__all__ = ["RunsMixin", "refuse"]
