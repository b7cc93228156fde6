"""Cancelling a run in the ledger (``ledgerflow.cancel`` without Airflow), on SQLite and
Postgres, driven at the kernel level the way the tasks drive it: the run ends
``cancelled`` once, nothing of it runs or commits after, its approvals are withdrawn,
``--compensate`` undoes the completed steps once, in reverse, and the saga's outcome
stays next to the ``cancelled`` status."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from ledgerflow import faults
from ledgerflow.cancel import cancel
from ledgerflow.errors import ApprovalConflict, CancelRefused, RunCancelled
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.saga import NothingToUndo, compensate_step, finish_saga, saga_started
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = ROOT / "dags" / "workflows" / "checkout" / "v1.yaml"
COMPENSABLE = ["create_shipment", "charge_payment", "reserve_inventory"]  # reverse order


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def params_for(spec: WorkflowSpec, **overrides: Any) -> dict[str, Any]:
    return {**{n: p.default for n, p in spec.params.items()}, **overrides}


def events(ledger: Ledger, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events(run_id) if e["kind"] == kind]


def two_steps_done(ledger: Ledger, name: str) -> tuple[WorkflowSpec, RunRef, dict[str, Any]]:
    spec = load_workflow(CHECKOUT)
    run = RunRef(run_id=f"checkout__v1/{name}", dag_id="checkout__v1")
    params = params_for(spec, order_id=f"o-{name}")
    for step_id in ("reserve_inventory", "charge_payment"):
        execute_step(ledger, spec, spec.tool_step(step_id), run, params=params)
    return spec, run, params


def test_cancel_with_compensate_undoes_completed_steps_once_in_reverse(ledger: Ledger) -> None:
    """Cancel with compensate after two completed steps: the run is `cancelled` with who
    and why, its saga starts at once; the compensation tasks' work undoes both steps, the
    later one first, each once (a second pass finds nothing to undo); the saga ends
    `compensated` and the run stays `cancelled`. A second cancel changes nothing."""
    spec, run, params = two_steps_done(ledger, "comp")
    done = cancel(
        ledger, run.run_id, by="alice", reason="wrong order", compensate=True, airflow=False
    )
    row = ledger.run(run.run_id)
    assert row is not None
    assert (row["status"], row["saga"], row["cancelled_by"], row["cancel_reason"]) == (
        "cancelled",
        "compensating",
        "alice",
        "wrong order",
    )
    assert row["cancel_compensate"] is True and done.ledger.already is False
    for _ in range(2):  # the compensation tasks, then again (a retried teardown)
        for i, step_id in enumerate(COMPENSABLE):
            with contextlib.suppress(NothingToUndo):
                compensate_step(ledger, spec, run, step_id, params=params, first=i == 0)
    assert finish_saga(ledger, run.run_id) == "compensated"
    undone = [e["step_key"] for e in events(ledger, run.run_id, "compensation_completed")]
    assert undone == ["charge_payment", "reserve_inventory"]
    forward = {c.step_key: c.status for c in ledger.checkpoints(run.run_id)}
    assert {k: v for k, v in forward.items() if not k.startswith("compensate__")} == {
        "reserve_inventory": "compensated",
        "charge_payment": "compensated",
    }
    again = cancel(ledger, run.run_id, by="bob", reason="again", compensate=False, airflow=False)
    assert again.ledger.already and again.ledger.by == "alice" and again.ledger.compensate
    row = ledger.run(run.run_id)
    assert row is not None and (row["status"], row["saga"]) == ("cancelled", "compensated")
    assert len(events(ledger, run.run_id, "run_cancelled")) == 1
    ledger.finish_run(run.run_id, "failed")  # Airflow's end of the DagRun after the saga
    assert ledger.run(run.run_id)["status"] == "cancelled"  # type: ignore[index]


def test_cancel_without_compensate_keeps_effects_and_stops_forward_steps(ledger: Ledger) -> None:
    """Without compensate: no saga starts, not even from a failure reported after the
    cancel (a task that fails as it is stopped); the next step refuses to start
    (`RunCancelled`, no attempt, no dead letter); the completed steps stay completed, and
    a retry of the cancelled run is allowed (like a failed one)."""
    from ledgerflow.retry_chain import standing

    spec, run, params = two_steps_done(ledger, "plain")
    cancel(ledger, run.run_id, by="alice", reason="stop", airflow=False)
    saga_started(ledger, spec, run.run_id, "create_shipment")
    with pytest.raises(RunCancelled, match="cancelled by alice: stop"):
        execute_step(ledger, spec, spec.tool_step("create_shipment"), run, params=params)
    row = ledger.run(run.run_id)
    assert row is not None and (row["status"], row["saga"]) == ("cancelled", None)
    assert ledger.checkpoint(run.run_id, "create_shipment") is None
    assert ledger.attempts(run.run_id, "create_shipment") == []
    with ledger.engine.connect() as conn:
        letters = conn.execute(select(func.count()).select_from(t.dead_letters)).scalar()
    assert letters == 0
    assert {c.step_key: c.status for c in ledger.checkpoints(run.run_id)} == {
        "reserve_inventory": "completed",
        "charge_payment": "completed",
    }
    assert standing(ledger, run.run_id).refusal(None) is None


def test_cancel_of_an_ended_run_is_refused_and_changes_nothing(ledger: Ledger) -> None:
    """A run that failed or succeeded cannot be cancelled: `CancelRefused` (409), the
    row and its events as they were; an unknown run is 404."""
    _, run, _ = two_steps_done(ledger, "ended")
    ledger.finish_run(run.run_id, "succeeded")
    before = (ledger.run(run.run_id), len(ledger.events(run.run_id)))
    with pytest.raises(CancelRefused, match="already ended") as info:
        cancel(ledger, run.run_id, by="alice", reason="late", airflow=False)
    assert info.value.http_status == 409
    assert (ledger.run(run.run_id), len(ledger.events(run.run_id))) == before
    with pytest.raises(CancelRefused) as unknown:
        cancel(ledger, "checkout__v1/nope", by="alice", reason="x", airflow=False)
    assert unknown.value.http_status == 404


def test_cancel_withdraws_a_parked_approval(ledger: Ledger) -> None:
    """A run parked on an approval: the cancel withdraws it (canceller and reason
    recorded) and a decision after it is refused with a clear conflict."""
    from ledgerflow.ledger import approvals

    _, run, _ = two_steps_done(ledger, "parked")
    approval, _ = approvals.request(
        ledger,
        run_id=run.run_id,
        step_key="approve",
        dag_id=run.dag_id,
        task_id="approve",
        workflow="checkout",
        version=1,
        subject="Ship it?",
        body="",
        payload={"order": "o-parked"},
        approvers={"users": ["bob"], "roles": []},
        deadline=datetime.now(UTC) + timedelta(hours=1),
        at_deadline="reject",
    )
    done = cancel(ledger, run.run_id, by="alice", reason="customer called", airflow=False)
    assert done.ledger.withdrawn == [{"kind": "approval", "id": approval.id, "step": "approve"}]
    got = approvals.get(ledger, approval.id)
    assert (got.status, got.decided_by) == ("withdrawn", "alice")
    with pytest.raises(ApprovalConflict, match="withdrawn: its run was cancelled by alice"):
        approvals.decide(ledger, approval.id, decision="approved", by="bob")
    assert got.fails_step  # its task, if it ever resumes, fails: it never completes


def test_a_step_racing_the_cancel_commits_or_not_never_both(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres (SQLite has one writer: nothing interleaves): the cancel commits while a
    step's effect is done in its open transaction: the step's commit is refused
    (`RunCancelled`), its transaction (the effect's rows included) rolls back, the step
    is not completed, its attempt `lost`."""
    ledger = Ledger(pg_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    ledger.migrate()
    spec, run, params = two_steps_done(ledger, "race")
    real_hit = faults.hit

    def cancel_after_effect(point: str, step_key: str | None = None) -> None:
        if point == "after_effect" and step_key == "create_shipment":
            cancel(ledger, run.run_id, by="alice", reason="race", airflow=False)
        real_hit(point, step_key)

    monkeypatch.setattr(faults, "hit", cancel_after_effect)
    with pytest.raises(RunCancelled):
        execute_step(ledger, spec, spec.tool_step("create_shipment"), run, params=params)
    cp = ledger.checkpoint(run.run_id, "create_shipment")
    assert cp is not None and cp.status == "failed"
    assert [a["status"] for a in ledger.attempts(run.run_id, "create_shipment")] == ["lost"]
    assert events(ledger, run.run_id, "run_cancelled")[0]["data"]["stopped"] == ["create_shipment"]


def test_a_commit_holding_the_run_makes_the_cancel_wait(pg_url: str) -> None:
    """Postgres: a forward step's commit holds its run's row (FOR SHARE) from its first
    write; a cancel arriving then waits for it and finds the step completed (not lost);
    the two never both win."""
    ledger = Ledger(pg_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    ledger.migrate()
    spec, run, params = two_steps_done(ledger, "wait")
    result: dict[str, Any] = {}
    worker: list[threading.Thread] = []
    real_hit = faults.hit

    def cancel_in_another_transaction(point: str, step_key: str | None = None) -> None:
        if point == "before_commit" and step_key == "create_shipment":
            thread = threading.Thread(
                target=lambda: result.update(
                    done=cancel(ledger, run.run_id, by="alice", reason="wait", airflow=False)
                )
            )
            thread.start()
            worker.append(thread)
            time.sleep(1.0)
            result["blocked"] = thread.is_alive()
        real_hit(point, step_key)

    faults_hit = faults.hit
    faults.hit = cancel_in_another_transaction  # type: ignore[assignment]
    try:
        execute_step(ledger, spec, spec.tool_step("create_shipment"), run, params=params)
    finally:
        faults.hit = faults_hit  # type: ignore[assignment]
    worker[0].join(timeout=30)
    assert result["blocked"] is True
    cp = ledger.checkpoint(run.run_id, "create_shipment")
    assert cp is not None and cp.status == "completed"
    assert result["done"].ledger.stopped == []
    assert [a["status"] for a in ledger.attempts(run.run_id, "create_shipment")] == ["completed"]
    assert ledger.run(run.run_id)["status"] == "cancelled"  # type: ignore[index]


def test_a_registered_wait_kind_is_withdrawn_in_the_cancels_transaction(
    sqlite_url: str,
) -> None:
    """A kind registered with ``register_wait_kind`` (what timers and event waits plug
    in) is withdrawn in the cancel's own transaction: what it returns is in the
    ``run_cancelled`` event; when it fails, nothing of the cancel is kept."""
    from ledgerflow import cancel as cancelling

    ledger = Ledger(sqlite_url)
    ledger.migrate()
    _, run, _ = two_steps_done(ledger, "kinds")
    calls: list[str] = []

    def broken(ledger: Ledger, conn: Any, run_id: str, *, by: str, reason: str) -> list[Any]:
        ledger._event(conn, run_id, None, "timer_withdrawn", {"by": by})
        raise RuntimeError("timer store down")

    def timers(ledger: Ledger, conn: Any, run_id: str, *, by: str, reason: str) -> list[Any]:
        calls.append(run_id)
        ledger._event(conn, run_id, None, "timer_withdrawn", {"by": by})
        return [{"kind": "wait", "id": 7, "step": "nap"}]

    shipped = cancelling._KINDS.get("wait")  # the timers' own, put back after
    try:
        cancelling.register_wait_kind("wait", broken)
        with pytest.raises(RuntimeError, match="timer store down"):
            cancel(ledger, run.run_id, by="alice", reason="x", airflow=False)
        assert ledger.run(run.run_id)["status"] == "running"  # type: ignore[index]
        assert events(ledger, run.run_id, "timer_withdrawn") == []
        cancelling.register_wait_kind("wait", timers)
        done = cancel(ledger, run.run_id, by="alice", reason="x", airflow=False)
    finally:
        cancelling._KINDS.pop("wait", None)
        if shipped is not None:
            cancelling._KINDS["wait"] = shipped
    assert calls == [run.run_id]
    assert done.ledger.withdrawn == [{"kind": "wait", "id": 7, "step": "nap"}]
    assert events(ledger, run.run_id, "run_cancelled")[0]["data"]["withdrawn"] == [
        {"kind": "wait", "id": 7, "step": "nap"}
    ]
    assert len(events(ledger, run.run_id, "timer_withdrawn")) == 1


def test_cancel_withdraws_a_parked_event_wait_and_a_later_delivery_is_only_kept(
    ledger: Ledger,
) -> None:
    """A run parked on an event step: the cancel withdraws the wait (through the registry
    of wait kinds, in its transaction); a delivery afterwards wakes nothing and is kept
    for a later wait, never completing the cancelled run's step."""
    from ledgerflow.ledger import event_waits

    _, run, _ = two_steps_done(ledger, "event")
    wait = event_waits.open_wait(
        ledger,
        run_id=run.run_id,
        step_key="settled",
        dag_id=run.dag_id,
        task_id="settled",
        workflow="checkout",
        name="payment.settled",
        key="pay-event",
        schema=None,
        deadline=datetime.now(UTC) + timedelta(hours=1),
        on_deadline="fail",
    )
    done = cancel(ledger, run.run_id, by="alice", reason="fraud", airflow=False)
    assert {"kind": "event", "id": wait.id, "step": "settled"} in done.ledger.withdrawn
    assert event_waits.get(ledger, wait.id).status == "withdrawn"
    got = event_waits.deliver(
        ledger, name="payment.settled", key="pay-event", event_id="e-1", payload={"x": 1}
    )
    assert (got.status, got.woke) == ("kept", [])
    assert event_waits.get(ledger, wait.id).status == "withdrawn"
    assert ledger.run(run.run_id)["status"] == "cancelled"  # type: ignore[index]


def test_cancel_withdraws_a_parked_timer_and_its_firing_is_refused(ledger: Ledger) -> None:
    """A run parked on a timer: the cancel records ``timer_withdrawn``; the trigger firing
    at that moment is refused (``RunCancelled``) and the step never completes."""
    from ledgerflow.errors import RunCancelled as Refused
    from ledgerflow.ledger import timers

    _, run, _ = two_steps_done(ledger, "timer")
    with ledger.begin() as conn:
        timers.park(
            ledger,
            conn,
            run_id=run.run_id,
            step_key="cool_off",
            step_id="cool_off",
            planned=datetime.now(UTC) + timedelta(seconds=1),
            args={"for": 1},
            try_number=1,
            first=True,
        )
    done = cancel(ledger, run.run_id, by="alice", reason="changed plans", airflow=False)
    assert {"kind": "wait", "id": "cool_off", "step": "cool_off"} in done.ledger.withdrawn
    assert len(events(ledger, run.run_id, timers.WITHDRAWN)) == 1
    with pytest.raises(Refused, match="withdrawn"):
        timers.fire(ledger, run.run_id, "cool_off")
    assert not events(ledger, run.run_id, timers.FIRED)
    again = cancel(ledger, run.run_id, by="alice", reason="changed plans", airflow=False)
    assert again.ledger.already
    assert len(events(ledger, run.run_id, timers.WITHDRAWN)) == 1
