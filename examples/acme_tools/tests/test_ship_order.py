"""A team's own tests of its tools and workflow: the tools through Ledgerflow's registry
(found by the package's entry point), then the workflow on a real Airflow stack
(api-server, scheduler, dag-processor, triggerer as local processes; Postgres on
127.0.0.1:5432 for Airflow's metadata and the ledger).

Run: ``pytest examples/acme_tools/tests`` (our suite runs it too)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from ledgerflow.cli_publish import SHIM
from ledgerflow.errors import NonRetryableError
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import get_tool

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "ship_order" / "v1.yaml"


def context(key: str) -> ToolContext:
    return ToolContext(
        run_id="test/run", step_key="quote", workflow="ship_order", version=1,
        try_number=1, idempotency_key=key,
    )  # fmt: skip


def test_the_entry_point_puts_the_tools_on_the_allow_list() -> None:
    """Installed, the package's tools are found by name; their rules hold."""
    quote = get_tool("acme.quote_shipping")
    assert quote.call(context("k"), {"weight_kg": 2.5, "zone": "eu"}) == {
        "zone": "eu",
        "price": "12.90",
    }
    with pytest.raises(NonRetryableError, match="unknown zone 'moon'"):
        quote.call(context("k"), {"weight_kg": 1, "zone": "moon"})
    assert get_tool("acme.book_courier").compensate == "acme.cancel_courier"


@pytest.mark.e2e
def test_ship_order_on_a_real_stack(tmp_path: Path) -> None:
    """One run books once; a run whose label printer is offline fails and its saga
    cancels the booking."""
    dags = tmp_path / "dags" / "workflows" / "ship_order"
    dags.mkdir(parents=True)
    shutil.copyfile(WORKFLOW, dags / "v1.yaml")
    (dags / "v1.py").write_text(SHIM)
    with (
        fresh_database("acme") as ledger_url,
        AirflowStack(
            dags_folder=tmp_path / "dags",
            home=tmp_path / "home",
            extra_env={"AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url},
        ) as stack,
    ):
        stack.wait_for_dags(["ship_order__v1"])
        good = stack.trigger("ship_order__v1", {"order_id": "o-1"})
        bad = stack.trigger("ship_order__v1", {"order_id": "o-2", "printer_online": False})
        assert stack.wait_for_run("ship_order__v1", good, timeout=180) == "success"
        assert stack.wait_for_run("ship_order__v1", bad, timeout=180) == "failed"
        ledger = Ledger(ledger_url.replace("postgresql://", "postgresql+psycopg2://", 1))
        with ledger.engine.connect() as conn:
            rows = conn.execute(
                text("select order_id, price, status from acme_courier_bookings order by 1")
            ).all()
        assert [(o, str(p), s) for o, p, s in rows] == [
            ("o-1", "12.90", "booked"),
            ("o-2", "12.90", "cancelled"),
        ]
        assert ledger.run(f"ship_order__v1/{bad}")["saga"] == "compensated"
