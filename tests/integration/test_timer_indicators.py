"""Wait steps in the SLO indicators (SQLite and Postgres): a fired timer's lag is part of
``timer_lag``, and a run parked on a timer is waiting, not orphaned."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from ledgerflow.ledger import timers
from ledgerflow.ledger.indicators import measure
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.ledger_runs import Step, ledger_clock, record_run

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def _park(ledger: Ledger, run_id: str, planned: datetime) -> None:
    with ledger.begin() as conn:
        timers.park(
            ledger,
            conn,
            run_id=run_id,
            step_key="w",
            step_id="w",
            planned=planned,
            args={"for_seconds": 1.0},
            try_number=1,
            first=True,
        )


def test_timer_lag_and_a_parked_timer_is_not_an_orphan(ledger_url: str) -> None:
    """One run fired its timer 250 ms late: timer lag 0.25 s. Another has waited two days
    (quiet since) on a timer due in three: it is pending, and not orphaned."""
    ledger = Ledger(ledger_url)
    ledger.migrate()
    with ledger_clock(T0 - timedelta(days=2)) as clock:
        parked = record_run(ledger, clock, workflow="tw", run="p", steps=[Step("a")], end=None)
        _park(ledger, parked.run_id, clock() + timedelta(days=3))
        clock.at(T0)
        fired = record_run(ledger, clock, workflow="tw", run="f", steps=[Step("a")], end=None)
        _park(ledger, fired.run_id, clock() + timedelta(seconds=10))
        clock.advance(10.25)
        output = timers.fire(ledger, fired.run_id, "w")
    assert output["lag_ms"] == 250
    window = measure(
        ledger,
        since=T0 - timedelta(days=3),
        until=T0 + timedelta(hours=1),
        now=T0 + timedelta(hours=1),
        orphan_after=timedelta(hours=1),
    )
    tw = window.summary()["workflows"]["tw"]
    assert tw["timer_lag_p95_s"] == 0.25
    assert tw["pending"] == 2
    assert tw["orphaned"] == 0
