"""The event step: open a wait in the ledger, then park in the triggerer until the event.

``execute`` goes through the kernel's prologue (registration, reuse of this run's or its
retry chain's completed checkpoint with the same event name and key, ``when``,
rendering the key), then opens the step's wait once per (run, step): a delivery that
came earlier and was kept is taken there and then. A wait that has ended already
(a kept delivery, a cleared task) ends the task on the worker; otherwise the task
defers to ``EventTrigger`` and ends from the triggerer, or from the api-server that
takes the delivery (``triggers.event.end_task_now``), without a worker.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.skipmixin import SkipMixin

from ledgerflow.spec.events import EventBranch, EventStep
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.kernel import Rendered, StepKind, prologue
from ledgerflow.steps.operator import LedgerflowOperator

# Safety-net poll of a parked wait: NOTIFY wakes it at once on Postgres.
POLL_POSTGRES_S = 30.0
POLL_SQLITE_S = 1.0


class EventKind(StepKind):
    """An event step renders its correlation key; its work is the wait itself (parked in
    the triggerer), and its commit is the delivery (``ledger.event_outcomes``), so it
    uses the kernel's prologue only."""

    def __init__(self, step: EventStep) -> None:
        self.step = step

    def render(self, context: dict[str, Any]) -> Rendered:
        from ledgerflow.spec.templates import render_value

        key = str(render_value(self.step.key, context))
        # A retry run reuses a completed event only for the same name and key.
        args = {"event": self.step.event, "key": key}
        return Rendered(args=args, extra=args)


def on_deadline(step: EventStep) -> Any:
    """``on_deadline`` as the wait row stores it."""
    if isinstance(step.on_deadline, EventBranch):
        return {"branch": step.on_deadline.branch}
    return step.on_deadline


def event_trigger(ledger: Any, wait_id: int, poll_interval: float) -> Any:
    """The trigger a parked event step waits on: it names the ledger's connection (None
    for the embedded SQLite file), never its URL (Airflow stores the kwargs)."""
    from ledgerflow.errors import LedgerError
    from ledgerflow.ledger._engine import embedded_url
    from ledgerflow.triggers.event import EventTrigger

    if ledger.conn_id is None and ledger.url != embedded_url():
        raise LedgerError("a parked event step needs the ledger of an Airflow connection")
    return EventTrigger(wait_id, conn_id=ledger.conn_id, poll_interval=poll_interval)


def build_task(spec: WorkflowSpec, step: EventStep, trigger_rule: str) -> BaseOperator:
    from ledgerflow.steps.saga import step_failed

    return EventOperator(
        task_id=step.id,
        step_id=step.id,
        trigger_rule=trigger_rule,
        # The outcome ends the task itself; a retry would open the same wait again.
        retries=0,
        # The deadline lives in the trigger: an execution timeout would cut a long wait.
        execution_timeout=None,
        doc_md=step.description or f"Event: {step.event}",
        on_failure_callback=step_failed,
    )


class EventOperator(LedgerflowOperator, SkipMixin):
    """Waits for an external event without holding a worker slot."""

    ui_color = "#e6f4ea"
    template_fields = ()
    inherits_from_skipmixin = True

    def _step(self) -> tuple[WorkflowSpec, EventStep]:
        from ledgerflow.workflow.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        assert isinstance(step, EventStep)
        return spec, step

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.ledger import event_waits
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_params, run_ref

        spec, step = self._step()
        ledger = Ledger.from_airflow()
        ledger.migrate()
        run = run_ref(context)
        with ledger.begin() as conn:
            found = prologue(
                ledger, spec, step, run, EventKind(step), conn, params=run_params(spec, context)
            )
        if found.reused is not None:
            # Completed earlier (a cleared task, or a retry run's chain): the same outcome.
            source = found.reused.details.get("reused_from") or run.run_id
            earlier = event_waits.for_step(ledger, source, step.id)
            expired = earlier is not None and earlier.takes_branch
            return self._follow(context, step, found.reused.output, expired=expired)
        if found.skipped:
            raise AirflowSkipException(f"`when: {step.when}` is false")
        wait = self._open(ledger, spec, step, run, found, context["ti"].try_number)
        if not wait.waiting:
            return self._end(context, ledger, step, wait)
        self.log.info(
            "waiting for event %s with key %r until %s (wait %s)",
            wait.name,
            wait.key,
            wait.deadline.isoformat(),
            wait.id,
        )
        self._defer(ledger, wait.id)

    def _open(
        self,
        ledger: Any,
        spec: WorkflowSpec,
        step: EventStep,
        run: Any,
        found: Any,
        try_number: int,
    ) -> Any:
        """The step's wait (created once), and its attempt; a render error is the final
        failure (with a dead letter), raised."""
        from ledgerflow import faults
        from ledgerflow.ledger import event_waits
        from ledgerflow.ledger.store import now
        from ledgerflow.steps.kernel import parked_step_unrendered

        if found.error is not None or found.rendered is None:
            raise parked_step_unrendered(ledger, spec, step, run, found, try_number)
        faults.hit("before_effect", found.key)
        wait = event_waits.open_wait(
            ledger,
            run_id=run.run_id,
            step_key=step.id,
            dag_id=run.dag_id,
            task_id=self.task_id,
            workflow=spec.name,
            name=step.event,
            key=found.rendered.args["key"],
            schema=step.payload_schema,
            deadline=now() + timedelta(seconds=step.deadline.total_seconds()),
            on_deadline=on_deadline(step),
            default=step.default,
            follow=self._follow_lists(step),
        )
        faults.hit("after_effect", found.key)
        ledger.begin_attempt(
            run_id=run.run_id,
            step_key=step.id,
            step_id=step.id,
            map_index=-1,
            try_number=try_number,
            args=found.rendered.args,
            idempotency_key=f"event:{wait.id}",
            first=found.checkpoint is None,
        )
        return wait

    def _defer(self, ledger: Any, wait_id: int) -> None:
        poll = POLL_POSTGRES_S if ledger.dialect == "postgresql" else POLL_SQLITE_S
        self.defer(trigger=event_trigger(ledger, wait_id, poll), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from a trigger of an older shape (the trigger normally ends the task)."""
        from ledgerflow.ledger import event_waits
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_ref

        ledger = Ledger.from_airflow()
        wait = event_waits.for_step(ledger, run_ref(context).run_id, self.step_id)
        if wait is None or wait.waiting:
            raise RuntimeError(f"event wait of {self.step_id} has not ended: {event}")
        return self._end(context, ledger, self._step()[1], wait)

    def _follow_lists(self, step: EventStep) -> dict[str, list[str] | None]:
        """What runs after a delivery and after the deadline, stored with the wait so
        that the outcome can end this task without a worker."""
        from ledgerflow.steps.branching import followed

        everyone = [t.task_id for t in self.get_direct_relatives(upstream=False)]
        target = step.branch_target
        if target is None:
            return {"received": everyone, "expired": None}
        return {
            "received": followed(self, fallback=target, take_fallback=False),
            "expired": followed(self, fallback=target, take_fallback=True),
        }

    def _end(self, context: Any, ledger: Any, step: EventStep, wait: Any) -> Any:
        """On a worker: the same outcomes as ``triggers.event.task_end_event``."""
        from airflow.sdk.exceptions import AirflowFailException

        from ledgerflow.ledger import event_outcomes
        from ledgerflow.lifecycle import EventWaitStatus

        if wait.status == EventWaitStatus.WITHDRAWN.value:
            raise AirflowFailException(f"event wait {wait.id} was withdrawn")
        if wait.fails_step:
            raise AirflowFailException(event_outcomes.fail(ledger, wait.id, "worker"))
        output = event_outcomes.complete(ledger, wait.id, "worker")
        return self._follow(context, step, output, expired=wait.takes_branch)

    def _follow(self, context: Any, step: EventStep, output: Any, *, expired: bool) -> Any:
        from ledgerflow.steps.branching import branch_skips
        from ledgerflow.steps.saga import end_forward_task

        skipping = branch_skips(self, context, fallback=step.branch_target, take_fallback=expired)
        return end_forward_task(self, context, output, skipping=skipping)
