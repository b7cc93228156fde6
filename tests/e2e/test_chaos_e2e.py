"""Crash safety: task processes SIGKILLed at random points of the charge step."""

from __future__ import annotations

import os
import random
import signal
import time
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

BATCHES = 5
PER_BATCH = 10  # 50 kills in all
SEED = int(os.environ.get("LEDGERFLOW_CHAOS_SEED", "20261121"))


def first_charge_attempt(ledger: Ledger, run_id: str) -> dict[str, Any] | None:
    for attempt in ledger.attempts(f"checkout__v1/{run_id}", "charge_payment"):
        if attempt["try_number"] == 1:
            return attempt
    return None


def kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("batch", range(BATCHES))
def test_sigkill_during_the_charge_never_duplicates_or_loses_a_run(
    stack: AirflowStack, ledger: Ledger, batch: int
) -> None:
    """Ten checkouts at once; each one's charge task process is SIGKILLed at a random moment
    of the charge step (after its attempt is recorded, inside its open transaction). Every run still
    reaches a terminal state, succeeds after Airflow's retry, and every order holds
    exactly one payment."""
    rng = random.Random(SEED + batch)
    # Kill between the attempt's start and the end of the 1 s payment call (its open
    # transaction); "committed, then crashed" is pinned by the injected-fault tests.
    orders = {f"chaos-{batch}-{i}": rng.uniform(0.0, 0.9) for i in range(PER_BATCH)}
    runs = {
        order: stack.trigger("checkout__v1", {"order_id": order, "charge_delay_s": 1.0})
        for order in orders
    }
    killed = 0
    pending = dict(runs)
    deadline = time.monotonic() + 240
    started: dict[str, float] = {}
    while pending and time.monotonic() < deadline:
        for order, run_id in list(pending.items()):
            attempt = first_charge_attempt(ledger, run_id)
            if attempt is None:
                continue
            started.setdefault(order, time.monotonic())
            if time.monotonic() - started[order] >= orders[order]:
                killed += kill(int(attempt["pid"]))
                del pending[order]
        time.sleep(0.05)
    assert not pending, f"charge never started for {sorted(pending)}"
    assert killed == PER_BATCH
    outcomes = {
        order: stack.wait_for_run("checkout__v1", run_id, timeout=300)
        for order, run_id in runs.items()
    }
    assert outcomes == {order: "success" for order in runs}, outcomes
    with ledger.engine.connect() as conn:
        payments = dict(
            conn.execute(
                text(
                    "SELECT order_id, COUNT(*) FROM demo_payments WHERE order_id LIKE :p GROUP BY order_id"
                ),
                {"p": f"chaos-{batch}-%"},
            ).all()
        )
    assert payments == {order: 1 for order in runs}
    for run_id in runs.values():
        run = ledger.run(f"checkout__v1/{run_id}")
        assert run is not None  # no lost run
        statuses = [
            a["status"] for a in ledger.attempts(f"checkout__v1/{run_id}", "charge_payment")
        ]
        assert statuses[-1] == "completed" and statuses.count("completed") == 1
