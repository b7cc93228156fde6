"""A successful run's end is written by the scheduler's listener, not a DAG callback.

A DAG success callback cost every successful run a process forked by the dag-processor
(a DAG-file parse and a ledger connection): ~15 % of the runs per minute on Celery
(``bench/throughput.py``). Airflow's listener manager, with the Ledgerflow plugin loaded
as in every component, calls ``run_listener.on_dag_run_success`` as the scheduler marks
a run successful. The write is made before the hook returns (before the scheduler commits
the run's state: a scheduler killed after that loses nothing), on a thread of its own
that the hook waits for ``SYNC_WAIT_S`` at most, and that rides out a ledger outage as
the callback did while the scheduler goes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from airflow.listeners.listener import get_listener_manager
from airflow.models.dagrun import DagRun
from airflow.sdk import DAG
from tests.integration import test_run_end_outage
from tests.integration.test_approval_db_outage import outage
from tests.integration.test_run_end_outage import _register

from ledgerflow import run_listener
from ledgerflow.factory import _finish_run, build_dag
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.loader import parse_spec

pytestmark = pytest.mark.integration


# The ledger behind ``ledgerflow_db`` (the connection the listener writes through).
ledger = test_run_end_outage.ledger


@pytest.fixture(autouse=True)
def _drained(ledger: Ledger) -> Iterator[None]:
    """Every queued end is written before the ledger goes away."""
    yield
    assert run_listener.drain(30)


def _succeeded(dag: DAG, run_id: str) -> None:
    """What the scheduler does as it marks a run successful (``DagRun.update_state``)."""
    dag_run = DagRun(dag_id=dag.dag_id, run_id=run_id, run_type="manual", state="success")
    dag_run.dag = dag
    assert get_listener_manager().has_listeners
    dag_run.notify_dagrun_state_changed(msg="success")


def test_a_successful_run_is_recorded_by_the_listener_before_it_returns(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What makes a scheduler killed right after the state change lose nothing. (The wait
    is made long here so that a slow machine does not turn it into a timeout.)"""
    monkeypatch.setattr(run_listener, "SYNC_WAIT_S", 60.0)
    _register(ledger, "wf__v1/ok")
    _succeeded(DAG("wf__v1", tags=["ledgerflow", "workflow:wf"]), "ok")
    run = ledger.run("wf__v1/ok")
    assert run is not None and run["status"] == "succeeded"
    kinds = [e["kind"] for e in ledger.events("wf__v1/ok")]
    assert kinds.count("run_succeeded") == 1


def test_runs_of_other_dags_are_left_alone(ledger: Ledger) -> None:
    """A DAG without the ``ledgerflow`` tag is not a workflow, whatever its id."""
    _register(ledger, "plain__v1/r1")
    _succeeded(DAG("plain__v1", tags=["team"]), "r1")
    assert run_listener.drain(30)
    run = ledger.run("plain__v1/r1")
    assert run is not None and run["status"] == "running"


def test_the_scheduler_does_not_wait_for_a_ledger_that_is_down(ledger: Ledger) -> None:
    """The ledger refuses every connection for 3 s: the hook returns while it is still
    down, and the run is `succeeded` once it is back."""
    _register(ledger, "wf__v1/outage")
    ledger.run("wf__v1/outage")  # a pooled connection that the outage will cut
    down = threading.Thread(target=outage, args=(ledger, 3.0))
    down.start()
    time.sleep(0.5)  # the database is refusing connections now
    _succeeded(DAG("wf__v1", tags=["ledgerflow"]), "outage")
    assert down.is_alive(), "the hook waited for the ledger"
    down.join()
    assert run_listener.drain(60)
    run = ledger.run("wf__v1/outage")
    assert run is not None and run["status"] == "succeeded"


def test_a_workflow_dag_has_a_failure_callback_and_no_success_callback() -> None:
    """A success costs no DAG callback (the listener writes it); a failure keeps one."""
    spec, _ = parse_spec(
        "name: wf\nversion: 1\nsteps:\n  - id: a\n    tool: demo.noop\n", "v1.yaml"
    )
    dag = build_dag(spec)
    assert not dag.has_on_success_callback
    assert dag.on_failure_callback is _finish_run
    assert run_listener.TAG in dag.tags
