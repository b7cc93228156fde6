"""The approval step: write the request to the ledger, then wait in the triggerer.

``execute`` records the request once per (run, step) — a retried or cleared task finds
the same request and the same decision — and defers to ``ApprovalTrigger``, so a run
that waits three days for a manager holds no worker slot. ``resume`` reads the decision
from the ledger (never from the trigger's event alone) and completes the step's
checkpoint once: approve -> the main path; reject -> the ``on_reject`` branch, or a
failed run (which compensates) when there is none; a deadline -> its declared outcome.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.skipmixin import SkipMixin

from ledgerflow.spec.models import ApprovalStep, WorkflowSpec
from ledgerflow.steps.kernel import Rendered, StepKind, prologue
from ledgerflow.steps.operator import LedgerflowOperator

# Safety-net poll of a parked approval: NOTIFY wakes it at once on Postgres; SQLite
# has no NOTIFY, so there the poll is how a decision is seen.
POLL_POSTGRES_S = 30.0
POLL_SQLITE_S = 2.0


class ApprovalKind(StepKind):
    """An approval renders what the approver will see; its work is the wait itself,
    parked in the triggerer (``ApprovalOperator``), and its commit is the decision
    (``ledger.approvals.complete``), so it uses the kernel's prologue only."""

    def __init__(self, step: ApprovalStep) -> None:
        self.step = step

    def render(self, context: dict[str, Any]) -> Rendered:
        from ledgerflow.spec.templates import render_value

        shown = {
            "subject": str(render_value(self.step.subject, context)),
            "body": str(render_value(self.step.body, context)),
            "payload": render_value(self.step.payload, context),
        }
        # The inputs of the step are what the approver is shown: a retry reuses a
        # decision only on the same subject, body and payload.
        return Rendered(args=shown, extra=shown)


@dataclass
class Asked:
    """What asking for a decision found: the decision taken earlier (``reused``: this run
    or its retry chain, with the same inputs), a skip (``when`` false), or the request,
    pending or decided (``approval``)."""

    reused: dict[str, Any] | None = None
    skipped: bool = False
    approval: Any = None


def ask(
    ledger: Any,
    spec: WorkflowSpec,
    step: ApprovalStep,
    run: Any,
    *,
    params: dict[str, Any],
    try_number: int = 1,
    task_id: str | None = None,
    follow: dict[str, list[str] | None] | None = None,
) -> Asked:
    """The approval step's part of a task, under the kernel's prologue: registration,
    reuse (this run, then the retry chain: a decision taken there on the same subject,
    body and payload is not asked for again), ``when``, rendering; then the request,
    once per (run, step), its attempt, and its notice. A render error is the final
    failure (approvals are not retried) with a dead letter, and is raised.

    Every point may crash (the named fault points): the next try finds the same request
    and sends the notice if it was not sent (at least once, never lost)."""
    from ledgerflow import faults
    from ledgerflow.ledger import approvals
    from ledgerflow.ledger.store import now
    from ledgerflow.steps.kernel import Attempt, record_failure

    kind = ApprovalKind(step)
    with ledger.begin() as conn:
        found = prologue(ledger, spec, step, run, kind, conn, params=params)
    if found.reused is not None:
        return Asked(reused=dict(found.reused.output or {}))
    if found.skipped:
        return Asked(skipped=True)
    if found.error is not None or found.rendered is None:
        error = found.error or RuntimeError("approval step rendered nothing")
        attempt = Attempt(
            ledger, spec, step, run, found.key, -1, try_number, Rendered({}), {}, True
        )
        attempt.attempt_id = ledger.begin_attempt(
            run_id=run.run_id,
            step_key=step.id,
            step_id=step.id,
            map_index=-1,
            try_number=try_number,
            args={},
            idempotency_key=None,
            first=found.checkpoint is None,
        )
        record_failure(attempt, error, final=True)
        raise error
    shown = found.rendered.extra
    faults.hit("before_effect", found.key)
    approval, _ = approvals.request(
        ledger,
        run_id=run.run_id,
        step_key=step.id,
        dag_id=run.dag_id,
        task_id=task_id or step.id,
        workflow=spec.name,
        version=spec.version,
        subject=str(shown["subject"]),
        body=str(shown["body"]),
        payload=shown["payload"],
        approvers={"users": list(step.approvers.users), "roles": list(step.approvers.roles)},
        deadline=now() + timedelta(seconds=step.deadline.total_seconds()),
        at_deadline=approvals.deadline_chain(step.at_deadline),
        follow=follow,
    )
    faults.hit("after_effect", found.key)
    ledger.begin_attempt(
        run_id=run.run_id,
        step_key=step.id,
        step_id=step.id,
        map_index=-1,
        try_number=try_number,
        args=found.rendered.args,
        idempotency_key=f"approval:{approval.id}",
        first=found.checkpoint is None,
    )
    faults.hit("before_commit", found.key)
    approvals.notify_once(ledger, approval)
    faults.hit("after_commit", found.key)
    return Asked(approval=approval)


def build_task(spec: WorkflowSpec, step: ApprovalStep, trigger_rule: str) -> BaseOperator:
    from ledgerflow.steps.saga import step_failed

    return ApprovalOperator(
        task_id=step.id,
        step_id=step.id,
        trigger_rule=trigger_rule,
        # Not retried by Airflow: a decision is final, and the decision ends the task
        # itself (a retry would ask the same request again). Clear the task, or retry
        # the run, to go through it once more: the same request is found.
        retries=0,
        # The deadline lives in the trigger: an execution timeout would cut a wait of days.
        execution_timeout=None,
        doc_md=step.description or f"Approval: {step.subject}",
        on_failure_callback=step_failed,
    )


class ApprovalOperator(LedgerflowOperator, SkipMixin):
    """Asks for a decision and waits for it without holding a worker slot."""

    ui_color = "#fff4d6"
    template_fields = ()
    inherits_from_skipmixin = True

    def _step(self) -> tuple[WorkflowSpec, ApprovalStep]:
        from ledgerflow.spec.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        assert isinstance(step, ApprovalStep)
        return spec, step

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_params, run_ref
        from ledgerflow.triggers.approval import ApprovalTrigger

        spec, step = self._step()
        ledger = Ledger.from_airflow()
        ledger.migrate()
        asked = ask(
            ledger,
            spec,
            step,
            run_ref(context),
            params=run_params(spec, context),
            try_number=context["ti"].try_number,
            task_id=self.task_id,
            follow=self._follow_lists(step),
        )
        if asked.reused is not None:
            # Decided earlier (a cleared or retried task): the same decision, no new request.
            return self._follow(context, step, asked.reused)
        if asked.skipped:
            raise AirflowSkipException(f"`when: {step.when}` is false")
        approval = asked.approval
        if not approval.pending:
            return self._complete(context, ledger, approval)
        self.log.info(
            "waiting for approval %s (%s) until %s; decide at /ledgerflow/approvals/%s",
            approval.id,
            approval.subject,
            approval.deadline.isoformat(),
            approval.id,
        )
        poll = POLL_POSTGRES_S if ledger.dialect == "postgresql" else POLL_SQLITE_S
        self.defer(
            trigger=ApprovalTrigger(
                approval_id=approval.id, ledger_url=ledger.url, poll_interval=poll
            ),
            method_name="resume",
        )

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from the triggerer: the decision is in the ledger."""
        from ledgerflow.ledger import approvals
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_ref

        ledger = Ledger.from_airflow()
        run = run_ref(context)
        checkpoint = ledger.checkpoint(run.run_id, self.step_id)
        if checkpoint is not None and checkpoint.status == "completed":
            # Resumed a second time (a trigger that fired twice): nothing new to record.
            return self._follow(context, self._step()[1], checkpoint.output)
        approval = approvals.for_step(ledger, run.run_id, self.step_id)
        if approval is None or approval.pending:
            # Never expected: the trigger fires only on a stored decision.
            raise RuntimeError(f"approval of {run.run_id}/{self.step_id} is not decided: {event}")
        ledger.record_event(run.run_id, self.step_id, "approval_resumed", {"event": event})
        return self._complete(context, ledger, approval)

    def _follow_lists(self, step: ApprovalStep) -> dict[str, list[str] | None]:
        """What runs after each decision, stored with the request so that the decision
        can end this task without a worker (see ``end_task_now``)."""
        from ledgerflow.steps.branching import followed

        everyone = [t.task_id for t in self.get_direct_relatives(upstream=False)]
        if step.on_reject is None:
            return {"approved": everyone, "rejected": None}
        return {
            "approved": followed(self, fallback=step.on_reject, take_fallback=False),
            "rejected": followed(self, fallback=step.on_reject, take_fallback=True),
        }

    def _complete(self, context: Any, ledger: Any, approval: Any) -> Any:
        """On a worker (the decision came before the task deferred, or a request of an
        older release): the same outcomes as ``task_end_event``."""
        from airflow.sdk.exceptions import AirflowFailException

        from ledgerflow.ledger import approvals

        step = self._step()[1]
        if approval.fails_step or (approval.status == "rejected" and step.on_reject is None):
            raise AirflowFailException(approvals.fail(ledger, approval.id, "worker"))
        return self._follow(context, step, approvals.complete(ledger, approval.id, "worker"))

    def _follow(self, context: Any, step: ApprovalStep, output: dict[str, Any]) -> Any:
        from ledgerflow.steps.branching import follow

        self.log.info(
            "decision: %s by %s (%s)", output["decision"], output["approver"], output["comment"]
        )
        follow(
            self,
            context,
            fallback=step.on_reject,
            take_fallback=output["decision"] == "rejected",
        )
        return output


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
    without waiting for the triggerer or a worker. Returns False (and changes nothing in
    Airflow) when the task is not deferred; the trigger then ends it as usual."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.trigger import handle_event_submit
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import select

    if not approval.ends_without_worker:
        return False
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
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.state import TaskInstanceState
    from sqlalchemy import or_, update

    follow = approval.follow or {}
    if follow.get("rejected") is None:
        return  # no branch declared: everything downstream runs
    downstream = set(follow.get("approved") or []) | set(follow["rejected"])
    skip = downstream - set(follow.get(approval.status) or [])
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
