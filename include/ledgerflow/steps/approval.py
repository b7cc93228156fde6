"""The approval step: write the request to the ledger, then wait in the triggerer.

``execute`` records the request once per (run, step) — a retried or cleared task finds
the same request and the same decision — and defers to ``ApprovalTrigger``, so a run
that waits three days for a manager holds no worker slot. ``resume`` reads the decision
from the ledger (never from the trigger's event alone) and completes the step's
checkpoint once: approve -> the main path; reject -> the ``on_reject`` branch, or a
failed run (which compensates) when there is none; a deadline -> its declared outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.skipmixin import SkipMixin

from ledgerflow.links import approval_page  # the approval's page as a full link
from ledgerflow.spec.models import ApprovalStep, WorkflowSpec
from ledgerflow.steps.kernel import Rendered, StepKind, prologue
from ledgerflow.steps.operator import LedgerflowOperator

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.triggers.approval import ApprovalTrigger

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
    from ledgerflow.ledger import approval_notices, approvals, escalation
    from ledgerflow.ledger.store import now
    from ledgerflow.steps.kernel import parked_step_unrendered

    kind = ApprovalKind(step)
    with ledger.begin() as conn:
        found = prologue(ledger, spec, step, run, kind, conn, params=params)
    if found.reused is not None:
        return Asked(reused=dict(found.reused.output or {}))
    if found.skipped:
        return Asked(skipped=True)
    if found.error is not None or found.rendered is None:
        raise parked_step_unrendered(ledger, spec, step, run, found, try_number)
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
        at_deadline=escalation.deadline_chain(step.at_deadline),
        follow=follow,
        required=step.required,
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
    approval_notices.notify_once(ledger, approval)
    faults.hit("after_commit", found.key)
    return Asked(approval=approval)


def approval_trigger(
    ledger: Ledger, approval_id: int, poll_interval: float, ti_id: str | None = None
) -> ApprovalTrigger:
    """The trigger a parked approval waits on: it names the ledger's connection (None for
    the embedded SQLite file), never the URL, which would put the password in Airflow's
    trigger table; ``ti_id``: the task instance listed in Airflow's Required Actions."""
    from ledgerflow.errors import LedgerError
    from ledgerflow.ledger._engine import embedded_url
    from ledgerflow.triggers.approval import ApprovalTrigger

    if ledger.conn_id is None and ledger.url != embedded_url():
        raise LedgerError("a parked approval needs the ledger of an Airflow connection")
    return ApprovalTrigger(
        approval_id, conn_id=ledger.conn_id, poll_interval=poll_interval, ti_id=ti_id
    )


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
        from ledgerflow.workflow.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        assert isinstance(step, ApprovalStep)
        return spec, step

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_params, run_ref

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
            "waiting for approval %s (%s) until %s; decide at %s",
            approval.id,
            approval.subject,
            approval.deadline.isoformat(),
            approval_page(approval.id),
        )
        self._wait(context, ledger, approval)

    def _wait(self, context: Any, ledger: Any, approval: Any) -> None:
        """List the request in Airflow's Required Actions, then defer to the trigger."""
        from ledgerflow.triggers.required_action import open_in_airflow

        ti_id = getattr(context.get("ti"), "id", None)
        listed = ti_id is not None and open_in_airflow(ti_id, approval)
        poll = POLL_POSTGRES_S if ledger.dialect == "postgresql" else POLL_SQLITE_S
        self.defer(
            trigger=approval_trigger(
                ledger, approval.id, poll, ti_id=str(ti_id) if listed else None
            ),
            method_name="resume",
        )

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from the triggerer (the decision is in the ledger), or from Airflow's
        Required Actions with a response (``triggers.required_action``)."""
        from ledgerflow.ledger import approvals
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_ref
        from ledgerflow.triggers import required_action

        ledger = Ledger.from_airflow()
        run = run_ref(context)
        checkpoint = ledger.checkpoint(run.run_id, self.step_id)
        if checkpoint is not None and checkpoint.status == "completed":
            # Resumed a second time (a trigger that fired twice): nothing new to record.
            return self._follow(context, self._step()[1], checkpoint.output)
        approval = approvals.for_step(ledger, run.run_id, self.step_id)
        if approval is not None and required_action.is_response(event):
            # Airflow's Required Actions resumed the task with a response: the ledger
            # decides (the first decision there stands); a refused one waits again.
            outcome, approval = required_action.apply(ledger, approval, event)
            if approval.pending:
                return self._wait(context, ledger, approval)
            event = {"source": required_action.SOURCE, "outcome": outcome}
        if approval is None:
            raise RuntimeError(f"no approval of {run.run_id}/{self.step_id}: {event}")
        if approval.pending:
            # Woken short of a decision (one decision of a quorum answered in Airflow's
            # Required Actions): park again; listing it again reopens that entry.
            self.log.info("approval %s still waits (%s): parked again", approval.id, event)
            return self._wait(context, ledger, approval)
        ledger.record_event(run.run_id, self.step_id, "approval_resumed", {"event": event})
        return self._complete(context, ledger, approval)

    def _follow_lists(self, step: ApprovalStep) -> dict[str, list[str] | None]:
        """What runs after each decision, stored with the request so that the decision
        can end this task without a worker (see ``triggers.approval_end.end_task_now``)."""
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
        older release): the same outcomes as ``triggers.approval_end.task_end_event``."""
        from airflow.sdk.exceptions import AirflowFailException

        from ledgerflow.ledger import approvals

        step = self._step()[1]
        if approval.fails_step or (approval.status == "rejected" and step.on_reject is None):
            raise AirflowFailException(approvals.fail(ledger, approval.id, "worker"))
        return self._follow(context, step, approvals.complete(ledger, approval.id, "worker"))

    def _follow(self, context: Any, step: ApprovalStep, output: dict[str, Any]) -> Any:
        from ledgerflow.steps.branching import branch_skips
        from ledgerflow.steps.saga import end_forward_task

        self.log.info(
            "decision: %s by %s (%s)", output["decision"], output["approver"], output["comment"]
        )
        skipping = branch_skips(
            self,
            context,
            fallback=step.on_reject,
            take_fallback=output["decision"] == "rejected",
        )
        return end_forward_task(self, context, output, skipping=skipping)
