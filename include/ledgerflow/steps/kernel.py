"""The step kernel: everything a step does around its own work, written once.

Every kind of step (tool, LLM, quality, approval, event, compensation) goes through
``run_step`` (or, for a step that parks, through ``prologue``) and supplies only its own
part as a ``StepKind``: ``render`` its inputs, ``claim`` its effect, ``perform`` the work,
``commit`` what it produced, and how a reused checkpoint reads. The kernel does the rest,
the same way for every kind:

1. register the run (the first task to get there), or reopen it when Airflow cleared a
   task of an ended run; the retry chain comes from the ledger's run row, never from
   the DagRun's conf;
2. a completed checkpoint of this run -> its output is reused, nothing runs; a skipped
   one stays skipped; a *compensated* one runs again (as a new effect);
3. ``when`` false -> recorded as skipped;
4. the kind renders its inputs (a template error is a non-retryable failure with a dead
   letter, on the first try);
5. a retry run reuses the completed checkpoint of the same step in its chain when the
   rendered inputs match (``ledger.chains``);
6. the breaker gate (tools with a breaker), the effect's claim, and the attempt record,
   in the same transaction as 1-5;
7. the step's turn from its rate limits' token buckets (``ledger.rates``; it waits for
   its slot), then the work, at the named fault points ``before_effect``/``after_effect``, then one
   transaction that commits what the kind produced with the checkpoint
   (``before_commit``/``after_commit``); a transactional tool performs its effect inside
   that transaction;
8. on failure: the attempt is failed; whether it was the last one is decided by the one
   predicate Airflow's retry policy also uses (``steps.retry.final_attempt``); the last
   one writes the dead letter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jinja2 import TemplateError
from sqlalchemy import Connection

from ledgerflow import faults
from ledgerflow.errors import (
    NonRetryableError,
    RunCancelled,
    StepSkipped,
    TemplateRenderError,
    UpstreamUndone,
)
from ledgerflow.ledger.store import Checkpoint, Ledger
from ledgerflow.lifecycle import StepStatus
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.spec.templates import evaluate
from ledgerflow.steps.kind import (
    CRASHES,
    Attempt,
    Committed,
    Prologue,
    Rendered,
    Reuse,
    StepKind,
    StepResult,
    jsonable,
)
from ledgerflow.steps.run import (
    Chain,
    RunRef,
    join_run,
    register_run,
    step_key,
    template_context,
    undone_upstream,
)
from ledgerflow.workflow.validate import referenced_steps

__all__ = [
    "Attempt",
    "Chain",
    "Committed",
    "Prologue",
    "Rendered",
    "Reuse",
    "RunRef",
    "StepKind",
    "StepResult",
    "StepSkipped",
    "TemplateRenderError",
    "UpstreamUndone",
    "join_run",
    "jsonable",
    "parked_step_unrendered",
    "prologue",
    "record_failure",
    "register_run",
    "run_step",
    "step_key",
    "template_context",
]


def prologue(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: Any,
    run: RunRef,
    kind: StepKind,
    conn: Connection,
    *,
    params: dict[str, Any],
    map_index: int = -1,
    item: Any = None,
    forward: bool = True,
) -> Prologue:
    """Run registration, checkpoint reuse (this run, then the retry chain), ``when`` and
    rendering, in the caller's transaction. ``forward=False`` (compensation steps):
    no reopening and no reuse from the chain (a retry run undoes its own effects)."""
    key = step_key(step.id, map_index)
    row, checkpoint, outputs = ledger.run_and_steps(
        run.run_id, key, referenced_steps(spec, step), conn
    )
    chain = Chain(None, None)
    if checkpoint is None or checkpoint.status != StepStatus.COMPLETED.value:
        chain = join_run(ledger, spec, run, params, conn, forward=forward, row=row)
    status = checkpoint.status if checkpoint is not None else None
    if checkpoint is not None and status == StepStatus.COMPLETED.value:
        ledger.record_event(run.run_id, key, "checkpoint_reused", None, conn=conn)
        return Prologue(key, checkpoint, {}, reused=kind.reused(checkpoint))
    if status == StepStatus.SKIPPED.value:
        return Prologue(key, checkpoint, {}, skipped=True)
    context = template_context(ledger, spec, run, params, item, map_index, outputs=outputs)
    found = Prologue(key, checkpoint, context, chain=chain)
    if forward and chain.had_saga:
        undone = undone_upstream(spec, run.run_id, step.id, conn)
        if undone:
            # A task cleared after the saga: running on would build on undone effects.
            found.error = UpstreamUndone(
                f"step {key}: {', '.join(undone)} of this run was undone by its saga; "
                "clear those steps too (Airflow's clear with upstream), or retry the run"
            )
            return found
    try:
        if step.when is not None and not evaluate(step.when, context):
            ledger.mark_step(
                run_id=run.run_id,
                step_key=key,
                step_id=step.id,
                map_index=map_index,
                status=StepStatus.SKIPPED.value,
                conn=conn,
            )
            found.skipped = True
            return found
        found.rendered = kind.render(context)
    except TemplateError as exc:
        found.error = TemplateRenderError(f"step {key}: {type(exc).__name__}: {exc}")
    except NonRetryableError as exc:  # an input that cannot work (e.g. no such dataset)
        found.error = exc
    if forward and checkpoint is None and chain.retry_of is not None:
        adopted = reuse_from_chain(
            ledger,
            spec,
            run.run_id,
            chain,
            key,
            step.id,
            None if found.rendered is None else found.rendered.args,
            conn,
        )
        if adopted is not None:
            result = kind.reused(adopted)
            result.details.setdefault("reused_from", adopted.reused_from)
            return Prologue(key, adopted, context, reused=result)
    return found


def reuse_from_chain(
    ledger: Ledger,
    spec: WorkflowSpec,
    run_id: str,
    chain: Chain,
    key: str,
    step_id: str,
    args: Any,
    conn: Connection,
) -> Checkpoint | None:
    """A retry run's step: the completed checkpoint of the same step in its chain (with
    the same inputs), copied into this run; None when there is none."""
    from ledgerflow.ledger import chains

    assert chain.retry_of is not None
    found = chains.find_reusable(
        conn,
        spec,
        retry_of=chain.retry_of,
        retry_from=chain.retry_from,
        step_key=key,
        step_id=step_id,
        args=args,
    )
    return None if found is None else chains.adopt(ledger, conn, run_id, found)


def run_step(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: Any,
    run: RunRef,
    kind: StepKind,
    *,
    params: dict[str, Any],
    final: Callable[[BaseException], bool],
    try_number: int = 1,
    map_index: int = -1,
    item: Any = None,
    forward: bool = True,
) -> StepResult:
    """Run one step (or one item of a for_each step) under the kernel above.

    Raises ``StepSkipped`` when ``when`` is false, the step's error when it fails (the
    attempt and, on the last one, the dead letter recorded), and whatever the kind's
    ``gate`` raises before any attempt is recorded."""
    ledger.migrate()
    with ledger.begin() as conn:
        found = prologue(
            ledger,
            spec,
            step,
            run,
            kind,
            conn,
            params=params,
            map_index=map_index,
            item=item,
            forward=forward,
        )
        if found.reused is not None:
            return found.reused
        if found.skipped:
            attempt = None
        else:
            attempt, early = _begin_attempt(
                kind, found, ledger, spec, step, run, map_index, try_number, conn, forward
            )
            if early is not None:
                return early
    if attempt is None:
        raise StepSkipped(f"`when: {step.when}` is false")
    if found.error is not None:
        raise found.error
    try:
        _take_turns(attempt)
        committed = _perform_and_commit(kind, attempt)
    except BaseException as error:
        if isinstance(error, (*CRASHES, RunCancelled)):
            raise  # cancelled: its attempt is ``lost`` already, no dead letter
        kind.finished(ledger, error)
        record_failure(attempt, error, final=bool(final(error)))
        raise
    kind.finished(ledger, None)
    if committed.rejection is not None:
        raise committed.rejection
    return StepResult(
        "completed",
        committed.output,
        attempt.rendered.idempotency_key,
        effect_reused=committed.reused,
        details=committed.details,
    )


def _begin_attempt(
    kind: StepKind,
    found: Prologue,
    ledger: Ledger,
    spec: WorkflowSpec,
    step: Any,
    run: RunRef,
    map_index: int,
    try_number: int,
    conn: Connection,
    forward: bool = True,
) -> tuple[Attempt, StepResult | None]:
    """Step 6: the breaker gate, the effect's claim and the attempt row (a render error
    is recorded as the final failure at once). Returns a finished effect's result when
    the claim found one."""
    rendered = found.rendered or Rendered(args={})
    early = None
    if found.error is None:
        kind.gate(ledger, conn)
        early = kind.claim(ledger, run, found.key, rendered, conn)
    attempt = Attempt(
        ledger=ledger,
        spec=spec,
        step=step,
        run=run,
        key=found.key,
        map_index=map_index,
        try_number=try_number,
        rendered=rendered,
        context=found.context,
        first=found.checkpoint is None,
        letters=found.checkpoint is not None or found.chain.retry_of is not None,
        forward=forward,
    )
    attempt.attempt_id = ledger.begin_attempt(
        run_id=run.run_id,
        step_key=found.key,
        step_id=step.id,
        map_index=map_index,
        try_number=try_number,
        args=rendered.args,
        idempotency_key=rendered.idempotency_key,
        first=attempt.first,
        conn=conn,
    )
    if found.error is not None:
        record_failure(attempt, found.error, final=True, conn=conn)
    elif early is not None:
        ledger.complete_step(
            conn,
            run_id=run.run_id,
            step_key=found.key,
            attempt_id=attempt.attempt_id,
            output=early.result,
            reused=True,
            letters=attempt.letters,
        )
        reused = StepResult("completed", early.result, rendered.idempotency_key, effect_reused=True)
        if early.from_run is not None and early.from_run != run.run_id:
            reused.details["reused_from"] = early.from_run
        return attempt, reused
    else:
        attempt.prepared = kind.prepare(attempt, conn)
    return attempt, None


def _take_turns(attempt: Attempt) -> None:
    """Wait for the step's slot in the token bucket of each rate limit it meets (a tool's
    ``rate``, the step's own), shared by every worker through the ledger."""
    from ledgerflow.workflow.limits import rates_of

    buckets = rates_of(attempt.spec, attempt.step)
    if buckets:
        from ledgerflow.ledger.rates import wait_turns

        wait_turns(attempt.ledger, buckets)


def _perform_and_commit(kind: StepKind, attempt: Attempt) -> Committed:
    ledger, key = attempt.ledger, attempt.key
    if kind.transactional(attempt):
        with ledger.begin() as conn:
            faults.hit("before_effect", key)
            outcome = kind.perform(attempt, conn)
            faults.hit("after_effect", key)
            committed = _commit(kind, attempt, outcome, conn)
            faults.hit("before_commit", key)
    else:
        faults.hit("before_effect", key)
        outcome = kind.perform(attempt, None)
        faults.hit("after_effect", key)
        with ledger.begin() as conn:
            committed = _commit(kind, attempt, outcome, conn)
            faults.hit("before_commit", key)
    faults.hit("after_commit", key)
    return committed


def _commit(kind: StepKind, attempt: Attempt, outcome: Any, conn: Connection) -> Committed:
    if attempt.forward:
        # First, before any row of the step is written: a cancel waits for this commit,
        # or this commit sees the cancel and rolls back (``ledger/cancels.py``).
        attempt.ledger.live_run(conn, attempt.run.run_id)
    committed = kind.commit(attempt, outcome, conn)
    if committed.rejection is not None:
        # The work ended, and its answer is final (invalid output, failed expectations).
        record_failure(
            attempt, committed.rejection, final=True, conn=conn, letter_args=committed.letter_args
        )
    else:
        attempt.ledger.complete_step(
            conn,
            run_id=attempt.run.run_id,
            step_key=attempt.key,
            attempt_id=attempt.attempt_id,
            output=committed.output,
            reused=committed.reused,
            letters=attempt.letters,
        )
    return committed


def record_failure(
    attempt: Attempt,
    error: BaseException,
    *,
    final: bool,
    conn: Connection | None = None,
    letter_args: Any = None,
) -> None:
    """The failed attempt; on the last one, the dead letter with the step's inputs."""
    ledger, spec, run = attempt.ledger, attempt.spec, attempt.run
    with ledger.begin(conn) as conn:
        ledger.fail_attempt(
            run_id=run.run_id,
            step_key=attempt.key,
            attempt_id=attempt.attempt_id,
            error=error,
            final=final,
            conn=conn,
        )
        if final:
            ledger.dead_letter(
                workflow=spec.name,
                version=spec.version,
                run_id=run.run_id,
                step_key=attempt.key,
                attempts=attempt.try_number,
                error=error,
                args=letter_args if letter_args is not None else attempt.rendered.letter_args,
                idempotency_key=attempt.rendered.idempotency_key,
                conn=conn,
            )


def parked_step_unrendered(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: Any,
    run: RunRef,
    found: Prologue,
    try_number: int,
    *,
    conn: Connection | None = None,
) -> BaseException:
    """A step that parks (approval, event, wait) whose arguments did not render: its
    attempt and final failure (with the dead letter) are recorded, as for any step, and
    the error is returned for the caller to raise."""
    error = found.error or RuntimeError(f"{step.kind} step {step.id!r} rendered nothing")
    attempt = Attempt(ledger, spec, step, run, found.key, -1, try_number, Rendered({}), {}, True)
    attempt.attempt_id = ledger.begin_attempt(
        run_id=run.run_id,
        step_key=found.key,
        step_id=step.id,
        map_index=-1,
        try_number=try_number,
        args={},
        idempotency_key=None,
        first=found.checkpoint is None,
        conn=conn,
    )
    record_failure(attempt, error, final=True, conn=conn)
    return error
