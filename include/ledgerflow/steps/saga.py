"""Saga compensation as real Airflow tasks.

When a run fails after some steps completed, each completed step's ``compensate``
action runs, in reverse order, as its own task (``compensate__<step>``): visible in the
grid, retried under its own policy, idempotent under a key derived from the effect it
undoes. The tasks are Airflow *teardown* tasks: they run once the work is done, whatever
its outcome, and do not change the run's state, so a failed run stays failed.

The failing step's failure callback records the failure and marks the saga
``compensating``; the first compensation task also checks Airflow's own task states (a
task killed on its last try may never have run its callback). ``saga__finish`` records
``compensated`` or ``compensation_failed``.

A run that succeeds does not start them: the forward task that ends last, seeing every
other forward task of its run succeeded or skipped (the run can no longer fail), skips
them all in the same call that ends it (``success_skips``, ``end_forward_task``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from airflow.sdk import BaseOperator

from ledgerflow.errors import InvalidParams, NothingToUndo
from ledgerflow.spec.models import KeyedIdempotency, ToolStep, WorkflowSpec
from ledgerflow.steps.operator import LedgerflowOperator

FAILED_STATES = frozenset({"failed", "upstream_failed"})


def compensation_task_id(step_id: str) -> str:
    return f"compensate__{step_id}"


def compensation_step(spec: WorkflowSpec, step: ToolStep, effect_key: str | None) -> ToolStep:
    """The compensate action as a step of its own, keyed by the effect it undoes."""
    call = step.compensate
    assert call is not None
    key = effect_key or f"{{{{ run.id }}}}:{step.id}"
    return ToolStep(
        id=compensation_task_id(step.id),
        tool=call.tool,
        args=call.args,
        idempotency=call.idempotency or KeyedIdempotency(key=key),
        retry=call.retry or spec.retry_for(step),
        timeout=step.timeout,
    )


def run_failed(context: Any, forward_task_ids: list[str]) -> list[str]:
    """Forward tasks that failed in this run, by Airflow's own states."""
    ti = context["ti"]
    dag_run = context["dag_run"]
    states = ti.get_task_states(
        dag_id=dag_run.dag_id, run_ids=[dag_run.run_id], task_ids=forward_task_ids
    )
    by_task = states.get(dag_run.run_id, states) if isinstance(states, dict) else {}
    failed = []
    for task_id, state in by_task.items():
        # Mapped tasks answer {task_id: {map_index: state}} or "task_id_<i>" keys.
        values = state.values() if isinstance(state, dict) else [state]
        if any(str(v) in FAILED_STATES for v in values):
            failed.append(str(task_id))
    return sorted(failed)


# Finished without failing: such a task can no longer fail the run (unless cleared).
_DONE_WELL = frozenset({"success", "skipped", "removed"})
# Trigger rules under which a task whose every upstream task is skipped is skipped too.
_SKIPPED_WITH_UPSTREAM = frozenset({"all_success", "none_failed_min_one_success", "one_success"})


def success_skips(operator: Any, context: Any, *, skipping: Iterable[str] = ()) -> list[str]:
    """The tasks a forward task skips as it ends successfully: ``skipping`` (a branch not
    taken), what Airflow would skip after them, and, when the run can no longer fail,
    every teardown task (``compensate__*``, ``saga__finish``). Empty: end as usual.

    The run can no longer fail when every other forward task of the run (every task that
    is not a teardown, each mapped instance) ended ``success`` or ``skipped`` or is
    skipped now. Only a task with no forward task after it (its direct downstream tasks
    are teardowns, or skipped now) asks Airflow (``ti.get_task_states``, one call); any
    other forward task returns ``skipping`` at no cost. Two last tasks ending at the
    same moment may each see the other still running: neither skips, and the teardowns
    start and skip themselves as without this (slower, the same outcome). So does a run
    whose last forward task is skipped (``when``) or ends without a worker (an approval
    decided in the triggerer or the api-server).

    Works from any forward task (by task ids and the DAG's graph, not step ids): a step's
    task, a mapped item, a fused segment. Off with ``[ledgerflow] skip_saga_on_success``.

    Airflow records the skip and this task's success in two calls: a worker killed between
    them on the task's last try fails the run with its saga skipped (``compensating`` in
    the ledger, nothing undone). On an earlier try the retry reuses the step's checkpoint
    and succeeds. A task cleared after the run succeeded finds the teardowns skipped, as
    it did when they skipped themselves: clear them too (downstream) to re-arm the saga."""
    from ledgerflow import settings

    skipping = list(dict.fromkeys(skipping))
    dag = operator.dag
    teardowns = sorted(t.task_id for t in dag.tasks if t.is_teardown)
    after = operator.get_direct_relatives(upstream=False)
    if not teardowns or any(not t.is_teardown and t.task_id not in skipping for t in after):
        return skipping
    if not settings.get("skip_saga_on_success"):
        return skipping
    forward = [t for t in dag.tasks if not t.is_teardown]
    also = _skipped_with(forward, set(skipping)) - set(skipping)
    others = [t.task_id for t in forward if t.task_id not in also and t.task_id not in skipping]
    ti = context["ti"]
    dag_run = context["dag_run"]
    found = ti.get_task_states(dag_id=dag_run.dag_id, run_ids=[dag_run.run_id], task_ids=others)
    states = _flat_states(found, dag_run.run_id)
    own = (
        ti.task_id if (ti.map_index is None or ti.map_index < 0) else f"{ti.task_id}_{ti.map_index}"
    )
    answered = {key: state for key, state in states.items() if key != own}
    if any(state not in _DONE_WELL for state in answered.values()):
        return skipping  # a task still to end (or failed): it may fail the run
    named = set(states)
    if any(tid not in named and not any(k.startswith(f"{tid}_") for k in named) for tid in others):
        return skipping  # a task without a task instance yet: not decided
    return [*skipping, *sorted(also), *teardowns]


def _skipped_with(forward: list[Any], skipping: set[str]) -> set[str]:
    """``skipping`` and the forward tasks Airflow skips after them: each whose every
    upstream task is skipped, under a trigger rule that skips it then."""
    skipped = set(skipping)
    grew = True
    while grew:
        grew = False
        for task in forward:
            if task.task_id in skipped or not task.upstream_task_ids:
                continue
            rule = str(getattr(task.trigger_rule, "value", task.trigger_rule))
            if rule in _SKIPPED_WITH_UPSTREAM and task.upstream_task_ids <= skipped:
                skipped.add(task.task_id)
                grew = True
    return skipped


def _flat_states(found: Any, run_id: str) -> dict[str, str]:
    """``ti.get_task_states``'s answer for one run as ``{task key: state}`` (a mapped
    instance's key is ``<task_id>_<map_index>``; ``None``: not yet scheduled)."""
    by_task = found.get(run_id, found) if isinstance(found, dict) else {}
    flat: dict[str, str] = {}
    for key, state in by_task.items():
        if isinstance(state, dict):
            flat.update({f"{key}_{i}": _state(s) for i, s in state.items()})
        else:
            flat[str(key)] = _state(state)
    return flat


def _state(state: Any) -> str:
    return str(getattr(state, "value", state)) if state is not None else "none"


def end_forward_task(
    operator: Any, context: Any, output: Any, *, skipping: Iterable[str] = (), ledger: Any = None
) -> Any:
    """End a forward task that succeeded with ``output``: returned as usual, or, when
    ``success_skips`` names tasks to skip, pushed to XCom and the task ended by skipping
    them in one call (``DownstreamTasksSkipped``; Airflow marks this task success). A
    saga skipped so is an event of the run in the ledger (``saga_not_needed``: the task
    that decided, the tasks it skipped); ``ledger``: the task's own, else one is opened."""
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    skipping = list(skipping)
    try:
        skips = success_skips(operator, context, skipping=skipping)
    except Exception:  # a shortcut never fails a step that succeeded: the teardowns run
        operator.log.warning("could not decide whether the saga is needed", exc_info=True)
        skips = skipping
    if not skips:
        return output
    teardowns = {task.task_id for task in operator.dag.tasks if task.is_teardown}
    saga = [task_id for task_id in skips if task_id in teardowns]
    if saga:
        operator.log.info("the run can no longer fail: skipping %s", ", ".join(saga))
        _record_saga_not_needed(ledger, context, saga)
    # Airflow pushes no return value for a task ended by this exception: push it first.
    context["ti"].xcom_push(key="return_value", value=output)
    raise DownstreamTasksSkipped(tasks=skips)


def _record_saga_not_needed(ledger: Any, context: Any, skipped: list[str]) -> None:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.operator import run_ref

    ti = context["ti"]
    try:
        (ledger or Ledger.from_airflow()).record_event(
            run_ref(context).run_id,
            None,
            "saga_not_needed",
            {"task_id": ti.task_id, "map_index": ti.map_index, "skipped": skipped},
        )
    except Exception:  # the event repeats what Airflow's states say: not worth failing the step
        import logging

        logging.getLogger(__name__).warning("saga_not_needed not recorded", exc_info=True)


def has_compensations(spec: WorkflowSpec) -> bool:
    """Whether the workflow's DAG has compensation tasks (a step declaring ``compensate``)."""
    return any(isinstance(s, ToolStep) and s.compensate is not None for s in spec.steps)


def saga_started(ledger: Any, spec: WorkflowSpec, run_id: str, failed_step: str | None) -> None:
    """A forward step failed for good: the saga starts. A workflow with nothing it could
    undo (no compensation tasks) ends its saga at once, ``nothing_to_compensate``:
    nothing else would ever finish it."""
    ledger.start_saga(run_id, failed_step)
    if not has_compensations(spec):
        ledger.finish_saga(run_id)


def step_failed(context: Any) -> None:
    """Failure callback of every forward step: record the failure, start the saga."""
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.steps.operator import run_ref
    from ledgerflow.workflow.loaded import spec_for_dag

    run = run_ref(context)
    ledger = Ledger.from_airflow()
    ledger.migrate()
    ti = context["ti"]
    if isinstance(context.get("exception"), InvalidParams):
        record_rejected_params(ledger, run, context, context["exception"])
    ledger.record_event(run.run_id, ti.task_id, "step_failed_final", {"try_number": ti.try_number})
    saga_started(ledger, spec_for_dag(run.dag_id), run.run_id, ti.task_id)


def record_rejected_params(ledger: Any, run: Any, context: Any, error: InvalidParams) -> None:
    """A run whose params do not fit its workflow (Airflow's own trigger lets undeclared
    keys through): registered with the params it got, and the problems, field by field."""
    with ledger.begin() as conn:
        ledger.ensure_run(
            run_id=run.run_id,
            dag_id=run.dag_id,
            workflow=error.workflow,
            version=error.version,
            params=dict(context.get("params") or {}),
            trigger_kind=run.trigger_kind,
            retry_of=run.retry_of,
            conn=conn,
        )
        ledger.record_event(
            run.run_id,
            context["ti"].task_id,
            "params_rejected",
            {"error": str(error), "problems": [p.as_dict() for p in error.problems]},
            conn=conn,
        )


def compensate_step(
    ledger: Any,
    spec: WorkflowSpec,
    run: Any,
    step_id: str,
    *,
    params: dict[str, Any],
    try_number: int = 1,
    retries: int = 0,
    first: bool = False,
) -> Any:
    """Undo one completed step of a failed run (what a compensation task does), under
    the kernel with ``forward=False``; the compensation record says how it went. Raises
    ``NothingToUndo`` when the step did not complete, and the undo's error on failure
    (recorded ``failed`` when it was the last attempt)."""
    from ledgerflow.steps.protocol import execute_step
    from ledgerflow.steps.retry import final_attempt
    from ledgerflow.tools.registry import get_tool

    step = spec.tool_step(step_id)
    if first:
        _record_not_compensable(ledger, spec, run.run_id)
    checkpoint = ledger.checkpoint(run.run_id, step.id)
    if checkpoint is not None and checkpoint.status == "compensated":
        # Undone already (this task retried or cleared after it succeeded).
        raise NothingToUndo(f"step {step.id} was compensated already")
    if checkpoint is None or checkpoint.status != "completed":
        ledger.record_compensation(
            run.run_id, step.id, "not_needed", detail="the step did not complete"
        )
        raise NothingToUndo(f"step {step.id} did not complete: nothing to undo")
    owner = _effect_owner(ledger, run.run_id, checkpoint.idempotency_key)
    if owner is not None:
        # Another run's effect, reused under the same business key: undoing it would
        # take a live payment from a run that may have succeeded with it.
        ledger.record_compensation(
            run.run_id,
            step.id,
            "not_needed",
            detail=f"the effect is also run {owner}'s (the same key): not undone",
        )
        raise NothingToUndo(f"step {step.id}: the effect is also run {owner}'s: not undone")
    undo = compensation_step(spec, step, checkpoint.idempotency_key)
    final = final_attempt(
        try_number, retries, spec.retry_for(undo), get_tool(undo.tool).non_retryable
    )
    ledger.record_compensation(run.run_id, step.id, "running", tool=undo.tool)
    try:
        result = execute_step(
            ledger,
            spec,
            undo,
            run,
            params=params,
            try_number=try_number,
            max_attempts=retries + 1,
            is_final_attempt=final,
            forward=False,  # a compensation neither reopens the run nor reuses the chain
        )
    except BaseException as error:
        if isinstance(error, Exception) and final(error):
            ledger.record_compensation(
                run.run_id,
                step.id,
                "failed",
                tool=undo.tool,
                detail=f"{type(error).__name__}: {error}",
            )
        raise
    ledger.record_compensation(run.run_id, step.id, "completed", tool=undo.tool)
    return result.output


def _effect_owner(ledger: Any, run_id: str, key: str | None) -> str | None:
    """Another run that still stands on the step's effect, if any: one outside
    ``run_id``'s retry chain, running or succeeded, that made the effect or completed a
    step on it (the same business key). Its effect is not this saga's to undo; the last
    failing run that stood on it undoes it."""
    from sqlalchemy import select

    from ledgerflow.ledger import chains
    from ledgerflow.ledger import schema as t

    if not key:
        return None
    chain = {row["run_id"] for row in chains.chain(ledger, run_id)}
    effect = ledger.effect(key)
    with ledger.engine.connect() as conn:
        users = set(
            conn.execute(
                select(t.steps.c.run_id).where(
                    t.steps.c.idempotency_key == key, t.steps.c.status == "completed"
                )
            ).scalars()
        )
        if effect is not None:
            users.add(effect.run_id)
        others = sorted(users - chain)
        if not others:
            return None
        live = conn.execute(
            select(t.runs.c.run_id).where(
                t.runs.c.run_id.in_(others), t.runs.c.status.in_(["running", "succeeded"])
            )
        ).scalars()
        standing = sorted(live)
    return standing[0] if standing else None


def _record_not_compensable(ledger: Any, spec: WorkflowSpec, run_id: str) -> None:
    done = {c.step_id for c in ledger.checkpoints(run_id) if c.status == "completed"}
    for step in spec.steps:
        if getattr(step, "compensate", None) is None and step.id in done:
            ledger.record_compensation(
                run_id, step.id, "not_compensable", detail="completed, declares no compensate"
            )


class CompensationOperator(LedgerflowOperator):
    """Undoes one completed step of a failed run (a teardown task): the compensation kind
    of the one operator base, its work done by ``compensate_step`` under the kernel."""

    ui_color = "#fbe9e7"

    def __init__(
        self, *, step_id: str, forward_task_ids: list[str], first: bool, **kwargs: Any
    ) -> None:
        super().__init__(step_id=step_id, **kwargs)
        self.forward_task_ids = forward_task_ids
        self.first = first

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_params, run_ref
        from ledgerflow.steps.segment import failed_step
        from ledgerflow.workflow.loaded import spec_for_dag

        spec = spec_for_dag(self.dag_id)
        run = run_ref(context)
        ledger = Ledger.from_airflow()
        ledger.migrate()
        row = ledger.run(run.run_id) or {}
        saga = row.get("saga")
        if row.get("status") == "cancelled" and not row.get("cancel_compensate"):
            raise AirflowSkipException("the run was cancelled without --compensate")
        if saga is None:
            failed = run_failed(context, self.forward_task_ids)
            if not failed:
                raise AirflowSkipException("the run did not fail: nothing to undo")
            from ledgerflow.workflow.segments import steps_of

            # A segment's task failed: the saga starts at the step it stopped at.
            steps = list(steps_of(spec, failed[0]))
            ledger.start_saga(run.run_id, failed_step(ledger, run.run_id, steps))
        try:
            output = compensate_step(
                ledger,
                spec,
                run,
                self.step_id,
                params=run_params(spec, context),
                try_number=context["ti"].try_number,
                retries=self.retries or 0,
                first=self.first,
            )
        except NothingToUndo as nothing:
            raise AirflowSkipException(str(nothing)) from None
        self.log.info("%s", undone_line(ledger, run.run_id, self.step_id, output))
        return output


def finish_saga(ledger: Any, run_id: str) -> str | None:
    """The saga's outcome, once every compensation is done (``None``: no saga)."""
    return ledger.finish_saga(run_id)  # type: ignore[no-any-return]


class SagaFinishOperator(BaseOperator):
    """Records the saga's outcome once every compensation task is done (a teardown task)."""

    ui_color = "#fbe9e7"
    template_fields = ()

    def execute(self, context: Any) -> str:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.ledger.store import Ledger
        from ledgerflow.steps.operator import run_ref

        ledger = Ledger.from_airflow()
        ledger.migrate()
        run_id = run_ref(context).run_id
        outcome = finish_saga(ledger, run_id)
        if outcome is None:
            raise AirflowSkipException("no saga: the run did not fail")
        self.log.info("%s", saga_summary(ledger, run_id, outcome))
        return outcome


def undone_line(ledger: Any, run_id: str, step_id: str, output: Any) -> str:
    """What a compensation task says in its log: the step, the undo tool, the effect's
    key and the tool's answer (e.g. ``undid charge_payment with demo.refund_payment
    (effect key checkout:charge_payment:o-1): {'refunded': True}``)."""
    record = ledger.compensations(run_id).get(step_id) or {}
    checkpoint = ledger.checkpoint(run_id, step_id)
    key = checkpoint.idempotency_key if checkpoint is not None else None
    where = f" (effect key {key})" if key else ""
    return f"undid {step_id} with {record.get('tool') or 'its compensate tool'}{where}: {output}"


def saga_summary(ledger: Any, run_id: str, outcome: str) -> str:
    """What ``saga__finish`` says in its log: the outcome, then each step by what
    happened to it (undone, failed to undo, not needed, not compensable)."""
    by_status: dict[str, list[str]] = {}
    for step, record in sorted(ledger.compensations(run_id).items()):
        by_status.setdefault(str(record["status"]), []).append(step)
    words = {
        "completed": "undone",
        "failed": "FAILED to undo (dead-lettered)",
        "not_needed": "nothing to undo",
        "not_compensable": "completed, declares no compensate",
    }
    parts = [
        f"{words.get(status, status)}: {', '.join(steps)}" for status, steps in by_status.items()
    ]
    return f"saga {outcome}" + (f" - {'; '.join(parts)}" if parts else "")
