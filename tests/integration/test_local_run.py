"""``ledgerflow new`` then ``ledgerflow run``: real ``dag.test()`` runs in child processes,
each against its own throwaway Airflow metadata database and SQLite ledger."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APPROVED = ROOT / "tests/integration/dags/workflows/approved_checkout/v1.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module: the first run prepares the metadata template, the others
    copy it."""
    return tmp_path_factory.mktemp("cache")


def ledgerflow(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["XDG_CACHE_HOME"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "ledgerflow.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ledger_rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_new_then_run_prints_the_timeline(tmp_path: Path, cache: Path) -> None:
    made = ledgerflow("new", "hello", cwd=tmp_path, cache=cache)
    assert made.returncode == 0, made.stderr
    file = "dags/workflows/hello/v1.yaml"
    ran = ledgerflow(
        "run", file, "--param", "who=team", "--workdir", "work", cwd=tmp_path, cache=cache
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "preparing a throwaway Airflow metadata database" in ran.stderr
    assert list(cache.glob("ledgerflow/airflow-*-metadata.db")), "the template is kept"
    # progress while it runs (stderr), the timeline at the end (stdout)
    assert "  greet: completed" in ran.stderr and "  shout: completed" in ran.stderr
    lines = ran.stdout.splitlines()
    greet = next(x for x in lines if " greet " in x)
    shout = next(x for x in lines if " shout " in x)
    assert "completed" in greet and '"hello, team"' in greet
    assert "completed" in shout and '"HELLO, TEAM"' in shout
    assert lines[-1].startswith("run success in ")
    ledger = tmp_path / "work" / "ledger.db"
    assert ledger_rows(ledger, "select workflow, status from lf_runs") == [("hello", "succeeded")]
    # nothing of the run outside its folder: the user's dags folder is as `new` wrote it
    assert sorted(p.name for p in (tmp_path / "dags/workflows/hello").iterdir()) == [
        "v1.lock",
        "v1.py",
        "v1.yaml",
    ]


def test_run_approves_an_approval_and_the_run_goes_on(tmp_path: Path, cache: Path) -> None:
    """An approved approval lets the run go on to success (in ``dag.test()`` Airflow's
    Required Actions entry reads back as nothing: the step must not fail on that)."""
    ran = ledgerflow(
        "run",
        str(APPROVED),
        "--param",
        "order_id=o-78",
        "--decide",
        "manager_approval=approve",
        "--workdir",
        "work",
        cwd=tmp_path,
        cache=cache,
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "approval manager_approval: approved by ledgerflow-run" in ran.stdout
    ledger = tmp_path / "work" / "ledger.db"
    assert ledger_rows(ledger, "select status from lf_runs") == [("succeeded",)]
    assert ledger_rows(ledger, "select status from lf_steps where step_id = 'charge_payment'") == [
        ("completed",)
    ]


def test_run_decides_an_approval_and_the_saga_undoes_what_ran(tmp_path: Path, cache: Path) -> None:
    """A rejected approval fails the run; the saga releases the reservation; the ledger
    records the decision by ``ledgerflow-run`` on the inputs it was shown."""
    ran = ledgerflow(
        "run",
        str(APPROVED),
        "--param",
        "order_id=o-77",
        "--decide",
        "manager_approval=reject",
        "--workdir",
        "work",
        cwd=tmp_path,
        cache=cache,
    )
    assert ran.returncode == 1, ran.stderr + ran.stdout
    assert "preparing a throwaway" not in ran.stderr  # the template from the first test
    out = ran.stdout
    assert "approval manager_approval: rejected by ledgerflow-run" in out
    assert "compensate__reserve_inventory" in out
    assert out.splitlines()[-1].startswith("run failed, saga compensated in ")
    ledger = tmp_path / "work" / "ledger.db"
    assert ledger_rows(ledger, "select status, saga from lf_runs") == [("failed", "compensated")]
    decided = ledger_rows(ledger, "select status, decided_by, payload from lf_approvals")
    assert [(s, by) for s, by, _ in decided] == [("rejected", "ledgerflow-run")]
    assert json.loads(str(decided[0][2]))["order_id"] == "o-77"
    assert ledger_rows(
        ledger, "select count(*) from lf_steps where step_id = 'charge_payment'"
    ) == [(0,)]


def test_run_stops_at_an_approval_nobody_decided(tmp_path: Path, cache: Path) -> None:
    ran = ledgerflow("run", str(APPROVED), "--param", "order_id=o-78", cwd=tmp_path, cache=cache)
    assert ran.returncode == 2, ran.stderr + ran.stdout
    assert "step manager_approval waits for an approval" in ran.stderr
    assert "--decide manager_approval=approve" in ran.stderr


EVENT_WORKFLOW = """\
name: settle
version: 1
params:
  ref: {type: string, required: true}
steps:
  - id: settled
    kind: event
    event: payment.settled
    key: "pay-{{ params.ref }}"
    schema: {type: object, required: [amount], properties: {amount: {type: number}}}
    deadline: 1h
  - id: book
    needs: [settled]
    tool: demo.noop
    args: {value: "{{ steps.settled.output.amount }}"}
    idempotency: natural
"""


def test_run_delivers_an_event_and_stops_at_one_nobody_gave(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--event STEP=JSON`` delivers the payload to the event step when it waits (its
    output feeds the next step); without it the run stops there, naming the option."""
    monkeypatch.setenv("LEDGERFLOW_DEMO_TOOLS", "1")
    file = tmp_path / "dags" / "workflows" / "settle" / "v1.yaml"
    file.parent.mkdir(parents=True)
    file.write_text(EVENT_WORKFLOW)
    ran = ledgerflow(
        "run",
        str(file),
        "--param",
        "ref=r1",
        "--event",
        'settled={"amount": 3}',
        "--workdir",
        "work",
        cwd=tmp_path,
        cache=cache,
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    ledger = tmp_path / "work" / "ledger.db"
    assert ledger_rows(ledger, "select status from lf_runs") == [("succeeded",)]
    waits = ledger_rows(ledger, "select key, status, payload from lf_event_waits")
    assert [(k, s, json.loads(str(p))) for k, s, p in waits] == [
        ("pay-r1", "received", {"amount": 3})
    ]
    book = ledger_rows(ledger, "select output from lf_steps where step_id = 'book'")
    assert json.loads(str(book[0][0])) == {"value": 3}
    stopped = ledgerflow(
        "run", str(file), "--param", "ref=r2", "--workdir", "work2", cwd=tmp_path, cache=cache
    )
    assert stopped.returncode != 0
    assert "--event settled=" in stopped.stderr
