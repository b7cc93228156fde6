"""Retry as a new run: a NEW DagRun of the same workflow version that resumes.

``plan_retry`` checks the request against the ledger and the workflow file and works out
what the new run reuses; ``start_retry`` creates it through Airflow's own Python API
(``airflow.api.common.trigger_dag``, what ``airflow dags trigger`` and the REST trigger
use), in the process that asks: the ``ledgerflow retry`` CLI, or the api-server for
``POST /ledgerflow/api/runs/{run_id}/retry`` and the run page's Retry form.

The rules of a retry chain (a run, the runs it retries through ``retry_of``, and every
retry of any of them):

* at most one live continuation: a chain with a run still running (or queued), or with
  a retry that succeeded, is not retried again (``continued``), naming that run;
* only the newest failed run of a chain is retried: an older one is refused
  (``not_newest``), naming the run to retry instead;
* a succeeded run is retried only with ``--from STEP`` (``succeeded``);
* the check is made again under a lock on the chain's oldest run, in the transaction
  that writes the new run's row, so two requests racing create one retry.

A retry may override params (``params``): the merged params are checked against the
workflow's params schema (``InvalidParams``, naming each field), stored as the new run's
params and recorded in the ``retried_by`` and ``run_started`` events. A completed step
whose rendered inputs change under them runs again, and so does each step downstream
whose inputs then change (``ledger.chains.find_reusable``).

The ledger alone establishes the chain: the new run's row (with ``retry_of``) is written
before Airflow creates the DagRun. Its conf carries ``ledgerflow_retry_of`` (and
``ledgerflow_retry_from``) for people reading it in Airflow's UI only: nothing trusts it.
The original run is left as it was. Each step of the new run reuses the newest completed
checkpoint of the same step in its retry chain (``ledger.chains``), so no effect, LLM call or
approval happens twice. Steps whose reuse is known before the run starts (completed in
the retry chain with the same inputs, not a branch point, not ``for_each``, and everything
they need reused too) are copied into the new run's ledger and their task instances are
created already ``success``, in the same metadata transaction that creates the DagRun:
the scheduler never starts a task for them, so the retry costs only the steps that
remain. Every other step runs as a task and still looks up the retry chain itself (a branch
point reuses its decision and follows the same branch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ledgerflow.errors import LedgerflowError, RetryRefused
from ledgerflow.ledger.store import Ledger
from ledgerflow.retry_chain import (
    Standing,
    StateOf,
    airflow_state,
    standing,
)
from ledgerflow.spec.models import WorkflowSpec

__all__ = [
    "CONF_RETRY_FROM",
    "CONF_RETRY_OF",
    "RetryPlan",
    "RetryRefused",
    "RetryStarted",
    "Standing",
    "StateOf",
    "airflow_state",
    "plan_retry",
    "record_retry",
    "retry_params",
    "standing",
    "start_retry",
]

CONF_RETRY_OF = "ledgerflow_retry_of"
CONF_RETRY_FROM = "ledgerflow_retry_from"


@dataclass(frozen=True)
class RetryPlan:
    """What a retry of ``run`` will do."""

    run: dict[str, Any]
    spec: WorkflowSpec
    spec_hash: str
    from_step: str | None
    chain: list[dict[str, Any]]
    # step id -> the run whose completed checkpoint it reuses, before the run starts
    reused: dict[str, str] = field(default_factory=dict)
    # steps reused inside their own task (branch points, for_each, after a branch point,
    # after a step that runs again: their task reuses them if their inputs still match)
    reused_in_task: dict[str, str] = field(default_factory=dict)
    # steps that run
    rerun: list[str] = field(default_factory=list)
    # the new run's params (the original's, engine keys dropped, with the overrides)
    params: dict[str, Any] = field(default_factory=dict)
    # the params the retry overrides, as asked
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def dag_id(self) -> str:
        return str(self.run["dag_id"])

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])


@dataclass(frozen=True)
class RetryStarted:
    run_id: str  # the ledger's id of the new run: <dag_id>/<dag_run_id>
    dag_id: str
    dag_run_id: str
    retry_of: str
    from_step: str | None
    reused: dict[str, str]
    rerun: list[str]
    params: dict[str, Any] = field(default_factory=dict)  # the overridden params

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dag_id": self.dag_id,
            "dag_run_id": self.dag_run_id,
            "retry_of": self.retry_of,
            "from": self.from_step,
            "reused": self.reused,
            "rerun": self.rerun,
            "params": self.params,
        }


def plan_retry(
    ledger: Ledger,
    run_id: str,
    from_step: str | None = None,
    dags_folder: Path | None = None,
    state_of: StateOf | None = None,
    *,
    params: dict[str, Any] | None = None,
) -> RetryPlan:
    """Check a retry request and work out what the new run reuses. Raises RetryRefused,
    or InvalidParams when the params with ``params`` overriding them do not fit the
    workflow's params schema.

    ``state_of(dag_id, dag_run_id)`` gives Airflow's state of a run (``airflow_state``);
    without it, or when it knows nothing, the ledger's status decides."""
    from ledgerflow import versions
    from ledgerflow.settings import workflow_file
    from ledgerflow.workflow.validate import load_workflow

    ledger.migrate()
    run = ledger.run(run_id)
    if run is None:
        raise RetryRefused(
            f"no run {run_id!r} in the ledger (ids look like <dag_id>/<airflow run id>; "
            "`ledgerflow runs` lists them)",
            reason="unknown_run",
        )
    path = workflow_file(run["workflow"], run["version"], dags_folder)
    if not path.exists():
        raise RetryRefused(
            f"{run_id} ran {run['workflow']} v{run['version']}, but {path} is gone: "
            "a version is retired only once it has no unfinished runs",
            reason="workflow_file",
        )
    try:
        digest = versions.check_published(path)
    except versions.PublishedVersionChanged as exc:
        raise RetryRefused(str(exc), reason="workflow_file") from None
    if run.get("spec_hash") and run["spec_hash"] != digest:
        raise RetryRefused(
            f"{path} is not the file {run_id} started on (sha256 {run['spec_hash'][:12]}, now "
            f"{digest[:12]}): a retry must run the same version",
            reason="workflow_file",
        )
    spec = load_workflow(path)
    ids = [s.id for s in spec.steps]
    if from_step is not None and from_step not in ids:
        raise RetryRefused(
            f"{spec.name} v{spec.version} has no step {from_step!r}; its steps: {', '.join(ids)}",
            reason="unknown_step",
        )
    refused = standing(ledger, run_id, state_of=state_of).refusal(from_step)
    if refused is not None:
        if refused.reason == "succeeded":
            refused = RetryRefused(
                f"{refused} (steps: {', '.join(ids)})", reason="succeeded", run_id=None
            )
        raise refused
    overrides = dict(params or {})
    new_params = retry_params(spec, run.get("params") or {}, overrides)
    reused, in_task, rerun = _reuse(ledger, spec, run, from_step, new_params)
    return RetryPlan(
        run=run,
        spec=spec,
        spec_hash=digest,
        from_step=from_step,
        chain=_chain(ledger, run_id),
        reused=reused,
        reused_in_task=in_task,
        rerun=rerun,
        params=new_params,
        overrides=overrides,
    )


def _chain(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    from ledgerflow.ledger import chains

    return chains.chain(ledger, run_id)


def retry_params(
    spec: WorkflowSpec, original: dict[str, Any], overrides: dict[str, Any]
) -> dict[str, Any]:
    """The retry run's params: the original run's (without the engine's ``ledgerflow_*``
    keys), ``overrides`` on top, checked against the workflow's params schema like a
    trigger request (raises ``InvalidParams`` naming each field; an override may not set
    an engine key)."""
    from ledgerflow.spec.params import ENGINE_PREFIX, check_params

    merged = {k: v for k, v in original.items() if not str(k).startswith(ENGINE_PREFIX)}
    merged.update(overrides)
    check_params(spec.name, spec.version, spec.params, merged)
    return merged


def _reuse(
    ledger: Ledger,
    spec: WorkflowSpec,
    run: dict[str, Any],
    from_step: str | None,
    params: dict[str, Any],
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """Which steps the retry reuses before it starts, which its tasks may reuse, which
    run. A tool step's args are rendered with the retry's params and the reused upstream
    outputs and must match the checkpoint's recorded args; another kind of step runs
    again when a param its templates read changed."""
    from ledgerflow.factory import topological_order
    from ledgerflow.ledger import chains
    from ledgerflow.spec.models import ToolStep
    from ledgerflow.spec.params import effective_params
    from ledgerflow.spec.templates import render_value

    run_id = str(run["run_id"])
    before = effective_params(spec.params, run.get("params") or {})
    seen = effective_params(spec.params, params)
    changed = {k for k in set(before) | set(seen) if before.get(k) != seen.get(k)}
    context: dict[str, Any] = {
        "params": seen,
        "steps": {},
        "run": {
            "id": run_id,
            "workflow": spec.name,
            "version": spec.version,
            "logical_date": None,
            "date": None,
        },
    }
    rerun_set = chains.rerun_steps(spec, from_step)
    reused: dict[str, str] = {}
    in_task: dict[str, str] = {}
    rerun: list[str] = []
    with ledger.engine.connect() as conn:
        for step_id in topological_order(spec):
            step = spec.step(step_id)
            if step_id in rerun_set:
                rerun.append(step_id)
                continue
            if step.for_each is not None:
                in_task[step_id] = "(per item)"
                continue
            args: Any = None
            if isinstance(step, ToolStep):
                try:
                    args = render_value(step.args, context)
                except Exception:  # reads an output not known yet: its task compares
                    args = None
            compared = isinstance(step, ToolStep) and args is not None
            stale = _params_read(step, args_rendered=compared) & changed
            found = (
                None
                if stale
                else chains.find_reusable(
                    conn,
                    spec,
                    retry_of=run_id,
                    retry_from=from_step,
                    step_key=step_id,
                    step_id=step_id,
                    args=args,
                )
            )
            if found is None:
                rerun.append(step_id)
                continue
            context["steps"][step_id] = {"status": "completed", "output": found.output}
            if getattr(step, "branch_target", None) is None and set(step.needs) <= set(reused):
                reused[step_id] = found.run_id
            else:
                in_task[step_id] = found.run_id
    return reused, in_task, rerun


def _params_read(step: Any, *, args_rendered: bool) -> set[str]:
    """The params a step's templates read (``args`` left out when they are compared
    rendered)."""
    from ledgerflow.spec.templates import analyse_expression, analyse_template, is_template
    from ledgerflow.workflow.validate import template_fields

    names: set[str] = set()
    for path, source, expression in template_fields(step):
        if args_rendered and path and path[0] == "args":
            continue
        if expression:
            names |= analyse_expression(source).params
        elif is_template(source):
            names |= analyse_template(source).params
    return names


def record_retry(
    ledger: Ledger,
    plan: RetryPlan,
    new_run_id: str,
    *,
    user: str | None = None,
    via: str = "cli",
    state_of: StateOf | None = None,
) -> None:
    """Write the retry run's row (``retry_of``, the params), the checkpoints it reuses
    and the events, after checking the chain again under a lock on its oldest run: of
    two requests racing to retry one chain, the second finds the first's run and is
    refused (RetryRefused ``continued``)."""
    from sqlalchemy import select

    from ledgerflow.ledger import chains
    from ledgerflow.ledger import schema as t
    from ledgerflow.ledger.store import Checkpoint, dumps, loads

    original = plan.run_id
    with ledger.begin() as conn:
        # SQLite: every ledger transaction holds the write lock (BEGIN IMMEDIATE).
        # Postgres: the chain's oldest run's row, locked until commit.
        oldest = chains.chain(ledger, original, conn)[-1]["run_id"]
        conn.execute(select(t.runs.c.run_id).where(t.runs.c.run_id == oldest).with_for_update())
        refused = standing(ledger, original, state_of=state_of, conn=conn).refusal(plan.from_step)
        if refused is not None:
            raise refused
        ledger.ensure_run(
            run_id=new_run_id,
            dag_id=plan.dag_id,
            workflow=plan.spec.name,
            version=plan.spec.version,
            params=plan.params,
            trigger_kind="retry",
            retry_of=original,
            retry_from=plan.from_step,
            spec_hash=plan.spec_hash,
            conn=conn,
        )
        if plan.overrides:
            # The run_started event this transaction just wrote also names the params
            # the retry overrides (nobody has read it yet: it is not committed).
            event = (t.events.c.run_id == new_run_id) & (t.events.c.kind == "run_started")
            data = conn.execute(select(t.events.c.data).where(event)).scalar()
            started = {**(loads(data) or {}), "params": plan.overrides}
            conn.execute(t.events.update().where(event).values(data=dumps(started)))
        for step_id, source in plan.reused.items():
            found = ledger.checkpoint(source, step_id, conn)
            assert isinstance(found, Checkpoint)
            chains.adopt(ledger, conn, new_run_id, found)
        retried: dict[str, Any] = {
            "run_id": new_run_id,
            "from": plan.from_step,
            "by": user,
            "via": via,
        }
        if plan.overrides:
            retried["params"] = plan.overrides
        ledger.record_event(original, None, "retried_by", retried, conn=conn)


def start_retry(
    ledger: Ledger,
    plan: RetryPlan,
    *,
    user: str | None = None,
    via: str = "cli",
    state_of: StateOf | None = airflow_state,
) -> RetryStarted:
    """Create the new run (``via``: ``cli``, ``rest_api`` or ``ui``): its ledger row first
    (``record_retry``, which refuses a chain continued meanwhile), then the DagRun.
    Raises RetryRefused, or LedgerflowError when Airflow refuses."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType

    original = plan.run_id
    dag_id = plan.dag_id
    airflow_run_id = original.split("/", 1)[1] if "/" in original else original
    stamp = datetime.now(timezone.utc)
    new_dag_run_id = f"retry__{stamp.isoformat()}"
    new_run_id = f"{dag_id}/{new_dag_run_id}"
    # For people reading the DagRun in Airflow's UI; the chain is the ledger's row.
    conf: dict[str, Any] = {**plan.params, CONF_RETRY_OF: original}
    if plan.from_step is not None:
        conf[CONF_RETRY_FROM] = plan.from_step
    record_retry(ledger, plan, new_run_id, user=user, via=via, state_of=state_of)
    with create_session() as session:
        try:
            dag_run = trigger_dag(
                dag_id,
                triggered_by=DagRunTriggeredByType(via),
                triggering_user_name=user,
                run_id=new_dag_run_id,
                conf=conf,
                note=f"Ledgerflow retry of {airflow_run_id}"
                + (f" from {plan.from_step}" if plan.from_step else ""),
                session=session,
            )
            assert dag_run is not None
            # Same transaction as the DagRun: the scheduler never sees these as to-do.
            from ledgerflow.workflow.segments import steps_of

            for ti in dag_run.get_task_instances(session=session):
                # A fused segment's task is done when every step it runs is reused.
                held = steps_of(plan.spec, ti.task_id)
                if all(s in plan.reused for s in held) and ti.map_index == -1:
                    ti.state = TaskInstanceState.SUCCESS
                    ti.start_date = ti.end_date = stamp
                    ti.duration = 0
            session.flush()
        except Exception as exc:
            session.rollback()
            ledger.finish_run(new_run_id, "failed")
            ledger.record_event(new_run_id, None, "retry_not_started", {"error": str(exc)[:500]})
            raise LedgerflowError(
                f"Airflow did not create the retry run of {original}: {exc}"
            ) from exc
    return RetryStarted(
        run_id=new_run_id,
        dag_id=dag_id,
        dag_run_id=new_dag_run_id,
        retry_of=original,
        from_step=plan.from_step,
        reused=dict(plan.reused),
        rerun=list(plan.rerun) + list(plan.reused_in_task),
        params=dict(plan.overrides),
    )
