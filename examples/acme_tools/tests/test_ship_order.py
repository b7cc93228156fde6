"""A team's own tests of its tools and workflow: the tools through Ledgerflow's registry
(found by the package's entry point), then the workflow run once, here, as Airflow runs
it (``ledgerflow run``: ``dag.test()`` with a throwaway metadata database and ledger).

Run: ``pytest examples/acme_tools/tests`` (our suite runs it too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledgerflow.errors import NonRetryableError
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


def test_ship_order_runs_with_its_saga(tmp_path: Path) -> None:
    """The workflow, run once with ``ledgerflow run`` (Airflow's ``dag.test()``: the real
    operators, retries and callbacks in one process, a throwaway SQLite ledger): a run
    books once; a run whose label printer is offline fails and its saga cancels the
    booking. (On a real stack, ``ledgerflow.testing.airflow_stack.AirflowStack`` does the
    same with scheduler, workers and api-server; see the README.)"""
    import os
    import sqlite3
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    results = {}
    for order, online in (("o-1", "true"), ("o-2", "false")):
        work = tmp_path / order
        params = ["--param", f"order_id={order}", "--param", f"printer_online={online}"]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ledgerflow.cli",
                "run",
                str(WORKFLOW),
                "--workdir",
                str(work),
                *params,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        with sqlite3.connect(work / "ledger.db") as db:
            results[order] = (
                done.returncode,
                db.execute("select status, saga from lf_runs").fetchall(),
                db.execute("select order_id, price, status from acme_courier_bookings").fetchall(),
            )
    assert results["o-1"] == (0, [("succeeded", None)], [("o-1", 12.9, "booked")])
    assert results["o-2"] == (1, [("failed", "compensated")], [("o-2", 12.9, "cancelled")])
