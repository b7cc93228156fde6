"""What a step knows about its run: which run it is, its retry chain (from the ledger),
its registration, and the context its templates see."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import RunStatus, StepStatus
from ledgerflow.spec.models import WorkflowSpec


@dataclass(frozen=True)
class RunRef:
    """Which run a step belongs to.

    ``retry_of``/``retry_from`` are used only when this call registers the run (a caller
    in Python, such as a test or a benchmark, that starts a retry run by hand); once the
    run is in the ledger, its row decides. The Airflow adapter never fills them from a
    DagRun's conf: a retry chain is established by the ledger alone."""

    run_id: str
    dag_id: str
    trigger_kind: str = "manual"
    logical_date: str | None = None
    retry_of: str | None = None
    # A retry run re-runs this step and everything downstream of it (``--from``).
    retry_from: str | None = None


def step_key(step_id: str, map_index: int) -> str:
    return step_id if map_index < 0 else f"{step_id}[{map_index}]"


def template_context(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: RunRef,
    params: dict[str, Any],
    item: Any,
    map_index: int,
    *,
    step_ids: Iterable[str] | None = None,
    conn: Connection | None = None,
    outputs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    local_date = None
    if run.logical_date:
        import pendulum

        local_date = pendulum.parse(run.logical_date).in_tz(spec.timezone)  # type: ignore[union-attr]
    context: dict[str, Any] = {
        "params": params,
        "steps": outputs
        if outputs is not None
        else ledger.outputs(run.run_id, step_ids, conn=conn),
        "run": {
            "id": run.run_id,
            "workflow": spec.name,
            "version": spec.version,
            # In the workflow's time zone: a 02:30 Amsterdam run is that day's run.
            "logical_date": local_date.isoformat() if local_date else None,
            "date": local_date.date().isoformat() if local_date else None,
        },
    }
    if map_index >= 0:
        context["item"] = item
        context["index"] = map_index
    return context


def register_run(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: RunRef,
    params: dict[str, Any],
    conn: Connection | None = None,
) -> bool:
    """Record the run in the ledger once (whichever task gets there first).

    Raises InvalidParams (non-retryable, naming each field) when the params do not fit
    the workflow's params schema, whichever way the run was triggered."""
    from ledgerflow.spec.notify import routes
    from ledgerflow.spec.params import check_params
    from ledgerflow.workflow.loaded import spec_hash

    check_params(spec.name, spec.version, spec.params, params, engine_keys=True)
    targets = routes(spec)
    if targets is not None:  # whom the run's events notify (ledger.outbox)
        from ledgerflow.ledger import outbox

        with ledger.begin(conn) as c:
            outbox.save_routes(ledger, run.run_id, targets, c)
    return ledger.ensure_run(
        run_id=run.run_id,
        dag_id=run.dag_id,
        workflow=spec.name,
        version=spec.version,
        params=params,
        trigger_kind=run.trigger_kind,
        retry_of=run.retry_of,
        retry_from=run.retry_from,
        spec_hash=spec_hash(run.dag_id),
        conn=conn,
    )


@dataclass(frozen=True)
class Chain:
    """Where a run sits in its retry chain, as the ledger says."""

    retry_of: str | None
    retry_from: str | None
    # A saga has run in this run (it failed, and a task of it was cleared since): its
    # completed steps may have been undone.
    had_saga: bool = False


def join_run(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: RunRef,
    params: dict[str, Any],
    conn: Connection,
    *,
    row: Any,
    forward: bool = True,
) -> Chain:
    """Register the run if it is new; reopen it if it had ended (a task cleared in
    Airflow runs again), unless it was cancelled (``RunCancelled``). Returns the run's retry chain from its ledger row (``row``:
    as ``Ledger.run_and_steps`` read it in this transaction, ``None`` when there is
    none)."""
    if row is None:
        register_run(ledger, spec, run, params, conn)
        return Chain(run.retry_of, run.retry_from)
    if forward and row.status == RunStatus.CANCELLED.value:
        ledger.live_run(conn, run.run_id)  # raises RunCancelled: a cancel is for good
    if forward and row.status != RunStatus.RUNNING.value:
        ledger.reopen_run(run.run_id, conn=conn)
    return Chain(row.retry_of, row.retry_from, had_saga=row.saga is not None)


def undone_upstream(spec: WorkflowSpec, run_id: str, step_id: str, conn: Connection) -> list[str]:
    """The steps this one depends on (transitively) that the run's saga undid."""
    wanted: set[str] = set()
    todo = list(spec.step(step_id).needs)
    while todo:
        need = todo.pop()
        if need not in wanted:
            wanted.add(need)
            todo.extend(spec.step(need).needs)
    if not wanted:
        return []
    rows = conn.execute(
        select(t.steps.c.step_id).where(
            t.steps.c.run_id == run_id,
            t.steps.c.step_id.in_(sorted(wanted)),
            t.steps.c.status == StepStatus.COMPENSATED.value,
        )
    )
    return sorted({r[0] for r in rows})
