"""The Airflow operators of a Ledgerflow DAG: thin adapters around the step protocol."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from ledgerflow.steps.protocol import RunRef


def run_ref(context: Any) -> RunRef:
    dag_run = context["dag_run"]
    logical = dag_run.logical_date or getattr(dag_run, "run_after", None)
    conf = dag_run.conf or {}
    return RunRef(
        run_id=f"{dag_run.dag_id}/{dag_run.run_id}",
        dag_id=dag_run.dag_id,
        trigger_kind=str(getattr(dag_run.run_type, "value", dag_run.run_type)),
        logical_date=logical.isoformat() if logical is not None else None,
        retry_of=conf.get("ledgerflow_retry_of"),
        retry_from=conf.get("ledgerflow_retry_from"),
    )


class StepOperator(BaseOperator):
    """Runs one workflow step (or one item of a for_each step) with its checkpoint."""

    ui_color = "#e8f1fb"
    template_fields = ()

    def __init__(self, *, step_id: str, item: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_id = step_id
        self.item = item

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.factory import spec_for_dag
        from ledgerflow.ledger.breakers import BreakerOpen
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.protocol import StepSkipped, execute_step
        from ledgerflow.steps.retry import final_attempt
        from ledgerflow.tools.registry import get_tool

        spec = spec_for_dag(self.dag_id)
        step = spec.tool_step(self.step_id)
        ti = context["ti"]
        retries = self.retries or 0
        ledger = Ledger.from_airflow()
        run = run_ref(context)
        try:
            result = execute_step(
                ledger,
                spec,
                step,
                run,
                params=dict(context["params"]),
                try_number=ti.try_number,
                max_attempts=retries + 1,
                # -1 unless this is one item of a for_each step (an item may itself be null).
                map_index=ti.map_index if step.for_each is not None else -1,
                item=self.item,
                is_final_attempt=final_attempt(
                    ti.try_number, retries, spec.retry_for(step), get_tool(step.tool).non_retryable
                ),
            )
        except StepSkipped as skipped:
            raise AirflowSkipException(str(skipped)) from None
        except BreakerOpen as wait:
            # Not a failed attempt and no worker slot held: wait in the triggerer.
            from airflow.providers.standard.triggers.temporal import DateTimeTrigger

            ledger.record_event(
                run.run_id,
                self.step_id,
                "waiting_for_breaker",
                {"until": wait.until.isoformat()},
            )
            self.log.info("%s; waiting (deferred)", wait)
            self.defer(trigger=DateTimeTrigger(moment=wait.until), method_name="resume")
        self.log.info(
            "step %s %s (idempotency key %s%s)",
            self.step_id,
            result.status,
            result.idempotency_key,
            ", effect reused" if result.effect_reused else "",
        )
        return result.output

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from waiting for a circuit breaker: run the step again (same try)."""
        return self.execute(context)


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
        from ledgerflow.factory import spec_for_dag
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.spec.templates import evaluate
        from ledgerflow.steps.protocol import referenced_steps, register_run, template_context

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        ledger = Ledger.from_airflow()
        ledger.migrate()
        run = run_ref(context)
        params = dict(context["params"])
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
