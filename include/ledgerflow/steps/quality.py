"""The quality step: validate a dataset with Great Expectations, then pass, warn, fail or
branch as the step declares.

``run_quality`` is the protocol (no Airflow in it, so tests and benchmarks drive it
directly); ``QualityOperator`` is its Airflow adapter and the branch point.

1. a completed checkpoint (this run, or the run it retries) -> its outcome is reused,
   including the path it took, so a retry run follows the same branch without
   validating again;
2. ``when`` false -> skipped;
3. an attempt is recorded, the dataset resolved (a table or a query with bound parameters through a
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
from sqlalchemy import Connection

from ledgerflow.errors import QualityCheckFailed, QualityDatasetError
from ledgerflow.steps.kernel import Attempt, Committed, Rendered, RunRef, StepKind, StepResult
from ledgerflow.steps.operator import LedgerflowOperator

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.quality.runner import Dataset
    from ledgerflow.spec.models import QualityStep, WorkflowSpec


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
    assert data.query is not None
    values = render_value(data.parameters, context)
    return SqlDataset(url=url, label=label, query=bind_literals(url, data.query, values))


def bind_literals(url: str, query: str, values: dict[str, Any]) -> str:
    """The query with each ``:name`` replaced by its value as the database's SQL literal
    (quoted and escaped by SQLAlchemy's dialect: ``o'brien`` -> ``'o''brien'``).
    Great Expectations takes a query asset as text, so the values cannot be sent apart;
    a literal rendered by the dialect cannot break out of its quotes."""
    from sqlalchemy import bindparam, text
    from sqlalchemy.engine import make_url

    from ledgerflow.errors import NonRetryableError

    for name, value in values.items():
        if not isinstance(value, str | int | float | bool) and value is not None:
            raise NonRetryableError(
                f"dataset.parameters.{name} is a {type(value).__name__}: a query parameter is "
                "a text, a number, a boolean or null"
            )
    dialect = make_url(url).get_dialect()()
    clause = text(query).bindparams(*(bindparam(n, v) for n, v in values.items()))
    return str(clause.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def connection_url(conn_id: str) -> str:
    """The SQLAlchemy URL of a Postgres (or SQLite) Airflow connection. The ledger's own
    connection falls back to the embedded SQLite ledger, like the ledger does; any other
    connection must exist."""
    from ledgerflow.ledger.store import DEFAULT_CONN_ID, _airflow_connection_uri, resolve_url

    if conn_id != DEFAULT_CONN_ID and _airflow_connection_uri(conn_id) is None:
        raise QualityDatasetError(f"no Airflow connection {conn_id!r}")
    return resolve_url(conn_id)


class QualityKind(StepKind):
    """Validate the dataset; commit the result row with the outcome."""

    def __init__(self, spec: WorkflowSpec, step: QualityStep) -> None:
        self.spec = spec
        self.step = step

    def render(self, context: dict[str, Any]) -> Rendered:
        label = describe_dataset(self.step)
        dataset = resolve_dataset(self.step, context)
        return Rendered({"dataset": label}, None, {"dataset": dataset}, letter_args=None)

    def perform(self, attempt: Attempt, db: Connection | None) -> Any:
        dataset = attempt.rendered.extra["dataset"]
        report = _validate(self.spec, self.step, dataset)
        if getattr(dataset, "url", None):  # a table or a query in a database
            from ledgerflow.tools.lineage import report_dataset_read

            report_dataset_read(
                dataset.url, self.step.dataset.conn_id, table=dataset.table, query=dataset.query
            )
        return report

    def commit(self, attempt: Attempt, outcome: Any, conn: Connection) -> Committed:
        return _finish(self.spec, self.step, attempt, outcome, conn)


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
    """Run one quality step under the kernel."""
    from ledgerflow.steps.kernel import run_step
    from ledgerflow.steps.retry import final_attempt

    final = is_final_attempt
    if not callable(final):
        final = final_attempt(try_number, max_attempts - 1, spec.retry_for(step))
    result = run_step(
        ledger,
        spec,
        step,
        run,
        QualityKind(spec, step),
        params=params,
        final=final,
        try_number=try_number,
    )
    return QualityOutcome(result.status, result.output)


def _validate(spec: WorkflowSpec, step: QualityStep, dataset: Dataset) -> dict[str, Any]:
    from ledgerflow.errors import DatasetError, SpecError
    from ledgerflow.quality.catalog import resolve
    from ledgerflow.quality.runner import validate

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
    spec: WorkflowSpec,
    step: QualityStep,
    attempt: Attempt,
    report: dict[str, Any],
    conn: Connection,
) -> Committed:
    """The result row (``lf_quality_results``) and the outcome, in the commit's
    transaction: the completed checkpoint (passed, warned, branched), or the final
    failure (``on_failure: fail``)."""
    from ledgerflow.ledger.quality import record_result

    ledger, key = attempt.ledger, attempt.key
    label = attempt.rendered.args["dataset"]
    if report["success"]:
        outcome = "passed"
    elif step.on_failure == "fail":
        outcome = "failed"
    elif step.on_failure == "warn":
        outcome = "warned"
    else:
        outcome = "branched"
    result_id = record_result(
        conn,
        run_id=attempt.run.run_id,
        step_key=key,
        try_number=attempt.try_number,
        workflow=spec.name,
        version=spec.version,
        dataset=label,
        report=report,
        outcome=outcome,
    )
    if outcome == "failed":
        return Committed(
            rejection=QualityCheckFailed(step.id, label, report["failed"]),
            letter_args={"dataset": label, "result_id": result_id},
        )
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
            attempt.run.run_id,
            key,
            f"quality_{outcome}",
            {"failed": output["failed"], "result_id": result_id},
            conn=conn,
        )
    return Committed(output=output)


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


class QualityOperator(LedgerflowOperator, SkipMixin):
    """Validates a dataset; on failure fails, warns, or takes the declared branch."""

    ui_color = "#e6f4ea"
    inherits_from_skipmixin = True  # see steps.branching

    def kind(self, spec: WorkflowSpec, step: Any, run: RunRef) -> StepKind:
        return QualityKind(spec, step)

    def report(self, step: Any, result: StepResult) -> None:
        out = result.output
        self.log.info(
            "quality %s on %s: %s (%s rows, %s expectations%s)",
            self.step_id,
            out["dataset"],
            out["outcome"],
            out["row_count"],
            out["evaluated"],
            f"; failed: {', '.join(out['failed'])}" if out["failed"] else "",
        )

    def branch(self, step: Any, result: StepResult) -> tuple[str | None, bool]:
        return step.branch_target, result.output.get("path") == "fallback"
