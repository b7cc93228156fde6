"""Smoke test of the e2e harness itself (``ledgerflow.testing.airflow_stack.AirflowStack``).

Invariant: a stack of real Airflow 3.3.2 processes (api-server, scheduler, dag-processor,
triggerer; LocalExecutor on a fresh Postgres database) started by ``AirflowStack`` parses a plain
3-task DAG with zero import errors; a run triggered over REST ends ``success`` with every task
instance ``success`` on its first try; and ``stop()`` leaves none of the stack's processes alive
and drops the database it created.
"""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ledgerflow.testing.airflow_stack import COMPONENTS, AirflowStack

DAG_ID = "lf_stack_smoke"
DAG_SOURCE = textwrap.dedent(
    f'''
    """Three chained tasks passing XComs: extract -> transform -> load."""
    from airflow.sdk import DAG, task

    with DAG(dag_id="{DAG_ID}", schedule=None, catchup=False, tags=["smoke"]):

        @task
        def extract() -> int:
            return 20

        @task
        def transform(x: int) -> int:
            return x + 1

        @task
        def load(y: int) -> None:
            assert y == 21, y

        load(transform(extract()))
    '''
)


def _postgres_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=2):
            return True
    except OSError:
        return False


def _database_exists(name: str) -> bool:
    import psycopg2

    conn = psycopg2.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_stack_runs_a_three_task_dag(tmp_path: Path) -> None:
    if not _postgres_up():
        pytest.fail("PostgreSQL is not listening on 127.0.0.1:5432 (the e2e tier needs it)")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "smoke_dag.py").write_text(DAG_SOURCE)

    stack = AirflowStack(dags_folder=dags, home=tmp_path / "airflow_home", parallelism=4)
    t0 = time.monotonic()
    stack.start(timeout=240)
    try:
        start_s = time.monotonic() - t0
        db_name = (stack.db_url or "").rsplit("/", 1)[-1]
        assert db_name.startswith("lf_af_") and _database_exists(db_name)
        pids = [stack.pid(name) for name in COMPONENTS]

        stack.wait_for_dags([DAG_ID], timeout=120)
        assert stack.import_errors() == []
        stack.unpause(DAG_ID)

        t1 = time.monotonic()
        run_id = stack.trigger(DAG_ID, conf={"source": "smoke"})
        state = stack.wait_for_run(DAG_ID, run_id, timeout=180)
        run_s = time.monotonic() - t1
        tis = stack.task_instances(DAG_ID, run_id)
        assert state == "success", (state, tis)
        assert stack.run(DAG_ID, run_id)["conf"] == {"source": "smoke"}
        assert sorted(ti["task_id"] for ti in tis) == ["extract", "load", "transform"]
        for ti in tis:
            assert ti["state"] == "success", ti
            assert ti["try_number"] == 1, ti
            assert ti["map_index"] == -1, ti
            assert ti["start_date"] and ti["end_date"], ti
        print(
            f"\nstack start {start_s:.1f}s, dag run {run_s:.1f}s",
            file=sys.stderr,
        )
    finally:
        t2 = time.monotonic()
        stack.stop()
        print(f"stack stop {time.monotonic() - t2:.1f}s", file=sys.stderr)

    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"process {pid} survived stop()"
    assert not _database_exists(db_name)
    assert stack.db_url is None
