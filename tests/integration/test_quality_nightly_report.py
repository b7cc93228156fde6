"""The nightly report validates its source rows before publishing, on both ledgers the
demo and production use (the embedded SQLite file and Postgres)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import text

from ledgerflow.ledger import quality as quality_ledger
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import QualityStep
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.quality import QualityCheckFailed, run_quality
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

REPORT = Path(__file__).resolve().parents[2] / "dags" / "workflows" / "nightly_report" / "v1.yaml"


def test_nightly_report_checks_its_source_rows_before_publishing(
    ledger_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clean captured payments pass the shipped suite and the report is stored; after a
    payment with a negative amount and an unknown status lands, the check fails (naming
    both expectations, with the bad values as samples) before any report is written."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_LEDGERFLOW_DB", ledger_url.replace("postgresql+psycopg2://", "postgresql://")
    )
    ledger = Ledger(ledger_url)
    ledger.migrate()
    spec = load_workflow(REPORT)
    check = spec.step("check_payments")
    assert isinstance(check, QualityStep)
    with ledger.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO demo_payments (order_id, amount, status, idempotency_key) VALUES "
                "('n-1', 12.50, 'captured', 'k-1'), ('n-2', 30, 'refunded', 'k-2')"
            )
        )
    good = RunRef(run_id="nightly_report__v1/good", dag_id="nightly_report__v1",
                  logical_date="2026-03-01T01:30:00+00:00")  # fmt: skip
    outcome = run_quality(ledger, spec, check, good, params={})
    assert outcome.output["outcome"] == "passed" and outcome.output["row_count"] == 2
    execute_step(ledger, spec, spec.tool_step("totals"), good, params={})
    stored = execute_step(ledger, spec, spec.tool_step("store"), good, params={})
    assert (stored.output["report_date"], stored.output["orders"]) == ("2026-03-01", 1)
    assert Decimal(stored.output["revenue"]) == Decimal("12.50")

    with ledger.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO demo_payments (order_id, amount, status, idempotency_key) VALUES "
                "('n-3', -5, 'captrued', 'k-3')"
            )
        )
    bad = RunRef(run_id="nightly_report__v1/bad", dag_id="nightly_report__v1")
    with pytest.raises(QualityCheckFailed) as info:
        run_quality(ledger, spec, check, bad, params={})
    assert "between(amount" in str(info.value) and "in_set(status" in str(info.value)
    [row] = quality_ledger.results(ledger, "nightly_report__v1/bad")
    samples = {f["type"]: f["sample"] for f in row["failed"]}
    assert samples["in_set"] == ["captrued"]
    assert [float(v) for v in samples["between"]] == [-5.0]
    with ledger.engine.connect() as conn:
        reports = conn.execute(text("SELECT COUNT(*) FROM demo_reports")).scalar_one()
    assert reports == 1
