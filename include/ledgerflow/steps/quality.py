"""The quality step: validate a dataset with Great Expectations, then pass, warn, fail or
branch as the step declares.

``run_quality`` is the protocol (no Airflow in it, so tests and benchmarks drive it
directly); ``QualityOperator`` is its Airflow adapter and the branch point.

1. a completed checkpoint (this run, or the run it retries) -> its outcome is reused,
   including the path it took, so a retry run follows the same branch without
   validating again;
2. ``when`` false -> skipped;
3. an attempt is recorded, the dataset resolved (a table or a rendered query through a
   connection; an upstream output as a DataFrame) and validated;
4. the result row (``lf_quality_results``) is written in the same transaction as the
   outcome: the completed checkpoint (passed, warned, branched), or the failed attempt
   and its dead letter (``on_failure: fail``, which raises ``QualityCheckFailed``:
   non-retryable, so the run fails at once and its saga compensates).

A database that cannot be reached is an ordinary failed attempt, retried with the
step's retry policy: that is not a finding about the data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.bases.skipmixin import SkipMixin

from ledgerflow.errors import InjectedFault, NonRetryableError

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.quality.runner import Dataset
    from ledgerflow.spec.models import QualityStep, WorkflowSpec
    from ledgerflow.steps.protocol import RunRef


class QualityCheckFailed(NonRetryableError):
    """Expectations failed and the step declares ``on_failure: fail``."""

    code = "quality_failed"

    def __init__(self, step_id: str, dataset: str, failed: list[dict[str, Any]]) -> None:
        self.step_id = step_id
        self.dataset = dataset
        self.failed = failed
        super().__init__(
            f"quality step {step_id}: {len(failed)} expectation(s) failed on {dataset}: "
            + "; ".join(_describe(f) for f in failed)
        )


class QualityDatasetError(NonRetryableError):
    """The dataset cannot be validated at all (an output that is not a table...)."""

    code = "quality_dataset"


def _describe(failure: dict[str, Any]) -> str:
    if failure.get("error"):
        return f"{failure['expectation']}: {failure['error']}"
    if failure.get("unexpected_count") is not None:
        sample = ", ".join(repr(v) for v in failure.get("sample", [])[:5])
        return f"{failure['expectation']}: {failure['unexpected_count']} unexpected (e.g. {sample})"
    return f"{failure['expectation']}: observed {failure.get('observed_value')!r}"


@dataclass(frozen=True)
class QualityOutcome:
    status: str  # completed | reused
    output: dict[str, Any]

    @property
    def take_branch(self) -> bool:
        return self.output.get("path") == "fallback"


def data_docs_dir(spec: WorkflowSpec, step: QualityStep) -> Path:
    """``$AIRFLOW_HOME/ledgerflow/data_docs/<workflow>/v<N>/<step>``."""
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    return home / "ledgerflow" / "data_docs" / spec.name / f"v{spec.version}" / step.id


def describe_dataset(step: QualityStep) -> str:
    data = step.dataset
    if data.table is not None:
        return f"table {data.table} ({data.conn_id})"
    if data.query is not None:
        return f"query ({data.conn_id})"
    if data.step is not None:
        return f"output of step {data.step}"
    return f"expression {data.expression}"


def resolve_dataset(step: QualityStep, context: dict[str, Any]) -> Dataset:
    """The dataset with its templates rendered (may raise Jinja's ``TemplateError``)."""
    from ledgerflow.quality.runner import FrameDataset, SqlDataset
    from ledgerflow.spec.templates import evaluate, render_value

    data = step.dataset
    label = describe_dataset(step)
    if data.step is not None:
        return FrameDataset(data=context["steps"].get(data.step), label=label)
    if data.expression is not None:
        return FrameDataset(data=evaluate(data.expression, context), label=label)
    url = connection_url(data.conn_id)
    if data.table is not None:
        return SqlDataset(url=url, label=label, table=data.table)
    return SqlDataset(url=url, label=label, query=str(render_value(data.query, context)))


def connection_url(conn_id: str) -> str:
    """The SQLAlchemy URL of a Postgres (or SQLite) Airflow connection. The ledger's own
    connection falls back to the embedded SQLite ledger, like the ledger does; any other
    connection must exist."""
    from ledgerflow.ledger.store import DEFAULT_CONN_ID, _airflow_connection_uri, resolve_url

    if conn_id != DEFAULT_CONN_ID and _airflow_connection_uri(conn_id) is None:
        raise QualityDatasetError(f"no Airflow connection {conn_id!r}")
    return resolve_url(conn_id)


def run_quality(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: QualityStep,
    run: RunRef,
    *,
    params: dict[str, Any],
    try_number: int = 1,
    max_attempts: int = 1,
    is_final_attempt: Any = None,
) -> QualityOutcome:
    """Run one quality step under the protocol above."""
    from jinja2 import TemplateError

    from ledgerflow.spec.templates import evaluate
    from ledgerflow.spec.validate import referenced_steps
    from ledgerflow.steps.protocol import (
        StepSkipped,
        TemplateRenderError,
        _record_failure,
        register_run,
        reuse_from_lineage,
        template_context,
    )

    ledger.migrate()
    key = step.id
    label = describe_dataset(step)
    dataset: Dataset | None = None
    error: BaseException | None = None
    skipped = False
    with ledger.begin() as conn:
        checkpoint, outputs = ledger.checkpoint_and_outputs(
            run.run_id, key, referenced_steps(spec, step), conn
        )
        if checkpoint is None and not outputs:
            register_run(ledger, spec, run, params, conn)
        if checkpoint is None and run.retry_of is not None:
            checkpoint = reuse_from_lineage(ledger, spec, run, key, step.id, conn)
        if checkpoint is not None and checkpoint.status == "completed":
            ledger.record_event(run.run_id, key, "checkpoint_reused", None, conn=conn)
            return QualityOutcome("reused", checkpoint.output)
        skipped = checkpoint is not None and checkpoint.status == "skipped"
        if not skipped:
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
                    dataset = resolve_dataset(step, context)
            except TemplateError as exc:
                error = TemplateRenderError(f"step {key}: {type(exc).__name__}: {exc}")
            except QualityDatasetError as exc:
                error = exc
        if not skipped:
            attempt_id = ledger.begin_attempt(
                run_id=run.run_id,
                step_key=key,
                step_id=step.id,
                map_index=-1,
                try_number=try_number,
                args={"dataset": label},
                idempotency_key=None,
                first=checkpoint is None,
                conn=conn,
            )
            if error is not None:
                _record_failure(
                    ledger, spec, run, key, attempt_id, error, try_number, None, None, True, conn
                )
    if skipped:
        raise StepSkipped(f"`when: {step.when}` is false")
    if error is not None:
        raise error
    assert dataset is not None
    try:
        report = _validate(spec, step, dataset)
    except BaseException as failure:
        if isinstance(failure, InjectedFault | KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        final = (
            bool(is_final_attempt(failure))
            if callable(is_final_attempt)
            else try_number >= max_attempts
        )
        _record_failure(ledger, spec, run, key, attempt_id, failure, try_number, None, None, final)
        raise
    return _finish(ledger, spec, step, run, key, attempt_id, try_number, label, report)


def _validate(spec: WorkflowSpec, step: QualityStep, dataset: Dataset) -> dict[str, Any]:
    from ledgerflow.errors import SpecError
    from ledgerflow.quality.catalog import resolve
    from ledgerflow.quality.runner import DatasetError, validate

    try:
        expectations = resolve(step.expectations, step.suite)
    except SpecError as exc:  # the suite file changed since the workflow was loaded
        raise QualityDatasetError(f"suite {step.suite!r}: {exc}") from None
    try:
        return validate(
            dataset,
            expectations,
            data_docs_dir=data_docs_dir(spec, step) if step.data_docs else None,
            name=f"{spec.name}_{step.id}",
        )
    except DatasetError as exc:
        raise QualityDatasetError(f"{dataset.label}: {exc}") from None


def _finish(
    ledger: Ledger,
    spec: WorkflowSpec,
    step: QualityStep,
    run: RunRef,
    key: str,
    attempt_id: int,
    try_number: int,
    label: str,
    report: dict[str, Any],
) -> QualityOutcome:
    from ledgerflow.ledger.quality import record_result
    from ledgerflow.steps.protocol import _record_failure

    if report["success"]:
        outcome = "passed"
    elif step.on_failure == "fail":
        outcome = "failed"
    elif step.on_failure == "warn":
        outcome = "warned"
    else:
        outcome = "branched"
    with ledger.begin() as conn:
        result_id = record_result(
            conn,
            run_id=run.run_id,
            step_key=key,
            try_number=try_number,
            workflow=spec.name,
            version=spec.version,
            dataset=label,
            report=report,
            outcome=outcome,
        )
        if outcome == "failed":
            error = QualityCheckFailed(step.id, label, report["failed"])
            _record_failure(
                ledger,
                spec,
                run,
                key,
                attempt_id,
                error,
                try_number,
                {"dataset": label, "result_id": result_id},
                None,
                True,
                conn,
            )
        else:
            output = {
                "success": report["success"],
                "outcome": outcome,
                "path": "fallback" if outcome == "branched" else "main",
                "dataset": label,
                "row_count": report["row_count"],
                "evaluated": report["statistics"]["evaluated_expectations"],
                "failed": [f["expectation"] for f in report["failed"]],
                "result_id": result_id,
            }
            if outcome != "passed":
                ledger.record_event(
                    run.run_id,
                    key,
                    f"quality_{outcome}",
                    {"failed": output["failed"], "result_id": result_id},
                    conn=conn,
                )
            ledger.complete_step(
                conn,
                run_id=run.run_id,
                step_key=key,
                attempt_id=attempt_id,
                output=output,
                reused=False,
            )
    if outcome == "failed":
        raise error
    return QualityOutcome("completed", output)


def build_task(spec: WorkflowSpec, step: QualityStep, trigger_rule: str) -> BaseOperator:
    from ledgerflow.steps.retry import StepRetryPolicy
    from ledgerflow.steps.saga import step_failed

    policy = spec.retry_for(step)
    return QualityOperator(
        task_id=step.id,
        step_id=step.id,
        trigger_rule=trigger_rule,
        retries=policy.max_attempts - 1,
        retry_delay=policy.backoff.initial,
        retry_policy=StepRetryPolicy(policy),
        execution_timeout=spec.timeout_for(step),
        doc_md=step.description or f"Quality: {describe_dataset(step)}",
        on_failure_callback=step_failed,
    )


class QualityOperator(BaseOperator, SkipMixin):
    """Validates a dataset; on failure fails, warns, or takes the declared branch."""

    ui_color = "#e6f4ea"
    template_fields = ()
    inherits_from_skipmixin = True  # see steps.branching

    def __init__(self, *, step_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step_id = step_id

    def execute(self, context: Any) -> Any:
        from airflow.sdk.exceptions import AirflowSkipException

        from ledgerflow.factory import spec_for_dag
        from ledgerflow.ledger.store import Ledger
        from ledgerflow.spec.models import QualityStep
        from ledgerflow.steps.branching import follow
        from ledgerflow.steps.operator import run_ref
        from ledgerflow.steps.protocol import StepSkipped
        from ledgerflow.steps.retry import final_attempt

        spec = spec_for_dag(self.dag_id)
        step = spec.step(self.step_id)
        assert isinstance(step, QualityStep)
        ti = context["ti"]
        retries = self.retries or 0
        try:
            outcome = run_quality(
                Ledger.from_airflow(),
                spec,
                step,
                run_ref(context),
                params=dict(context["params"]),
                try_number=ti.try_number,
                max_attempts=retries + 1,
                is_final_attempt=final_attempt(ti.try_number, retries, spec.retry_for(step)),
            )
        except StepSkipped as skipped:
            raise AirflowSkipException(str(skipped)) from None
        out = outcome.output
        self.log.info(
            "quality %s on %s: %s (%s rows, %s expectations%s)",
            self.step_id,
            out["dataset"],
            out["outcome"],
            out["row_count"],
            out["evaluated"],
            f"; failed: {', '.join(out['failed'])}" if out["failed"] else "",
        )
        # The output goes to XCom before follow() ends the task by skipping a branch.
        context["ti"].xcom_push(key="return_value", value=out)
        follow(self, context, fallback=step.branch_target, take_fallback=outcome.take_branch)
        return out
