"""Metrics through Airflow's pipeline: a known run on real Airflow processes with StatsD on.

The stack (tests/e2e/conftest.py) runs with ``[metrics] statsd_on`` pointing at a real UDP
StatsD server of the test session (``ledgerflow.testing.statsd``). The ``metrics_probe``
workflow is run by this test only, so the names suffixed with its workflow count exactly
this run's facts.
"""

from __future__ import annotations

import secrets
import time

import pytest

from ledgerflow.ledger import runview
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.statsd import StatsdListener

pytestmark = pytest.mark.e2e

DAG_ID = "metrics_probe__v1"
P = "airflow.ledgerflow."
W = "metrics_probe"


def wait_for_counters(
    statsd: StatsdListener, names: list[str], timeout: float = 180.0
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counters = statsd.snapshot(P)["counters"]
        if all(n in counters for n in names):
            return dict(counters)
        if time.monotonic() > deadline:
            raise TimeoutError(f"metrics {names} not all received: {counters}")
        time.sleep(0.5)


def test_a_known_run_emits_its_ledgerflow_metrics_to_statsd(
    stack: AirflowStack, ledger: Ledger, statsd: StatsdListener
) -> None:
    """One metrics_probe run (reserve; slow_once times out once and succeeds on its retry;
    ship fails both tries and is dead-lettered; the saga releases the reservation) sends,
    through Airflow's StatsD client, exactly: 1 run started, 1 failed, 1 compensated, 6
    step attempts (1 + 2 + 2 + the compensation's 1), 2 retries and 1 dead letter for
    its workflow, and nothing counted as succeeded; the tagged names (no workflow suffix)
    arrive too. The counts match the ledger's own rows of the run."""
    before = statsd.snapshot(P)["counters"]
    assert not any(name.endswith(f".{W}") for name in before), before
    stack.unpause(DAG_ID)
    run_id = stack.trigger(DAG_ID, {"order_id": f"m-{secrets.token_hex(4)}"})
    assert stack.wait_for_run(DAG_ID, run_id, timeout=300) == "failed"

    final = [f"{P}runs.failed.{W}", f"{P}runs.compensated.{W}"]
    counters = wait_for_counters(statsd, final)
    time.sleep(3)  # let any stray datagram of this run arrive before comparing exactly
    counters = statsd.snapshot(P)["counters"]
    mine = {k.removeprefix(P): v for k, v in counters.items() if k.endswith(f".{W}")}
    assert mine == {
        f"runs.started.{W}": 1,
        f"step.attempts.{W}": 6,
        f"step.retries.{W}": 2,
        f"dead_letters.{W}": 1,
        f"runs.failed.{W}": 1,
        f"runs.compensated.{W}": 1,
    }
    for tagged in ("runs.started", "step.attempts", "step.retries", "dead_letters"):
        assert counters.get(P + tagged, 0) >= mine[f"{tagged}.{W}"]

    # The same facts in the ledger's rows of the run.
    doc = runview.run_document(ledger, f"{DAG_ID}/{run_id}")
    assert doc is not None
    tries = {s["step_key"]: [a["try_number"] for a in s["attempts"]] for s in doc["steps"]}
    assert tries == {
        "reserve": [1],
        "slow_once": [1, 2],
        "ship": [1, 2],
        "compensate__reserve": [1],
    }
    assert [d["step_key"] for d in doc["dead_letters"]] == ["ship"]
    assert doc["saga"]["outcome"] == "compensated"
