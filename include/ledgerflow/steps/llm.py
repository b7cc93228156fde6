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
from sqlalchemy import Connection

from ledgerflow.errors import LlmCallFailed, LlmOutputRejected
from ledgerflow.ledger.store import Checkpoint, Ledger
from ledgerflow.spec.models import LlmStep, WorkflowSpec
from ledgerflow.spec.templates import evaluate, render_value
from ledgerflow.steps.kernel import (
    Attempt,
    Committed,
    Rendered,
    RunRef,
    StepKind,
    StepResult,
    run_step,
)
from ledgerflow.steps.operator import LedgerflowOperator
from ledgerflow.steps.retry import final_attempt


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
    # Run-scoped: a retry run reuses a completed answer through its retry chain's
    # checkpoint (the kernel); a step it re-runs on purpose (--from) asks afresh.
    return f"llm:{run.run_id}:{step.id}"


class LlmKind(StepKind):
    """Ask the model (or find the answer recorded under the key); decide the path."""

    tool_errors = (LlmOutputRejected,)

    def __init__(self, spec: WorkflowSpec, step: LlmStep, run: RunRef, hook: Any = None) -> None:
        self.spec = spec
        self.step = step
        self.run = run
        self.hook = hook

    def render(self, context: dict[str, Any]) -> Rendered:
        system_prompt = str(render_value(self.step.system_prompt, context))
        prompt = str(render_value(self.step.prompt, context))
        return Rendered(
            args={"conn_id": self.step.conn_id, "prompt": prompt},
            idempotency_key=call_key(self.spec, self.step, self.run, context),
            extra={"system_prompt": system_prompt, "prompt": prompt},
            letter_args={},
        )

    def prepare(self, attempt: Attempt, conn: Connection) -> Any:
        from ledgerflow.ledger import llm as calls

        # A first attempt under the run-scoped default key cannot have an answer yet.
        if attempt.first and self.step.idempotency is None:
            return None
        assert attempt.rendered.idempotency_key is not None
        return calls.find(attempt.ledger, attempt.rendered.idempotency_key, conn)

    def perform(self, attempt: Attempt, db: Connection | None) -> Any:
        if attempt.prepared is not None:
            return attempt.prepared
        extra = attempt.rendered.extra
        return _ask(self.step, self.hook, extra["system_prompt"], extra["prompt"])

    def commit(self, attempt: Attempt, outcome: Any, conn: Connection) -> Committed:
        """The answer (under its key) and the checkpoint commit together, so a retry finds
        both or neither; a crash before the commit asks again, once."""
        from ledgerflow.ledger import llm as calls

        step, context = self.step, attempt.context
        reused = attempt.prepared is not None
        path, reason, output = decide(step, outcome.status, outcome.output, outcome.errors, context)
        if not reused:
            assert attempt.rendered.idempotency_key is not None
            stored, inserted = calls.record(
                attempt.ledger,
                key=attempt.rendered.idempotency_key,
                run_id=attempt.run.run_id,
                step_key=attempt.key,
                system_prompt=attempt.rendered.extra["system_prompt"],
                prompt=attempt.rendered.extra["prompt"],
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
        details = {"path": path, "reason": reason, "call_reused": reused}
        if path == "fallback" and step.on_invalid is None:
            return Committed(
                rejection=LlmOutputRejected(f"step {attempt.key}: {reason}"),
                letter_args={},
                details=details,
            )
        return Committed(output=output, reused=reused, details=details)

    def reused(self, checkpoint: Checkpoint) -> StepResult:
        path, reason = _recorded_path(checkpoint.output)
        return StepResult(
            "reused",
            checkpoint.output,
            checkpoint.idempotency_key,
            effect_reused=True,
            details={"path": path, "reason": reason, "call_reused": True},
        )


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
    is_final_attempt: Any = None,
) -> LlmResult:
    """Run an LLM step under the kernel; ``hook`` overrides the step's connection (a
    ``LedgerflowAIHook``), else it is built from ``step.conn_id``. Whether a failure is
    the last attempt is Airflow's own rule (``steps.retry.final_attempt``), including
    the error names the step's retry policy lists as non-retryable."""
    kind = LlmKind(spec, step, run, hook)
    final = is_final_attempt
    if not callable(final):
        final = final_attempt(try_number, max_attempts - 1, spec.retry_for(step), kind.tool_errors)
    result = run_step(
        ledger, spec, step, run, kind, params=params, final=final, try_number=try_number
    )
    details = result.details
    return LlmResult(
        result.status,
        details.get("path", "main"),
        result.output,
        details.get("reason"),
        result.idempotency_key,
        bool(details.get("call_reused")),
    )


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
        retry_policy=StepRetryPolicy(policy, LlmKind.tool_errors),
        execution_timeout=spec.timeout_for(step),
        doc_md=step.description or f"LLM step (connection `{step.conn_id}`)",
        on_failure_callback=step_failed,
    )


class LlmOperator(LedgerflowOperator, SkipMixin):
    """Runs an LLM step and follows the main path or the ``on_invalid`` branch."""

    ui_color = "#eee6fb"
    inherits_from_skipmixin = True  # see steps.branching

    def kind(self, spec: WorkflowSpec, step: Any, run: RunRef) -> StepKind:
        return LlmKind(spec, step, run)

    def report(self, step: Any, result: StepResult) -> None:
        details = result.details
        reason = details.get("reason")
        self.log.info(
            "LLM step %s: %s path%s (key %s%s)",
            self.step_id,
            details.get("path", "main"),
            f" ({reason})" if reason else "",
            result.idempotency_key,
            ", recorded answer reused" if details.get("call_reused") else "",
        )

    def branch(self, step: Any, result: StepResult) -> tuple[str | None, bool]:
        return step.on_invalid, result.details.get("path") == "fallback"
