"""Finding 9: parked approvals ride out an outage of the ledger's Postgres (every
connection to its database cut and new ones refused for a while, as a restart does):
each trigger keeps waiting and, once decided, fires exactly once; a deadline that
passed during the outage is applied once afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.testing.postgres import _admin_execute, fresh_database
from ledgerflow.triggers.approval import ApprovalTrigger

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ledger]:
    """The ledger behind the Airflow connection ``lf_outage`` (triggers name it)."""
    with fresh_database("lf_outage") as url:
        monkeypatch.setenv("AIRFLOW_CONN_LF_OUTAGE", url)
        ledger = Ledger.from_airflow("lf_outage")
        ledger.migrate()
        yield ledger
        _admin_execute(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" WITH ALLOW_CONNECTIONS true')
        ledger.engine.dispose()


def request(ledger: Ledger, run: str, deadline: Any = None) -> approvals.Approval:
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
        deadline=deadline or now() + timedelta(hours=1),
        at_deadline="reject",
    )
    return approval


def outage(ledger: Ledger, seconds: float) -> None:
    """Cut every connection to the ledger's database and refuse new ones for a while."""
    name = ledger.engine.url.database
    _admin_execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    _admin_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    )
    time.sleep(seconds)
    _admin_execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')


def test_parked_approvals_survive_a_database_outage(ledger: Ledger) -> None:
    """Five triggers poll every 0.3 s through a 4 s outage; none ends (no event, no
    error) while the database is away; after it, four decisions and one deadline give
    exactly one event each, with the stored outcome."""
    parked = [request(ledger, f"p{n}") for n in range(4)]
    late = request(ledger, "late", deadline=now() + timedelta(seconds=2))

    async def scenario() -> list[dict[str, Any]]:
        triggers = [
            ApprovalTrigger(a.id, ledger.conn_id, poll_interval=0.3) for a in [*parked, late]
        ]
        counts = [0] * len(triggers)

        async def events(i: int, trigger: ApprovalTrigger) -> dict[str, Any]:
            payload: dict[str, Any] = {}
            async for event in trigger.run():
                counts[i] += 1
                payload = event.payload
            return payload

        tasks = [asyncio.create_task(events(i, t)) for i, t in enumerate(triggers)]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(outage, ledger, 4.0)
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in tasks[:4]), [t.exception() for t in tasks if t.done()]
        for n, approval in enumerate(parked):
            await asyncio.to_thread(
                approvals.decide,
                ledger,
                approval.id,
                decision="approved" if n % 2 else "rejected",
                by="manager",
            )
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert counts == [1] * len(triggers)
        return results

    results = asyncio.run(scenario())
    assert [r["status"] for r in results] == [
        "rejected",
        "approved",
        "rejected",
        "approved",
        "rejected",
    ]
    assert approvals.get(ledger, late.id).decided_by is not None
    decided = [e for e in ledger.events("wf__v1/late") if e["kind"] == "approval_decided"]
    assert len(decided) == 1
