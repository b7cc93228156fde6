"""The LLM step: a schema-checked model call that is also a branch point.

For one step of one run:
1. a completed checkpoint -> its output and its path are reused, nothing runs;
2. ``when`` false -> skipped;
3. otherwise the prompts and the idempotency key are rendered and an attempt recorded;
   a call already in the ledger under that key (an earlier run with the same key) is
   reused: **no second model call**. Else the model is asked through common.ai
   (validation, ``repair_attempts`` re-asks);
4. the checks run on valid output; the path is ``main`` (valid, checks pass) or
   ``fallback`` (still invalid, or a check failed, with the reason);
5. one transaction records the call under its key and the checkpoint: the validated
   output on the main path, the fallback info (``{"valid", "reason", "errors",
   "output"}``) on the other, so later templates read ``steps.<id>.output``. A retried
   task finds that checkpoint (step 1). The operator then skips the branch not taken.

Without ``on_invalid``, the fallback outcome fails the step (non-retryable: asking the
same question again returns the recorded answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.skipmixin import SkipMixin
from jinja2 import TemplateError

from ledgerflow import faults
from ledgerflow.errors import InjectedFault, NonRetryableError, ToolError
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import LlmStep, WorkflowSpec
from ledgerflow.spec.templates import evaluate, render_value
from ledgerflow.spec.validate import referenced_steps
from ledgerflow.steps.protocol import (
    RunRef,
    StepSkipped,
    TemplateRenderError,
    _record_failure,
    register_run,
    reuse_from_lineage,
    template_context,
)


class LlmOutputRejected(NonRetryableError):
    """The output stayed invalid (or failed a check) and the step declares no on_invalid."""


class LlmCallFailed(ToolError):
    """The provider could not be asked (down, rate-limited, refused): retried like any
    failed step. The message never contains the connection's secret."""


@dataclass(frozen=True)
class LlmResult:
    status: str  # completed | reused
    path: str  # main | fallback
    output: Any
    reason: str | None
    idempotency_key: str | None
    call_reused: bool = False


def call_key(spec: WorkflowSpec, step: LlmStep, run: RunRef, context: dict[str, Any]) -> str:
    if step.idempotency is not None:
        return f"{spec.name}:{step.id}:{render_value(step.idempotency.key, context)}"
    # Run-scoped: a retry run reuses a completed answer through its lineage's checkpoint
    # (protocol.reuse_from_lineage); a step it re-runs on purpose (--from) asks afresh.
    return f"llm:{run.run_id}:{step.id}"


def execute_llm_step(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: LlmStep,
    run: RunRef,
    *,
    params: dict[str, Any],
    try_number: int = 1,
    max_attempts: int = 1,
    hook: Any = None,
) -> LlmResult:
    """Run an LLM step under the protocol above; ``hook`` overrides the step's connection
    (a ``LedgerflowAIHook``), else it is built from ``step.conn_id``."""
    from ledgerflow.ledger import llm as calls

    ledger.migrate()
    key = step.id
    render_error: TemplateRenderError | None = None
    system_prompt = prompt = ""
    idem_key: str | None = None
    context: dict[str, Any] = {}
    attempt_id = 0
    cached = None
    with ledger.begin() as conn:
        checkpoint, outputs = ledger.checkpoint_and_outputs(
            run.run_id, key, referenced_steps(spec, step), conn
        )
        if checkpoint is None and not outputs:
            register_run(ledger, spec, run, params, conn)
        if checkpoint is None and run.retry_of is not None:
            checkpoint = reuse_from_lineage(ledger, spec, run, key, step.id, conn)
        if checkpoint is not None and checkpoint.status == "completed":
            path, reason = _recorded_path(checkpoint.output)
            ledger.record_event(run.run_id, key, "checkpoint_reused", None, conn=conn)
            return LlmResult(
                "reused", path, checkpoint.output, reason, checkpoint.idempotency_key, True
            )
        if checkpoint is not None and checkpoint.status == "skipped":
            raise StepSkipped(f"`when: {step.when}` is false")
        context = template_context(ledger, spec, run, params, None, -1, outputs=outputs)
        try:
            if step.when is not None and not evaluate(step.when, context):
                ledger.mark_step(
                    run_id=run.run_id,
                    step_key=key,
                    step_id=step.id,
                    map_index=-1,
                    status="skipped",
                    conn=conn,
                )
                skipped = True
            else:
                skipped = False
                system_prompt = str(render_value(step.system_prompt, context))
                prompt = str(render_value(step.prompt, context))
                idem_key = call_key(spec, step, run, context)
        except TemplateError as exc:
            skipped = False
            render_error = TemplateRenderError(f"step {key}: {type(exc).__name__}: {exc}")
        if not skipped:
            attempt_id = ledger.begin_attempt(
                run_id=run.run_id,
                step_key=key,
                step_id=step.id,
                map_index=-1,
                try_number=try_number,
                args={"conn_id": step.conn_id, "prompt": prompt},
                idempotency_key=idem_key,
                first=checkpoint is None,
                conn=conn,
            )
            # A first attempt under the run-scoped default key cannot have an answer yet.
            may_exist = checkpoint is not None or step.idempotency is not None
            if idem_key is not None and may_exist:
                cached = calls.find(ledger, idem_key, conn)
    if skipped:
        raise StepSkipped(f"`when: {step.when}` is false")
    if render_error is not None:
        _record_failure(
            ledger, spec, run, key, attempt_id, render_error, try_number, {}, None, True
        )
        raise render_error
    assert idem_key is not None
    outcome: Any = cached
    try:
        if cached is None:
            outcome = _ask(step, hook, system_prompt, prompt)
        faults.hit("after_effect", key)
    except BaseException as error:
        # An injected crash or an exit is not a failed attempt: the next try marks it lost.
        if isinstance(error, InjectedFault | KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        final = isinstance(error, NonRetryableError) or try_number >= max_attempts
        _record_failure(ledger, spec, run, key, attempt_id, error, try_number, {}, idem_key, final)
        raise
    # One transaction: the answer (under its key) and the checkpoint commit together, so
    # a retry finds both or neither; a crash before the commit asks again, once.
    rejected: LlmOutputRejected | None = None
    with ledger.begin() as conn:
        reused = cached is not None
        path, reason, output = decide(step, outcome.status, outcome.output, outcome.errors, context)
        if not reused:
            stored, inserted = calls.record(
                ledger,
                key=idem_key,
                run_id=run.run_id,
                step_key=key,
                system_prompt=system_prompt,
                prompt=prompt,
                outcome=outcome,
                path=path,
                reason=reason,
                conn=conn,
            )
            if not inserted:  # a concurrent twin recorded its answer first: follow it
                reused = True
                path, reason, output = decide(
                    step, stored.status, stored.output, stored.errors, context
                )
        if path == "fallback" and step.on_invalid is None:
            rejected = LlmOutputRejected(f"step {key}: {reason}")
            _record_failure(
                ledger, spec, run, key, attempt_id, rejected, try_number, {}, idem_key, True, conn
            )
        else:
            ledger.complete_step(
                conn,
                run_id=run.run_id,
                step_key=key,
                attempt_id=attempt_id,
                output=output,
                reused=reused,
            )
        faults.hit("before_commit", key)
    faults.hit("after_commit", key)
    if rejected is not None:
        raise rejected
    return LlmResult("completed", path, output, reason, idem_key, reused)


def _ask(step: LlmStep, hook: Any, system_prompt: str, prompt: str) -> Any:
    """Ask the model (with the repairs); a provider failure is ``LlmCallFailed``."""
    from ledgerflow.llm.call import agent_for, call_model
    from ledgerflow.llm.local import hook_for

    hook = hook or hook_for(step.conn_id)
    try:
        outcome = call_model(agent_for(hook, step, system_prompt), prompt)
    except Exception as exc:
        # Provider errors can echo the request; keep the key out of the ledger and logs.
        message = f"{type(exc).__name__}: {exc}"
        secret = getattr(getattr(hook, "_conn", None), "password", None)
        if secret:
            message = message.replace(secret, "***")
        raise LlmCallFailed(f"step {step.id}: {message}") from None
    return outcome


def decide(
    step: LlmStep, status: str, output: Any, errors: list[str], context: dict[str, Any]
) -> tuple[str, str | None, Any]:
    """(path, reason, checkpoint output) from a call's result and the step's checks."""
    if status != "valid":
        last = errors[-1] if errors else "no usable answer"
        reason = f"output invalid after {step.repair_attempts} repair attempt(s): {last}"
        return "fallback", reason, _fallback_info(reason, errors, None)
    failed = failed_checks(step, output, context)
    if failed:
        reason = "check failed: " + "; ".join(failed)
        return "fallback", reason, _fallback_info(reason, [], output)
    return "main", None, output


def failed_checks(step: LlmStep, output: Any, context: dict[str, Any]) -> list[str]:
    """The reasons of the checks that ``output`` fails, in declaration order."""
    from ledgerflow.llm.registry import get_check

    failed: list[str] = []
    scope = {**context, "output": output}
    for item in step.checks:
        try:
            if item.expr is not None:
                ok: Any = evaluate(item.expr, scope)
            else:
                assert item.function is not None
                ok = get_check(item.function)(output)
        except Exception as exc:  # a check that cannot be evaluated does not pass
            failed.append(f"{item.label} ({type(exc).__name__}: {exc})")
            continue
        if isinstance(ok, str):
            failed.append(f"{item.label}: {ok}" if item.message or item.function else ok)
        elif ok is None and item.function is not None:
            continue  # a check function that returns nothing found nothing wrong
        elif not ok:
            failed.append(item.label)
    return failed


def _fallback_info(reason: str, errors: list[str], output: Any) -> dict[str, Any]:
    return {"valid": False, "fallback": True, "reason": reason, "errors": errors, "output": output}


def _recorded_path(output: Any) -> tuple[str, str | None]:
    if isinstance(output, dict) and output.get("fallback") is True and "reason" in output:
        return "fallback", output["reason"]
    return "main", None


def build_task(spec: WorkflowSpec, step: LlmStep, trigger_rule: str) -> BaseOperator:
    from ledgerflow.steps.retry import StepRetryPolicy
    from ledgerflow.steps.saga import step_failed

    policy = spec.retry_for(step)
    return LlmOperator(
        task_id=step.id,
        step_id=step.id,
        trigger_rule=trigger_rule,
        retries=policy.max_attempts - 1,
        retry_delay=policy.backoff.initial,
        retry_policy=StepRetryPolicy(policy, (LlmOutputRejected,)),
        execution_timeout=spec.timeout_for(step),
        doc_md=step.description or f"LLM step (connection `{step.conn_id}`)",
        on_failure_callback=step_failed,
    )


class LlmOperator(BaseOperator, SkipMixin):
    """Runs an LLM step and follows the main path or the ``on_invalid`` branch."""

    ui_color = "#eee6fb"
    template_fields = ()
    inherits_from_skipmixin = True  # see steps.branching

    def __init__(self, *, step_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_id = step_id

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.factory import spec_for_dag
        from ledgerflow.steps.branching import follow
        from ledgerflow.steps.operator import run_ref

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        assert isinstance(step, LlmStep)
        ti = context["ti"]
        try:
            result = execute_llm_step(
                Ledger.from_airflow(),
                spec,
                step,
                run_ref(context),
                params=dict(context["params"]),
                try_number=ti.try_number,
                max_attempts=(self.retries or 0) + 1,
            )
        except StepSkipped as skipped:
            raise AirflowSkipException(str(skipped)) from None
        self.log.info(
            "LLM step %s: %s path%s (key %s%s)",
            self.step_id,
            result.path,
            f" ({result.reason})" if result.reason else "",
            result.idempotency_key,
            ", recorded answer reused" if result.call_reused else "",
        )
        follow(self, context, fallback=step.on_invalid, take_fallback=result.path == "fallback")
        return result.output
