"""Saga statuses say what happened (finding 3 and the second half of finding 7), on
SQLite and Postgres, driven at the kernel level the way the tasks drive it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import NonRetryableError
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.saga import NothingToUndo, compensate_step, finish_saga, saga_started
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = ROOT / "dags" / "workflows" / "checkout" / "v1.yaml"
COMPENSABLE = ["create_shipment", "charge_payment", "reserve_inventory"]  # reverse order


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def params_for(spec: WorkflowSpec, **overrides: Any) -> dict[str, Any]:
    return {**{n: p.default for n, p in spec.params.items()}, **overrides}


def run_saga(ledger: Ledger, spec: WorkflowSpec, run: RunRef, params: dict[str, Any]) -> str:
    """What the compensation tasks and saga__finish do, in their order."""
    for i, step_id in enumerate(COMPENSABLE):
        with contextlib.suppress(NothingToUndo):
            compensate_step(ledger, spec, run, step_id, params=params, first=i == 0)
    outcome = finish_saga(ledger, run.run_id)
    assert outcome is not None
    return outcome


def fail_at_the_shipment(
    ledger: Ledger, spec: WorkflowSpec, run: RunRef, params: dict[str, Any]
) -> None:
    """Reserve and charge, then the carrier refuses the shipment: the saga starts."""
    for step_id in ("reserve_inventory", "charge_payment"):
        execute_step(ledger, spec, spec.tool_step(step_id), run, params=params)
    with pytest.raises(Exception, match="carrier"):
        execute_step(ledger, spec, spec.tool_step("create_shipment"), run, params=params)
    saga_started(ledger, spec, run.run_id, "create_shipment")


def test_failed_first_step_has_nothing_to_compensate(ledger: Ledger) -> None:
    """A checkout whose first step fails completed nothing: every compensation is
    `not_needed`, and the saga says `nothing_to_compensate`, not `compensated`."""
    spec = load_workflow(CHECKOUT)
    run = RunRef(run_id="checkout__v1/nothing", dag_id="checkout__v1")
    params = params_for(spec, order_id="o-nothing", qty=10_000)  # more than is on hand
    with pytest.raises(NonRetryableError, match="not enough"):
        execute_step(ledger, spec, spec.tool_step("reserve_inventory"), run, params=params)
    saga_started(ledger, spec, run.run_id, "reserve_inventory")
    assert run_saga(ledger, spec, run, params) == "nothing_to_compensate"
    assert ledger.run(run.run_id)["saga"] == "nothing_to_compensate"  # type: ignore[index]
    statuses = {k: v["status"] for k, v in ledger.compensations(run.run_id).items()}
    assert set(statuses.values()) == {"not_needed"}


def test_failed_after_charging_is_compensated(ledger: Ledger) -> None:
    """A checkout that fails at the shipment after reserving and charging undoes both,
    and its saga says `compensated`."""
    spec = load_workflow(CHECKOUT)
    run = RunRef(run_id="checkout__v1/undo", dag_id="checkout__v1")
    params = params_for(spec, order_id="o-undo", fail_shipment=True)
    fail_at_the_shipment(ledger, spec, run, params)
    assert run_saga(ledger, spec, run, params) == "compensated"
    statuses = {k: v["status"] for k, v in ledger.compensations(run.run_id).items()}
    assert statuses == {
        "create_shipment": "not_needed",
        "charge_payment": "completed",
        "reserve_inventory": "completed",
    }


def test_workflow_without_compensations_ends_its_saga(ledger: Ledger, tmp_path: Path) -> None:
    """Finding 3: a failed run of a workflow that declares no `compensate` has no
    compensation task to finish its saga; it must not stay `compensating` forever: the
    saga ends at once, `nothing_to_compensate`."""
    path = tmp_path / "workflows" / "plain" / "v1.yaml"
    path.parent.mkdir(parents=True)
    flag = tmp_path / "broken"
    flag.write_text("x")
    path.write_text(
        "name: plain\nversion: 1\nsteps:\n"
        "  - id: a\n    tool: demo.noop\n    idempotency: natural\n"
        "  - id: b\n    needs: [a]\n    tool: demo.fail_while\n"
        f"    args: {{flag: '{flag}'}}\n    idempotency: natural\n"
    )
    spec = load_workflow(path)
    run = RunRef(run_id="plain__v1/r", dag_id="plain__v1")
    execute_step(ledger, spec, spec.tool_step("a"), run, params={})
    with pytest.raises(Exception):  # noqa: B017 - the tool's own failure
        execute_step(ledger, spec, spec.tool_step("b"), run, params={})
    saga_started(ledger, spec, run.run_id, "b")
    assert ledger.run(run.run_id)["saga"] == "nothing_to_compensate"  # type: ignore[index]


def test_the_logs_say_what_the_saga_undid(ledger: Ledger) -> None:
    """A compensation task's log line names the step, the undo tool, the effect's key and
    the tool's answer; saga__finish's line names the outcome and each step by what
    happened to it (issue 11: Airflow's own views tell the story)."""
    from ledgerflow.steps.saga import saga_summary, undone_line

    spec = load_workflow(CHECKOUT)
    run = RunRef(run_id="checkout__v1/told", dag_id="checkout__v1")
    params = params_for(spec, order_id="o-told", fail_shipment=True)
    fail_at_the_shipment(ledger, spec, run, params)
    outcome = run_saga(ledger, spec, run, params)
    assert undone_line(ledger, run.run_id, "charge_payment", {"refunded": True}) == (
        "undid charge_payment with demo.refund_payment "
        "(effect key checkout:charge_payment:o-told): {'refunded': True}"
    )
    assert saga_summary(ledger, run.run_id, outcome) == (
        "saga compensated - undone: charge_payment, reserve_inventory; "
        "nothing to undo: create_shipment"
    )
