"""Ending a decided approval's task without a worker: from the triggerer
(``task_end_event``) or from the api-server right after the decision (``end_task_now``).

Here, beside the trigger, rather than in ``steps.approval``: the trigger and the
api-server need these, and neither should import the step's operator module."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any


def task_end_xcoms(approval: Any, output: dict[str, Any]) -> dict[str, Any]:
    """The XComs a decided approval's task ends with when no worker resumes it: its
    output, and the scheduler's "followed" list for the branch it takes."""
    from airflow.sdk.bases.skipmixin import XCOM_SKIPMIXIN_FOLLOWED, XCOM_SKIPMIXIN_KEY

    xcoms: dict[str, Any] = {"return_value": output}
    if approval.follow is not None and approval.follow.get("rejected") is not None:
        xcoms[XCOM_SKIPMIXIN_KEY] = {XCOM_SKIPMIXIN_FOLLOWED: approval.follow[approval.status]}
    return xcoms


def task_end_event(ledger: Any, approval: Any, via: str, *, xcoms: bool = True) -> Any:
    """The event that ends a decided approval's task without a worker, after recording
    the outcome in the ledger: success with the step's output and the branch's XComs, or
    failure (whose callbacks the dag-processor runs; the saga is already started)."""
    from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent

    from ledgerflow.ledger import approvals

    if approval.fails_step:
        reason = approvals.fail(ledger, approval.id, via)
        logging.getLogger(__name__).warning("%s: the step fails", reason)
        return TaskFailedEvent()
    output = approvals.complete(ledger, approval.id, via)
    return TaskSuccessEvent(xcoms=task_end_xcoms(approval, output) if xcoms else None)


def end_task_now(ledger: Any, approval: Any) -> bool:
    """From the api-server, right after a decision: record the outcome and end the
    deferred Airflow task as Airflow's own approval route does (the task instance row
    locked, then ``handle_event_submit``), so the next task (or the saga) is scheduled
    without waiting for the triggerer or a worker; its Required Actions entry is closed.
    Returns False (and ends nothing in Airflow) when the task is not deferred; the
    trigger then ends it as usual."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    from ledgerflow.triggers.required_action import close_in_session

    with create_session() as session:
        ti = session.scalars(
            select(TaskInstance)
            .where(
                TaskInstance.dag_id == approval.dag_id,
                TaskInstance.run_id == approval.airflow_run_id,
                TaskInstance.task_id == approval.task_id,
                TaskInstance.map_index == -1,
            )
            .with_for_update()
        ).one_or_none()
        if ti is not None:
            # Airflow's Required Actions entry takes the ledger's decision as its response
            # (after the task instance's lock, Airflow's order): a later response there 409s.
            close_in_session(session, ti.id, approval)
        if not approval.ends_without_worker:
            return False
        if ti is None or ti.state != TaskInstanceState.DEFERRED:
            return False
        # No XComs from here: the trigger of this task may be firing at the same moment
        # (its read of the task instance is not locked) and would insert the same XCom
        # rows; a duplicate key there stops the whole triggerer. The branch not taken is
        # skipped directly instead, as Airflow's own "skip downstream" route does.
        event = task_end_event(ledger, approval, "api", xcoms=False)
        handle_event_submit(event, task_instance=ti, session=session)
        if not approval.fails_step:
            _skip_branch_not_taken(session, ti, approval)
    return True


def _skip_branch_not_taken(session: Any, ti: Any, approval: Any) -> None:
    follow = approval.follow or {}
    if follow.get("rejected") is None:
        return  # no branch declared: everything downstream runs
    downstream = set(follow.get("approved") or []) | set(follow["rejected"])
    skip_tasks(session, ti, downstream - set(follow.get(approval.status) or []))


def skip_tasks(session: Any, ti: Any, skip: set[str]) -> None:
    """Mark ``skip`` (tasks of ``ti``'s run not running or done) skipped, as Airflow's
    own "skip downstream" route does (also used by ``triggers.event``)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import or_, update

    if not skip:
        return
    now = datetime.now(timezone.utc)
    session.execute(
        update(TaskInstance)
        .where(
            TaskInstance.dag_id == ti.dag_id,
            TaskInstance.run_id == ti.run_id,
            TaskInstance.task_id.in_(sorted(skip)),
            # Never overwrite a task that is running or done.
            or_(
                TaskInstance.state.is_(None),
                TaskInstance.state.not_in(
                    [
                        TaskInstanceState.RUNNING,
                        TaskInstanceState.SUCCESS,
                        TaskInstanceState.FAILED,
                    ]
                ),
            ),
        )
        .values(state=TaskInstanceState.SKIPPED, start_date=now, end_date=now)
        .execution_options(synchronize_session=False)
    )
