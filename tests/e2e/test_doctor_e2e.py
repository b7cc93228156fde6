"""The maintenance DAG ``ledgerflow_doctor`` in a real Airflow task process (where Airflow
3 blocks the ORM): it reports an orphan the ledger holds, sends the ``orphaned_runs``
gauge, and repairs nothing without ``[ledgerflow] doctor_fix``."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import delete, update

from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import now
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.statsd import StatsdListener

pytestmark = pytest.mark.e2e

ORPHAN = "slow__v1/manual__doctor-e2e-orphan"


def test_the_doctor_dag_reports_an_orphan_and_sends_the_gauge(
    stack: AirflowStack, ledger: Ledger, statsd: StatsdListener
) -> None:
    """A ledger run left `running` an hour ago for a DagRun Airflow never had (as a crash
    between the two leaves it) is reported `run_missing` by the DAG's task; the gauge
    `ledgerflow.orphaned_runs` arrives; the run is not changed (report only)."""
    ledger.ensure_run(
        run_id=ORPHAN,
        dag_id="slow__v1",
        workflow="doctor_probe",  # not `slow`: the other tests' indicators stay as they are
        version=1,
        params={},
        trigger_kind="manual",
    )
    try:
        with ledger.engine.begin() as conn:
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == ORPHAN)
                .values(updated_at=now() - timedelta(hours=1))
            )
        stack.wait_for_dags(["ledgerflow_doctor"], timeout=120)
        stack.unpause("ledgerflow_doctor")
        run_id = stack.trigger("ledgerflow_doctor")
        assert stack.wait_for_run("ledgerflow_doctor", run_id, timeout=300) == "success"
        report = stack.api(
            "GET",
            f"/api/v2/dags/ledgerflow_doctor/dagRuns/{run_id}/taskInstances/check_orphans"
            "/xcomEntries/return_value",
        )["value"]
        if isinstance(report, str):  # the stored JSON, as text
            report = json.loads(report)
        mine = [f for f in report["findings"] if f["run_id"] == ORPHAN]
        assert [(f["cause"], f["status"]) for f in mine] == [("run_missing", "found")], report
        assert report["fixed"] is False
        deadline = time.monotonic() + 30
        while not statsd.gauges.get("airflow.ledgerflow.orphaned_runs"):
            assert time.monotonic() < deadline, "no orphaned_runs gauge"
            time.sleep(0.2)
        assert statsd.gauges["airflow.ledgerflow.orphaned_runs"][-1] >= 1
        assert ledger.run(ORPHAN)["status"] == "running"  # type: ignore[index]
    finally:
        with ledger.engine.begin() as conn:
            conn.execute(delete(t.events).where(t.events.c.run_id == ORPHAN))
            conn.execute(delete(t.runs).where(t.runs.c.run_id == ORPHAN))
