"""Wait steps (durable timers) in ``ledgerflow run``: real ``dag.test()`` runs, whose
deferred tasks run their triggers inline, against a throwaway SQLite ledger."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest
from tests.integration.test_local_run import ROOT, ledger_rows, ledgerflow

TIMED = ROOT / "tests/integration/dags/workflows/timed_checkout/v1.yaml"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _events(db: Path, kind: str) -> list[tuple[str, dict[str, object]]]:
    rows = ledger_rows(
        db, f"select step_key, data from lf_events where kind = '{kind}' order by id"
    )
    return [(str(key), json.loads(str(data))) for key, data in rows]


def test_timers_fire_and_the_run_goes_on(tmp_path: Path, cache: Path) -> None:
    """``for: 2s`` parks and fires no earlier than planned; an ``until`` already past
    (read in Europe/Paris) fires at once; each timer is parked and fired once, its output
    (planned, fired, lag) is the checkpoint's, and the steps after it run once."""
    ran = ledgerflow(
        "run", str(TIMED), "--param", "order_id=t-1", "--workdir", "work", cwd=tmp_path, cache=cache
    )
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "cool_off           completed" in ran.stdout
    db = tmp_path / "work" / "ledger.db"
    assert ledger_rows(db, "select status from lf_runs") == [("succeeded",)]
    parked, fired = _events(db, "timer_parked"), _events(db, "timer_fired")
    assert [k for k, _ in parked] == ["cool_off", "not_before"]
    assert [k for k, _ in fired] == ["cool_off", "not_before"]
    cool = dict(fired)["cool_off"]
    assert datetime.fromisoformat(str(cool["fired"])) >= datetime.fromisoformat(
        str(cool["planned"])
    )
    assert dict(parked)["cool_off"]["for_seconds"] == 2.0
    # 2020-01-01T09:00 in Paris is 08:00 UTC: long past, so it fired at once.
    late = dict(fired)["not_before"]
    assert datetime.fromisoformat(str(late["planned"])).isoformat() == "2020-01-01T09:00:00+01:00"
    outputs = dict(
        ledger_rows(
            db, "select step_id, output from lf_steps where step_id in ('cool_off', 'not_before')"
        )
    )
    assert json.loads(str(outputs["cool_off"])) == cool
    attempts = ledger_rows(db, "select step_key, count(*) from lf_attempts group by step_key")
    assert all(n == 1 for _, n in attempts), attempts


def test_a_skipped_timer_and_the_saga_after_a_later_failure(tmp_path: Path, cache: Path) -> None:
    """``when`` false skips a timer (nothing parked); a later step that fails fails the
    run, and its saga undoes the charge and the reservation and records the completed
    timer as not compensable (there is nothing to undo about time passing)."""
    ran = ledgerflow(
        "run",
        str(TIMED),
        "--param",
        "order_id=t-2",
        "--param",
        "gate=false",
        "--param",
        "fail_shipment=true",
        "--workdir",
        "work",
        cwd=tmp_path,
        cache=cache,
    )
    assert ran.returncode == 1, ran.stderr + ran.stdout
    db = tmp_path / "work" / "ledger.db"
    assert ledger_rows(db, "select status, saga from lf_runs") == [("failed", "compensated")]
    assert ledger_rows(db, "select status from lf_steps where step_id = 'not_before'") == [
        ("skipped",)
    ]
    assert [k for k, _ in _events(db, "timer_parked")] == ["cool_off"]
    comp = dict(ledger_rows(db, "select step_key, status from lf_compensations"))
    assert comp["cool_off"] == "not_compensable"
    assert comp["charge_payment"] == "completed"
    assert comp["reserve_inventory"] == "completed"


FUSED = ROOT / "tests/integration/dags/workflows/timed_fused/v1.yaml"


def test_a_timer_ends_a_fused_segment_and_the_next_starts_after_it(
    tmp_path: Path, cache: Path
) -> None:
    """``execution: fused``: a -> b run in one task, the wait in its own (parked), and
    c -> d in one task after it fired: each step completed once, each e-mail sent once,
    and c saw the timer's output."""
    ran = ledgerflow("run", str(FUSED), "--workdir", "work", cwd=tmp_path, cache=cache)
    assert ran.returncode == 0, ran.stderr + ran.stdout
    db = tmp_path / "work" / "ledger.db"
    assert ledger_rows(db, "select status from lf_runs") == [("succeeded",)]
    steps = dict(ledger_rows(db, "select step_id, status from lf_steps"))
    assert steps == {s: "completed" for s in ("a", "b", "w", "c", "d")}
    sent = ledger_rows(db, "select subject, body from demo_emails order by id")
    assert [s for s, _ in sent] == ["a", "b", "c", "d"]
    fired = _events(db, "timer_fired")
    assert [k for k, _ in fired] == ["w"]
    assert dict(sent)["c"] == fired[0][1]["fired"]
    # The wait ended the first segment: b completed before the timer was parked, c after
    # it fired.
    order = [
        (str(k), str(s))
        for k, s in ledger_rows(
            db,
            "select kind, step_key from lf_events where kind in "
            "('step_completed', 'timer_parked', 'timer_fired') order by id",
        )
    ]
    assert order.index(("step_completed", "b")) < order.index(("timer_parked", "w"))
    assert order.index(("timer_fired", "w")) < order.index(("step_completed", "c"))
