"""Retry as a new run: a NEW DagRun of the same workflow version that resumes.

``plan_retry`` checks the request against the ledger and the workflow file and works out
what the new run reuses; ``start_retry`` creates it through Airflow's own Python API
(``airflow.api.common.trigger_dag``, what ``airflow dags trigger`` and the REST trigger
use), in the process that asks: the ``ledgerflow retry`` CLI, or the api-server for
``POST /ledgerflow/api/runs/{run_id}/retry``.

The new run carries ``ledgerflow_retry_of`` (and ``ledgerflow_retry_from``) in its conf
beside the original params; the original run is left as it was. Each step of the new run
reuses the newest completed checkpoint of the same step in its lineage
(``ledger.lineage``), so no effect, LLM call or approval happens twice. Steps whose
reuse is known before the run starts (completed in the lineage, not a branch point, not
``for_each``, and everything they need reused too) are copied into the new run's ledger
and their task instances are created already ``success``, in the same metadata
transaction that creates the DagRun: the scheduler never starts a task for them, so the
retry costs only the steps that remain. Every other step runs as a task and still looks
up the lineage itself (a branch point reuses its decision and follows the same branch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ledgerflow.errors import LedgerflowError
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import WorkflowSpec

CONF_RETRY_OF = "ledgerflow_retry_of"
CONF_RETRY_FROM = "ledgerflow_retry_from"


class RetryRefused(LedgerflowError):
    """A retry that must not start; ``reason`` says why (and maps to an HTTP status)."""

    code = "retry_refused"
    HTTP_STATUS = {
        "unknown_run": 404,
        "unknown_step": 422,
        "running": 409,
        "succeeded": 409,
        "workflow_file": 409,
    }

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.reason, 409)


@dataclass(frozen=True)
class RetryPlan:
    """What a retry of ``run`` will do."""

    run: dict[str, Any]
    spec: WorkflowSpec
    spec_hash: str
    from_step: str | None
    lineage: list[dict[str, Any]]
    # step id -> the run whose completed checkpoint it reuses, before the run starts
    reused: dict[str, str] = field(default_factory=dict)
    # steps reused inside their own task (branch points, for_each, after a branch point)
    reused_in_task: dict[str, str] = field(default_factory=dict)
    # steps that run
    rerun: list[str] = field(default_factory=list)

    @property
    def dag_id(self) -> str:
        return str(self.run["dag_id"])


@dataclass(frozen=True)
class RetryStarted:
    run_id: str  # the ledger's id of the new run: <dag_id>/<dag_run_id>
    dag_id: str
    dag_run_id: str
    retry_of: str
    from_step: str | None
    reused: dict[str, str]
    rerun: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dag_id": self.dag_id,
            "dag_run_id": self.dag_run_id,
            "retry_of": self.retry_of,
            "from": self.from_step,
            "reused": self.reused,
            "rerun": self.rerun,
        }


def default_dags_folder() -> Path:
    """Airflow's ``[core] dags_folder`` (also when set in airflow.cfg), else ``./dags``."""
    import os

    env = os.environ.get("AIRFLOW__CORE__DAGS_FOLDER")
    if env:
        return Path(env)
    try:
        from airflow.configuration import conf

        return Path(conf.get("core", "dags_folder"))
    except Exception:
        return Path("dags")


def workflow_file(dags_folder: Path, workflow: str, version: int) -> Path:
    return dags_folder / "workflows" / workflow / f"v{version}.yaml"


def airflow_state(dag_id: str, dag_run_id: str) -> str | None:
    """The DagRun's state in Airflow's metadata database (None: unknown or unreachable).

    Airflow's state is the truth about "still running": the ledger's status is written by
    the DAG's callback, which runs a moment after the run ends."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            state = session.scalar(
                select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == dag_run_id)
            )
    except Exception:
        return None
    return None if state is None else str(getattr(state, "value", state))


_STATUS_OF_STATE = {"queued": "running", "running": "running", "success": "succeeded"}


def plan_retry(
    ledger: Ledger,
    run_id: str,
    from_step: str | None = None,
    dags_folder: Path | None = None,
    state_of: Callable[[str, str], str | None] | None = None,
) -> RetryPlan:
    """Check a retry request and work out what the new run reuses. Raises RetryRefused.

    ``state_of(dag_id, dag_run_id)`` gives Airflow's state of the run (``airflow_state``);
    without it, or when it knows nothing, the ledger's status decides."""
    from ledgerflow import versions
    from ledgerflow.factory import topological_order
    from ledgerflow.ledger import lineage
    from ledgerflow.spec.validate import load_workflow

    ledger.migrate()
    run = ledger.run(run_id)
    if run is None:
        raise RetryRefused(
            f"no run {run_id!r} in the ledger (ids look like <dag_id>/<airflow run id>; "
            "`ledgerflow runs` lists them)",
            reason="unknown_run",
        )
    path = workflow_file(dags_folder or default_dags_folder(), run["workflow"], run["version"])
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
    status = run["status"]
    state = state_of(run["dag_id"], run_id.split("/", 1)[-1]) if state_of else None
    if state is not None:
        status = _STATUS_OF_STATE.get(state, "failed")
    if status == "running":
        raise RetryRefused(
            f"run {run_id} is still running; retry it once it has failed",
            reason="running",
        )
    if status == "succeeded" and from_step is None:
        raise RetryRefused(
            f"run {run_id} succeeded: nothing to resume. To run steps again, name the "
            f"first one: ledgerflow retry {run_id} --from STEP (steps: {', '.join(ids)})",
            reason="succeeded",
        )
    rerun_set = lineage.rerun_steps(spec, from_step)
    reused: dict[str, str] = {}
    in_task: dict[str, str] = {}
    rerun: list[str] = []
    with ledger.engine.connect() as conn:
        for step_id in topological_order(spec):
            step = spec.step(step_id)
            found = (
                None
                if step_id in rerun_set or step.for_each is not None
                else lineage.find_reusable(
                    conn,
                    spec,
                    retry_of=run_id,
                    retry_from=from_step,
                    step_key=step_id,
                    step_id=step_id,
                )
            )
            if found is None:
                if step.for_each is not None and step_id not in rerun_set:
                    in_task[step_id] = "(per item)"
                else:
                    rerun.append(step_id)
            elif getattr(step, "branch_target", None) is None and set(step.needs) <= set(reused):
                reused[step_id] = found.run_id
            else:
                in_task[step_id] = found.run_id
    return RetryPlan(
        run=run,
        spec=spec,
        spec_hash=digest,
        from_step=from_step,
        lineage=lineage.chain(ledger, run_id),
        reused=reused,
        reused_in_task=in_task,
        rerun=rerun,
    )


def start_retry(
    ledger: Ledger,
    plan: RetryPlan,
    *,
    user: str | None = None,
    via: str = "cli",
) -> RetryStarted:
    """Create the new DagRun (``via``: ``cli`` or ``rest_api``). Raises RetryRefused when
    Airflow says the run is still active, LedgerflowError when Airflow refuses."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState
    from airflow.utils.types import DagRunTriggeredByType
    from sqlalchemy import select

    from ledgerflow.ledger import lineage
    from ledgerflow.ledger.store import Checkpoint

    original = str(plan.run["run_id"])
    dag_id = plan.dag_id
    airflow_run_id = original.split("/", 1)[1] if "/" in original else original
    stamp = datetime.now(timezone.utc)
    new_dag_run_id = f"retry__{stamp.isoformat()}"
    new_run_id = f"{dag_id}/{new_dag_run_id}"
    conf: dict[str, Any] = {**(plan.run.get("params") or {}), CONF_RETRY_OF: original}
    if plan.from_step is not None:
        conf[CONF_RETRY_FROM] = plan.from_step
    with create_session() as session:
        state = session.scalar(
            select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == airflow_run_id)
        )
        if state in (DagRunState.QUEUED, DagRunState.RUNNING):
            raise RetryRefused(
                f"run {original} is still {state}; retry it once it has failed", reason="running"
            )
        if state == DagRunState.SUCCESS and plan.from_step is None:
            raise RetryRefused(
                f"run {original} succeeded: nothing to resume (name a step with --from)",
                reason="succeeded",
            )
        with ledger.begin() as conn:
            ledger.ensure_run(
                run_id=new_run_id,
                dag_id=dag_id,
                workflow=plan.spec.name,
                version=plan.spec.version,
                params=plan.run.get("params") or {},
                trigger_kind="retry",
                retry_of=original,
                retry_from=plan.from_step,
                spec_hash=plan.spec_hash,
                conn=conn,
            )
            for step_id, source in plan.reused.items():
                found = ledger.checkpoint(source, step_id, conn)
                assert isinstance(found, Checkpoint)
                lineage.adopt(ledger, conn, new_run_id, found)
            ledger.record_event(
                original,
                None,
                "retried_by",
                {"run_id": new_run_id, "from": plan.from_step, "by": user, "via": via},
                conn=conn,
            )
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
            for ti in dag_run.get_task_instances(session=session):
                if ti.task_id in plan.reused and ti.map_index == -1:
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
    )
