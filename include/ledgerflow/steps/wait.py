"""The wait step (a durable timer): park in the triggerer until a moment, then go on.

``kind: wait`` with ``for: 3d`` or ``until: "<template>"``. The task goes through the
kernel's prologue (registration, reuse in this run and up the retry chain, ``when``,
rendering), records its planned fire time once per run (``ledger.timers.park``) and
defers to ``TimerTrigger``: no worker slot while it waits. At the fire time the trigger
completes the step (output ``{"planned", "fired", "lag_ms"}``) and ends the task; a
moment already past fires at once, on the worker. A retry run reuses a completed wait
(the same ``for``, or the same rendered ``until``) and does not wait again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from ledgerflow.spec.models import WaitStep, WorkflowSpec
from ledgerflow.steps.kernel import Rendered, StepKind
from ledgerflow.steps.operator import LedgerflowOperator

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.kernel import RunRef


class WaitKind(StepKind):
    """A wait renders its declaration (what a retry run compares: the duration, or the
    rendered moment); its work is the wait itself, parked in the triggerer, and its
    commit is the firing (``ledger.timers.fire``), so it uses the kernel's prologue only."""

    def __init__(self, spec: WorkflowSpec, step: WaitStep) -> None:
        self.spec = spec
        self.step = step

    def render(self, context: dict[str, Any]) -> Rendered:
        if self.step.for_ is not None:
            seconds = self.step.for_.total_seconds()
            return Rendered(args={"for_seconds": seconds}, extra={"delay": seconds})
        from ledgerflow.errors import NonRetryableError
        from ledgerflow.spec.templates import render_value
        from ledgerflow.workflow.waits import parse_until

        assert self.step.until is not None
        value = render_value(self.step.until, context)
        try:
            moment = (
                value
                if isinstance(value, datetime) and value.tzinfo is not None
                else parse_until(
                    value.isoformat() if isinstance(value, datetime) else value, self.spec.timezone
                )
            )
        except ValueError as exc:
            raise NonRetryableError(f"step {self.step.id}: until: {exc}") from None
        return Rendered(args={"until": moment.isoformat()}, extra={"until": moment})

    def planned(self, rendered: Rendered, now: datetime) -> datetime:
        if "delay" in rendered.extra:
            return now + timedelta(seconds=rendered.extra["delay"])
        return rendered.extra["until"]  # type: ignore[no-any-return]


@dataclass
class Parked:
    """What a wait step found: its output from earlier (``reused``: this run, or its retry
    chain), a skip (``when`` false), or its fire time (``planned``)."""

    key: str
    reused: Any = None
    skipped: bool = False
    planned: datetime | None = None


def park(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: WaitStep,
    run: RunRef,
    *,
    params: dict[str, Any],
    try_number: int = 1,
) -> Parked:
    """The wait step's part of a task, under the kernel's prologue (registration, reuse,
    ``when``, rendering), then its fire time (once per run) and attempt, in the same
    transaction. A render error (an ``until`` that reads as no moment) is the final
    failure, with a dead letter, and is raised."""
    from ledgerflow.ledger import timers
    from ledgerflow.ledger.store import now
    from ledgerflow.steps.kernel import parked_step_unrendered, prologue

    kind = WaitKind(spec, step)
    with ledger.begin() as conn:
        found = prologue(ledger, spec, step, run, kind, conn, params=params)
        if found.reused is not None:
            return Parked(found.key, reused=found.reused.output)
        if found.skipped:
            return Parked(found.key, skipped=True)
        if found.rendered is not None and found.error is None:
            planned = timers.park(
                ledger,
                conn,
                run_id=run.run_id,
                step_key=found.key,
                step_id=step.id,
                planned=kind.planned(found.rendered, now()),
                args=found.rendered.args,
                try_number=try_number,
                first=found.checkpoint is None,
            )
            return Parked(found.key, planned=planned)
        error = parked_step_unrendered(ledger, spec, step, run, found, try_number, conn=conn)
    raise error


def build_task(spec: WorkflowSpec, step: WaitStep, trigger_rule: str) -> BaseOperator:
    from ledgerflow.steps.saga import step_failed

    shown = f"for {step.for_}" if step.for_ is not None else f"until {step.until}"
    return WaitOperator(
        task_id=step.id,
        step_id=step.id,
        trigger_rule=trigger_rule,
        # Not retried by Airflow: the wait cannot fail (a bad `until` is final); clear
        # the task, or retry the run, to go through it again (the same fire time).
        retries=0,
        # The wait lives in the trigger: an execution timeout would cut a wait of days.
        execution_timeout=None,
        doc_md=step.description or f"Wait {shown}",
        on_failure_callback=step_failed,
    )


class WaitOperator(LedgerflowOperator):
    """Parks until the step's fire time without holding a worker slot."""

    ui_color = "#eef0ff"
    template_fields = ()

    def kind(self, spec: WorkflowSpec, step: Any, run: RunRef) -> StepKind:
        return WaitKind(spec, step)

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.ledger import timers
        from ledgerflow.ledger.store import Ledger, now
        from ledgerflow.steps.operator import run_params, run_ref
        from ledgerflow.workflow.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        assert isinstance(step, WaitStep)
        ledger = Ledger.from_airflow()
        ledger.migrate()
        run = run_ref(context)
        parked = park(
            ledger,
            spec,
            step,
            run,
            params=run_params(spec, context),
            try_number=context["ti"].try_number,
        )
        if parked.reused is not None:
            self.log.info("wait %s: completed earlier, not waiting again", step.id)
            return self._end(context, parked.reused)
        if parked.skipped:
            raise AirflowSkipException(f"`when: {step.when}` is false")
        assert parked.planned is not None
        if parked.planned <= now():
            self.log.info("wait %s: %s has passed, firing at once", step.id, parked.planned)
            return self._end(context, timers.fire(ledger, run.run_id, parked.key))
        self.log.info("wait %s: parked until %s", step.id, parked.planned.isoformat())
        self.defer(
            trigger=self._trigger(ledger, run.run_id, parked.key, parked.planned),
            method_name="resume",
        )

    @staticmethod
    def _trigger(ledger: Any, run_id: str, step_key: str, planned: datetime) -> Any:
        """The trigger names the ledger's connection (None: the embedded SQLite file),
        never its URL, which would put the password in Airflow's trigger table."""
        from ledgerflow.errors import LedgerError
        from ledgerflow.ledger._engine import embedded_url
        from ledgerflow.triggers.timer import TimerTrigger

        if ledger.conn_id is None and ledger.url != embedded_url():
            raise LedgerError("a parked timer needs the ledger of an Airflow connection")
        return TimerTrigger(run_id, step_key, planned.isoformat(), conn_id=ledger.conn_id)

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from the trigger on a worker (``dag.test()``, which runs triggers inline,
        or a trigger of an older release): the step completes once, here or there."""
        from ledgerflow.ledger import timers
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_ref

        return self._end(
            context, timers.fire(Ledger.from_airflow(), run_ref(context).run_id, self.step_id)
        )

    def _end(self, context: Any, output: Any) -> Any:
        from ledgerflow.steps.saga import end_forward_task

        self.log.info("wait %s: %s", self.step_id, output)
        return end_forward_task(self, context, output)
