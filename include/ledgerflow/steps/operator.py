"""The Airflow operators of a Ledgerflow DAG: one base around the step kernel."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from ledgerflow.spec.models import WorkflowSpec

if TYPE_CHECKING:  # the kernel (and the ledger) load when a task runs, not at parse time
    from ledgerflow.steps.kernel import RunRef, StepKind, StepResult


def run_ref(context: Any) -> RunRef:
    """The run of a task. Its retry chain is NOT read from the DagRun's conf: anyone who
    may trigger the DAG can write conf, so a chain is established by the ledger alone
    (``retries.start_retry`` writes the retry run's row before Airflow creates it)."""
    from ledgerflow.steps.kernel import RunRef

    dag_run = context["dag_run"]
    logical = dag_run.logical_date or getattr(dag_run, "run_after", None)
    return RunRef(
        run_id=f"{dag_run.dag_id}/{dag_run.run_id}",
        dag_id=dag_run.dag_id,
        trigger_kind=str(getattr(dag_run.run_type, "value", dag_run.run_type)),
        logical_date=logical.isoformat() if logical is not None else None,
    )


def run_params(spec: WorkflowSpec, context: Any) -> dict[str, Any]:
    """The params every step of the run sees: Airflow's, with an empty optional field
    meaning its declared default (``spec.params.effective_params``)."""
    from ledgerflow.spec.params import effective_params

    return effective_params(spec.params, dict(context["params"]))


class LedgerflowOperator(BaseOperator):
    """The one operator base of every step kind: the Airflow side of ``steps.kernel``.

    A subclass names its kind (``kind``), and may say how it logs its result (``report``)
    and which branch it follows (``branch``, for branch points that also mix in
    ``SkipMixin``). Everything else (the spec and the run, the params, Airflow's
    final-attempt rule, skipping, waiting for a breaker) is here, once."""

    ui_color = "#e8f1fb"
    template_fields = ()

    def __init__(self, *, step_id: str, item: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_id = step_id
        self.item = item

    def kind(self, spec: WorkflowSpec, step: Any, run: RunRef) -> StepKind:
        raise NotImplementedError

    def report(self, step: Any, result: StepResult) -> None:
        source = result.details.get("reused_from")
        origin = ""
        if source:
            from ledgerflow.links import run_page

            what = "the effect" if result.effect_reused else "the checkpoint"
            origin = f"; {what} of run {source}, reused: {run_page(source)}"
        elif result.effect_reused:
            origin = ", effect reused"
        self.log.info(
            "step %s %s (idempotency key %s%s)",
            self.step_id,
            result.status,
            result.idempotency_key,
            origin,
        )

    def branch(self, step: Any, result: StepResult) -> tuple[str | None, bool]:
        """(the fallback step, whether this result takes it); no fallback: no branch."""
        return None, False

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.errors import BreakerOpen, InvalidParams, StepSkipped
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.secrets import scrub, scrub_exception
        from ledgerflow.steps.branching import branch_skips
        from ledgerflow.steps.kernel import run_step
        from ledgerflow.steps.retry import final_attempt
        from ledgerflow.steps.saga import end_forward_task
        from ledgerflow.workflow.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        ti = context["ti"]
        ledger = Ledger.from_airflow()
        run = run_ref(context)
        kind = self.kind(spec, step, run)
        try:
            result = run_step(
                ledger,
                spec,
                step,
                run,
                kind,
                params=run_params(spec, context),
                # Airflow's own rule: the retries are used up, or the policy fails it now.
                final=final_attempt(
                    ti.try_number, self.retries or 0, spec.retry_for(step), kind.tool_errors
                ),
                try_number=ti.try_number,
                # -1 unless this is one item of a for_each step (an item may itself be null).
                map_index=ti.map_index if getattr(step, "for_each", None) is not None else -1,
                item=self.item,
            )
        except StepSkipped as skipped:
            raise AirflowSkipException(str(skipped)) from None
        except InvalidParams as bad:
            # The one-line reason, naming each field; the kernel's frames add nothing.
            self.log.error("params rejected: %s", bad)
            raise bad.with_traceback(None) from None
        except BreakerOpen as wait:
            # Not a failed attempt and no worker slot held: wait in the triggerer.
            from airflow.providers.standard.triggers.temporal import DateTimeTrigger

            ledger.record_event(
                run.run_id, self.step_id, "waiting_for_breaker", {"until": wait.until.isoformat()}
            )
            self.log.info("%s; waiting (deferred)", wait)
            self.defer(trigger=DateTimeTrigger(moment=wait.until), method_name="resume")
        except Exception as error:
            # Airflow logs and reports this error in more places than the task log.
            scrub_exception(error)
            raise
        self.report(step, result)
        fallback, take = self.branch(step, result)
        # XCom holds what the ledger holds: the output without registered secrets.
        output = scrub(result.output)
        return end_forward_task(
            self,
            context,
            output,
            skipping=branch_skips(self, context, fallback=fallback, take_fallback=take),
            ledger=ledger,
        )

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from waiting for a circuit breaker: run the step again (same try)."""
        return self.execute(context)


class StepOperator(LedgerflowOperator):
    """Runs one tool step (or one item of a for_each step) with its checkpoint."""

    def kind(self, spec: WorkflowSpec, step: Any, run: RunRef) -> StepKind:
        from ledgerflow.steps.protocol import ToolKind

        return ToolKind(spec, step, run)


class ForEachItemsOperator(BaseOperator):
    """Evaluates a for_each expression; its list becomes the mapped step's items."""

    ui_color = "#f4f0e6"
    template_fields = ()

    def __init__(self, *, step_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_id = step_id

    def execute(self, context: Any) -> list[Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.errors import NonRetryableError
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.spec.templates import evaluate
        from ledgerflow.steps.kernel import register_run, template_context
        from ledgerflow.workflow.loaded import spec_for_dag
        from ledgerflow.workflow.validate import referenced_steps

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        ledger = Ledger.from_airflow()
        ledger.migrate()
        run = run_ref(context)
        params = run_params(spec, context)
        register_run(ledger, spec, run, params)
        ctx = template_context(
            ledger, spec, run, params, None, -1, step_ids=referenced_steps(spec, step)
        )
        if step.when is not None and not evaluate(step.when, ctx):
            ledger.mark_step(
                run_id=run.run_id, step_key=step.id, step_id=step.id, map_index=-1, status="skipped"
            )
            raise AirflowSkipException(f"`when: {step.when}` is false")
        assert step.for_each is not None
        items = evaluate(step.for_each, ctx)
        if not isinstance(items, list | tuple):
            raise NonRetryableError(
                f"step {step.id}: for_each must give a list, got {type(items).__name__}"
            )
        ledger.record_event(run.run_id, step.id, "for_each_expanded", {"items": len(items)})
        return list(items)
