"""The DAG's end-of-run callback rides out a ledger outage.

Airflow runs the callback once (in the dag-processor); before, a ledger unreachable at
that moment (a Postgres restart) raised out of it and the ledger's run stayed `running`
while Airflow's had succeeded - found by the restart test of
tests/e2e/test_celery_faults.py (2 of 220 runs). Now the callback waits for the ledger
and writes the run's end once it is back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError
from tests.integration.test_approval_db_outage import outage

from ledgerflow.factory import _finish_run
from ledgerflow.ledger.outage import ride_out
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.postgres import _admin_execute, fresh_database

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    """The ledger behind the default connection ``ledgerflow_db`` (the callback's)."""
    with fresh_database("lf_run_end") as url:
        monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_DB", url)
        ledger = Ledger.from_airflow()
        ledger.migrate()
        yield ledger
        _admin_execute(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" WITH ALLOW_CONNECTIONS true')
        ledger.engine.dispose()


def _register(ledger: Ledger, run_id: str) -> None:
    from sqlalchemy import insert

    from ledgerflow.ledger import schema as t
    from ledgerflow.ledger.store import now

    stamp = now()
    with ledger.engine.begin() as conn:
        conn.execute(
            insert(t.runs).values(
                run_id=run_id,
                dag_id=run_id.split("/")[0],
                workflow="wf",
                version=1,
                params="{}",
                status="running",
                created_at=stamp,
                updated_at=stamp,
            )
        )


def test_the_run_end_is_written_once_the_ledger_is_back(ledger: Ledger) -> None:
    """The callback fires while the ledger's database refuses every connection (3 s):
    it does not fail; the run is `succeeded` in the ledger once the database is back."""
    run_id = "wf__v1/outage"
    _register(ledger, run_id)
    ledger.run(run_id)  # a pooled connection that the outage will cut
    dag_run = SimpleNamespace(dag_id="wf__v1", run_id="outage", state="success")
    down = threading.Thread(target=outage, args=(ledger, 3.0))
    down.start()
    time.sleep(0.5)  # the database is refusing connections now
    _finish_run({"dag_run": dag_run})
    down.join()
    assert ledger.run(run_id)["status"] == "succeeded"  # type: ignore[index]


def test_ride_out_gives_up_after_its_limit_and_passes_other_errors_on(ledger: Ledger) -> None:
    """A lost connection is tried again until the limit, then raised; any other error is
    raised at once (a wrong statement is not an outage)."""
    lost = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    calls: list[int] = []
    naps: list[float] = []

    def always_lost() -> None:
        calls.append(1)
        raise lost

    with pytest.raises(OperationalError):
        ride_out(ledger, always_lost, "test", limit_s=0.0, sleep=naps.append)
    assert len(calls) == 1 and naps == []

    outcomes = iter([lost, lost, None])

    def twice_lost() -> str:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return "done"

    assert ride_out(ledger, twice_lost, "test", limit_s=60.0, sleep=naps.append) == "done"
    assert len(naps) == 2 and naps[1] > 0

    def wrong() -> None:
        raise ValueError("not an outage")

    with pytest.raises(ValueError):
        ride_out(ledger, wrong, "test", sleep=naps.append)
    assert len(naps) == 2


def test_ride_out_says_once_that_the_ledger_is_away(ledger: Ledger) -> None:
    """``on_lost`` is called at the first lost connection only (the run-end listener's
    cue to stop holding the scheduler), never when the first call succeeds."""
    lost = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    outcomes = iter([lost, lost, None])
    told: list[int] = []

    def twice_lost() -> str:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome
        return "done"

    assert (
        ride_out(ledger, twice_lost, "test", sleep=lambda _: None, on_lost=lambda: told.append(1))
        == "done"
    )
    assert told == [1]
    assert ride_out(ledger, lambda: "at once", "test", on_lost=lambda: told.append(1)) == "at once"
    assert told == [1]
