"""SLO indicators, objectives and alerts from ledger rows written through the ledger's own
API (SQLite and Postgres), at times set by hand so every figure is exact.

The window holds five runs (times in seconds after each run's registration):

- r1 succeeded: first step at 2, steps of 10 and 20 -> completion 32.
- r2 succeeded: first step at 1, a 5 s step, an approval answered after 100 s, a step
  that fails once and then works (3 s each) -> completion 112 - 100 waited = 12; one
  LLM answer took its fallback.
- r3 failed at its second step (three failed tries), its first step compensated, a
  dead letter; first step at 3.
- r4 running: a step, then an approval whose deadline passed 5 s before the deadline's
  outcome was recorded (timer lag 5, human wait 15); first step at 4.
- r5 running since two days before the others and quiet since (orphaned); first step at 5.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from ledgerflow import slo
from ledgerflow.errors import ToolError
from ledgerflow.ledger import approvals, breakers
from ledgerflow.ledger.audit import AuthFailures
from ledgerflow.ledger.indicators import measure, series
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import BreakerSpec
from ledgerflow.spec.slo import SloSpec
from ledgerflow.testing.ledger_runs import (
    LedgerClock,
    Step,
    ledger_clock,
    record_llm_fallback,
    record_run,
)

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
SINCE, UNTIL, NOW = T0 - timedelta(days=3), T0 + timedelta(hours=1), T0 + timedelta(hours=1)


def _expired_approval(ledger: Ledger, clock: LedgerClock, run_id: str) -> None:
    approval, _ = approvals.request(
        ledger,
        run_id=run_id,
        step_key="sign",
        dag_id="shop__v1",
        task_id="sign",
        workflow="shop",
        version=1,
        subject="sign",
        body="",
        payload={},
        approvers={"users": ["ann"], "roles": []},
        deadline=clock() + timedelta(seconds=10),
        at_deadline="reject",
    )
    clock.advance(15)
    approvals.decide(ledger, approval.id, decision="expired", by="deadline")


def fill(ledger: Ledger) -> dict[str, str]:
    ids = {}
    with ledger_clock(T0 - timedelta(days=2)) as clock:
        ids["r5"] = record_run(
            ledger, clock, workflow="shop", run="r5", steps=[Step("a")], end=None,
            first_step_after=5,
        ).run_id  # fmt: skip
        clock.at(T0)
        ids["r1"] = record_run(
            ledger, clock, workflow="shop", run="r1",
            steps=[Step("a", seconds=10), Step("b", seconds=20)], first_step_after=2,
        ).run_id  # fmt: skip
        clock.at(T0 + timedelta(minutes=5))
        r2 = record_run(
            ledger, clock, workflow="shop", run="r2",
            steps=[Step("a", seconds=5), Step("ok", approval_wait=100),
                   Step("b", tries=("fail", "ok"), seconds=3)],
            first_step_after=1,
        )  # fmt: skip
        ids["r2"] = r2.run_id
        record_llm_fallback(ledger, r2.run_id, "classify")
        clock.at(T0 + timedelta(minutes=10))
        r3 = record_run(
            ledger, clock, workflow="shop", run="r3",
            steps=[Step("a"), Step("b", tries=("fail", "fail", "fail"))],
            first_step_after=3, compensate=True,
        )  # fmt: skip
        ids["r3"] = r3.run_id
        ledger.dead_letter(
            workflow="shop", version=1, run_id=r3.run_id, step_key="b", attempts=3,
            error=ToolError("refused"), args={}, idempotency_key=None,
        )  # fmt: skip
        clock.at(T0 + timedelta(minutes=15))
        r4 = record_run(
            ledger, clock, workflow="shop", run="r4", steps=[Step("a")], end=None,
            first_step_after=4,
        )  # fmt: skip
        ids["r4"] = r4.run_id
        _expired_approval(ledger, clock, r4.run_id)
        # Another workflow, and facts of no workflow: a breaker opening, refused requests.
        clock.at(T0 + timedelta(minutes=20))
        ids["other"] = record_run(
            ledger, clock, workflow="mail", run="m1", steps=[Step("a")]
        ).run_id
        breakers.record(ledger, "pay", BreakerSpec(failures=1), success=False, trial=False)
        failures = AuthFailures(lambda: ledger, flush_seconds=0)
        for status in (401, 401, 403):
            failures.record(status)
        assert failures.flush() == 3
    return ids


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def test_every_indicator_is_the_exact_figure_of_the_rows(ledger: Ledger) -> None:
    """Each indicator of the window is the figure the rows above make: rates over runs and
    attempts, nearest-rank percentiles, completion without the human wait, timer lag,
    pending and orphaned runs, dead letters, fallbacks, breaker openings, 401/403s."""
    fill(ledger)
    window = measure(ledger, since=SINCE, until=UNTIL, now=NOW)
    shop = window.summary()["workflows"]["shop"]
    assert shop == {
        "runs": 5,
        "outcomes": {
            "succeeded": 2, "failed": 0, "compensated": 1, "compensation_failed": 0,
            "cancelled": 0, "running": 2,
        },
        "success_rate": 2 / 3,
        "step_failure_rate": 4 / 11,  # attempts: 2 + 3 + 4 + 1 + 1; failed: 1 + 3
        "retry_rate": 3 / 11,
        "attempts": 11,
        "completion_p50_s": 12.0,
        "completion_p95_s": 32.0,
        "human_wait_p50_s": 15.0,
        "human_wait_p95_s": 100.0,
        "first_step_p50_s": 3.0,
        "first_step_p95_s": 5.0,
        "timer_lag_p95_s": 5.0,
        "pending": 2,
        "orphaned": 1,
        "compensations": 1,
        "dead_letters": 1,
        "llm_fallbacks": 1,
        "throughput_per_h": round(3 / 73, 3),
        "audit_latency_mean_ms": 0.0,
        "audit_latency_max_ms": 0.0,
    }  # fmt: skip
    assert window.summary()["breaker_openings"] == 1
    assert window.summary()["auth_failures"] == {"unauthenticated_401": 2, "forbidden_403": 1}
    assert set(window.workflows) == {"shop", "mail"}
    # Only the DAGs a caller may read, and only the window: r5 started before it.
    mine = measure(
        ledger, since=T0 - timedelta(hours=1), until=UNTIL, dag_ids=["mail__v1"], now=NOW
    )
    assert set(mine.workflows) == {"mail"} and mine.workflows["mail"].summary(1)["runs"] == 1
    later = measure(ledger, since=T0 - timedelta(hours=1), until=UNTIL, now=NOW)
    assert later.workflows["shop"].summary(1)["runs"] == 4


def test_the_series_put_each_fact_in_its_span(ledger: Ledger) -> None:
    """Per span of the window, runs by outcome (by start), retries, compensations, dead
    letters, fallbacks and breaker openings add up to the window's figures."""
    fill(ledger)
    window = measure(ledger, since=T0, until=T0 + timedelta(hours=24), now=NOW)
    data = series(window, "shop", count=24)
    first = {o: counts[0] for o, counts in data["outcomes"].items()}
    assert first == {
        "succeeded": 2, "failed": 0, "compensated": 1, "compensation_failed": 0,
        "cancelled": 0, "running": 1,
    }  # fmt: skip
    assert sum(sum(c) for c in data["outcomes"].values()) == 4
    assert data["retries"][0] == 3 and sum(data["retries"]) == 3
    assert data["compensations"][0] == 1 and data["dead_letters"][0] == 1
    assert data["llm_fallbacks"][0] == 1 and data["breaker_openings"][0] == 1
    assert data["completion_p95"][0] == 32.0 and data["completion_p95"][1] is None


SLOS = {
    "shop": SloSpec.model_validate(
        {
            "completion_p95": "20s",  # 32 > 20: one of two bad, 0.1 allowed -> breached
            "success_rate": "50%",  # one of three failed, 1.5 allowed -> burning
            "first_step_p95": "10s",  # none over -> ok
            "human_wait_p95": "1m",  # 100 > 60: one of two -> breached
        }
    )
}


def test_a_cancelled_run_is_its_own_outcome_neither_success_nor_failure(ledger: Ledger) -> None:
    """A run an operator cancelled (after it compensated, even) is counted as
    ``cancelled``: not pending, not in the success rate's runs either way, not a bad run
    of the ``success_rate`` objective, and in the series by its start."""
    from ledgerflow.ledger.cancels import cancel_run

    fill(ledger)
    with ledger_clock(T0 + timedelta(minutes=25)) as clock:
        run = record_run(
            ledger, clock, workflow="shop", run="c1", steps=[Step("a")], end=None,
            first_step_after=1,
        )  # fmt: skip
        cancel_run(ledger, run.run_id, by="ops", reason="duplicate order", compensate=True)
        ledger.finish_saga(run.run_id)
    shop = measure(ledger, since=SINCE, until=UNTIL, now=NOW).summary()["workflows"]["shop"]
    assert shop["runs"] == 6 and shop["outcomes"]["cancelled"] == 1
    assert (shop["success_rate"], shop["pending"], shop["compensations"]) == (2 / 3, 2, 1)
    rep = slo.report(ledger, slos=SLOS, since=SINCE, until=UNTIL, now=NOW)
    assert _states(rep.objectives)["success_rate"] == ("burning", pytest.approx(1 / 1.5))
    window = measure(ledger, since=T0, until=T0 + timedelta(hours=24), now=NOW)
    assert series(window, "shop", count=24)["outcomes"]["cancelled"][0] == 1


def _states(objectives: list[slo.Objective]) -> dict[str, tuple[str, Any]]:
    return {o.name: (o.state, o.burn) for o in objectives}


def test_objectives_burn_their_error_budget_and_alert_once_per_breach(ledger: Ledger) -> None:
    """Each objective's burn is its bad runs over the runs its budget allows; an alert is
    sent when an objective enters burning or breached, not again while it stays there, and
    again after it recovered and broke once more."""
    fill(ledger)
    rep = slo.report(ledger, slos=SLOS, since=SINCE, until=UNTIL, now=NOW)
    states = _states(rep.objectives)
    assert states["completion_p95"] == ("breached", pytest.approx(10.0))
    assert states["success_rate"] == ("burning", pytest.approx(1 / 1.5))
    assert states["first_step_p95"] == ("ok", 0.0)
    assert states["human_wait_p95"] == ("breached", pytest.approx(10.0))
    assert rep.workflows()["shop"]["sla_breach_rate"] == 0.5
    assert rep.workflows()["mail"]["objectives"] == []

    sent: list[tuple[str, str, str]] = []

    def notifier(o: slo.Objective, previous: str) -> None:
        sent.append((o.name, previous, o.state))

    assert len(slo.check_alerts(ledger, rep.objectives, [notifier])) == 3
    assert sorted(sent) == [
        ("completion_p95", "ok", "breached"),
        ("human_wait_p95", "ok", "breached"),
        ("success_rate", "ok", "burning"),
    ]
    sent.clear()
    assert slo.check_alerts(ledger, rep.objectives, [notifier]) == []  # still breached
    assert sent == []
    # Recovered (a lenient objective over the same runs), then breached again: a new alert.
    lenient = {"shop": SloSpec.model_validate({"completion_p95": "1h"})}
    calm = slo.report(ledger, slos=lenient, since=SINCE, until=UNTIL, now=NOW).objectives
    assert slo.check_alerts(ledger, calm, [notifier]) == [] and sent == []
    again = [o for o in rep.objectives if o.name == "completion_p95"]
    assert slo.check_alerts(ledger, again, [notifier]) == again
    assert sent == [("completion_p95", "ok", "breached")]
    states_now = {r["objective"]: r["state"] for r in slo.alert_states(ledger)}
    assert states_now == {
        "completion_p95": "breached",
        "human_wait_p95": "breached",
        "success_rate": "burning",
        "first_step_p95": "ok",
    }


def test_a_budget_of_zero_is_spent_by_one_bad_run(ledger: Ledger) -> None:
    """``success_rate: 100%`` allows no failure: one failed run burns without limit."""
    fill(ledger)
    strict = {"shop": SloSpec.model_validate({"success_rate": "100%"})}
    (o,) = slo.report(ledger, slos=strict, since=SINCE, until=UNTIL, now=NOW).objectives
    assert o.state == "breached" and o.burn == math.inf
    assert o.as_dict()["budget_burn"] == "inf"
