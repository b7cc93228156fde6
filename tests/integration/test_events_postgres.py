"""Event steps on real Postgres: a thousand parked waits on one LISTEN connection, each
woken by its own delivery's NOTIFY; concurrent deliveries and waits never lose an event
and never use one twice."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger import event_waits
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.testing import wait_for
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.triggers.event import EventTrigger

pytestmark = pytest.mark.integration

# Long enough that only a NOTIFY can wake a trigger within the test's hang guard.
NO_POLL = 3600.0


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    with fresh_database("events_lf") as url, pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_EVENTS_LF", url)
        ledger = Ledger.from_airflow("events_lf")
        ledger.migrate()
        yield ledger
        ledger.engine.dispose()


def open_wait(ledger: Ledger, run: str, key: str) -> event_waits.Wait:
    run_id = f"wf__v1/{run}"
    ledger.ensure_run(
        run_id=run_id, dag_id="wf__v1", workflow="wf", version=1, params={}, trigger_kind="manual"
    )
    wait = event_waits.open_wait(
        ledger,
        run_id=run_id,
        step_key="settled",
        dag_id="wf__v1",
        task_id="settled",
        workflow="wf",
        name="payment.settled",
        key=key,
        schema={"type": "object"},
        deadline=now() + timedelta(hours=1),
        on_deadline="fail",
    )
    ledger.begin_attempt(
        run_id=run_id,
        step_key="settled",
        step_id="settled",
        map_index=-1,
        try_number=1,
        args={"event": "payment.settled", "key": key},
        idempotency_key=f"event:{wait.id}",
        first=True,
    )
    return wait


def deliver(ledger: Ledger, event_id: str, key: str, payload: Any = None) -> Any:
    return event_waits.deliver(
        ledger,
        name="payment.settled",
        key=key,
        event_id=event_id,
        payload=payload if payload is not None else {"id": event_id},
        source="test",
    )


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


def test_a_thousand_parked_waits_share_one_connection_and_wake_on_notify(ledger: Ledger) -> None:
    """1,000 parked event triggers in one event loop hold ONE listening connection; each
    wakes on its own delivery's NOTIFY (the poll is an hour away) and ends its task with
    its own payload; the connection closes when the last one leaves."""
    waits = [open_wait(ledger, f"many-{n}", f"k-{n}") for n in range(1000)]

    async def scenario() -> list[Any]:
        async def first(trigger: EventTrigger) -> Any:
            async for event in trigger.run():
                return event
            raise AssertionError("no event")

        tasks = [
            asyncio.create_task(first(EventTrigger(w.id, ledger.conn_id, NO_POLL))) for w in waits
        ]
        for _ in range(300):
            await asyncio.sleep(0.1)
            if await asyncio.to_thread(listening, ledger) == 1:
                break
        await asyncio.sleep(1.0)
        assert await asyncio.to_thread(listening, ledger) == 1
        assert not any(t.done() for t in tasks)
        for n in range(1000):
            await asyncio.to_thread(deliver, ledger, f"many-evt-{n}", f"k-{n}")
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)

    events = asyncio.run(scenario())
    assert [e.xcoms["return_value"] for e in events] == [
        {"id": f"many-evt-{n}"} for n in range(1000)
    ]
    wait_for(lambda: listening(ledger) == 0, 10, "the listening connection closed")


def test_concurrent_waits_take_a_kept_delivery_exactly_once(ledger: Ledger) -> None:
    """Ten waits of ten runs start at the same moment for one kept delivery: exactly one
    receives it; the others keep waiting."""
    assert deliver(ledger, "race-evt", "race-key").status == "kept"
    barrier = threading.Barrier(10)
    found: list[event_waits.Wait] = []

    def start(n: int) -> None:
        barrier.wait()
        found.append(open_wait(ledger, f"race-{n}", "race-key"))

    threads = [threading.Thread(target=start, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(found) == 10
    assert sorted(w.status for w in found) == ["received"] + ["waiting"] * 9


def test_a_delivery_and_a_wait_starting_together_always_meet(ledger: Ledger) -> None:
    """A delivery and the wait for it, started at the same moment, 30 times: each time
    the wait receives it (taken at its start, or woken by it), never both missing."""
    for n in range(30):
        barrier = threading.Barrier(2)
        got: dict[str, Any] = {}

        def wait_side(
            n: int = n, barrier: threading.Barrier = barrier, got: dict[str, Any] = got
        ) -> None:
            barrier.wait()
            got["wait"] = open_wait(ledger, f"meet-{n}", f"meet-{n}")

        def deliver_side(
            n: int = n, barrier: threading.Barrier = barrier, got: dict[str, Any] = got
        ) -> None:
            barrier.wait()
            got["delivery"] = deliver(ledger, f"meet-evt-{n}", f"meet-{n}")

        threads = [threading.Thread(target=wait_side), threading.Thread(target=deliver_side)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        wait = event_waits.get(ledger, got["wait"].id)
        assert wait.status == "received", (n, got)
        assert wait.payload == {"id": f"meet-evt-{n}"}


def test_concurrent_redeliveries_count_once(ledger: Ledger) -> None:
    """The same event id sent ten times at once wakes its wait once: one ``delivered``,
    nine ``duplicate``, one event_received in the run's log."""
    wait = open_wait(ledger, "dup", "dup-key")
    barrier = threading.Barrier(10)
    statuses: list[str] = []

    def send() -> None:
        barrier.wait()
        statuses.append(deliver(ledger, "dup-evt", "dup-key").status)

    threads = [threading.Thread(target=send) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == ["delivered"] + ["duplicate"] * 9
    assert event_waits.get(ledger, wait.id).status == "received"
    kinds = [e["kind"] for e in ledger.events("wf__v1/dup")]
    assert kinds.count("event_received") == 1


def test_a_kept_event_is_taken_only_by_a_wait_its_sender_may_wake(ledger: Ledger) -> None:
    """An event sent before its wait started keeps its sender's reach (the DAGs it may
    trigger): a wait of a DAG outside it does not take it (the event stays kept, the run
    records why); a wait its sender may wake does. Before, any later wait took it, so a
    sender with rights on one team's DAG could feed a run of another team's."""
    reach_other = event_waits.deliver(
        ledger,
        name="payment.settled",
        key="reach-1",
        event_id="reach-other",
        payload={"id": "forged"},
        source="api",
        by="other-team",
        reach=lambda: ["other__v1"],
    )
    assert reach_other.status == "kept"
    wait = open_wait(ledger, "reach-a", "reach-1")
    assert wait.waiting, "taken from a sender who may not trigger wf__v1"
    skipped = [
        e for e in ledger.events("wf__v1/reach-a") if e["kind"] == "event_delivery_not_taken"
    ]
    assert [(e["data"]["event_id"], e["data"]["sender"]) for e in skipped] == [
        ("reach-other", "other-team")
    ]
    with ledger.engine.connect() as conn:
        status = conn.execute(
            text("SELECT status FROM lf_event_deliveries WHERE event_id = 'reach-other'")
        ).scalar_one()
    assert status == "kept"

    allowed = event_waits.deliver(
        ledger,
        name="payment.settled",
        key="reach-2",
        event_id="reach-mine",
        payload={"id": "real"},
        source="api",
        by="payments",
        reach=lambda: ["wf__v1", "other__v1"],
    )
    assert allowed.status == "kept"
    taken = open_wait(ledger, "reach-b", "reach-2")
    assert not taken.waiting and taken.output() == {"id": "real"}
