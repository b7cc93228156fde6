"""Retention and the audit export on SQLite and Postgres, over rows written through the
ledger's API at chosen times.

``ledgerflow prune --older-than 90d`` removes old finished runs with everything recorded
under them, keeps effects (idempotency keys) younger than the horizon, and never touches
a running run, a run a running retry reuses, or a run with an open dead letter.
``ledgerflow export`` writes the event log of a span as JSON lines or CSV, the same rows.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from ledgerflow.cli import main
from ledgerflow.errors import ToolError
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.audit import export_rows
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.ledger_runs import Step, ledger_clock, record_run

NOW = datetime.now(timezone.utc)


def count(ledger: Ledger, table: object, run_id: str | None = None) -> int:
    query = select(func.count()).select_from(table)  # type: ignore[arg-type]
    if run_id is not None:
        query = query.where(table.c.run_id == run_id)  # type: ignore[attr-defined]
    with ledger.engine.connect() as conn:
        return int(conn.execute(query).scalar() or 0)


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def test_prune_removes_old_finished_runs_and_keeps_what_must_stay(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """Of runs that ended 100 days ago, the finished one goes with its checkpoints,
    attempts, events, approval and compensations; the running one, the failed one a running
    retry continues, and the failed one with an open dead letter stay whole; a recent run
    stays. Its effect (100 days old) stays within the 365-day horizon; an effect 400 days
    old goes. A dry run changes nothing and says the same counts."""
    with ledger_clock(NOW - timedelta(days=400)) as clock:
        ancient = record_run(ledger, clock, workflow="shop", run="ancient", steps=[Step("a")])
        ledger.insert_effect(
            key="k-ancient", tool="pay", run_id=ancient.run_id, step_key="a", result={"id": 1}
        )
        clock.at(NOW - timedelta(days=100))
        old = record_run(
            ledger, clock, workflow="shop", run="old",
            steps=[Step("a"), Step("ok", approval_wait=60), Step("b", tries=("fail", "ok"))],
        )  # fmt: skip
        ledger.insert_effect(key="k-old", tool="pay", run_id=old.run_id, step_key="a", result={})
        running = record_run(
            ledger, clock, workflow="shop", run="running", steps=[Step("a")], end=None
        )
        failed = record_run(
            ledger, clock, workflow="shop", run="failed",
            steps=[Step("a"), Step("b", tries=("fail",))], compensate=True,
        )  # fmt: skip
        lettered = record_run(
            ledger, clock, workflow="shop", run="lettered", steps=[Step("b", tries=("fail",))]
        )
        ledger.dead_letter(
            workflow="shop", version=1, run_id=lettered.run_id, step_key="b", attempts=1,
            error=ToolError("no"), args={}, idempotency_key=None,
        )  # fmt: skip
        clock.at(NOW - timedelta(days=1))
        ledger.ensure_run(
            run_id="shop__v1/retry", dag_id="shop__v1", workflow="shop", version=1,
            params={}, trigger_kind="retry", retry_of=failed.run_id,
        )  # fmt: skip
        recent = record_run(ledger, clock, workflow="shop", run="recent", steps=[Step("a")])
    kept = [running.run_id, failed.run_id, lettered.run_id, recent.run_id, "shop__v1/retry"]
    before = {r: count(ledger, t.events, r) for r in kept}
    old_rows = {
        tbl.name: count(ledger, tbl, old.run_id) + count(ledger, tbl, ancient.run_id)
        for tbl in (t.steps, t.attempts, t.events, t.approvals)
    }
    assert old_rows == {"lf_steps": 3, "lf_attempts": 4, "lf_events": 10, "lf_approvals": 1}

    url = ["--url", ledger.url]
    assert main(["prune", "--older-than", "90d", "--dry-run", "-o", "json", *url]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert main(["prune", "--older-than", "90d", "-o", "plain", *url]) == 0
    out = capsys.readouterr().out
    assert "removed 2 finished runs" in out
    assert f"  lf_events: {old_rows['lf_events']} rows" in out
    assert "  lf_effects: 1 rows" in out
    assert "kept 2 old finished runs" in out  # the retried one and the dead-lettered one
    assert dry["runs"] == 2 and dry["rows"]["lf_events"] == old_rows["lf_events"]
    assert dry["rows"]["lf_effects"] == 1 and dry["protected"] == 2

    for run_id in (old.run_id, ancient.run_id):
        assert ledger.run(run_id) is None
        for tbl in (t.steps, t.attempts, t.events, t.approvals, t.compensations):
            assert count(ledger, tbl, run_id) == 0, (tbl.name, run_id)
    assert ledger.effect("k-old") is not None  # within the horizon
    assert ledger.effect("k-ancient") is None
    for run_id in kept:
        assert ledger.run(run_id) is not None
        assert count(ledger, t.events, run_id) == before[run_id]
    assert count(ledger, t.compensations, failed.run_id) == 1
    # Nothing more to do.
    assert main(["prune", "--older-than", "90d", "-o", "plain", *url]) == 0
    assert "removed 0 finished runs" in capsys.readouterr().out


def test_export_writes_the_event_log_of_a_span_as_jsonl_and_csv(
    ledger: Ledger, tmp_path: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """The export holds exactly the events recorded in [since, until), oldest first, with
    the run's DAG and workflow and who acted (the approver of a decision); JSON lines and
    CSV carry the same rows; a DAG filter keeps only that DAG's runs."""
    start = NOW - timedelta(hours=3)
    with ledger_clock(start - timedelta(hours=1)) as clock:
        record_run(ledger, clock, workflow="shop", run="before", steps=[Step("a")])
        clock.at(start)
        shop = record_run(
            ledger, clock, workflow="shop", run="in", steps=[Step("ok", approval_wait=30)]
        )
        clock.at(start + timedelta(minutes=5))
        mail = record_run(ledger, clock, workflow="mail", run="in", steps=[Step("a")])
    until = (start + timedelta(hours=1)).isoformat()
    url = ["--url", ledger.url, "--since", start.isoformat(), "--until", until]

    assert main(["export", *url, "--format", "jsonl"]) == 0
    lines = capsys.readouterr()
    rows = [json.loads(x) for x in lines.out.splitlines()]
    assert "exported 7 events (jsonl)" in lines.err
    assert [r["run_id"] for r in rows] == [shop.run_id] * 4 + [mail.run_id] * 3
    assert [r["kind"] for r in rows] == [
        "run_started", "approval_requested", "approval_decided", "run_succeeded",
        "run_started", "step_completed", "run_succeeded",
    ]  # fmt: skip
    decided = [r for r in rows if r["kind"] == "approval_decided"]
    assert [(r["who"], r["dag_id"], r["workflow"]) for r in decided] == [
        ("admin", "shop__v1", "shop")
    ]
    assert all(r["who"] == "system" for r in rows if r["kind"] == "run_started")
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)

    assert main(["export", *url, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in rows]
    assert [r["who"] for r in table] == [r["who"] for r in rows]
    assert [json.loads(r["data"]) if r["data"] else None for r in table] == [
        r["data"] for r in rows
    ]

    only_mail = list(
        export_rows(
            ledger,
            since=start,
            until=start + timedelta(hours=1),
            dag_ids=["mail__v1"],
        )
    )
    assert {r["run_id"] for r in only_mail} == {mail.run_id} and len(only_mail) == 3
