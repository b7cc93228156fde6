"""The step protocol: checkpoint lookup, attempt, effect with its key, checkpoint.

Independent of Airflow so it can be driven directly by tests and benchmarks; the
operator is a thin adapter around ``execute_step``.

For one step (or one item of a for_each step):
1. a completed checkpoint in the ledger -> its output is reused, nothing runs;
2. ``when`` is false -> the step is recorded as skipped;
3. otherwise an attempt is recorded, then the tool runs:
   * transactional tools (writing through ``ctx.db``) run inside one transaction with
     the effect record and the checkpoint: all three commit, or none does;
   * other tools with an idempotency key first claim the key (a pending effect row,
     committed), then call the tool with that key, then record the result and the
     checkpoint together. A retry after a crash finds the claim and calls again with
     the SAME key, so the remote side de-duplicates; a finished effect is never redone;
4. on failure the attempt is recorded as failed; the final failure gets a dead letter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import Connection

from ledgerflow import faults
from ledgerflow.errors import InjectedFault, NonRetryableError
from ledgerflow.ledger import breakers
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import KeyedIdempotency, ToolStep, WorkflowSpec
from ledgerflow.spec.templates import evaluate, render_value
from ledgerflow.spec.validate import referenced_steps
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import get_tool


@dataclass(frozen=True)
class RunRef:
    """Which run a step belongs to."""

    run_id: str
    dag_id: str
    trigger_kind: str = "manual"
    logical_date: str | None = None
    retry_of: str | None = None
    # A retry run re-runs this step and everything downstream of it (``--from``).
    retry_from: str | None = None


@dataclass
class StepResult:
    status: str  # completed | reused | skipped
    output: Any = None
    idempotency_key: str | None = None
    effect_reused: bool = False
    details: dict[str, Any] = field(default_factory=dict)


class StepSkipped(Exception):
    """``when`` was false; the adapter turns this into a skipped task."""


def step_key(step_id: str, map_index: int) -> str:
    return step_id if map_index < 0 else f"{step_id}[{map_index}]"


def template_context(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: RunRef,
    params: dict[str, Any],
    item: Any,
    map_index: int,
    *,
    step_ids: Iterable[str] | None = None,
    conn: Connection | None = None,
    outputs: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    local_date = None
    if run.logical_date:
        import pendulum

        local_date = pendulum.parse(run.logical_date).in_tz(spec.timezone)  # type: ignore[union-attr]
    context: dict[str, Any] = {
        "params": params,
        "steps": outputs
        if outputs is not None
        else ledger.outputs(run.run_id, step_ids, conn=conn),
        "run": {
            "id": run.run_id,
            "workflow": spec.name,
            "version": spec.version,
            # In the workflow's time zone: a 02:30 Amsterdam run is that day's run.
            "logical_date": local_date.isoformat() if local_date else None,
            "date": local_date.date().isoformat() if local_date else None,
        },
    }
    if map_index >= 0:
        context["item"] = item
        context["index"] = map_index
    return context


def render_key(
    spec: WorkflowSpec, step: ToolStep, run: RunRef, key: str, context: dict[str, Any]
) -> str:
    if isinstance(step.idempotency, KeyedIdempotency):
        rendered = render_value(step.idempotency.key, context)
        # The workflow name scopes the key: two workflows may use the same business id.
        return f"{spec.name}:{step.id}:{rendered}"
    return f"{run.run_id}:{key}"


def register_run(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: RunRef,
    params: dict[str, Any],
    conn: Connection | None = None,
) -> bool:
    """Record the run in the ledger once (whichever task gets there first).

    Raises InvalidParams (non-retryable, naming each field) when the params do not fit
    the workflow's params schema, whichever way the run was triggered."""
    from ledgerflow.factory import spec_hash
    from ledgerflow.spec.params import check_params

    check_params(spec.name, spec.version, spec.params, params, engine_keys=True)
    return ledger.ensure_run(
        run_id=run.run_id,
        dag_id=run.dag_id,
        workflow=spec.name,
        version=spec.version,
        params=params,
        trigger_kind=run.trigger_kind,
        retry_of=run.retry_of,
        retry_from=run.retry_from,
        spec_hash=spec_hash(run.dag_id),
        conn=conn,
    )


def reuse_from_lineage(
    ledger: Ledger, spec: WorkflowSpec, run: RunRef, key: str, step_id: str, conn: Connection
) -> Any:
    """A retry run's step: the completed checkpoint of the same step in the lineage,
    copied into this run (None when there is none, or the step is re-run on purpose)."""
    if run.retry_of is None:
        return None
    from ledgerflow.ledger import lineage

    found = lineage.find_reusable(
        conn,
        spec,
        retry_of=run.retry_of,
        retry_from=run.retry_from,
        step_key=key,
        step_id=step_id,
    )
    return None if found is None else lineage.adopt(ledger, conn, run.run_id, found)


class TemplateRenderError(NonRetryableError):
    """A template could not be rendered with this run's params and outputs."""


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
) -> StepResult:
    """Run one step under the protocol above. Raises the tool's error on failure.

    Two transactions on the happy path: one that registers the run, reads the
    checkpoint and the referenced outputs, records the attempt and (for keyed,
    non-transactional tools) claims the key; one that records the effect and the
    checkpoint (for transactional tools, together with the effect itself).
    """
    ledger.migrate()
    key = step_key(step.id, map_index)
    tool = get_tool(step.tool)
    breaker = step.breaker or tool.breaker
    breaker_name = (breaker.name if breaker else None) or tool.name
    gate = breakers.Pass(trial=False)
    keyed = isinstance(step.idempotency, KeyedIdempotency)
    args: dict[str, Any] = {}
    idem_key: str | None = None
    render_error: TemplateRenderError | None = None
    with ledger.begin() as conn:
        checkpoint, outputs = ledger.checkpoint_and_outputs(
            run.run_id, key, referenced_steps(spec, step), conn
        )
        if checkpoint is None and not outputs:
            # No row of this run was read: it may be the run's first step. (A checkpoint
            # or an upstream output proves an earlier task registered the run.)
            register_run(ledger, spec, run, params, conn)
        if checkpoint is None and run.retry_of is not None:
            checkpoint = reuse_from_lineage(ledger, spec, run, key, step.id, conn)
        if checkpoint is not None and checkpoint.status == "completed":
            ledger.record_event(run.run_id, key, "checkpoint_reused", None, conn=conn)
            return StepResult("reused", checkpoint.output, checkpoint.idempotency_key)
        skipped = checkpoint is not None and checkpoint.status == "skipped"
        if not skipped:
            context = template_context(ledger, spec, run, params, item, map_index, outputs=outputs)
            try:
                if step.when is not None and not evaluate(step.when, context):
                    ledger.mark_step(
                        run_id=run.run_id,
                        step_key=key,
                        step_id=step.id,
                        map_index=map_index,
                        status="skipped",
                        conn=conn,
                    )
                    skipped = True
                else:
                    args = render_value(step.args, context)
                    idem_key = render_key(spec, step, run, key, context)
            except TemplateError as exc:
                render_error = TemplateRenderError(f"step {key}: {type(exc).__name__}: {exc}")
        if skipped:
            return_skip = True
        else:
            return_skip = False
            if breaker is not None and render_error is None:
                # Raises BreakerOpen (before any attempt is recorded) when the call must wait.
                gate = breakers.acquire(ledger, conn, breaker_name, breaker)
            attempt_id = ledger.begin_attempt(
                run_id=run.run_id,
                step_key=key,
                step_id=step.id,
                map_index=map_index,
                try_number=try_number,
                args=args,
                idempotency_key=idem_key,
                first=checkpoint is None,
                conn=conn,
            )
            if render_error is not None:
                _record_failure(
                    ledger,
                    spec,
                    run,
                    key,
                    attempt_id,
                    render_error,
                    try_number,
                    args,
                    None,
                    True,
                    conn,
                )
            elif keyed and not tool.is_transactional(args):
                assert idem_key is not None
                claimed = ledger.claim_effect(
                    conn, key=idem_key, tool=tool.name, run_id=run.run_id, step_key=key
                )
                done = None if claimed else ledger.effect(idem_key, conn)
                if done is not None and done.status == "done":
                    ledger.complete_step(
                        conn,
                        run_id=run.run_id,
                        step_key=key,
                        attempt_id=attempt_id,
                        output=done.result,
                        reused=True,
                    )
                    return StepResult("completed", done.result, idem_key, effect_reused=True)
    if return_skip:
        raise StepSkipped(f"`when: {step.when}` is false")
    if render_error is not None:
        raise render_error
    assert idem_key is not None
    ctx = ToolContext(
        run_id=run.run_id,
        step_key=key,
        workflow=spec.name,
        version=spec.version,
        try_number=try_number,
        idempotency_key=idem_key,
    )
    try:
        if tool.is_transactional(args):
            output, reused = _run_transactional(
                ledger, tool, ctx, args, run, key, attempt_id, keyed
            )
        else:
            output, reused = _run_keyed(ledger, tool, ctx, args, run, key, attempt_id, keyed)
        if breaker is not None:
            breakers.record(ledger, breaker_name, breaker, success=True, trial=gate.trial)
        return StepResult("completed", output, idem_key, effect_reused=reused)
    except BaseException as error:
        # A timeout (AirflowTaskTimeout is a BaseException) is a failed attempt; a crash
        # signal or an interpreter exit is not: the next attempt marks that one lost.
        if isinstance(error, InjectedFault | KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        if breaker is not None and not isinstance(error, NonRetryableError):
            # Bad input says nothing about the tool's health; everything else does.
            breakers.record(ledger, breaker_name, breaker, success=False, trial=gate.trial)
        final = (
            bool(is_final_attempt(error))
            if callable(is_final_attempt)
            else try_number >= max_attempts
        )
        _record_failure(
            ledger, spec, run, key, attempt_id, error, try_number, args, idem_key, final
        )
        raise


def _record_failure(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: RunRef,
    key: str,
    attempt_id: int,
    error: BaseException,
    try_number: int,
    args: Any,
    idem_key: str | None,
    final: bool,
    conn: Connection | None = None,
) -> None:
    with ledger.begin(conn) as conn:
        ledger.fail_attempt(
            run_id=run.run_id,
            step_key=key,
            attempt_id=attempt_id,
            error=error,
            final=final,
            conn=conn,
        )
        if final:
            ledger.dead_letter(
                workflow=spec.name,
                version=spec.version,
                run_id=run.run_id,
                step_key=key,
                attempts=try_number,
                error=error,
                args=args,
                idempotency_key=idem_key,
                conn=conn,
            )


def _run_transactional(
    ledger: Ledger,
    tool: Any,
    ctx: ToolContext,
    args: dict[str, Any],
    run: RunRef,
    key: str,
    attempt_id: int,
    keyed: bool,
) -> tuple[Any, bool]:
    with ledger.begin() as conn:
        done = ledger.effect(ctx.idempotency_key, conn) if keyed else None
        if done is not None and done.status == "done":
            output, reused = done.result, True
        else:
            ctx.db = conn
            faults.hit("before_effect", key)
            output, reused = tool.call(ctx, args), False
            faults.hit("after_effect", key)
            ctx.db = None
            if keyed:
                ledger.insert_effect(
                    conn,
                    key=ctx.idempotency_key,
                    tool=tool.name,
                    run_id=run.run_id,
                    step_key=key,
                    result=output,
                )
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
    return _jsonable(output), reused


def _run_keyed(
    ledger: Ledger,
    tool: Any,
    ctx: ToolContext,
    args: dict[str, Any],
    run: RunRef,
    key: str,
    attempt_id: int,
    keyed: bool,
) -> tuple[Any, bool]:
    # A keyed effect was claimed (or found done) in the attempt's transaction.
    faults.hit("before_effect", key)
    output = _jsonable(tool.call(ctx, args))
    faults.hit("after_effect", key)
    with ledger.begin() as conn:
        if keyed:
            ledger.finish_effect(conn, key=ctx.idempotency_key, result=output)
        ledger.complete_step(
            conn,
            run_id=run.run_id,
            step_key=key,
            attempt_id=attempt_id,
            output=output,
            reused=False,
        )
        faults.hit("before_commit", key)
    faults.hit("after_commit", key)
    return output, False


def _jsonable(value: Any) -> Any:
    from ledgerflow.ledger.store import dumps, loads

    return loads(dumps(value))
