"""Runs and their saga in the ledger: registration, end, reopening (an Airflow clear),
the saga's start and outcome, and the compensation records."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from ledgerflow import observability
from ledgerflow.errors import IllegalTransition
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._base import LedgerBase, refuse
from ledgerflow.ledger._engine import dumps, now
from ledgerflow.lifecycle import (
    COMPENSATION,
    RUN,
    SAGA,
    CompensationStatus,
    EffectStatus,
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
        """The run's end as Airflow reports it (``succeeded`` or ``failed``). Airflow is the
        truth about a run's state: a run that ended one way and now ends the other (a task
        was cleared and ran again) is reopened first, so the change is recorded, not
        overwritten. The same end reported twice is a no-op."""
        if status not in _ENDS:
            raise IllegalTransition(RUN.name, None, status, run_id)
        with self.begin(conn) as conn:
            changed = conn.execute(_end_run(status), {"b_run": run_id, "stamp": now()}).rowcount
            if not changed:
                current = self._run_status(conn, run_id)
                if current is None:
                    return  # never registered: no task of it ran
                if current == RunStatus.CANCELLED.value:
                    # Terminal: Airflow's end of a cancelled run (after its saga, or a
                    # task that ended as it was cancelled) is recorded, not applied.
                    self._event(conn, run_id, None, "airflow_run_ended", {"state": status})
                    return
                if current != status:  # the other end: Airflow ran it again meanwhile
                    self.reopen_run(run_id, conn=conn)
                    changed = conn.execute(
                        _end_run(status), {"b_run": run_id, "stamp": now()}
                    ).rowcount
                    if not changed:
                        refuse(RUN, self._run_status(conn, run_id), status, run_id)
            if changed:
                self._event(conn, run_id, None, f"run_{status}", None)
        observability.run_finished(run_id, status)

    def reopen_run(self, run_id: str, conn: Connection | None = None) -> bool:
        """An ended run runs again (a task cleared in Airflow): ``running``, and its saga
        is reset so that a new failure starts a new one (the old outcome is in the
        ``run_reopened`` event). True when this call reopened it; a running run (or one
        not registered) is left as it is."""
        with self.begin(conn) as conn:
            row = conn.execute(
                select(t.runs.c.status, t.runs.c.saga).where(t.runs.c.run_id == run_id)
            ).first()
            if row is None or row.status == RunStatus.RUNNING.value:
                return False
            RUN.check(row.status, RunStatus.RUNNING.value, run_id)
            changed = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.status == row.status)
                .values(status=RunStatus.RUNNING.value, saga=None, updated_at=now())
            ).rowcount
            if not changed:
                return False  # a concurrent writer reopened (or ended) it first
            self._event(
                conn, run_id, None, "run_reopened", {"status": row.status, "saga": row.saga}
            )
        return True

    def live_run(self, conn: Connection, run_id: str) -> None:
        """Raise ``RunCancelled`` if the run was cancelled; else hold its row (``FOR
        SHARE`` on Postgres) until ``conn`` commits, so a cancel waits for this
        transaction (a forward step's commit) or this transaction sees the cancel."""
        from ledgerflow.errors import RunCancelled

        query = select(t.runs.c.status, t.runs.c.cancelled_by, t.runs.c.cancel_reason).where(
            t.runs.c.run_id == run_id
        )
        if self.dialect == "postgresql":
            query = query.with_for_update(read=True)
        row = conn.execute(query).first()
        if row is not None and row.status == RunStatus.CANCELLED.value:
            raise RunCancelled(cancelled_message(run_id, row.cancelled_by, row.cancel_reason))

    def _run_status(self, conn: Connection, run_id: str) -> str | None:
        return conn.execute(  # type: ignore[no-any-return]
            select(t.runs.c.status).where(t.runs.c.run_id == run_id)
        ).scalar()

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

    def start_saga(
        self, run_id: str, failed_step: str | None, conn: Connection | None = None
    ) -> bool:
        """Mark the run's saga ``compensating`` (once); True when this call did it.

        A failure reported to a run whose saga has started joins it (a no-op). The saga
        of an ended one is not restarted here: only ``reopen_run`` (a cleared task) gives
        the run a new saga, so a late report cannot leave an ended saga compensating with
        nothing left to finish it. A run cancelled without ``--compensate`` gets no saga
        (a task failing as it is stopped reports a failure too)."""
        from sqlalchemy import or_

        with self.begin(conn) as conn:
            changed = conn.execute(
                update(t.runs)
                .where(
                    t.runs.c.run_id == run_id,
                    t.runs.c.saga.is_(None),
                    or_(
                        t.runs.c.status != RunStatus.CANCELLED.value,
                        t.runs.c.cancel_compensate.is_(True),
                    ),
                )
                .values(
                    saga=SagaStatus.COMPENSATING.value, failed_step=failed_step, updated_at=now()
                )
            ).rowcount
            if changed:
                self._event(conn, run_id, failed_step, "saga_compensating", None)
            else:
                row = conn.execute(
                    select(t.runs.c.saga, t.runs.c.status).where(t.runs.c.run_id == run_id)
                ).first()
                if row is not None and not (
                    row.status == RunStatus.CANCELLED.value and row.saga is None
                ):  # not registered: it failed before any step ran
                    SAGA.check(row.saga, SagaStatus.COMPENSATING.value, run_id)
        return bool(changed)

    def finish_saga(self, run_id: str, conn: Connection | None = None) -> str | None:
        """The saga's outcome from the compensation records: ``compensation_failed`` if
        one failed, ``compensated`` if something was undone (a compensation
        ``completed``), else ``nothing_to_compensate`` (the run failed with nothing to
        undo). An ended saga keeps its outcome (finishing twice is a no-op); ``None``:
        the run has no saga."""
        with self.begin(conn) as conn:
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
            changed = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.saga == saga)
                .values(saga=outcome, updated_at=now())
            ).rowcount
            if not changed:  # a concurrent finish_saga decided first: its outcome stands
                return conn.execute(  # type: ignore[no-any-return]
                    select(t.runs.c.saga).where(t.runs.c.run_id == run_id)
                ).scalar()
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
        subject = f"{run_id}/{step_key}"
        with self.begin(conn) as conn:
            current = conn.execute(
                select(t.compensations.c.status).where(
                    t.compensations.c.run_id == run_id, t.compensations.c.step_key == step_key
                )
            ).scalar()
            COMPENSATION.check(current, status, subject)
            values = {"tool": tool, "status": status, "detail": detail, "updated_at": now()}
            insert = self._insert(t.compensations).values(
                run_id=run_id, step_key=step_key, **values
            )
            written = conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[t.compensations.c.run_id, t.compensations.c.step_key],
                    set_=values,
                    # Guarded: a concurrent writer may have moved it since the read.
                    where=t.compensations.c.status.in_(COMPENSATION.sources(status)),
                )
            ).rowcount
            if not written:
                refuse(
                    COMPENSATION, self._compensation_status(conn, run_id, step_key), status, subject
                )
                return
            self._event(conn, run_id, step_key, f"compensation_{status}", None)
            if status == CompensationStatus.COMPLETED.value and current != status:
                self._mark_compensated(conn, run_id, step_key)

    def _compensation_status(self, conn: Connection, run_id: str, step_key: str) -> str | None:
        return conn.execute(  # type: ignore[no-any-return]
            select(t.compensations.c.status).where(
                t.compensations.c.run_id == run_id, t.compensations.c.step_key == step_key
            )
        ).scalar()

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


def cancelled_message(run_id: str, by: str | None, reason: str | None) -> str:
    return f"run {run_id} was cancelled by {by or 'someone'}: {reason or '(no reason)'}"


_ENDS = frozenset({RunStatus.SUCCEEDED.value, RunStatus.FAILED.value})


def _end_run(status: str) -> Any:
    """The guarded UPDATE that ends a run: only from a status that may move to ``status``
    (a repeat of the same end changes nothing)."""
    sources = [s for s in RUN.sources(status) if s != status]
    return (
        update(t.runs)
        .where(t.runs.c.run_id == bindparam("b_run"), t.runs.c.status.in_(sources))
        .values(status=status, updated_at=bindparam("stamp"))
    )


__all__ = ["RunsMixin", "cancelled_message"]
