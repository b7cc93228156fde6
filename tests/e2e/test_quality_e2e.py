"""Quality steps on real Airflow processes: GX runs in a LocalExecutor task against the
Postgres ledger database, the result is a ledger row, and the grid shows the path taken."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger import quality as quality_ledger
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

DAG = "quality_gate__v1"


@pytest.fixture(scope="module")
def orders(ledger: Ledger) -> None:
    """``qe2e_orders`` in the ledger database: batch 'clean' passes every expectation,
    batch 'dirty' has a null email, a duplicate id, a negative amount, an unknown status."""
    with ledger.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS qe2e_orders"))
        conn.execute(
            text(
                "CREATE TABLE qe2e_orders (id INTEGER, batch TEXT, email TEXT, "
                "amount NUMERIC(10, 2), status TEXT)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO qe2e_orders SELECT g, 'clean', 'c' || g || '@shop.io', g % 900, "
                "'paid' FROM generate_series(1, 500) AS g"
            )
        )
        conn.execute(
            text(
                "INSERT INTO qe2e_orders VALUES (1, 'dirty', NULL, 5, 'paid'), "
                "(1, 'dirty', 'a@shop.io', -3, 'paid'), (2, 'dirty', 'b@shop.io', 9, 'lost')"
            )
        )


def states(stack: AirflowStack, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in stack.task_instances(DAG, run_id)}


def test_clean_data_takes_the_main_path(stack: AirflowStack, ledger: Ledger, orders: Any) -> None:
    """Clean rows: the run succeeds, publish runs, the quarantine branch is skipped in the
    grid, the join still runs, and the ledger holds one passing result row."""
    run_id = stack.trigger(DAG, {"batch": "clean"})
    assert stack.wait_for_run(DAG, run_id, timeout=240) == "success"
    assert states(stack, run_id) == {
        "check": "success",
        "publish": "success",
        "quarantine": "skipped",
        "done": "success",
    }
    [row] = quality_ledger.results(ledger, f"{DAG}/{run_id}", "check")
    assert row["success"] is True and row["outcome"] == "passed" and row["row_count"] == 500
    publish = ledger.checkpoint(f"{DAG}/{run_id}", "publish")
    assert publish is not None and publish.output == {"value": 500}


def test_dirty_data_takes_the_declared_branch(
    stack: AirflowStack, ledger: Ledger, orders: Any
) -> None:
    """Dirty rows: the check completes on the fallback path, quarantine runs with the failed
    expectations, publish is skipped in the grid, and the result row holds the samples."""
    run_id = stack.trigger(DAG, {"batch": "dirty"})
    assert stack.wait_for_run(DAG, run_id, timeout=240) == "success"
    assert states(stack, run_id) == {
        "check": "success",
        "publish": "skipped",
        "quarantine": "success",
        "done": "success",
    }
    [row] = quality_ledger.results(ledger, f"{DAG}/{run_id}", "check")
    assert row["success"] is False and row["outcome"] == "branched"
    samples = {f["type"]: f["sample"] for f in row["failed"]}
    assert samples["not_null"] == [None] and samples["unique"] == [1, 1]
    assert samples["in_set"] == ["lost"] and [float(v) for v in samples["between"]] == [-3.0]
    quarantine = ledger.checkpoint(f"{DAG}/{run_id}", "quarantine")
    assert quarantine is not None
    assert set(quarantine.output["value"]) == {
        "not_null(email)",
        "unique(id)",
        "between(amount, min=0, max=1000)",
        "in_set(status, values=['paid', 'shipped'])",
    }


def test_nightly_report_validates_before_publishing(stack: AirflowStack, ledger: Ledger) -> None:
    """The shipped nightly report runs its quality step first on the real stack: the check
    passes on the demo payments, then totals and store run."""
    run_id = stack.trigger("nightly_report__v1")
    assert stack.wait_for_run("nightly_report__v1", run_id, timeout=240) == "success"
    got = {ti["task_id"]: ti["state"] for ti in stack.task_instances("nightly_report__v1", run_id)}
    assert got == {"check_payments": "success", "totals": "success", "store": "success"}
    [row] = quality_ledger.results(ledger, f"nightly_report__v1/{run_id}", "check_payments")
    assert row["outcome"] == "passed" and row["evaluated"] == 5


def test_on_failure_fail_fails_the_run_once_and_compensates(
    stack: AirflowStack, ledger: Ledger, orders: Any
) -> None:
    """on_failure: fail on dirty rows: the check fails at its first try although it may
    retry (a data finding is not retried), publish never runs, the saga releases the
    reservation made before the check, and the ledger holds the failed result, the
    dead letter naming the failed expectations, and a compensated saga."""
    run_id = stack.trigger("quality_strict__v1", {"order_id": "qs-1", "batch": "dirty"})
    assert stack.wait_for_run("quality_strict__v1", run_id, timeout=240) == "failed"
    got = {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in stack.task_instances("quality_strict__v1", run_id)
    }
    assert got["reserve"] == ("success", 1)
    assert got["check"] == ("failed", 1)
    assert got["publish"][0] == "upstream_failed"
    assert got["compensate__reserve"] == ("success", 1)
    ledger_run = f"quality_strict__v1/{run_id}"
    [row] = quality_ledger.results(ledger, ledger_run, "check")
    assert row["outcome"] == "failed" and row["failed_count"] == 2
    run = ledger.run(ledger_run)
    assert run is not None and run["saga"] == "compensated" and run["failed_step"] == "check"
    letters = [d for d in ledger.dead_letters(None) if d["run_id"] == ledger_run]
    assert [d["step_key"] for d in letters] == ["check"]
    assert "not_null(email)" in letters[0]["error"] and "unique(id)" in letters[0]["error"]
    with ledger.engine.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM demo_reservations WHERE order_id = 'qs-1'")
        ).scalar_one()
    assert status == "released"
