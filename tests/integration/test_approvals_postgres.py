"""Approvals on real Postgres: one decision of many, NOTIFY, one shared listener."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.testing import wait_for
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.triggers.approval import ApprovalTrigger, Listener

pytestmark = pytest.mark.integration

# Long enough that only a NOTIFY can wake a trigger within the tests' hang guards.
NO_POLL = 3600.0


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    """The ledger behind the Airflow connection ``lf_approvals`` (triggers name it)."""
    with fresh_database("lf_approvals") as url, pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_LF_APPROVALS", url)
        ledger = Ledger.from_airflow("lf_approvals")
        ledger.migrate()
        yield ledger
        ledger.engine.dispose()


def request(ledger: Ledger, run: str, **kw: Any) -> approvals.Approval:
    approval, _ = approvals.request(
        ledger,
        run_id=f"wf__v1/{run}",
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject="Approve?",
        body="",
        payload={"run": run},
        approvers={"users": ["manager"], "roles": []},
        deadline=kw.get("deadline", now() + timedelta(hours=1)),
        at_deadline="reject",
    )
    return approval


def listening(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query = 'LISTEN ledgerflow_approvals'"
                )
            ).scalar_one()
        )


def test_twenty_concurrent_decisions_store_exactly_one(ledger: Ledger) -> None:
    """20 threads decide the same approval at once: one wins, 19 get ApprovalConflict, and
    the ledger holds one decision and one approval_decided event."""
    approval = request(ledger, "race")
    barrier = threading.Barrier(20)
    outcomes: list[str] = []

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            approvals.decide(
                ledger, approval.id, decision="approved" if n % 2 else "rejected", by=f"u{n}"
            )
            outcomes.append("won")
        except approvals.ApprovalConflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 19 + ["won"]
    decided = [e for e in ledger.events("wf__v1/race") if e["kind"] == "approval_decided"]
    assert len(decided) == 1
    stored = approvals.get(ledger, approval.id)
    assert stored.decided_by == decided[0]["data"]["by"]


def test_a_stale_payload_hash_is_refused(ledger: Ledger) -> None:
    """A decision that names a payload hash other than the recorded one is refused and
    changes nothing."""
    approval = request(ledger, "stale")
    with pytest.raises(approvals.ApprovalConflict, match="payload you saw"):
        approvals.decide(ledger, approval.id, decision="approved", by="m", seen_hash="0" * 64)
    assert approvals.get(ledger, approval.id).pending


def test_parked_triggers_share_one_connection_and_wake_on_notify(ledger: Ledger) -> None:
    """50 parked triggers in one event loop hold ONE listening connection; each wakes on
    its own decision's NOTIFY (the poll is an hour away), and the connection closes when
    the last one leaves."""
    parked = [request(ledger, f"park-{n}") for n in range(50)]

    async def scenario() -> list[dict[str, Any]]:
        triggers = [ApprovalTrigger(a.id, ledger.conn_id, poll_interval=NO_POLL) for a in parked]

        async def first(trigger: ApprovalTrigger) -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise AssertionError("no event")

        tasks = [asyncio.create_task(first(t)) for t in triggers]
        for _ in range(100):
            await asyncio.sleep(0.1)
            if await asyncio.to_thread(listening, ledger) == 1:
                break
        assert await asyncio.to_thread(listening, ledger) == 1
        assert not any(t.done() for t in tasks)
        for n, approval in enumerate(parked):
            decision = "approved" if n % 2 else "rejected"
            await asyncio.to_thread(
                approvals.decide, ledger, approval.id, decision=decision, by="manager"
            )
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)

    events = asyncio.run(scenario())
    assert [e["approval_id"] for e in events] == [a.id for a in parked]
    assert [e["status"] for e in events] == ["approved" if n % 2 else "rejected" for n in range(50)]
    # The client has closed it; the server lists the session until its backend has exited
    # (under load, a moment later: CI saw it still listed once).
    wait_for(lambda: listening(ledger) == 0, 10, "the listening connection closed")


def test_a_lost_listener_connection_reconnects_and_misses_nothing(ledger: Ledger) -> None:
    """The listening connection is terminated; a decision made while it is down is still
    seen: the listener reconnects and wakes every waiter to re-read."""
    approval = request(ledger, "reconnect")

    async def scenario() -> dict[str, Any]:
        trigger = ApprovalTrigger(approval.id, ledger.conn_id, poll_interval=NO_POLL)

        async def first() -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise AssertionError("no event")

        task = asyncio.create_task(first())
        for _ in range(100):
            await asyncio.sleep(0.1)
            if await asyncio.to_thread(listening, ledger) == 1:
                break
        listener = Listener.shared(ledger.url)
        assert listener.connections == 1

        def cut_and_decide() -> None:
            with ledger.engine.begin() as conn:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() "
                        "AND query = 'LISTEN ledgerflow_approvals'"
                    )
                )
            approvals.decide(ledger, approval.id, decision="approved", by="manager")

        await asyncio.to_thread(cut_and_decide)
        payload = await asyncio.wait_for(task, timeout=60)
        assert listener.connections >= 2
        return payload

    assert asyncio.run(scenario())["status"] == "approved"


def test_triggers_carry_a_connection_id_never_credentials(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ledger's connection has a password (with ``@/#:``): the kwargs every
    Ledgerflow trigger serializes into Airflow's trigger table hold neither the password
    nor a URL, only the connection's id; the trigger rebuilt from them, as the triggerer
    rebuilds it, resolves the connection itself and fires on the decision over NOTIFY."""
    import importlib
    import inspect
    import json
    import pkgutil
    from urllib.parse import quote

    from airflow.triggers.base import BaseTrigger

    import ledgerflow.triggers
    from ledgerflow.ledger import event_waits
    from ledgerflow.steps.approval import approval_trigger
    from ledgerflow.steps.event import event_trigger
    from ledgerflow.steps.wait import WaitOperator

    password = "s3cr@t/#:pw"
    engine_url = ledger.engine.url
    monkeypatch.setenv(
        "AIRFLOW_CONN_LEDGERFLOW_DB",
        json.dumps(
            {
                "conn_type": "postgres",
                "login": engine_url.username,
                "password": password,
                "host": engine_url.host,
                "port": engine_url.port,
                "schema": engine_url.database,
            }
        ),
    )
    guarded = Ledger.from_airflow()  # as the approval step opens it
    assert guarded.engine.url.password == password  # trust auth: Postgres ignores it
    approval = request(guarded, "no-credentials")
    wait = event_waits.open_wait(
        guarded,
        run_id="wf__v1/no-credentials",
        step_key="settled",
        dag_id="wf__v1",
        task_id="settled",
        workflow="wf",
        name="payment.settled",
        key="no-credentials",
        schema=None,
        deadline=now() + timedelta(hours=1),
        on_deadline="fail",
    )
    built = {
        "ApprovalTrigger": approval_trigger(guarded, approval.id, NO_POLL),
        "EventTrigger": event_trigger(guarded, wait.id, NO_POLL),
        "TimerTrigger": WaitOperator._trigger(
            guarded, "wf__v1/no-credentials", "nap", now() + timedelta(hours=1)
        ),
    }
    found = {
        name
        for info in pkgutil.iter_modules(ledgerflow.triggers.__path__, "ledgerflow.triggers.")
        for name, kind in inspect.getmembers(importlib.import_module(info.name), inspect.isclass)
        if issubclass(kind, BaseTrigger) and kind.__module__ == info.name
    }
    assert found == set(built), "every trigger of the package is checked here"
    for trigger in built.values():
        classpath, kwargs = trigger.serialize()
        stored = json.dumps(kwargs)
        for secret in (password, quote(password, safe=""), quote(password)):
            assert secret not in stored, classpath
        assert "://" not in stored and "@" not in stored, stored
    classpath, kwargs = built["ApprovalTrigger"].serialize()
    assert kwargs["conn_id"] == "ledgerflow_db"

    module, name = classpath.rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)

    async def scenario() -> dict[str, Any]:
        async def first() -> dict[str, Any]:
            async for event in rebuilt.run():
                return event.payload
            raise AssertionError("no event")

        task = asyncio.create_task(first())
        for _ in range(100):
            await asyncio.sleep(0.1)
            if await asyncio.to_thread(listening, ledger) == 1:
                break
        await asyncio.to_thread(
            approvals.decide, guarded, approval.id, decision="approved", by="manager"
        )
        return await asyncio.wait_for(task, timeout=60)

    event = asyncio.run(scenario())
    assert event == {"approval_id": approval.id, "status": "approved", "decided_by": "manager"}
    # The event trigger, rebuilt the same way, fires on its delivery over NOTIFY.
    classpath, kwargs = built["EventTrigger"].serialize()
    assert kwargs["conn_id"] == "ledgerflow_db"
    module, name = classpath.rsplit(".", 1)
    rebuilt_event = getattr(importlib.import_module(module), name)(**kwargs)
    guarded.ensure_run(
        run_id="wf__v1/no-credentials",
        dag_id="wf__v1",
        workflow="wf",
        version=1,
        params={},
        trigger_kind="manual",
    )

    async def delivered() -> Any:
        async def first() -> Any:
            async for fired in rebuilt_event.run():
                return fired
            raise AssertionError("no event")

        task = asyncio.create_task(first())
        for _ in range(100):
            await asyncio.sleep(0.1)
            if await asyncio.to_thread(listening, ledger) == 1:
                break
        await asyncio.to_thread(
            event_waits.deliver,
            guarded,
            name="payment.settled",
            key="no-credentials",
            event_id="no-credentials-1",
            payload={"ok": True},
            source="test",
        )
        return await asyncio.wait_for(task, timeout=60)

    fired = asyncio.run(delivered())
    assert fired.xcoms == {"return_value": {"ok": True}}
