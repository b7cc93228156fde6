"""Non-retryable errors and circuit breakers on real Airflow processes."""

from __future__ import annotations

import pytest

from ledgerflow.ledger import breakers
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.http_peer import IdempotentPeer

pytestmark = pytest.mark.e2e


def ti_states(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
    return {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in stack.task_instances(dag_id, run_id)
    }


def test_http_400_fails_at_once_with_one_attempt(stack: AirflowStack, ledger: Ledger) -> None:
    """A 400 answer is the request's fault: the step fails on its first try although its
    policy allows four, with one attempt and a dead letter in the ledger."""
    run_id = stack.trigger("flaky_http__v1", {"order_id": "bad-1", "path": "bad"})
    assert stack.wait_for_run("flaky_http__v1", run_id, timeout=180) == "failed"
    assert ti_states(stack, "flaky_http__v1", run_id)["charge"] == ("failed", 1)
    attempts = ledger.attempts(f"flaky_http__v1/{run_id}", "charge")
    assert [(a["status"], a["error_type"].rsplit(".", 1)[-1]) for a in attempts] == [
        ("failed", "HttpClientError")
    ]
    letters = [d for d in ledger.dead_letters() if d["run_id"] == f"flaky_http__v1/{run_id}"]
    assert [d["attempts"] for d in letters] == [1]


def test_open_breaker_parks_the_step_in_the_triggerer_then_one_trial_closes_it(
    stack: AirflowStack, ledger: Ledger, peer: IdempotentPeer
) -> None:
    """Two failed calls open the breaker; the next run's step waits deferred (no attempt,
    no worker slot, not a failure); when the service is back and the cooldown is over,
    one trial call succeeds, closes the breaker and the run succeeds on its first try."""
    peer.down = True
    for order in ("brk-1", "brk-2"):
        run_id = stack.trigger("breaker_demo__v1", {"order_id": order})
        assert stack.wait_for_run("breaker_demo__v1", run_id, timeout=180) == "failed"
    (state,) = [b for b in breakers.states(ledger) if b["name"] == "down-api"]
    assert state["state"] == "open" and state["failures"] == 2
    waiting = stack.trigger("breaker_demo__v1", {"order_id": "brk-3"})
    wait_for(
        lambda: ti_states(stack, "breaker_demo__v1", waiting)["call"][0] == "deferred",
        120,
        "the step to defer",
    )
    ledger_run = f"breaker_demo__v1/{waiting}"
    assert ledger.attempts(ledger_run, "call") == []
    assert any(e["kind"] == "waiting_for_breaker" for e in ledger.events(ledger_run))
    calls_while_open = peer.requests.count("breaker_demo:call:brk-3")
    peer.down = False
    assert stack.wait_for_run("breaker_demo__v1", waiting, timeout=180) == "success"
    assert calls_while_open == 0
    assert ti_states(stack, "breaker_demo__v1", waiting)["call"] == ("success", 1)
    assert [a["status"] for a in ledger.attempts(ledger_run, "call")] == ["completed"]
    (state,) = [b for b in breakers.states(ledger) if b["name"] == "down-api"]
    assert state["state"] == "closed"
