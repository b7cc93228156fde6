"""Cancel a run: ``ledgerflow cancel``, ``POST /ledgerflow/api/runs/{run}/cancel`` and
the run page's Cancel button all call :func:`cancel`.

Two steps, the ledger first:

1. The ledger (``ledger.cancels.cancel_run``, one transaction): the run ends
   ``cancelled`` with who, when and why; its running attempts become ``lost`` and their
   steps ``failed``; every open wait of the run is withdrawn through the registry below
   (approvals become ``withdrawn``); with ``compensate`` its saga starts. From then on a
   forward step of the run neither starts nor commits (``RunCancelled``).
2. Airflow (:func:`stop_in_airflow`, in the metadata database, as Airflow's own "mark
   run as failed" does): running, deferred and awaiting-input task instances become
   ``failed`` (the supervisor kills the process at its next heartbeat; a deferred task's
   trigger leaves the triggerer), or ``success`` when their step(s) completed in the
   ledger before the cancel (a step that won the race keeps its result on both sides).
   Tasks not started become ``skipped``. Without ``compensate`` the compensation tasks
   are skipped too and the DagRun ends ``failed`` at once. With ``compensate`` they are
   left to run: Airflow starts them (teardowns) once nothing else runs, they undo the
   completed steps in reverse order under the saga started in step 1, and
   ``saga__finish`` records its outcome; tasks not started are marked
   ``upstream_failed`` so the DagRun then ends ``failed`` (Airflow has no "cancelled").
   The waits' Airflow sides are closed (an approval's Required Actions entry).

Both steps are idempotent: cancelling a cancelled run changes nothing in the ledger and
runs step 2 again (it finishes a cancel whose Airflow step was interrupted).

**Open waits of other kinds** plug in with :func:`register_wait_kind`: ``withdraw``
runs in the ledger transaction of step 1 (``withdraw(ledger, conn, run_id, by=...,
reason=...)``, returning one dict per wait withdrawn, with at least ``kind`` and
``id``); ``close_in_airflow(session, cancel, withdrawn)`` (optional) in the Airflow
session of step 2. A task parked in the triggerer needs nothing more: its task
instance becomes ``failed`` and Airflow removes its trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ledgerflow.ledger.cancels import RunCancel, Withdraw, cancel_run, withdraw_approvals
from ledgerflow.ledger.store import Ledger

# ``close_in_airflow(session, cancel, withdrawn)``: ``withdrawn`` are this kind's dicts.
CloseInAirflow = Callable[[Any, RunCancel, list[dict[str, Any]]], None]


@dataclass(frozen=True)
class WaitKind:
    """One kind of open wait a cancel withdraws (``approval``, ``wait``, ``event``...)."""

    kind: str
    withdraw: Withdraw
    close_in_airflow: CloseInAirflow | None = None
    # The withdrawn waits of a run cancelled earlier (a repeated cancel closes their
    # Airflow side again); None: nothing to close again.
    withdrawn_of: Callable[[Ledger, str], list[dict[str, Any]]] | None = None


_KINDS: dict[str, WaitKind] = {}


def register_wait_kind(
    kind: str,
    withdraw: Withdraw,
    close_in_airflow: CloseInAirflow | None = None,
    withdrawn_of: Callable[[Ledger, str], list[dict[str, Any]]] | None = None,
) -> None:
    """Register (or replace) how a cancel withdraws the open waits of ``kind``."""
    _KINDS[kind] = WaitKind(kind, withdraw, close_in_airflow, withdrawn_of)


def wait_kinds() -> list[WaitKind]:
    return list(_KINDS.values())


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did: the ledger's record and what changed in Airflow."""

    ledger: RunCancel
    # task id (``task[i]`` for a mapped one) -> the state it was given
    airflow: dict[str, str] = field(default_factory=dict)
    dag_run_state: str | None = None  # the DagRun's state after the cancel, if known

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.ledger.as_dict(),
            "airflow": {"tasks": self.airflow, "dag_run_state": self.dag_run_state},
        }


def cancel(
    ledger: Ledger,
    run_id: str,
    *,
    by: str,
    reason: str,
    compensate: bool = False,
    airflow: bool = True,
) -> Cancelled:
    """Cancel ``run_id`` (the ledger's id, ``<dag_id>/<airflow run id>``).

    Raises ``CancelRefused`` for an unknown run (404) or one that ended (409).
    ``airflow=False``: the ledger only (a process without Airflow's metadata database;
    the run's tasks then stop at their next step boundary)."""
    reason = reason.strip()
    if not reason:
        raise ValueError("a cancel needs a reason (--reason)")
    if airflow and ledger.run(run_id) is None:
        register_unstarted(ledger, run_id)
    record = cancel_run(
        ledger,
        run_id,
        by=by,
        reason=reason,
        compensate=compensate,
        withdrawers=[k.withdraw for k in wait_kinds()],
    )
    if record.compensate and record.saga == "compensating" and not record.already:
        _finish_saga_without_tasks(ledger, record)
    if not airflow:
        return Cancelled(record)
    changed, state = stop_in_airflow(ledger, record)
    return Cancelled(record, changed, state)


def register_unstarted(ledger: Ledger, run_id: str) -> None:
    """A DagRun none of whose tasks has started yet (queued, or its first task waiting for
    a slot) is not in the ledger: it is registered from Airflow's DagRun (its workflow and
    version from the DAG id, its params from the conf), so that it can be cancelled and
    its first task, if it ever starts, finds the run cancelled. Nothing is registered for
    an unknown or ended DagRun (the cancel then answers 404 as before)."""
    import re

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    dag_id, _, dag_run_id = run_id.partition("/")
    named = re.fullmatch(r"(?P<workflow>[a-z][a-z0-9_-]*)__v(?P<version>[0-9]+)", dag_id)
    if not dag_run_id or named is None:
        return
    with create_session() as session:
        found = session.execute(
            select(DagRun.state, DagRun.conf, DagRun.run_type).where(
                DagRun.dag_id == dag_id, DagRun.run_id == dag_run_id
            )
        ).first()
    if found is None or found.state not in (DagRunState.QUEUED, DagRunState.RUNNING):
        return
    kind = str(getattr(found.run_type, "value", found.run_type) or "manual")
    ledger.ensure_run(
        run_id=run_id,
        dag_id=dag_id,
        workflow=named["workflow"],
        version=int(named["version"]),
        params=dict(found.conf or {}),
        trigger_kind=kind,
    )


def _finish_saga_without_tasks(ledger: Ledger, record: RunCancel) -> None:
    """A workflow with nothing to undo has no compensation tasks to finish its saga."""
    from ledgerflow.steps.saga import has_compensations

    spec = _spec(ledger, record.run_id)
    if spec is not None and not has_compensations(spec):
        ledger.finish_saga(record.run_id)


def _spec(ledger: Ledger, run_id: str) -> Any:
    from ledgerflow.settings import workflow_file
    from ledgerflow.workflow.validate import load_workflow

    run = ledger.run(run_id)
    if run is None:
        return None
    try:
        return load_workflow(workflow_file(run["workflow"], run["version"]))
    except Exception:
        return None


TEARDOWN_PREFIX = "compensate__"
SAGA_FINISH = "saga__finish"


def stop_in_airflow(ledger: Ledger, record: RunCancel) -> tuple[dict[str, str], str | None]:
    """Step 2 (see the module's doc): the DagRun's unfinished task instances in a terminal
    state, in one metadata transaction with the DagRun's row locked. Returns the states
    given (by task) and the DagRun's state; ``({}, None)`` when Airflow does not know
    the run, and ``({}, <state>)`` when its DagRun has ended already."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, State, TaskInstanceState
    from sqlalchemy import select

    from ledgerflow.steps.run import step_key
    from ledgerflow.workflow.segments import steps_of

    running = {
        TaskInstanceState.RUNNING,
        TaskInstanceState.DEFERRED,
        TaskInstanceState.UP_FOR_RESCHEDULE,
        TaskInstanceState.AWAITING_INPUT,
    }
    spec = _spec(ledger, record.run_id)
    changed: dict[str, str] = {}
    with create_session() as session:
        dag_run = session.scalar(
            select(DagRun)
            .where(DagRun.dag_id == record.dag_id, DagRun.run_id == record.dag_run_id)
            .with_for_update()
        )
        if dag_run is None:
            return {}, None
        if dag_run.state not in (DagRunState.RUNNING, DagRunState.QUEUED):
            _close_waits(session, ledger, record)
            return {}, str(getattr(dag_run.state, "value", dag_run.state))
        tis = session.scalars(
            select(TaskInstance)
            .where(TaskInstance.dag_id == record.dag_id, TaskInstance.run_id == record.dag_run_id)
            .with_for_update()
        ).all()
        # Read after the ledger's cancel committed: a step completed before it is here.
        completed = {
            cp.step_key for cp in ledger.checkpoints(record.run_id) if cp.status == "completed"
        }
        for ti in tis:
            if ti.state in State.finished:
                continue
            teardown = ti.task_id.startswith(TEARDOWN_PREFIX) or ti.task_id == SAGA_FINISH
            if teardown:
                if record.compensate:
                    continue  # the saga's tasks run once nothing else does
                new = TaskInstanceState.SKIPPED
            elif ti.state in running:
                steps = steps_of(spec, ti.task_id) if spec is not None else (ti.task_id,)
                keys = {step_key(s, ti.map_index if len(steps) == 1 else -1) for s in steps}
                done = keys <= completed
                new = TaskInstanceState.SUCCESS if done else TaskInstanceState.FAILED
            elif record.compensate:
                new = TaskInstanceState.UPSTREAM_FAILED
            else:
                new = TaskInstanceState.SKIPPED
            ti.set_state(new, session=session)
            name = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
            changed[name] = new.value
        note = f"cancelled by {record.by}: {record.reason}"
        dag_run.note = note[:1000]  # type: ignore[method-assign,assignment]
        if not record.compensate:
            dag_run.set_state(DagRunState.FAILED)
        _close_waits(session, ledger, record)
        session.flush()
        state = str(getattr(dag_run.state, "value", dag_run.state))
    return changed, state


def _close_waits(session: Any, ledger: Ledger, record: RunCancel) -> None:
    for kind in wait_kinds():
        if kind.close_in_airflow is None:
            continue
        if record.already:
            mine = kind.withdrawn_of(ledger, record.run_id) if kind.withdrawn_of else []
        else:
            mine = [w for w in record.withdrawn if w.get("kind") == kind.kind]
        if mine:
            kind.close_in_airflow(session, record, mine)


# -- approvals: the built-in kind --------------------------------------------------------


def _withdrawn_approvals(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from ledgerflow.ledger import schema as t

    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(t.approvals.c.id, t.approvals.c.step_key).where(
                t.approvals.c.run_id == run_id, t.approvals.c.status == "withdrawn"
            )
        ).all()
    return [{"kind": "approval", "id": r.id, "step": r.step_key} for r in rows]


def _close_approvals(session: Any, record: RunCancel, withdrawn: list[dict[str, Any]]) -> None:
    """Each withdrawn approval's Required Actions entry answered in Airflow's name of the
    canceller, no option chosen: Airflow stops listing it and refuses a response (409)."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy import select

    for wait in withdrawn:
        ti_id = session.scalar(
            select(TaskInstance.id).where(
                TaskInstance.dag_id == record.dag_id,
                TaskInstance.run_id == record.dag_run_id,
                TaskInstance.task_id == wait["step"],
                TaskInstance.map_index == -1,
            )
        )
        if ti_id is None:
            continue
        detail = session.scalar(
            select(HITLDetail).where(HITLDetail.ti_id == ti_id).with_for_update(of=HITLDetail)
        )
        if detail is None or detail.responded_at is not None:
            continue
        detail.responded_by = {"id": record.by, "name": record.by}
        detail.responded_at = record.at
        detail.chosen_options = []
        detail.params_input = {"comment": f"withdrawn: run cancelled: {record.reason}"}
        session.add(detail)


register_wait_kind("approval", withdraw_approvals, _close_approvals, _withdrawn_approvals)


def _withdraw_event_waits(
    ledger: Ledger, conn: Any, run_id: str, *, by: str, reason: str
) -> list[dict[str, Any]]:
    from ledgerflow.ledger import event_waits

    return event_waits.withdraw_waits(ledger, run_id, by=by, reason=reason, conn=conn)


def _withdraw_timers(
    ledger: Ledger, conn: Any, run_id: str, *, by: str, reason: str
) -> list[dict[str, Any]]:
    from ledgerflow.ledger import timers

    return timers.withdraw(ledger, conn, run_id, by=by, reason=reason)


# An event wait's and a timer's task are parked in the triggerer: marking it failed
# removes its trigger, so neither needs a close_in_airflow.
register_wait_kind("event", _withdraw_event_waits)
register_wait_kind("wait", _withdraw_timers)


__all__ = [
    "Cancelled",
    "CloseInAirflow",
    "WaitKind",
    "cancel",
    "register_unstarted",
    "register_wait_kind",
    "stop_in_airflow",
    "wait_kinds",
]
