"""What a step reads before it runs does not grow with its run (SQLite and Postgres): the
outputs its templates name and its own checkpoint are found by index, never by reading
every step of the run; open dead letters are found by index, never over the whole table."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import Connection

from ledgerflow.ledger import _steps
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger

pytestmark = pytest.mark.integration

RUN = "long__v1/r"
STEPS = 300
T0 = datetime(2026, 12, 1, 9, 30, tzinfo=timezone.utc)


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate(demo=False)
    ledger.ensure_run(
        run_id=RUN, dag_id="long__v1", workflow="long", version=1, params={},
        trigger_kind="manual",
    )  # fmt: skip
    rows = [
        {
            "run_id": RUN,
            "step_key": f"s{i:04d}",
            "step_id": f"s{i:04d}",
            "map_index": -1,
            "status": "completed",
            "attempts": 1,
            "output": json.dumps({"n": i}),
            "started_at": T0,
            "completed_at": T0,
        }
        for i in range(STEPS)
    ]
    with ledger.begin() as conn:
        conn.execute(t.steps.insert(), rows)
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE lf_steps")
        else:
            conn.exec_driver_sql("ANALYZE")
    return ledger


def plan(conn: Connection, statement: Any) -> tuple[str, list[dict[str, Any]]]:
    """The database's plan for ``statement`` (bound values inlined), as text and, on
    Postgres, the executed plan's nodes with their row counts."""
    sql = str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "postgresql":
        # Indexes are what this pins: with a table this small the planner would scan it.
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        (raw,) = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}").one()
        nodes: list[dict[str, Any]] = []
        todo = [raw[0]["Plan"]]
        while todo:
            node = todo.pop()
            nodes.append(node)
            todo.extend(node.get("Plans", []))
        return json.dumps(raw), nodes
    rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}").all()
    return "\n".join(str(r[-1]) for r in rows), []


def test_a_late_step_reads_only_the_rows_it_needs(ledger: Ledger) -> None:
    """The last step of a 300-step run reads its run's row, its own checkpoint and the
    output of the step it names: the database looks at those rows only (Postgres: no
    row of lf_steps read and thrown away; SQLite: both lookups by index), and the read
    returns exactly them."""
    last, prev = f"s{STEPS - 1:04d}", f"s{STEPS - 2:04d}"
    statement = _steps._RUN_AND_STEPS.params(b_run=RUN, b_key=last, b_wanted=[prev])
    with ledger.begin() as conn:
        text, nodes = plan(conn, statement)
        run, own, outputs = ledger.run_and_steps(RUN, last, {prev}, conn)
    assert run is not None and own is not None and own.step_key == last
    assert outputs == {prev: {"status": "completed", "output": {"n": STEPS - 2}}}
    if nodes:
        on_steps = [n for n in nodes if n.get("Relation Name") == "lf_steps"]
        assert on_steps, text
        read = sum(n.get("Rows Removed by Filter", 0) for n in on_steps)
        read += sum(n.get("Rows Removed by Index Recheck", 0) for n in on_steps)
        assert read == 0, text
        assert "lf_steps_step_id" in text
    else:
        assert "lf_steps_step_id" in text, text


def test_open_dead_letters_are_found_by_index(ledger: Ledger) -> None:
    """A step completing after a failed attempt looks for open dead letters of its key:
    by index, not by reading every dead letter ever written."""
    with ledger.begin() as conn:
        text, _nodes = plan(conn, _steps._OPEN_LETTERS.params(b_key="s0001", b_open="open"))
    assert "lf_dead_letters_open" in text, text
