"""Saga compensation and failure handling on real Airflow processes with Postgres."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

FORWARD = ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation")


def rows(ledger: Ledger, sql: str, **binds: Any) -> list[dict[str, Any]]:
    with ledger.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), binds).mappings()]


def reserved(ledger: Ledger, sku: str) -> int:
    return int(
        rows(ledger, "SELECT reserved FROM demo_inventory WHERE sku = :s", s=sku)[0]["reserved"]
    )


def states(stack: AirflowStack, run_id: str) -> dict[str, tuple[str, int]]:
    return {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in stack.task_instances("checkout__v1", run_id)
    }


def test_a_fused_checkout_retries_the_shipment_in_its_task_then_undoes_each_step(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """checkout__v2 runs its four steps in one task. The shipment fails all three of its
    attempts inside that task (no Airflow retry of the task), and the saga undoes each
    completed step in its own task, in reverse: the refund, then the release."""
    run_id = stack.trigger("checkout__v2", {"order_id": "saga-fused", "fail_shipment": True})
    assert stack.wait_for_run("checkout__v2", run_id, timeout=240) == "failed"
    s = {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in stack.task_instances("checkout__v2", run_id)
    }
    assert s["fused__reserve_inventory__send_confirmation"] == ("failed", 1)
    assert s["compensate__create_shipment"][0] == "skipped"
    assert s["compensate__charge_payment"] == ("success", 1)
    assert s["compensate__reserve_inventory"] == ("success", 1)
    assert s["saga__finish"][0] == "success"
    ledger_run = f"checkout__v2/{run_id}"
    run = ledger.run(ledger_run)
    assert run is not None and (run["saga"], run["failed_step"]) == (
        "compensated",
        "create_shipment",
    )
    shipment = ledger.attempts(ledger_run, "create_shipment")
    assert [(a["try_number"], a["status"]) for a in shipment] == [
        (1, "failed"),
        (2, "failed"),
        (3, "failed"),
    ]
    assert len({a["pid"] for a in shipment}) == 1  # all three in the one task process
    refund = ledger.attempts(ledger_run, "compensate__charge_payment")
    release = ledger.attempts(ledger_run, "compensate__reserve_inventory")
    assert len(refund) == len(release) == 1
    assert refund[0]["ended_at"] <= release[0]["started_at"]
    assert [
        r["status"]
        for r in rows(ledger, "SELECT status FROM demo_payments WHERE order_id = 'saga-fused'")
    ] == ["refunded"]


def test_a_successful_run_skips_its_saga_without_starting_a_task(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Issue 12: a checkout whose four steps succeed ends with every compensation task and
    saga__finish skipped by its last step, none of them ever started on a worker (no
    try, no host); the ledger says the saga was not needed, and the run succeeded."""
    run_id = stack.trigger("checkout__v1", {"order_id": "saga-ok", "sku": "sku-mug", "qty": 1})
    assert stack.wait_for_run("checkout__v1", run_id, timeout=240) == "success"
    tis = {ti["task_id"]: ti for ti in stack.task_instances("checkout__v1", run_id)}
    assert {step: tis[step]["state"] for step in FORWARD} == dict.fromkeys(FORWARD, "success")
    teardowns = [f"compensate__{step}" for step in FORWARD[:3]] + ["saga__finish"]
    assert {
        t: (tis[t]["state"], tis[t]["try_number"], tis[t]["hostname"] or "") for t in teardowns
    } == (dict.fromkeys(teardowns, ("skipped", 0, "")))
    ledger_run = f"checkout__v1/{run_id}"
    [event] = [e for e in ledger.events(ledger_run) if e["kind"] == "saga_not_needed"]
    assert event["data"]["task_id"] == "send_confirmation"
    assert sorted(event["data"]["skipped"]) == sorted(teardowns)
    assert ledger.compensations(ledger_run) == {}
    # The scheduler's listener (ledgerflow.run_listener) still records the outcome.
    wait_for(lambda: (ledger.run(ledger_run) or {}).get("status") == "succeeded", 60, "status")
    assert (ledger.run(ledger_run) or {}).get("saga") is None


def test_a_successful_fused_run_skips_its_saga_from_its_segment_task(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """checkout__v2's one forward task (the four steps fused) is its last: it skips the
    compensation tasks and saga__finish as it ends; none of them starts."""
    run_id = stack.trigger("checkout__v2", {"order_id": "saga-ok-fused"})
    assert stack.wait_for_run("checkout__v2", run_id, timeout=240) == "success"
    tis = {ti["task_id"]: ti for ti in stack.task_instances("checkout__v2", run_id)}
    assert tis["fused__reserve_inventory__send_confirmation"]["state"] == "success"
    teardowns = [f"compensate__{step}" for step in FORWARD[:3]] + ["saga__finish"]
    assert {t: (tis[t]["state"], tis[t]["try_number"]) for t in teardowns} == dict.fromkeys(
        teardowns, ("skipped", 0)
    )
    [event] = [e for e in ledger.events(f"checkout__v2/{run_id}") if e["kind"] == "saga_not_needed"]
    assert event["data"]["task_id"] == "fused__reserve_inventory__send_confirmation"


def test_shipment_failure_refunds_then_releases_exactly_once(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Shipment fails after reserve and charge: refund then release run as their own tasks,
    in that order, once each; the run is failed, the saga compensated, and the demo
    tables are back to their starting balances."""
    before = reserved(ledger, "sku-mug")
    run_id = stack.trigger(
        "checkout__v1", {"order_id": "saga-1", "sku": "sku-mug", "qty": 3, "fail_shipment": True}
    )
    assert stack.wait_for_run("checkout__v1", run_id, timeout=240) == "failed"
    s = states(stack, run_id)
    assert s["create_shipment"][0] == "failed"
    assert s["send_confirmation"][0] == "upstream_failed"
    assert s["compensate__create_shipment"][0] == "skipped"  # never completed: nothing to undo
    assert s["compensate__charge_payment"] == ("success", 1)
    assert s["compensate__reserve_inventory"] == ("success", 1)
    assert s["saga__finish"][0] == "success"
    ledger_run = f"checkout__v1/{run_id}"
    run = ledger.run(ledger_run)
    assert run is not None and run["saga"] == "compensated"
    assert run["failed_step"] == "create_shipment"
    comps = {k: v["status"] for k, v in ledger.compensations(ledger_run).items()}
    assert comps == {
        "create_shipment": "not_needed",
        "charge_payment": "completed",
        "reserve_inventory": "completed",
    }
    # Reverse order: the refund finished before the release started.
    refund = ledger.attempts(ledger_run, "compensate__charge_payment")
    release = ledger.attempts(ledger_run, "compensate__reserve_inventory")
    assert len(refund) == len(release) == 1
    assert refund[0]["ended_at"] <= release[0]["started_at"]
    assert [
        (p["status"])
        for p in rows(ledger, "SELECT status FROM demo_payments WHERE order_id = 'saga-1'")
    ] == ["refunded"]
    assert [
        r["status"]
        for r in rows(ledger, "SELECT status FROM demo_reservations WHERE order_id = 'saga-1'")
    ] == ["released"]
    assert reserved(ledger, "sku-mug") == before
    assert rows(ledger, "SELECT id FROM demo_shipments WHERE order_id = 'saga-1'") == []


def test_a_compensation_that_fails_twice_is_retried_until_it_succeeds(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """The refund API fails twice: the compensation task is retried under its own policy and
    succeeds on its third try; nothing is lost or duplicated."""
    run_id = stack.trigger(
        "checkout__v1", {"order_id": "saga-2", "fail_shipment": True, "refund_failures": 2}
    )
    assert stack.wait_for_run("checkout__v1", run_id, timeout=300) == "failed"
    s = states(stack, run_id)
    assert s["compensate__charge_payment"] == ("success", 3)
    assert s["compensate__reserve_inventory"] == ("success", 1)
    ledger_run = f"checkout__v1/{run_id}"
    attempts = ledger.attempts(ledger_run, "compensate__charge_payment")
    assert [a["status"] for a in attempts] == ["failed", "failed", "completed"]
    assert (ledger.run(ledger_run) or {})["saga"] == "compensated"
    assert [
        p["status"]
        for p in rows(ledger, "SELECT status FROM demo_payments WHERE order_id = 'saga-2'")
    ] == ["refunded"]


def test_a_step_failing_before_any_effect_compensates_nothing(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """The first step fails (not enough stock): no compensation runs a tool; every
    compensation is recorded as not needed; the run is failed."""
    run_id = stack.trigger("checkout__v1", {"order_id": "saga-3", "qty": 10_000_000})
    assert stack.wait_for_run("checkout__v1", run_id, timeout=240) == "failed"
    s = states(stack, run_id)
    assert s["reserve_inventory"] == ("failed", 1)  # non-retryable: one attempt
    assert all(s[f"compensate__{step}"][0] == "skipped" for step in FORWARD[:3])
    ledger_run = f"checkout__v1/{run_id}"
    assert {v["status"] for v in ledger.compensations(ledger_run).values()} == {"not_needed"}
    # Issue 10, finding 7: nothing was undone, so the saga says so (it said "compensated").
    assert (ledger.run(ledger_run) or {})["saga"] == "nothing_to_compensate"
    assert rows(ledger, "SELECT id FROM demo_payments WHERE order_id = 'saga-3'") == []


def test_a_timeout_ends_the_attempt_and_is_retried(stack: AirflowStack, ledger: Ledger) -> None:
    """A step whose first try outlives its 2 s timeout is stopped, recorded as a failed
    attempt (AirflowTaskTimeout), and retried; the retry succeeds."""
    run_id = stack.trigger("slow__v1", {})
    assert stack.wait_for_run("slow__v1", run_id, timeout=240) == "success"
    tis = {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in stack.task_instances("slow__v1", run_id)
    }
    assert tis["wait"] == ("success", 2)
    attempts = ledger.attempts(f"slow__v1/{run_id}", "wait")
    assert [a["status"] for a in attempts] == ["failed", "completed"]
    assert attempts[0]["error_type"].endswith("AirflowTaskTimeout")


def test_a_compensation_that_keeps_failing_is_dead_lettered_not_dropped(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A refund that fails on all four tries: the saga ends compensation_failed, the failing
    compensation is a dead letter (with its key), and the release still runs."""
    run_id = stack.trigger(
        "checkout__v1", {"order_id": "saga-4", "fail_shipment": True, "refund_failures": 99}
    )
    assert stack.wait_for_run("checkout__v1", run_id, timeout=300) == "failed"
    s = states(stack, run_id)
    assert s["compensate__charge_payment"] == ("failed", 4)
    assert s["compensate__reserve_inventory"] == ("success", 1)
    ledger_run = f"checkout__v1/{run_id}"
    assert (ledger.run(ledger_run) or {})["saga"] == "compensation_failed"
    comps = {k: v["status"] for k, v in ledger.compensations(ledger_run).items()}
    assert comps["charge_payment"] == "failed" and comps["reserve_inventory"] == "completed"
    letters = [d for d in ledger.dead_letters() if d["run_id"] == ledger_run]
    assert [(d["step_key"], d["attempts"]) for d in letters] == [
        ("create_shipment", 3),  # the step that failed the run, exhausted
        ("compensate__charge_payment", 4),
    ]
    assert (
        letters[1]["idempotency_key"]
        == "checkout:compensate__charge_payment:checkout:charge_payment:saga-4"
    )
    assert [
        p["status"]
        for p in rows(ledger, "SELECT status FROM demo_payments WHERE order_id = 'saga-4'")
    ] == ["captured"]
