"""Quality results in the ledger: one row per validation a quality step ran.

The row is written in the same transaction as the step's checkpoint (or its failed
attempt), so a result is never recorded for a step the ledger does not know finished,
and a finished quality step always has its result.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, dumps, loads, now

OUTCOMES = ("passed", "failed", "warned", "branched")


def record_result(
    conn: Connection,
    *,
    run_id: str,
    step_key: str,
    try_number: int,
    workflow: str,
    version: int,
    dataset: str,
    report: dict[str, Any],
    outcome: str,
) -> int:
    """Insert one result row; returns its id. ``report`` is ``quality.runner``'s report."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    stats = report["statistics"]
    row = conn.execute(
        t.quality_results.insert()
        .values(
            run_id=run_id,
            step_key=step_key,
            try_number=try_number,
            workflow=workflow,
            version=version,
            dataset=dataset,
            success=bool(report["success"]),
            outcome=outcome,
            row_count=report.get("row_count"),
            evaluated=int(stats["evaluated_expectations"]),
            failed_count=int(stats["unsuccessful_expectations"]),
            statistics=dumps(stats),
            failed=dumps(report["failed"]),
            results=dumps(report["results"]),
            duration_ms=int(report.get("duration_ms", 0)),
            created_at=now(),
        )
        .returning(t.quality_results.c.id)
    ).scalar_one()
    return int(row)


def results(ledger: Ledger, run_id: str, step_key: str | None = None) -> list[dict[str, Any]]:
    """The result rows of a run (or of one step of it), oldest first, JSON decoded."""
    query = select(t.quality_results).where(t.quality_results.c.run_id == run_id)
    if step_key is not None:
        query = query.where(t.quality_results.c.step_key == step_key)
    with ledger.engine.connect() as conn:
        rows = conn.execute(query.order_by(t.quality_results.c.id)).mappings().all()
    return [
        {
            **row,
            "success": bool(row["success"]),
            "statistics": loads(row["statistics"]),
            "failed": loads(row["failed"]),
            "results": loads(row["results"]),
        }
        for row in rows
    ]
