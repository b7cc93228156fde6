"""Quality steps against real Postgres: GX validates real tables and queries, the ledger
records every result, and a failure takes the path the step declares."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from ledgerflow.errors import NonRetryableError
from ledgerflow.ledger import quality as quality_ledger
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import QualityStep, WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.quality import QualityCheckFailed, QualityOutcome, run_quality
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

WORKFLOW = """
name: qc
version: 1
params:
  region: {{type: string, default: good, enum: [good, bad]}}
steps:
  - id: load
    tool: demo.noop
    args:
      value:
        - {{id: 1, email: a@x.io}}
        - {{id: 2, email: null}}
        - {{id: 2, email: b@x.io}}
    idempotency: natural
  - id: check
    kind: quality
    needs: [load]
    dataset: {dataset}
    expectations:
{expectations}
    on_failure: {on_failure}{extra}
  - id: publish
    needs: [check]
    tool: demo.noop
    idempotency: natural
  - id: quarantine
    needs: [check]
    tool: demo.noop
    idempotency: natural
"""

ORDERS = """
  - not_null: email
  - unique: id
  - between: {column: amount, min: 0, max: 1000}
  - in_set: {column: status, values: [paid, shipped]}
  - row_count_between: {min: 1, max: 100000}
  - match_regex: {column: email, regex: "^[^@]+@[^@]+$"}
"""


@pytest.fixture(scope="module")
def warehouse() -> Iterator[str]:
    """A Postgres database with an ``orders`` table: region 'good' is clean, region 'bad'
    has a null email, a duplicate id, a negative amount and an unknown status."""
    with fresh_database("lf_qc_wh") as url:
        engine = create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "CREATE TABLE orders (id INTEGER, region TEXT, email TEXT, "
                    "amount NUMERIC(10, 2), status TEXT)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO orders SELECT g, 'good', 'c' || g || '@shop.io', g % 500, "
                    "CASE WHEN g % 3 = 0 THEN 'shipped' ELSE 'paid' END "
                    "FROM generate_series(1, 2000) AS g"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO orders VALUES (9001, 'bad', 'ok@shop.io', 10, 'paid'), "
                    "(9002, 'bad', NULL, 20, 'paid'), (9002, 'bad', 'dup@shop.io', -7.5, 'paid'), "
                    "(9003, 'bad', 'no-at-sign', 30, 'lost')"
                )
            )
        engine.dispose()
        yield url


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch, warehouse: str) -> Iterator[Ledger]:
    """A fresh Postgres ledger; the ``warehouse`` Airflow connection (an environment
    variable, as Airflow reads it) points at the data."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", warehouse)
    with fresh_database("lf_qc_ledger") as url:
        monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_DB", url)
        ledger = Ledger(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        ledger.migrate()
        yield ledger
        ledger.engine.dispose()


def workflow(
    tmp_path: Path,
    *,
    dataset: str = "{conn_id: warehouse, table: orders}",
    expectations: str = ORDERS,
    on_failure: str = "fail",
    extra: str = "",
) -> WorkflowSpec:
    body = WORKFLOW.format(
        dataset=dataset,
        expectations=textwrap.indent(textwrap.dedent(expectations).strip(), "      "),
        on_failure=on_failure,
        extra=extra,
    )
    path = tmp_path / "qc.yaml"
    path.write_text(body)
    return load_workflow(path)


def check(spec: WorkflowSpec) -> QualityStep:
    step = spec.step("check")
    assert isinstance(step, QualityStep)
    return step


def run(spec: WorkflowSpec, ledger: Ledger, name: str, **params: Any) -> QualityOutcome:
    ref = RunRef(run_id=f"qc__v1/{name}", dag_id="qc__v1")
    return run_quality(ledger, spec, check(spec), ref, params={"region": "good", **params})


def count(ledger: Ledger, sql: str, **binds: Any) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(text(sql), binds).scalar_one())


def failed_by_type(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["type"]: f for f in row["failed"]}


def test_a_clean_table_passes_and_the_result_is_a_ledger_row(
    tmp_path: Path, ledger: Ledger
) -> None:
    """2,000 clean rows through a Postgres connection pass all six expectations: the
    checkpoint is completed with a summary, and one result row holds GX's statistics."""
    spec = workflow(
        tmp_path,
        dataset="{conn_id: warehouse, query: \"SELECT * FROM orders WHERE region = 'good'\"}",
    )
    outcome = run(spec, ledger, "clean")
    assert outcome.status == "completed" and not outcome.take_branch
    assert outcome.output["outcome"] == "passed" and outcome.output["failed"] == []
    assert outcome.output["row_count"] == 2000 and outcome.output["evaluated"] == 6
    [row] = quality_ledger.results(ledger, "qc__v1/clean", "check")
    assert row["success"] is True and row["outcome"] == "passed"
    assert row["row_count"] == 2000 and row["evaluated"] == 6 and row["failed_count"] == 0
    assert row["statistics"]["successful_expectations"] == 6
    checkpoint = ledger.checkpoint("qc__v1/clean", "check")
    assert checkpoint is not None and checkpoint.status == "completed"
    assert checkpoint.output["result_id"] == row["id"]


def test_failing_data_with_on_failure_fail_fails_at_once_with_the_samples_recorded(
    tmp_path: Path, ledger: Ledger
) -> None:
    """The 'bad' rows fail five expectations. on_failure: fail raises a non-retryable error
    naming them; the result row holds each failed expectation with its unexpected values;
    the attempt is failed and final, with a dead letter; no checkpoint output exists."""
    spec = workflow(
        tmp_path,
        dataset="{conn_id: warehouse, query: \"SELECT * FROM orders WHERE region = :region\", parameters: {region: '{{ params.region }}'}}",
    )
    with pytest.raises(QualityCheckFailed) as info:
        run(spec, ledger, "dirty", region="bad")
    assert isinstance(info.value, NonRetryableError)
    message = str(info.value)
    for label in ("not_null(email)", "unique(id)", "between(amount", "in_set(status"):
        assert label in message
    [row] = quality_ledger.results(ledger, "qc__v1/dirty", "check")
    assert row["success"] is False and row["outcome"] == "failed" and row["row_count"] == 4
    failed = failed_by_type(row)
    assert set(failed) == {"not_null", "unique", "between", "in_set", "match_regex"}
    assert failed["not_null"]["sample"] == [None] and failed["not_null"]["unexpected_count"] == 1
    assert sorted(failed["unique"]["sample"]) == [9002, 9002]
    assert [float(v) for v in failed["between"]["sample"]] == [-7.5]
    assert failed["in_set"]["sample"] == ["lost"]
    assert failed["match_regex"]["sample"] == ["no-at-sign"]
    checkpoint = ledger.checkpoint("qc__v1/dirty", "check")
    assert checkpoint is not None and checkpoint.status == "failed"
    assert checkpoint.output is None
    [attempt] = ledger.attempts("qc__v1/dirty", "check")
    assert attempt["status"] == "failed" and attempt["error_type"].endswith("QualityCheckFailed")
    assert count(ledger, "SELECT COUNT(*) FROM lf_dead_letters WHERE run_id = 'qc__v1/dirty'") == 1


def test_failing_data_with_on_failure_warn_completes_with_the_warning_recorded(
    tmp_path: Path, ledger: Ledger
) -> None:
    """on_failure: warn completes the step on the main path; the result row (outcome
    warned) and a quality_warned event record what failed."""
    spec = workflow(
        tmp_path,
        dataset="{conn_id: warehouse, query: \"SELECT * FROM orders WHERE region = 'bad'\"}",
        on_failure="warn",
    )
    outcome = run(spec, ledger, "warned")
    assert outcome.status == "completed" and not outcome.take_branch
    assert outcome.output["outcome"] == "warned" and outcome.output["success"] is False
    assert "unique(id)" in outcome.output["failed"]
    [row] = quality_ledger.results(ledger, "qc__v1/warned", "check")
    assert row["outcome"] == "warned" and row["failed_count"] == 5
    assert (
        count(
            ledger,
            "SELECT COUNT(*) FROM lf_events WHERE run_id = 'qc__v1/warned' AND kind = 'quality_warned'",
        )
        == 1
    )


def test_failing_data_with_a_branch_takes_it_and_a_retry_reuses_the_decision(
    tmp_path: Path, ledger: Ledger
) -> None:
    """on_failure: {branch: quarantine} completes the step on the fallback path; the same
    step run again (a retried task) reuses the checkpoint: same path, no new validation."""
    spec = workflow(
        tmp_path,
        dataset="{conn_id: warehouse, query: \"SELECT * FROM orders WHERE region = 'bad'\"}",
        on_failure="{branch: quarantine}",
    )
    assert check(spec).branch_target == "quarantine"
    first = run(spec, ledger, "branch")
    assert first.take_branch and first.output["outcome"] == "branched"
    again = run(spec, ledger, "branch")
    assert again.status == "reused" and again.take_branch and again.output == first.output
    assert len(quality_ledger.results(ledger, "qc__v1/branch", "check")) == 1


def test_clean_data_with_a_branch_stays_on_the_main_path(tmp_path: Path, ledger: Ledger) -> None:
    """The branch form on clean data: passed, main path (the fallback will be skipped)."""
    spec = workflow(
        tmp_path,
        dataset="{conn_id: warehouse, query: \"SELECT * FROM orders WHERE region = 'good'\"}",
        on_failure="{branch: quarantine}",
    )
    outcome = run(spec, ledger, "main")
    assert outcome.output["outcome"] == "passed" and not outcome.take_branch


def test_a_whole_table_and_a_missing_column_is_a_failed_expectation(
    tmp_path: Path, ledger: Ledger
) -> None:
    """A table dataset is validated in place (all 2,004 rows); an expectation on a column
    the table does not have fails with GX's error recorded, not an engine crash."""
    spec = workflow(
        tmp_path,
        expectations="- not_null: id\n- not_null: coupon\n- row_count_between: {min: 2004, max: 2004}",
        on_failure="warn",
    )
    outcome = run(spec, ledger, "table")
    assert outcome.output["row_count"] == 2004
    assert outcome.output["failed"] == ["not_null(coupon)"]
    [row] = quality_ledger.results(ledger, "qc__v1/table", "check")
    assert "coupon" in row["failed"][0]["error"]


def test_an_upstream_output_is_validated_as_a_dataframe(tmp_path: Path, ledger: Ledger) -> None:
    """``dataset: {expression: ...}`` validates the records an earlier step returned (read
    from the ledger): the null email and the duplicate id are found with their samples."""
    spec = workflow(
        tmp_path,
        dataset='{expression: "steps.load.output.value"}',
        expectations="- not_null: email\n- unique: id\n- row_count_between: {min: 3}",
        on_failure="{branch: quarantine}",
    )
    ref = RunRef(run_id="qc__v1/frame", dag_id="qc__v1")
    execute_step(ledger, spec, spec.tool_step("load"), ref, params={"region": "good"})
    outcome = run_quality(ledger, spec, check(spec), ref, params={"region": "good"})
    assert outcome.take_branch and outcome.output["row_count"] == 3
    [row] = quality_ledger.results(ledger, "qc__v1/frame", "check")
    failed = failed_by_type(row)
    assert set(failed) == {"not_null", "unique"}
    assert failed["not_null"]["sample"] == [None] and failed["unique"]["sample"] == [2, 2]


def test_an_unreachable_database_is_a_retryable_attempt_not_a_finding(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the data's database cannot be reached the attempt fails as retryable (not
    final, no dead letter, no result row): nothing is claimed about the data."""
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", "postgresql://postgres@127.0.0.1:1/none")
    spec = workflow(tmp_path)
    ref = RunRef(run_id="qc__v1/down", dag_id="qc__v1")
    with pytest.raises(Exception) as info:
        run_quality(
            ledger, spec, check(spec), ref, params={"region": "good"}, try_number=1, max_attempts=3
        )
    assert not isinstance(info.value, NonRetryableError)
    checkpoint = ledger.checkpoint("qc__v1/down", "check")
    assert checkpoint is not None and checkpoint.status == "retrying"
    assert quality_ledger.results(ledger, "qc__v1/down") == []
    assert count(ledger, "SELECT COUNT(*) FROM lf_dead_letters WHERE run_id = 'qc__v1/down'") == 0


def test_an_unknown_connection_fails_without_retrying(tmp_path: Path, ledger: Ledger) -> None:
    """A dataset naming a connection Airflow does not have is a non-retryable failure."""
    spec = workflow(tmp_path, dataset="{conn_id: nowhere, table: orders}")
    with pytest.raises(NonRetryableError, match="no Airflow connection 'nowhere'"):
        run(spec, ledger, "noconn")


def test_data_docs_are_written_under_the_airflow_home_only_when_asked(
    tmp_path: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data_docs: true`` writes GX Data Docs (an index and the validation page) under
    $AIRFLOW_HOME/ledgerflow/data_docs/<workflow>/v<N>/<step>; without it nothing is written."""
    home = tmp_path / "airflow-home"
    monkeypatch.setenv("AIRFLOW_HOME", str(home))
    plain = workflow(tmp_path, on_failure="warn")
    run(plain, ledger, "no-docs")
    assert not (home / "ledgerflow").exists()
    spec = workflow(tmp_path, on_failure="warn", extra="\n    data_docs: true")
    outcome = run(spec, ledger, "docs")
    assert outcome.output["outcome"] == "warned"
    site = home / "ledgerflow" / "data_docs" / "qc" / "v1" / "check"
    assert (site / "index.html").is_file()
    assert list((site / "validations").rglob("*.html"))


def test_query_parameters_are_bound_as_literals_and_cannot_break_out(warehouse: str) -> None:
    """A query's values are rendered by Postgres's dialect as quoted literals: a value
    written to close the quote (``good' OR '1'='1``) matches no row, where pasting it
    into the query text (what a templated query did) matched all 2,004."""
    from ledgerflow.steps.quality import bind_literals

    engine = create_engine(warehouse)
    query = "SELECT count(*) FROM orders WHERE region = :region"
    try:
        with engine.connect() as conn:

            def rows(value: str) -> int:
                return int(
                    conn.execute(
                        text(bind_literals(warehouse, query, {"region": value}))
                    ).scalar_one()
                )

            assert rows("good") == 2000
            assert rows("good' OR '1'='1") == 0
            pasted = query.replace(":region", "'good' OR '1'='1'")
            assert int(conn.execute(text(pasted)).scalar_one()) == 2004
    finally:
        engine.dispose()
