"""The tool step: a registered tool called with its idempotency key, under the kernel.

Independent of Airflow so it can be driven directly by tests and benchmarks; the
operator is a thin adapter around ``execute_step``. Everything around the call
(checkpoint reuse, ``when``, the retry chain, the attempt, failure and dead letter) is
the kernel's (``steps.kernel``); what is the tool step's own:

* transactional tools (writing through ``ctx.db``) run inside one transaction with the
  effect record and the checkpoint: all three commit, or none does;
* other tools with an idempotency key first claim the key (a pending effect row,
  committed with the attempt), then call the tool with that key, then record the result
  and the checkpoint together. A retry after a crash finds the claim and calls again
  with the SAME key, so the remote side de-duplicates; a finished effect is never redone;
* an effect the saga compensated is never reused, whatever its key: the step is
  performed again under the next generation of its key (``<key>#2``...), a new effect;
* a circuit breaker gates the call before any attempt is recorded.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from ledgerflow.errors import StepSkipped, TemplateRenderError
from ledgerflow.ledger import breakers
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import EffectStatus
from ledgerflow.spec.models import KeyedIdempotency, ToolStep, WorkflowSpec
from ledgerflow.spec.templates import render_value
from ledgerflow.steps.kernel import (
    Attempt,
    Committed,
    Rendered,
    Reuse,
    RunRef,
    StepKind,
    StepResult,
    jsonable,
    register_run,
    run_step,
    step_key,
    template_context,
)
from ledgerflow.steps.retry import final_attempt
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import Tool, get_tool
from ledgerflow.workflow.validate import referenced_steps

__all__ = [
    "RunRef",
    "StepResult",
    "StepSkipped",
    "TemplateRenderError",
    "ToolKind",
    "execute_step",
    "referenced_steps",
    "register_run",
    "render_key",
    "step_key",
    "template_context",
]

# A compensated effect is redone under ``<key>#<generation>``; more than this many
# generations of one effect is a loop, not a business process.
MAX_GENERATIONS = 100


def render_key(
    spec: WorkflowSpec, step: ToolStep, run: RunRef, key: str, context: dict[str, Any]
) -> str:
    if isinstance(step.idempotency, KeyedIdempotency):
        rendered = render_value(step.idempotency.key, context)
        # The workflow name scopes the key: two workflows may use the same business id.
        return f"{spec.name}:{step.id}:{rendered}"
    return f"{run.run_id}:{key}"


def live_key(ledger: Ledger, key: str, conn: Connection) -> str:
    """``key``, or the first generation of it whose effect the saga has not undone."""
    current = key
    for generation in range(2, MAX_GENERATIONS + 2):
        found = ledger.effect(current, conn)
        if found is None or found.status != EffectStatus.COMPENSATED.value:
            return current
        current = f"{key}#{generation}"
    raise TemplateRenderError(f"effect {key!r} was compensated {MAX_GENERATIONS} times")


class ToolKind(StepKind):
    """A registered tool, called once per effect."""

    def __init__(self, spec: WorkflowSpec, step: ToolStep, run: RunRef) -> None:
        self.spec = spec
        self.step = step
        self.run = run
        self.tool: Tool = get_tool(step.tool)
        self.tool_errors = self.tool.non_retryable
        self.keyed = isinstance(step.idempotency, KeyedIdempotency)
        self.breaker = step.breaker or self.tool.breaker
        self.breaker_name = (self.breaker.name if self.breaker else None) or self.tool.name
        self.trial = False

    def render(self, context: dict[str, Any]) -> Rendered:
        key = step_key(self.step.id, context.get("index", -1))
        args = render_value(self.step.args, context)
        return Rendered(args, render_key(self.spec, self.step, self.run, key, context))

    def gate(self, ledger: Ledger, conn: Connection) -> None:
        if self.breaker is not None:
            # Raises BreakerOpen (before any attempt is recorded) when the call must wait.
            self.trial = breakers.acquire(ledger, conn, self.breaker_name, self.breaker).trial

    def claim(
        self, ledger: Ledger, run: RunRef, key: str, rendered: Rendered, conn: Connection
    ) -> Reuse | None:
        if not self.keyed:
            return None
        assert rendered.idempotency_key is not None
        if self.tool.is_transactional(rendered.args):
            # The effect is recorded in the commit's transaction; only its generation
            # is chosen here.
            rendered.idempotency_key = live_key(ledger, rendered.idempotency_key, conn)
            return None
        claim_key = rendered.idempotency_key
        while True:
            if ledger.claim_effect(
                conn, key=claim_key, tool=self.tool.name, run_id=run.run_id, step_key=key
            ):
                break
            done = ledger.effect(claim_key, conn)
            if done is None or done.status != EffectStatus.COMPENSATED.value:
                rendered.idempotency_key = claim_key
                if done is not None and done.status == EffectStatus.DONE.value:
                    return Reuse(done.result, done.run_id)
                return None  # claimed earlier (a crashed attempt): call again, same key
            claim_key = live_key(ledger, rendered.idempotency_key, conn)
        rendered.idempotency_key = claim_key
        return None

    def transactional(self, attempt: Attempt) -> bool:
        return self.tool.is_transactional(attempt.rendered.args)

    def _ctx(self, attempt: Attempt) -> ToolContext:
        assert attempt.rendered.idempotency_key is not None
        return ToolContext(
            run_id=attempt.run.run_id,
            step_key=attempt.key,
            workflow=self.spec.name,
            version=self.spec.version,
            try_number=attempt.try_number,
            idempotency_key=attempt.rendered.idempotency_key,
        )

    def perform(self, attempt: Attempt, db: Connection | None) -> Any:
        ctx = self._ctx(attempt)
        if db is None:
            return jsonable(self.tool.call(ctx, attempt.rendered.args))
        if self.keyed:
            done = attempt.ledger.effect(ctx.idempotency_key, db)
            if done is not None and done.status == EffectStatus.DONE.value:
                return Reuse(done.result)
        ctx.db = db
        try:
            return self.tool.call(ctx, attempt.rendered.args)
        finally:
            ctx.db = None

    def commit(self, attempt: Attempt, outcome: Any, conn: Connection) -> Committed:
        ledger, key = attempt.ledger, attempt.rendered.idempotency_key
        if isinstance(outcome, Reuse):
            return Committed(output=jsonable(outcome.result), reused=True)
        if self.keyed and key is not None:
            if self.transactional(attempt):
                # A plain INSERT: a concurrent twin with the same key fails on the unique
                # key and its transaction (with its effect) rolls back.
                ledger.insert_effect(
                    conn,
                    key=key,
                    tool=self.tool.name,
                    run_id=attempt.run.run_id,
                    step_key=attempt.key,
                    result=outcome,
                )
            else:
                ledger.finish_effect(conn, key=key, result=outcome)
        return Committed(output=jsonable(outcome))

    def finished(self, ledger: Ledger, error: BaseException | None) -> None:
        from ledgerflow.errors import NonRetryableError

        if self.breaker is None or isinstance(error, NonRetryableError):
            return  # bad input says nothing about the tool's health
        breakers.record(
            ledger, self.breaker_name, self.breaker, success=error is None, trial=self.trial
        )


def execute_step(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: ToolStep,
    run: RunRef,
    *,
    params: dict[str, Any],
    try_number: int = 1,
    max_attempts: int = 1,
    map_index: int = -1,
    item: Any = None,
    is_final_attempt: Any = None,
    forward: bool = True,
) -> StepResult:
    """Run one tool step under the kernel. Raises the tool's error on failure.

    Whether a failure is the last attempt: ``is_final_attempt(error)`` when given (the
    operator passes Airflow's own rule), else the same rule for ``max_attempts`` tries.
    Two transactions on the happy path: the attempt's (run registration, checkpoint and
    referenced outputs, attempt row, effect claim) and the commit's."""
    kind = ToolKind(spec, step, run)
    if callable(is_final_attempt):
        final = is_final_attempt
    else:
        final = final_attempt(try_number, max_attempts - 1, spec.retry_for(step), kind.tool_errors)
    return run_step(
        ledger,
        spec,
        step,
        run,
        kind,
        params=params,
        final=final,
        try_number=try_number,
        map_index=map_index,
        item=item,
        forward=forward,
    )
