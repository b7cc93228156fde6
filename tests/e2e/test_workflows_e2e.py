"""Ledgerflow workflows on real Airflow processes: scheduler, dag-processor, triggerer,
api-server, LocalExecutor, Postgres for Airflow's metadata and for the ledger."""

from __future__ import annotations

import os
import signal
import time
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.http_peer import IdempotentPeer

pytestmark = pytest.mark.e2e


def rows(ledger: Ledger, sql: str, **binds: Any) -> list[dict[str, Any]]:
    with ledger.engine.connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), binds).mappings()]


def tries(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, tuple[str, int]]:
    return {
        ti["task_id"]: (ti["state"], ti["try_number"])
        for ti in stack.task_instances(dag_id, run_id)
    }


def test_dags_folder_imports_without_errors(stack: AirflowStack) -> None:
    """The dag-processor parses every workflow file of dags/ with zero import errors."""
    assert stack.import_errors() == []
    dag = stack.api("GET", "/api/v2/dags/checkout__v1")
    assert "ledgerflow" in {t["name"] for t in dag["tags"]}
    assert not dag["is_paused"]


def test_dag_details_show_the_workflows_time_zone(stack: AirflowStack) -> None:
    """A cron meant for Amsterdam runs in Amsterdam (Airflow's next run is 02:30 there), and
    what Airflow's DAG page shows says so: the description and the docs name the zone.
    (Airflow 3.3.2's details field ``timezone`` reports the server's default zone for every
    DAG, ``DagModel.timezone``; it is not the DAG's.)"""
    nightly = stack.api("GET", "/api/v2/dags/nightly_report__v1/details")
    assert nightly["timetable_summary"] == "30 2 * * *"
    assert nightly["description"].endswith("(cron in Europe/Amsterdam)")
    assert "Schedule: `30 2 * * *` in time zone **Europe/Amsterdam**." in nightly["doc_md"]
    from zoneinfo import ZoneInfo

    next_run = datetime.fromisoformat(nightly["next_dagrun_run_after"])
    local = next_run.astimezone(ZoneInfo("Europe/Amsterdam"))
    assert (local.hour, local.minute) == (2, 30)
    checkout = stack.api("GET", "/api/v2/dags/checkout__v1/details")
    assert "cron in" not in (checkout["description"] or "")


def test_rest_triggered_checkout_succeeds_with_its_effects(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A checkout triggered through Airflow's REST API succeeds; the ledger holds the run,
    four completed checkpoints and four effects; the demo tables hold exactly one
    reservation, payment, shipment and email for the order."""
    before = rows(ledger, "SELECT reserved FROM demo_inventory WHERE sku = 'sku-lamp'")[0][
        "reserved"
    ]
    run_id = stack.trigger(
        "checkout__v1", {"order_id": "e2e-1", "sku": "sku-lamp", "qty": 2, "amount": 40}
    )
    assert stack.wait_for_run("checkout__v1", run_id, timeout=180) == "success"
    states = tries(stack, "checkout__v1", run_id)
    assert {k: v for k, v in states.items() if "__" not in k} == {
        step: ("success", 1)
        for step in ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation")
    }
    # The compensation tasks (teardowns) exist, and skip when nothing failed.
    assert {k: v[0] for k, v in states.items() if "__" in k} == {
        "compensate__create_shipment": "skipped",
        "compensate__charge_payment": "skipped",
        "compensate__reserve_inventory": "skipped",
        "saga__finish": "skipped",
    }
    ledger_run = f"checkout__v1/{run_id}"
    assert [
        (c.step_key, c.status)
        for c in sorted(ledger.checkpoints(ledger_run), key=lambda c: c.step_key)
    ] == [
        ("charge_payment", "completed"),
        ("create_shipment", "completed"),
        ("reserve_inventory", "completed"),
        ("send_confirmation", "completed"),
    ]
    assert {e["idempotency_key"] for e in ledger.effects(ledger_run) if e["status"] == "done"} == {
        f"checkout:{step}:e2e-1"
        for step in ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation")
    }
    payments = rows(ledger, "SELECT amount, status FROM demo_payments WHERE order_id = 'e2e-1'")
    assert [(float(p["amount"]), p["status"]) for p in payments] == [(40.0, "captured")]
    assert len(rows(ledger, "SELECT id FROM demo_shipments WHERE order_id = 'e2e-1'")) == 1
    assert len(rows(ledger, "SELECT id FROM demo_emails WHERE subject LIKE '%e2e-1%'")) == 1
    after = rows(ledger, "SELECT reserved FROM demo_inventory WHERE sku = 'sku-lamp'")[0][
        "reserved"
    ]
    assert after - before == 2
    # The scheduler's listener writes the outcome on its own thread: it lands shortly after.
    wait_for(lambda: (ledger.run(ledger_run) or {}).get("status") == "succeeded", 60, "run status")
    # The step output is also in XCom, for the UI and for templating.
    xcom = stack.api(
        "GET",
        f"/api/v2/dags/checkout__v1/dagRuns/{run_id}/taskInstances/charge_payment/xcomEntries/return_value",
    )
    assert "payment_id" in str(xcom["value"])


def test_step_fails_twice_then_succeeds_under_its_retry_policy(
    stack: AirflowStack, ledger: Ledger, peer: IdempotentPeer
) -> None:
    """A step whose service answers 503 twice is retried by Airflow under the spec's policy
    and succeeds on its third try; every attempt is in the ledger; one effect at the peer."""
    run_id = stack.trigger("flaky_http__v1", {"order_id": "flaky-1"})
    assert stack.wait_for_run("flaky_http__v1", run_id, timeout=180) == "success"
    assert tries(stack, "flaky_http__v1", run_id)["charge"] == ("success", 3)
    attempts = ledger.attempts(f"flaky_http__v1/{run_id}", "charge")
    assert [(a["try_number"], a["status"]) for a in attempts] == [
        (1, "failed"),
        (2, "failed"),
        (3, "completed"),
    ]
    assert attempts[0]["error_type"].endswith("HttpStatusError")
    key = "flaky_http:charge:flaky-1"
    assert peer.requests.count(key) == 3
    # One effect at the peer for this key, and it is the one the step recorded.
    charge = ledger.checkpoint(f"flaky_http__v1/{run_id}", "charge")
    assert charge is not None and charge.output["body"] == peer.effects[key]
    assert [d for d in ledger.dead_letters() if d["run_id"] == f"flaky_http__v1/{run_id}"] == []


def test_sigkilled_task_is_retried_with_zero_duplicate_effects(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """SIGKILL of the task process in the middle of the charge (payment row written, not
    committed): Airflow retries the task and the order is charged exactly once."""
    run_id = stack.trigger("checkout__v1", {"order_id": "kill-1", "charge_delay_s": 6})
    ledger_run = f"checkout__v1/{run_id}"

    def running_attempt() -> dict[str, Any] | None:
        for attempt in ledger.attempts(ledger_run, "charge_payment"):
            if attempt["status"] == "running" and attempt["try_number"] == 1:
                return attempt
        return None

    attempt = wait_for(running_attempt, 120, "the first charge attempt to start")
    time.sleep(1.5)  # inside the tool: the payment row is written, the transaction is open
    os.kill(attempt["pid"], signal.SIGKILL)
    assert stack.wait_for_run("checkout__v1", run_id, timeout=240) == "success"
    state, try_number = tries(stack, "checkout__v1", run_id)["charge_payment"]
    assert (state, try_number) == ("success", 2)
    assert len(rows(ledger, "SELECT id FROM demo_payments WHERE order_id = 'kill-1'")) == 1
    assert [
        e["status"] for e in ledger.effects(ledger_run) if e["step_key"] == "charge_payment"
    ] == ["done"]
    assert [a["status"] for a in ledger.attempts(ledger_run, "charge_payment")] == [
        "lost",
        "completed",
    ]


def test_same_order_twice_charges_once(stack: AirflowStack, ledger: Ledger) -> None:
    """A second run for the same order (same idempotency keys) succeeds by reusing every
    recorded effect: still one reservation, one payment, one shipment, one email."""
    first = stack.trigger("checkout__v1", {"order_id": "twice-1"})
    assert stack.wait_for_run("checkout__v1", first, timeout=180) == "success"
    second = stack.trigger("checkout__v1", {"order_id": "twice-1"})
    assert stack.wait_for_run("checkout__v1", second, timeout=180) == "success"
    for table in ("demo_reservations", "demo_payments", "demo_shipments"):
        assert len(rows(ledger, f"SELECT id FROM {table} WHERE order_id = 'twice-1'")) == 1, table
    assert len(rows(ledger, "SELECT id FROM demo_emails WHERE subject LIKE '%twice-1%'")) == 1
    events = ledger.events(f"checkout__v1/{second}")
    reused = [e for e in events if e["kind"] == "step_completed" and e["data"]["reused_effect"]]
    assert len(reused) == 4


def test_non_retryable_failure_fails_at_once_and_is_dead_lettered(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A declined card (non-retryable) fails the step on its first try although it has
    four attempts; the dead letter holds the arguments, the error and the key; the run
    is failed in Airflow and in the ledger; nothing downstream ran."""
    run_id = stack.trigger("checkout__v1", {"order_id": "declined-1", "decline_card": True})
    assert stack.wait_for_run("checkout__v1", run_id, timeout=180) == "failed"
    states = tries(stack, "checkout__v1", run_id)
    assert states["charge_payment"] == ("failed", 1)
    assert states["create_shipment"][0] == "upstream_failed"
    ledger_run = f"checkout__v1/{run_id}"
    letters = [d for d in ledger.dead_letters() if d["run_id"] == ledger_run]
    assert len(letters) == 1
    assert letters[0]["step_key"] == "charge_payment"
    assert letters[0]["error_type"].endswith("PaymentDeclined")
    assert letters[0]["args"]["order_id"] == "declined-1"
    assert letters[0]["idempotency_key"] == "checkout:charge_payment:declined-1"
    assert rows(ledger, "SELECT id FROM demo_payments WHERE order_id = 'declined-1'") == []
    wait_for(lambda: (ledger.run(ledger_run) or {}).get("status") == "failed", 60, "run status")


def test_for_each_and_when_follow_the_spec(stack: AirflowStack, ledger: Ledger) -> None:
    """for_each maps one task per item (each checkpointed under its own key); a false
    `when` skips its step and what depends only on it; a join with another completed
    upstream still runs and sees the list of item outputs."""
    run_id = stack.trigger("fanout__v1", {"skus": ["sku-book", "sku-mug", "sku-lamp"]})
    assert stack.wait_for_run("fanout__v1", run_id, timeout=180) == "success"
    tis = stack.task_instances("fanout__v1", run_id)
    mapped = sorted(ti["map_index"] for ti in tis if ti["task_id"] == "reserve")
    assert mapped == [0, 1, 2]
    states = {ti["task_id"]: ti["state"] for ti in tis if ti["task_id"] != "reserve"}
    assert states == {
        "reserve__items": "success",
        "express_label": "skipped",
        "express_notice": "skipped",
        "summary": "success",
    }
    ledger_run = f"fanout__v1/{run_id}"
    checkpoints = {c.step_key: c for c in ledger.checkpoints(ledger_run)}
    assert {k for k in checkpoints if k.startswith("reserve[")} == {
        "reserve[0]",
        "reserve[1]",
        "reserve[2]",
    }
    assert checkpoints["express_label"].status == "skipped"
    assert checkpoints["summary"].output == {"value": "sku-book,sku-mug,sku-lamp"}
