"""A fused segment: several steps in one Airflow task (``workflow.segments``).

Each step goes through the kernel exactly as in its own task: checkpoint, attempt rows,
idempotency key and effect, ``when``, dead letter, breaker, metrics and span. What the
task does instead of Airflow:

* **retries**: a step that fails is retried in the task, after its policy's backoff
  (with jitter), up to its ``max_attempts``; its attempts are numbered on from the
  ledger's rows, so a try of the task that was killed counts as one of the step's
  attempts, as a killed task would. The backoff never outlives the segment's timeout
  (the sum of its steps' timeouts): Airflow's timeout ends the task.
* **the last failure** (retries used up, or a non-retryable error) fails the task at
  once (``AirflowFailException``: no Airflow retry), and the failure callback starts the
  saga naming the step that failed.
* **a crash** (SIGKILL, a lost worker, the timeout): Airflow retries the task, which
  starts again at its first step; every completed step is a checkpoint reused, so the
  try goes on at the first step without one. A step declared ``idempotency: none``
  that was interrupted is never started again (without fusing it has no retries).
* **a circuit breaker** that is open defers the whole task to the triggerer, as a
  step's own task would; back from it, the task starts again the same way.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.skipmixin import SkipMixin

from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.operator import LedgerflowOperator, run_params, run_ref

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.kernel import RunRef, StepKind, StepResult

# The ledger's event that tells the run page (and ``ledgerflow show``) which task ran a
# fused step.
SEGMENT_EVENT = "segment_started"


def kind_for(spec: WorkflowSpec, step: Any, run: RunRef) -> StepKind:
    """The kernel kind of a step that may be fused (tool or LLM)."""
    if step.kind == "llm":
        from ledgerflow.steps.llm import LlmKind

        return LlmKind(spec, step, run)
    from ledgerflow.steps.protocol import ToolKind

    return ToolKind(spec, step, run)


def max_attempts(spec: WorkflowSpec, step: Any) -> int:
    """A step's attempts: its policy's, and one for a step that must never run twice."""
    if getattr(step, "idempotency", None) == "none":
        return 1
    return spec.retry_for(step).max_attempts


class SegmentOperator(LedgerflowOperator, SkipMixin):
    """Runs the steps of one fused segment, in order, each under the kernel."""

    ui_color = "#dcebf7"
    inherits_from_skipmixin = True  # a branch point may end a segment (steps.branching)

    def __init__(self, *, step_ids: list[str], **kwargs: Any) -> None:
        super().__init__(step_id=step_ids[-1], **kwargs)
        self.step_ids = list(step_ids)

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

        from ledgerflow.errors import BreakerOpen, InvalidParams, StepSkipped
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.secrets import scrub, scrub_exception
        from ledgerflow.steps.branching import branch_skips
        from ledgerflow.steps.saga import end_forward_task
        from ledgerflow.workflow.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        ti = context["ti"]
        ledger = Ledger.from_airflow()
        run = run_ref(context)
        try:
            params = run_params(spec, context)
        except InvalidParams as bad:
            self.log.error("params rejected: %s", bad)
            raise AirflowFailException(str(bad)) from bad.with_traceback(None)
        ledger.migrate()
        deadline = time.monotonic() + (
            self.execution_timeout.total_seconds() if self.execution_timeout else 86400.0
        )
        outputs: dict[str, Any] = {}
        skipped_from: str | None = None
        result: StepResult | None = None
        failure: Exception | None = None
        for step_id in self.step_ids:
            step = spec.step(step_id)
            if skipped_from is not None:
                self._skip_after(ledger, run, step_id, skipped_from)
                continue
            try:
                result, failure = self._run(
                    ledger, spec, step, run, params, ti.try_number, deadline
                )
            except StepSkipped as skipped:
                self.log.info("step %s skipped: %s", step_id, skipped)
                skipped_from = step_id
                continue
            except BreakerOpen as wait:
                from airflow.providers.standard.triggers.temporal import DateTimeTrigger

                ledger.record_event(
                    run.run_id, step_id, "waiting_for_breaker", {"until": wait.until.isoformat()}
                )
                self.log.info("%s; the segment waits (deferred)", wait)
                self.defer(trigger=DateTimeTrigger(moment=wait.until), method_name="resume")
            except Exception as error:
                scrub_exception(error)
                raise
            if step_id == self.step_ids[0]:
                # Once the first step has registered the run: which task runs the steps.
                ledger.record_event(
                    run.run_id,
                    None,
                    SEGMENT_EVENT,
                    {"task_id": self.task_id, "steps": self.step_ids, "try_number": ti.try_number},
                )
            if failure is not None:
                scrub_exception(failure)
                raise AirflowFailException(
                    f"step {step_id} failed for good: {type(failure).__name__}: {failure}"
                ) from failure
            assert result is not None
            self.step_id = step_id
            self.report(step, result)
            outputs[step_id] = result.output
        if skipped_from is not None:
            raise AirflowSkipException(
                f"step {skipped_from} was skipped, and the steps after it in this segment"
            )
        assert result is not None
        output = scrub(outputs)
        last = spec.step(self.step_ids[-1])
        fallback, take = branch_of(last, result)
        # The branch not taken, and the saga's tasks when the run can no longer fail,
        # skipped in the one call that ends the task (steps.saga.end_forward_task).
        skipping = branch_skips(self, context, fallback=fallback, take_fallback=take)
        return end_forward_task(self, context, output, skipping=skipping, ledger=ledger)

    def _run(
        self,
        ledger: Ledger,
        spec: WorkflowSpec,
        step: Any,
        run: RunRef,
        params: dict[str, Any],
        task_try: int,
        deadline: float,
    ) -> tuple[StepResult | None, Exception | None]:
        """One step, its failed attempts retried here after its backoff: its result, or
        the error it failed with for good."""
        from ledgerflow.errors import AttemptsUsedUp
        from ledgerflow.steps.kernel import run_step, step_key
        from ledgerflow.steps.kind import CRASHES
        from ledgerflow.steps.retry import backoff_delay, final_attempt

        policy = spec.retry_for(step)
        limit = max_attempts(spec, step)
        kind = kind_for(spec, step, run)
        key = step_key(step.id, -1)
        # A first try of the task has no earlier attempt of its steps in this run.
        number = 1 if task_try == 1 else len(ledger.attempts(run.run_id, key)) + 1
        while True:
            if number > limit:
                used = AttemptsUsedUp(
                    f"step {step.id}: its {limit} attempt(s) were used (the task running it "
                    "was interrupted); it is not started again"
                )
                ledger.record_event(run.run_id, key, "attempts_used", {"attempts": number - 1})
                return None, used
            final = final_attempt(number, limit - 1, policy, kind.tool_errors)
            try:
                result = run_step(
                    ledger,
                    spec,
                    step,
                    run,
                    kind,
                    params=params,
                    final=final,
                    try_number=number,
                )
                return result, None
            except CRASHES:
                raise
            except Exception as error:
                from ledgerflow.errors import BreakerOpen, StepSkipped

                if isinstance(error, StepSkipped | BreakerOpen):
                    raise
                if final(error):
                    return None, error
                delay = backoff_delay(policy, number).total_seconds()
                delay = max(0.0, min(delay, deadline - time.monotonic()))
                self.log.warning(
                    "step %s attempt %d failed (%s: %s); retrying in %.2fs",
                    step.id,
                    number,
                    type(error).__name__,
                    error,
                    delay,
                )
                time.sleep(delay)
                number += 1

    def _skip_after(self, ledger: Ledger, run: RunRef, step_id: str, cause: str) -> None:
        """A step after a skipped one in the segment is skipped (Airflow's trigger rule)."""
        from ledgerflow.lifecycle import StepStatus

        if ledger.checkpoint(run.run_id, step_id) is None:
            ledger.mark_step(
                run_id=run.run_id,
                step_key=step_id,
                step_id=step_id,
                map_index=-1,
                status=StepStatus.SKIPPED.value,
            )
        self.log.info("step %s skipped: %s before it was skipped", step_id, cause)

    def resume(self, context: Any, event: Any = None) -> Any:
        """Back from waiting for a circuit breaker: the segment again (completed steps are
        reused from their checkpoints)."""
        return self.execute(context)


def branch_of(step: Any, result: StepResult) -> tuple[str | None, bool]:
    """(the fallback step, whether this result takes it) of a branch point that ends a
    segment; (None, False) for any other step."""
    if step.kind == "llm" and getattr(step, "on_invalid", None):
        return step.on_invalid, result.details.get("path") == "fallback"
    return None, False


def failed_step(ledger: Ledger, run_id: str, step_ids: list[str]) -> str:
    """The step a failed segment stopped at: its first without a completed or skipped
    checkpoint (the last one if all have one)."""
    for step_id in step_ids:
        checkpoint = ledger.checkpoint(run_id, step_id)
        if checkpoint is None or checkpoint.status not in ("completed", "skipped"):
            return step_id
    return step_ids[-1]


def segment_failed(context: Any) -> None:
    """Failure callback of a segment's task: what ``steps.saga.step_failed`` does for a
    step's own task, naming the step the segment stopped at."""
    from ledgerflow.errors import InvalidParams
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.saga import record_rejected_params, saga_started
    from ledgerflow.workflow.loaded import spec_for_dag
    from ledgerflow.workflow.segments import steps_of

    run = run_ref(context)
    spec = spec_for_dag(run.dag_id)
    ledger = Ledger.from_airflow()
    ledger.migrate()
    ti = context["ti"]
    error = context.get("exception")
    cause = getattr(error, "__cause__", None)
    for candidate in (error, cause):
        if isinstance(candidate, InvalidParams):
            record_rejected_params(ledger, run, context, candidate)
            break
    step_id = failed_step(ledger, run.run_id, list(steps_of(spec, ti.task_id)))
    ledger.record_event(
        run.run_id,
        step_id,
        "step_failed_final",
        {"try_number": ti.try_number, "task_id": ti.task_id},
    )
    saga_started(ledger, spec, run.run_id, step_id)
