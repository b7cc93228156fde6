"""Workflow spec -> Airflow DAG, one DAG per workflow version.

Each version lives in ``workflows/<name>/v<N>.yaml`` beside a two-line Python file
(``v<N>.py``, written by ``ledgerflow sync``) that calls ``dag_for_spec_file``. Airflow
parses each such file on its own, so a bad workflow file is exactly one import error
naming that file, line and field, and every other workflow still loads; a worker that
starts a task parses only the one YAML file its DAG came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledgerflow.spec.models import ParamSpec, ToolStep, WorkflowSpec

if TYPE_CHECKING:
    from airflow.sdk import DAG

# Re-exported: the registry of built specs lives in workflow.loaded (no import cycle with steps).
from ledgerflow.workflow.loaded import (
    _SPEC_FILES,
    _SPEC_HASHES,
    _SPECS,
    spec_for_dag,
    spec_hash,
    topological_order,
)

__all__ = [
    "_SPECS",
    "_SPEC_FILES",
    "_SPEC_HASHES",
    "build_dag",
    "dag_for_spec_file",
    "display_path",
    "record_run_end",
    "spec_for_dag",
    "spec_hash",
    "topological_order",
]


def display_path(yaml_path: Path) -> str:
    """``.../dags/workflows/checkout/v1.yaml`` -> ``workflows/checkout/v1.yaml``."""
    parts = yaml_path.resolve().parts
    if "workflows" in parts:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("workflows") :])
    return str(yaml_path)


def dag_for_spec_file(shim_file: str) -> DAG:
    """Build the DAG of the workflow file beside ``shim_file`` (``v1.py`` -> ``v1.yaml``).

    A published version (a ``v<N>.lock`` beside it) must still match its recorded hash;
    a version with a newer version beside it is built without its schedule.
    """
    from ledgerflow import versions
    from ledgerflow.workflow.validate import load_workflow

    yaml_path = Path(shim_file).with_suffix(".yaml")
    shown = display_path(yaml_path)
    digest = versions.check_published(yaml_path, shown)
    spec = load_workflow(yaml_path, display_path=shown)
    _SPEC_HASHES[spec.dag_id] = digest
    return build_dag(spec, yaml_path, superseded=versions.is_superseded(yaml_path))


def _param(spec: ParamSpec) -> Any:
    from airflow.sdk import Param

    kwargs: dict[str, Any] = {"type": spec.type if spec.required else [spec.type, "null"]}
    if spec.description:
        kwargs["description"] = spec.description
    if spec.enum is not None:
        kwargs["enum"] = (
            list(spec.enum) if spec.required or spec.default is not None else [*spec.enum, None]
        )
    if spec.required and spec.default is None:
        return Param(**kwargs)
    return Param(spec.default, **kwargs)


def _doc_md(spec: WorkflowSpec, yaml_path: Path | None) -> str:
    lines = [f"## {spec.name} v{spec.version}", "", spec.description or "", ""]
    if yaml_path is not None:
        lines += [f"Defined in `{display_path(yaml_path)}` (Ledgerflow).", ""]
    if spec.schedule not in (None, "@once"):
        lines += [f"Schedule: `{spec.schedule}` in time zone **{spec.timezone}**.", ""]
    lines += ["| step | does | needs | idempotency | compensate |", "|---|---|---|---|---|"]
    for step in spec.steps:
        if isinstance(step, ToolStep):
            idem = getattr(step.idempotency, "key", step.idempotency) or "-"
            comp = step.compensate.tool if step.compensate else "-"
            does = f"`{step.tool}`"
        else:
            idem, comp = "-", "-"
            target = getattr(step, "branch_target", None)
            does = step.kind + (f" (else `{target}`)" if target else "")
        lines.append(
            f"| `{step.id}` | {does} | {', '.join(step.needs) or '-'} | `{idem}` | {comp} |"
        )
    return "\n".join(lines)


def _description(spec: WorkflowSpec) -> str | None:
    """The description's first line; a schedule's time zone follows it: Airflow 3.3's DAG
    details report the server's default zone ([core] default_timezone), not the DAG's,
    beside a cron that runs in the workflow's zone."""
    text = (spec.description or "").strip().split("\n")[0]
    if spec.schedule not in (None, "@once"):
        text = f"{text} (cron in {spec.timezone})" if text else f"cron in {spec.timezone}"
    return text[:200] or None


def build_dag(
    spec: WorkflowSpec, yaml_path: Path | None = None, *, superseded: bool = False
) -> DAG:
    """The DAG of one workflow version. ``superseded`` (a newer version exists): no
    schedule and the ``superseded`` tag; it stays triggerable for its unfinished runs
    and their retries."""
    import pendulum
    from airflow.sdk import DAG

    from ledgerflow.steps.operator import ForEachItemsOperator, StepOperator
    from ledgerflow.steps.retry import StepRetryPolicy
    from ledgerflow.steps.saga import step_failed
    from ledgerflow.tools.registry import get_tool

    tz = pendulum.timezone(spec.timezone)
    schedule: Any = None
    if spec.schedule == "@once" and not superseded:
        schedule = "@once"
    elif spec.schedule is not None and not superseded:
        from airflow.timetables.trigger import CronTriggerTimetable

        schedule = CronTriggerTimetable(spec.schedule, timezone=tz)
    if spec.triggers.assets and not superseded:
        schedule = _asset_schedule(spec, tz)
    _SPECS[spec.dag_id] = spec
    if yaml_path is not None:
        _SPEC_FILES[spec.dag_id] = yaml_path
    dag = DAG(
        dag_id=spec.dag_id,
        description=_description(spec),
        schedule=schedule,
        start_date=pendulum.instance(pendulum.parse(spec.start_date, tz=tz)),  # type: ignore[arg-type]
        catchup=False,
        tags=sorted(
            {*spec.tags, "ledgerflow", f"workflow:{spec.name}"}
            | ({"superseded"} if superseded else set())
        ),
        doc_md=_doc_md(spec, yaml_path),
        params={name: _param(p) for name, p in spec.params.items()},
        default_args={"owner": spec.owner},
        max_active_runs=spec.max_active_runs,
        # A success is written by the scheduler as it marks the run (ledgerflow.run_listener):
        # a success callback would cost every run a parse in a dag-processor child.
        on_failure_callback=_finish_run,
    )
    tasks: dict[str, Any] = {}
    with dag:
        fused = _add_segments(spec, tasks)
        for step in spec.steps:
            rule = "none_failed_min_one_success" if step.needs else "all_success"
            if step.id in fused:
                continue
            if not isinstance(step, ToolStep):
                # approval / llm / quality / wait: each kind's module builds its own task.
                tasks[step.id] = _kind_builder(step.kind)(spec, step, rule)
                for task in _flat(tasks[step.id]):
                    _place(task, **_placement(spec, step))
                continue
            policy = spec.retry_for(step)
            tool = get_tool(step.tool)
            retries = 0 if step.idempotency == "none" else policy.max_attempts - 1
            common: dict[str, Any] = {
                "retries": retries,
                "retry_delay": policy.backoff.initial,
                "retry_policy": StepRetryPolicy(policy, tool.non_retryable),
                "execution_timeout": spec.timeout_for(step),
                "doc_md": step.description,
                "on_failure_callback": step_failed,
                **_placement(spec, step),
            }
            if step.for_each is None:
                tasks[step.id] = StepOperator(
                    task_id=step.id, step_id=step.id, trigger_rule=rule, **common
                )
            else:
                items = ForEachItemsOperator(
                    task_id=f"{step.id}__items", step_id=step.id, trigger_rule=rule
                )
                mapped = StepOperator.partial(task_id=step.id, step_id=step.id, **common).expand(
                    item=items.output
                )
                tasks[step.id] = (items, mapped)
        linked: set[tuple[str, str]] = set()
        for step in spec.steps:
            head = tasks[step.id][0] if isinstance(tasks[step.id], tuple) else tasks[step.id]
            for need in step.needs:
                tail = tasks[need][1] if isinstance(tasks[need], tuple) else tasks[need]
                if tail is not head and (tail.task_id, head.task_id) not in linked:
                    linked.add((tail.task_id, head.task_id))
                    tail >> head
        _add_compensations(spec, tasks)
    return dag


def _add_segments(spec: WorkflowSpec, tasks: dict[str, Any]) -> set[str]:
    """One task per fused segment (``workflow.segments``), entered in ``tasks`` under each
    of its steps; returns the steps it placed."""
    from datetime import timedelta

    from ledgerflow.steps.segment import SegmentOperator, segment_failed
    from ledgerflow.workflow.segments import queue_and_pool, segments

    placed: set[str] = set()
    for segment in segments(spec):
        steps = [spec.step(i) for i in segment.steps]
        policies = [spec.retry_for(s) for s in steps]
        rows = "\n".join(f"{n}. `{s.id}`" for n, s in enumerate(steps, 1))
        task = SegmentOperator(
            task_id=segment.task_id,
            task_display_name=segment.label,
            step_ids=list(segment.steps),
            trigger_rule="none_failed_min_one_success" if steps[0].needs else "all_success",
            # Steps retry inside the task; Airflow's retries are for a task that was
            # killed (each such try goes on at the first step without a checkpoint).
            retries=max(p.max_attempts for p in policies) - 1,
            retry_delay=min(p.backoff.initial for p in policies),
            execution_timeout=sum((spec.timeout_for(s) for s in steps), timedelta()),
            doc_md=f"Fused segment: these steps run in this one task, in order, each with "
            f"its own checkpoint.\n\n{rows}",
            on_failure_callback=segment_failed,
            **_placed(*queue_and_pool(spec, segment.steps)),
        )
        for step in steps:
            tasks[step.id] = task
            placed.add(step.id)
    return placed


def _placed(queue: str | None, pool: str | None) -> dict[str, str]:
    """The operator arguments of a task's queue and pool (``spec.limits``): only those
    set, so that Airflow's defaults stay the defaults."""
    return {k: v for k, v in (("queue", queue), ("pool", pool)) if v is not None}


def _placement(spec: WorkflowSpec, step: Any) -> dict[str, str]:
    from ledgerflow.workflow.limits import placement

    return _placed(*placement(spec, step))


def _flat(item: Any) -> list[Any]:
    return list(item) if isinstance(item, tuple) else [item]


def _place(task: Any, **placed: str) -> None:
    """Set the queue and pool of a task a step kind's module built (a mapped one too)."""
    for name, value in placed.items():
        if hasattr(task, "partial_kwargs"):
            task.partial_kwargs[name] = value
        else:
            setattr(task, name, value)


def _asset_schedule(spec: WorkflowSpec, tz: Any) -> Any:
    """An event on any of ``triggers.assets`` starts a run; so does the cron schedule."""
    from airflow.sdk import Asset, AssetAny, AssetOrTimeSchedule, CronTriggerTimetable

    assets = AssetAny(*(Asset(uri) for uri in spec.triggers.assets))
    if spec.schedule is None:
        return assets
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(spec.schedule, timezone=tz), assets=assets
    )


def _kind_builder(kind: str) -> Any:
    """``build_task(spec, step, trigger_rule)`` of a step kind's module."""
    import importlib

    module = {
        "approval": "approval",
        "llm": "llm",
        "quality": "quality",
        "event": "event",
        "wait": "wait",
    }[kind]
    return importlib.import_module(f"ledgerflow.steps.{module}").build_task


def _add_compensations(spec: WorkflowSpec, tasks: dict[str, Any]) -> None:
    """compensate__<step> teardown tasks in reverse order, then saga__finish."""
    from ledgerflow.steps.retry import StepRetryPolicy
    from ledgerflow.steps.saga import (
        CompensationOperator,
        SagaFinishOperator,
        compensation_step,
        compensation_task_id,
    )
    from ledgerflow.tools.registry import get_tool
    from ledgerflow.workflow.limits import pool_for_tool

    order = [spec.step(i) for i in reversed(topological_order(spec))]
    undoable = [s for s in order if isinstance(s, ToolStep) and s.compensate is not None]
    if not undoable:
        return
    forward: list[Any] = []
    for item in tasks.values():
        for task in item if isinstance(item, tuple) else [item]:
            if all(task is not other for other in forward):  # a segment holds several steps
                forward.append(task)
    forward_ids = [t.task_id for t in forward]
    previous: Any = None
    for step in undoable:
        undo = compensation_step(spec, step, None)
        policy = spec.retry_for(undo)
        task = CompensationOperator(
            task_id=compensation_task_id(step.id),
            step_id=step.id,
            forward_task_ids=forward_ids,
            first=previous is None,
            retries=policy.max_attempts - 1,
            retry_delay=policy.backoff.initial,
            retry_policy=StepRetryPolicy(policy, get_tool(undo.tool).non_retryable),
            execution_timeout=spec.timeout_for(step),
            doc_md=f"Undoes `{step.id}` with `{undo.tool}` if the run fails after it completed.",
            **_placed(step.queue, pool_for_tool(undo.tool)),
        ).as_teardown()
        if previous is None:
            forward >> task
        else:
            previous >> task
        previous = task
    previous >> SagaFinishOperator(task_id="saga__finish").as_teardown()


def _finish_run(context: Any) -> None:
    """DAG-level failure callback (and ``ledgerflow run``'s end of either kind): the run's
    final state in the ledger. A failed run of a workflow with nothing to undo ends its
    saga (``nothing_to_compensate``) if a failure callback did not; approvals still
    pending can no longer resume (``abandoned``)."""
    from ledgerflow.ledger.outage import ride_out
    from ledgerflow.ledger.store import Ledger

    dag_run = context["dag_run"]
    state = str(getattr(dag_run.state, "value", dag_run.state))
    run_id = f"{dag_run.dag_id}/{dag_run.run_id}"
    ledger = Ledger.from_airflow()
    # The callback's one chance to write the run's end: a ledger down for a moment (a
    # Postgres restart) is waited for, or the ledger's run would stay `running`.
    ride_out(ledger, lambda: record_run_end(ledger, dag_run.dag_id, run_id, state), run_id)


def record_run_end(ledger: Any, dag_id: str, run_id: str, state: str) -> None:
    """The run's end in the ledger (each write idempotent: it may be written again)."""
    from ledgerflow.steps.saga import has_compensations
    from ledgerflow.workflow.loaded import spec_for_dag

    status = "succeeded" if state == "success" else "failed"
    ledger.finish_run(run_id, status)
    if status == "failed":
        run = ledger.run(run_id) or {}
        spec = spec_for_dag(dag_id)
        if not has_compensations(spec) and run.get("saga") in (None, "compensating"):
            ledger.start_saga(run_id, run.get("failed_step"))
            ledger.finish_saga(run_id)
    from ledgerflow.ledger import approvals

    abandon = getattr(approvals, "abandon_for_run", None)
    if abandon is not None:
        abandon(ledger, run_id, f"the run ended ({state})")
