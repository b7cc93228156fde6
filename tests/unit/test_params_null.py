"""Finding 7: an optional field cleared in Airflow's Trigger form (sent as null) means
its declared default, for Airflow's param schema, for our params check, and for what the
steps see."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from ledgerflow.factory import build_dag
from ledgerflow.spec.params import InvalidParams, check_params, effective_params
from ledgerflow.steps.operator import run_params
from ledgerflow.workflow.validate import load_workflow

CHECKOUT = Path(__file__).resolve().parents[2] / "dags" / "workflows" / "checkout" / "v1.yaml"


def test_null_optional_number_means_its_default_for_the_steps() -> None:
    """`qty: null` from the form reaches the steps as the declared default (1), not None
    (which failed the first step with a raw pydantic error)."""
    spec = load_workflow(CHECKOUT)
    context = {"params": {"order_id": "A-1", "qty": None, "amount": None}, "dag_run": None}
    params = run_params(spec, context)
    assert params["qty"] == 1 and params["amount"] == 25.0 and params["order_id"] == "A-1"


def test_airflow_schema_and_our_check_agree_on_null() -> None:
    """Airflow's form accepts null for an optional field with a default, and so does our
    check (it means the default); a required field without a default refuses null in
    Airflow's schema and in our check, naming the field, on one line."""
    spec = load_workflow(CHECKOUT)
    dag = build_dag(spec, CHECKOUT)
    qty = dag.params.get_param("qty")
    qty.resolve(None)  # Airflow's own validation: accepted
    check_params(spec.name, spec.version, spec.params, {"order_id": "A-1", "qty": None})
    order = dag.params.get_param("order_id")
    with pytest.raises(Exception):  # noqa: B017 - Airflow's ParamValidationError
        order.resolve(None)
    with pytest.raises(InvalidParams) as info:
        check_params(spec.name, spec.version, spec.params, {"order_id": None})
    assert "order_id" in str(info.value) and "\n" not in str(info.value)


def test_effective_params_keeps_given_values_and_unknown_keys() -> None:
    """Only null optional fields with a default change; given values and keys the check
    will refuse pass through untouched."""
    spec = load_workflow(CHECKOUT)
    given = {"order_id": "A-2", "qty": 3, "ammount": 5}
    assert effective_params(spec.params, given) == given
    assert SimpleNamespace(**effective_params(spec.params, {"sku": None})).sku == "sku-book"
