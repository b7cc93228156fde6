"""Regression tests of the step kernel for findings of issue 10, on SQLite and Postgres.

* finding 2: a retry after the saga compensated must not reuse the undone effects (a
  business key included): it performs them again, as new effects;
* finding 4: an LLM step honours the names in ``retry.non_retryable`` like every step:
  the first failure is the final one, with its dead letter;
* finding 8: a run's retry chain is the ledger's, never a claim in the DagRun's conf.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import LlmStep, WorkflowSpec
from ledgerflow.steps.operator import run_ref
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.saga import NothingToUndo, compensate_step, compensation_step
from ledgerflow.testing.openai_peer import OpenAIPeer
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = ROOT / "dags" / "workflows" / "checkout" / "v1.yaml"
TRIAGE = ROOT / "dags" / "workflows" / "ticket_triage" / "v1.yaml"


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def checkout_params(spec: WorkflowSpec, **overrides: Any) -> dict[str, Any]:
    params = {name: p.default for name, p in spec.params.items()}
    params.update(overrides)
    return params


def rows(ledger: Ledger, sql: str, **binds: Any) -> list[Any]:
    with ledger.engine.connect() as conn:
        return list(conn.execute(text(sql), binds))


def compensate(ledger: Ledger, spec: WorkflowSpec, run: RunRef, step_id: str) -> None:
    """What a compensation task does for one completed step (kernel level)."""
    step = spec.tool_step(step_id)
    checkpoint = ledger.checkpoint(run.run_id, step_id)
    assert checkpoint is not None and checkpoint.status == "completed"
    undo = compensation_step(spec, step, checkpoint.idempotency_key)
    params = ledger.run(run.run_id)["params"]  # type: ignore[index]
    execute_step(ledger, spec, undo, run, params=params, forward=False)
    ledger.record_compensation(run.run_id, step_id, "completed", tool=undo.tool)


def test_retry_after_compensation_performs_undone_steps_again(ledger: Ledger) -> None:
    """Finding 2: a run failed late and its saga refunded the payment and released the
    stock. Its retry (business-keyed effects) must not reuse the undone effects and report
    success with nothing live: it charges and reserves again, as new effects, and after
    the retry succeeds exactly one payment and one reservation of the order are live."""
    spec = load_workflow(CHECKOUT)
    order = "o-finding-2"
    first = RunRef(run_id="checkout__v1/first", dag_id="checkout__v1")
    failing = checkout_params(spec, order_id=order, fail_shipment=True)
    for step_id in ("reserve_inventory", "charge_payment"):
        execute_step(ledger, spec, spec.tool_step(step_id), first, params=failing)
    with pytest.raises(Exception, match="carrier"):
        execute_step(
            ledger, spec, spec.tool_step("create_shipment"), first, params=failing, max_attempts=1
        )
    ledger.start_saga(first.run_id, "create_shipment")
    compensate(ledger, spec, first, "charge_payment")
    compensate(ledger, spec, first, "reserve_inventory")
    ledger.finish_saga(first.run_id)
    assert [r.status for r in rows(ledger, "SELECT status FROM demo_payments")] == ["refunded"]

    retry = RunRef(run_id="checkout__v1/retry", dag_id="checkout__v1", retry_of=first.run_id)
    fixed = checkout_params(spec, order_id=order)  # the carrier accepts this time
    for step_id in ("reserve_inventory", "charge_payment", "create_shipment", "send_confirmation"):
        result = execute_step(ledger, spec, spec.tool_step(step_id), retry, params=fixed)
        assert result.status == "completed", step_id

    payments = rows(ledger, "SELECT status, idempotency_key FROM demo_payments ORDER BY id")
    assert [p.status for p in payments] == ["refunded", "captured"]
    assert payments[1].idempotency_key != payments[0].idempotency_key  # a new effect
    reservations = rows(ledger, "SELECT status FROM demo_reservations ORDER BY id")
    assert [r.status for r in reservations] == ["released", "reserved"]
    charge = ledger.checkpoint(retry.run_id, "charge_payment")
    assert charge is not None and charge.output["payment_id"] == 2  # type: ignore[index]


def test_same_business_key_in_a_new_run_after_compensation_is_a_new_effect(
    ledger: Ledger,
) -> None:
    """A compensated effect is never reused, whatever starts the next run: a new, unlinked
    run of the same order (same business key) charges again instead of returning the
    refunded payment."""
    spec = load_workflow(CHECKOUT)
    params = checkout_params(spec, order_id="o-new-run")
    first = RunRef(run_id="checkout__v1/a", dag_id="checkout__v1")
    execute_step(ledger, spec, spec.tool_step("reserve_inventory"), first, params=params)
    execute_step(ledger, spec, spec.tool_step("charge_payment"), first, params=params)
    ledger.start_saga(first.run_id, "create_shipment")
    compensate(ledger, spec, first, "charge_payment")

    again = RunRef(run_id="checkout__v1/b", dag_id="checkout__v1")
    result = execute_step(ledger, spec, spec.tool_step("charge_payment"), again, params=params)
    assert not result.effect_reused
    statuses = [r.status for r in rows(ledger, "SELECT status FROM demo_payments ORDER BY id")]
    assert statuses == ["refunded", "captured"]
    # Running the new run's step again reuses ITS effect (the new generation), once.
    again2 = RunRef(run_id="checkout__v1/c", dag_id="checkout__v1")
    reused = execute_step(ledger, spec, spec.tool_step("charge_payment"), again2, params=params)
    assert reused.effect_reused and reused.output == result.output


@pytest.fixture
def peer() -> Iterator[OpenAIPeer]:
    with OpenAIPeer() as peer:
        yield peer


def test_llm_step_honours_non_retryable_names(
    ledger: Ledger, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Finding 4: with `retry.non_retryable: [LlmCallFailed]`, Airflow fails the task at
    the first provider error; the ledger must agree: that attempt is final (step
    `failed`, not `retrying`) and a dead letter is written, on try 1 of 3."""
    from ledgerflow.steps.llm import LlmCallFailed, execute_llm_step

    monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_LLM", peer.connection_uri())
    text_ = TRIAGE.read_text()
    retry = "    retry: {max_attempts: 3, backoff: {initial: 2s}}\n"
    assert retry in text_
    text_ = text_.replace(
        retry,
        "    retry: {max_attempts: 3, backoff: {initial: 2s}, non_retryable: [LlmCallFailed]}\n",
        1,
    )
    path = tmp_path / "workflows" / "ticket_triage" / "v1.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text_)
    spec = load_workflow(path)
    step = spec.step("classify")
    assert isinstance(step, LlmStep)
    peer.script("T-nr", (400, {"error": {"message": "refused", "type": "x"}}))
    run = RunRef(run_id="ticket_triage__v1/T-nr", dag_id="ticket_triage__v1")
    with pytest.raises(LlmCallFailed):
        execute_llm_step(
            ledger,
            spec,
            step,
            run,
            params={"ticket_id": "T-nr", "ticket": "I was charged twice."},
            try_number=1,
            max_attempts=3,
        )
    assert ledger.outputs(run.run_id)["classify"]["status"] == "failed"
    letters = [d for d in ledger.dead_letters() if d["run_id"] == run.run_id]
    assert [d["step_key"] for d in letters] == ["classify"]


def test_conf_cannot_claim_a_retry_chain(ledger: Ledger) -> None:
    """Finding 8: a DagRun whose conf says `ledgerflow_retry_of: <another order's run>`
    is not a retry: the task's run has no chain, and its steps perform their own
    effects instead of reusing that run's payment."""
    spec = load_workflow(CHECKOUT)
    victim = RunRef(run_id="checkout__v1/victim", dag_id="checkout__v1")
    victim_params = checkout_params(spec, order_id="o-victim")
    paid = execute_step(
        ledger, spec, spec.tool_step("charge_payment"), victim, params=victim_params
    )

    dag_run = SimpleNamespace(
        dag_id="checkout__v1",
        run_id="forged",
        logical_date=None,
        run_after=None,
        run_type="manual",
        conf={"ledgerflow_retry_of": victim.run_id, "order_id": "o-attacker"},
    )
    forged = run_ref({"dag_run": dag_run})
    assert forged.retry_of is None
    params = checkout_params(spec, order_id="o-attacker")
    result = execute_step(ledger, spec, spec.tool_step("charge_payment"), forged, params=params)
    assert result.output != paid.output
    assert ledger.run(forged.run_id)["retry_of"] is None  # type: ignore[index]
    orders = [r.order_id for r in rows(ledger, "SELECT order_id FROM demo_payments ORDER BY id")]
    assert orders == ["o-victim", "o-attacker"]
    assert json.dumps(result.output)  # a real, recorded output


def test_a_task_cleared_after_the_saga_does_not_run_on_undone_effects(ledger: Ledger) -> None:
    """Found by the lifecycle model: a checkout failed at the shipment and its saga
    refunded the payment; an operator clears only the failed task in Airflow. The task
    must not book the shipment and let the run succeed on a refunded payment: it fails
    at once, naming the undone steps, and no shipment exists."""
    from ledgerflow.steps.kernel import UpstreamUndone

    spec = load_workflow(CHECKOUT)
    run = RunRef(run_id="checkout__v1/cleared", dag_id="checkout__v1")
    failing = checkout_params(spec, order_id="o-cleared", fail_shipment=True)
    for step_id in ("reserve_inventory", "charge_payment"):
        execute_step(ledger, spec, spec.tool_step(step_id), run, params=failing)
    with pytest.raises(Exception, match="carrier"):
        execute_step(
            ledger, spec, spec.tool_step("create_shipment"), run, params=failing, max_attempts=1
        )
    ledger.start_saga(run.run_id, "create_shipment")
    compensate(ledger, spec, run, "charge_payment")
    compensate(ledger, spec, run, "reserve_inventory")
    ledger.finish_saga(run.run_id)
    ledger.finish_run(run.run_id, "failed")

    fixed = checkout_params(spec, order_id="o-cleared")
    with pytest.raises(UpstreamUndone, match="charge_payment, reserve_inventory"):
        execute_step(
            ledger, spec, spec.tool_step("create_shipment"), run, params=fixed, try_number=2
        )
    assert rows(ledger, "SELECT id FROM demo_shipments WHERE order_id = 'o-cleared'") == []


def test_a_saga_leaves_an_effect_another_run_stands_on(ledger: Ledger) -> None:
    """Found by the lifecycle model: two runs of the same order share the payment (the
    second reused it under the business key). When the first fails at the shipment, its
    saga must not refund the payment the second run goes on to succeed with; once every
    run standing on it has failed, the last saga does refund it."""
    spec = load_workflow(CHECKOUT)
    a = RunRef(run_id="checkout__v1/shared-a", dag_id="checkout__v1")
    b = RunRef(run_id="checkout__v1/shared-b", dag_id="checkout__v1")
    failing = checkout_params(spec, order_id="o-shared", fail_shipment=True)
    for step_id in ("reserve_inventory", "charge_payment"):
        execute_step(ledger, spec, spec.tool_step(step_id), a, params=failing)
        execute_step(ledger, spec, spec.tool_step(step_id), b, params=failing)
    with pytest.raises(Exception, match="carrier"):
        execute_step(
            ledger, spec, spec.tool_step("create_shipment"), a, params=failing, max_attempts=1
        )
    ledger.start_saga(a.run_id, "create_shipment")
    for step_id in ("charge_payment", "reserve_inventory"):
        with pytest.raises(NothingToUndo, match="shared-b"):
            compensate_step(ledger, spec, a, step_id, params=failing)
    assert ledger.finish_saga(a.run_id) == "nothing_to_compensate"
    assert [r.status for r in rows(ledger, "SELECT status FROM demo_payments")] == ["captured"]

    with pytest.raises(Exception, match="carrier"):
        execute_step(
            ledger, spec, spec.tool_step("create_shipment"), b, params=failing, max_attempts=1
        )
    ledger.finish_run(a.run_id, "failed")
    ledger.finish_run(b.run_id, "failed")
    ledger.start_saga(b.run_id, "create_shipment")
    compensate_step(ledger, spec, b, "charge_payment", params=failing)
    assert [r.status for r in rows(ledger, "SELECT status FROM demo_payments")] == ["refunded"]
