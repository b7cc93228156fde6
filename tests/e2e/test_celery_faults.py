"""Faults below and beside the workers of a Celery deployment: the broker restarted, the
ledger's Postgres restarted with 200 runs in flight, and the scheduler, the triggerer and
the api-server each SIGKILLed in turn with approvals parked and runs mid-way.

The broker (:class:`~ledgerflow.testing.private_services.PrivateRabbitMQ`) and the
ledger's Postgres (:class:`~ledgerflow.testing.private_services.PrivatePostgres`) are this
module's own, so that restarting them disturbs no other test; Airflow's metadata database
stays on the machine's Postgres. Each test checks the same promises: every run ends, none
is lost (each has its effects), none is done twice (one effect per key at the peer, one
shipment row per order), and the ledger agrees with Airflow.

Marked ``celery`` (left out of the default run, like ``test_celery_e2e.py``):
``./scripts/test.sh -m celery`` runs them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ledgerflow.cli import SHIM
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.http_peer import CountingPeer
from ledgerflow.testing.private_services import PrivatePostgres, PrivateRabbitMQ

pytestmark = [pytest.mark.e2e, pytest.mark.celery]

# A charge at an HTTP API and a shipment row written with its checkpoint (a transactional
# effect in the ledger's own database), fused into one task: the busiest path through the
# ledger, one Airflow task per run.
ORDER = """
name: flt_order
version: 1
max_active_runs: 300
params:
  order_id: {{type: string, required: true}}
defaults:
  retry: {{max_attempts: 6, backoff: {{initial: 2s, multiplier: 2, max: 10s}}}}
steps:
  - id: charge
    segment: order
    tool: http
    args: {{url: "{url}/charge", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "charge-{{{{ params.order_id }}}}"}}
  - id: ship
    needs: [charge]
    segment: order
    tool: demo.create_shipment
    args: {{order_id: "{{{{ params.order_id }}}}", address: "1 Loop Rd"}}
    idempotency: {{key: "ship-{{{{ params.order_id }}}}"}}
"""

# A keyed call, an approval, a keyed call after it.
APPROVED = """
name: flt_approved
version: 1
max_active_runs: 100
params:
  order_id: {{type: string, required: true}}
defaults:
  retry: {{max_attempts: 6, backoff: {{initial: 2s, multiplier: 2, max: 10s}}}}
steps:
  - id: reserve
    tool: http
    args: {{url: "{url}/reserve", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "reserve-{{{{ params.order_id }}}}"}}
  - id: approve
    kind: approval
    needs: [reserve]
    subject: "Release {{{{ params.order_id }}}}?"
    approvers: {{roles: [admin]}}
  - id: release
    needs: [approve]
    tool: http
    args: {{url: "{url}/release", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "release-{{{{ params.order_id }}}}"}}
"""

WORKFLOWS = {"flt_order": ORDER, "flt_approved": APPROVED}
ORDER_DAG = "flt_order__v1"
APPROVED_DAG = "flt_approved__v1"


@pytest.fixture(scope="module")
def peer() -> Iterator[CountingPeer]:
    with CountingPeer(delay=0.05, delays={"/charge": 0.5}) as peer:
        yield peer


@pytest.fixture(scope="module")
def broker() -> Iterator[PrivateRabbitMQ]:
    with PrivateRabbitMQ() as mq:
        yield mq


@pytest.fixture(scope="module")
def ledger_pg() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def ledger_url(ledger_pg: PrivatePostgres) -> str:
    return ledger_pg.create_database("lf_faults_ledger")


@pytest.fixture(scope="module")
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    ledger.migrate(demo=True)
    return ledger


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    broker: PrivateRabbitMQ,
    ledger_url: str,
    ledger: Ledger,
    peer: CountingPeer,
) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("faults")
    dags = base / "dags"
    for name, body in WORKFLOWS.items():
        folder = dags / "workflows" / name
        folder.mkdir(parents=True)
        (folder / "v1.yaml").write_text(body.format(url=peer.url))
        (folder / "v1.py").write_text(SHIM)
    stack = AirflowStack(
        dags_folder=dags,
        home=base / "home",
        executor="celery",
        celery_workers=2,
        worker_concurrency=4,
        parallelism=8,
        broker_url=broker.add_vhost("faults"),
        extra_env={
            "AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url,
            "LEDGERFLOW_DEMO_TOOLS": "1",
            # A task whose worker or scheduler died is failed (and retried) 30 s after
            # its last heartbeat, not 60.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
            # 300 runs may be running at once (the default stops at 16 per DAG).
            "AIRFLOW__CORE__MAX_ACTIVE_RUNS_PER_DAG": "300",
        },
    )
    with stack:
        stack.wait_for_dags([f"{name}__v1" for name in WORKFLOWS], timeout=180)
        yield stack


def _count_runs(stack: AirflowStack, dag_id: str, state: str) -> int:
    page = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"state": state, "limit": 1})
    return int(page["total_entries"])


def _ledger_statuses(ledger: Ledger, dag_id: str) -> Counter[str]:
    with ledger.engine.connect() as conn:
        query = text("SELECT status FROM lf_runs WHERE dag_id = :d")
        return Counter(row.status for row in conn.execute(query, {"d": dag_id}))


def _ledger_agrees(ledger: Ledger, dag_id: str, run_ids: list[str]) -> None:
    """Every one of these runs is ``succeeded`` in the ledger too (the end-of-run callback
    writes it a few seconds after the DagRun ends)."""
    wanted = [f"{dag_id}/{rid}" for rid in run_ids]

    def statuses() -> Counter[str]:
        with ledger.engine.connect() as conn:
            query = text("SELECT run_id, status FROM lf_runs WHERE dag_id = :d")
            found = {row.run_id: row.status for row in conn.execute(query, {"d": dag_id})}
        return Counter(found.get(r, "missing") for r in wanted)

    deadline = time.monotonic() + 120
    while statuses() != Counter({"succeeded": len(wanted)}) and time.monotonic() < deadline:
        time.sleep(1)
    assert statuses() == Counter({"succeeded": len(wanted)}), statuses()


def _once_each(peer: CountingPeer, path: str, orders: list[str]) -> None:
    per_order = Counter(e["order"] for e in peer.effects_at(path))
    assert set(orders) <= set(per_order), sorted(set(orders) - set(per_order))[:5]
    extra = {o: n for o, n in per_order.items() if o in orders and n > 1}
    assert not extra, (path, extra)


def _shipments(ledger: Ledger, prefix: str) -> Counter[str]:
    with ledger.engine.connect() as conn:
        return Counter(
            row.order_id
            for row in conn.execute(
                text("SELECT order_id FROM demo_shipments WHERE order_id LIKE :p"),
                {"p": f"{prefix}%"},
            )
        )


def _doctor(stack: AirflowStack) -> dict[str, Any]:
    """``ledgerflow doctor --json`` against this deployment (its Airflow and its ledger)."""
    ledgerflow = Path(sys.executable).parent / "ledgerflow"
    done = subprocess.run(
        [str(ledgerflow), "doctor", "--json", "--grace", "0s"],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def test_kill_9_the_scheduler_the_triggerer_and_the_api_server_in_turn(
    stack: AirflowStack, ledger: Ledger, peer: CountingPeer
) -> None:
    """12 runs park on an approval and 12 more are mid-way through their order; the
    scheduler, the triggerer and the api-server are SIGKILLed in turn (each started again),
    with approvals decided before, between and after the kills. Every run succeeds, each
    approval is decided once and completes once, each keyed call reached the peer once,
    and the doctor finds nothing to repair."""
    approved = [f"appr-{n}" for n in range(12)]
    approved_runs = {o: stack.trigger(APPROVED_DAG, {"order_id": o}) for o in approved}

    def request(order: str) -> approvals.Approval | None:
        return approvals.for_step(ledger, f"{APPROVED_DAG}/{approved_runs[order]}", "approve")

    pending = {o: wait_for(lambda o=o: request(o), 300, f"{o} parked") for o in approved}
    orders = [f"mid-{n}" for n in range(12)]
    order_runs = {o: stack.trigger(ORDER_DAG, {"order_id": o}) for o in orders}
    decided: list[str] = []

    def decide(count: int) -> None:
        for order in [o for o in approved if o not in decided][:count]:
            body = {"decision": "approve", "comment": "in turn"}
            path = f"/ledgerflow/api/approvals/{pending[order].id}/decision"
            # A client whose request met a dead api-server asks again, as a real one does.
            for _ in range(60):
                try:
                    stack.api("POST", path, json=body)
                    break
                except httpx.TransportError:
                    time.sleep(1)
            else:
                raise AssertionError(f"{order}: the api-server never took the decision")
            decided.append(order)

    decide(3)
    wait_for(lambda: peer.arrivals.get("/charge"), 120, "an order mid-way")
    # Decisions taken while the scheduler or the triggerer is dead; the api-server's kill
    # lands right after a decision was posted.
    for component in ("scheduler", "triggerer"):
        stack.kill(component)
        decide(3)
        stack.restart(component)
    decide(1)
    stack.kill("api-server")
    stack.restart("api-server")
    decide(len(approved))
    assert sorted(decided) == sorted(approved)

    assert stack.wait_for_runs(APPROVED_DAG, list(approved_runs.values()), 600) == ["success"] * 12
    assert stack.wait_for_runs(ORDER_DAG, list(order_runs.values()), 600) == ["success"] * 12
    for order, run_id in approved_runs.items():
        events = [e["kind"] for e in ledger.events(f"{APPROVED_DAG}/{run_id}")]
        assert events.count("approval_decided") == 1, (order, events)
        assert events.count("approval_completed") == 1, (order, events)
    _once_each(peer, "/reserve", approved)
    _once_each(peer, "/release", approved)
    _once_each(peer, "/charge", orders)
    shipments = _shipments(ledger, "mid-")
    assert set(shipments) == set(orders) and max(shipments.values()) == 1, shipments
    _ledger_agrees(ledger, APPROVED_DAG, list(approved_runs.values()))
    _ledger_agrees(ledger, ORDER_DAG, list(order_runs.values()))
    report = _doctor(stack)
    assert report["findings"] == [], report


def test_the_broker_restarted_with_runs_in_flight(
    stack: AirflowStack, ledger: Ledger, peer: CountingPeer, broker: PrivateRabbitMQ
) -> None:
    """40 orders are triggered; while tasks are queued at the broker and running on the
    workers, RabbitMQ is stopped for 5 s and started again. Every run succeeds with one
    charge and one shipment each."""
    orders = [f"mq-{n}" for n in range(40)]
    runs = {o: stack.trigger(ORDER_DAG, {"order_id": o}) for o in orders}
    wait_for(
        lambda: len([e for e in peer.effects_at("/charge") if e["order"].startswith("mq-")]) >= 3,
        300,
        "orders under way",
    )
    in_flight = _count_runs(stack, ORDER_DAG, "running")
    broker.restart(down_for=5)
    assert in_flight >= 10, in_flight
    assert stack.wait_for_runs(ORDER_DAG, list(runs.values()), 900) == ["success"] * len(orders)
    _once_each(peer, "/charge", orders)
    shipments = _shipments(ledger, "mq-")
    assert set(shipments) == set(orders) and max(shipments.values()) == 1, shipments
    _ledger_agrees(ledger, ORDER_DAG, list(runs.values()))


def test_the_ledgers_postgres_restarted_with_200_runs_in_flight(
    stack: AirflowStack, ledger: Ledger, peer: CountingPeer, ledger_pg: PrivatePostgres
) -> None:
    """220 orders are triggered; once at least 200 of their runs are running in Airflow,
    the ledger's Postgres is stopped as by a crash (every connection cut), stays down 5 s
    and starts again. Every run ends succeeded, with one charge and one shipment each;
    Airflow's succeeded count equals the ledger's."""
    orders = [f"pg-{n}" for n in range(220)]
    # A slot is free again as soon as its task process exits (ledgerflow.supervisor_exit):
    # runs triggered one at a time would end about as fast as they are triggered. They are
    # triggered while the DAG is paused (queued), then released together: 220 runs running
    # at once, their tasks waiting for the workers' 8 slots.
    stack.api("PATCH", f"/api/v2/dags/{ORDER_DAG}", json={"is_paused": True})
    try:
        runs = {o: stack.trigger(ORDER_DAG, {"order_id": o}) for o in orders}
        before = _count_runs(stack, ORDER_DAG, "success")
    finally:
        stack.unpause(ORDER_DAG)
    wait_for(lambda: _count_runs(stack, ORDER_DAG, "running") >= 200, 300, "200 runs running")
    wait_for(
        lambda: len([e for e in peer.effects_at("/charge") if e["order"].startswith("pg-")]) >= 3,
        300,
        "orders under way",
    )
    in_flight = _count_runs(stack, ORDER_DAG, "running")
    ledger_pg.restart(down_for=5)
    # This process's own pooled connections died with the server (its first read would
    # fail once, as in any long-lived process); the workers' task processes are new.
    ledger.engine.dispose()
    assert in_flight >= 200, in_flight
    ended = stack.wait_for_runs(ORDER_DAG, list(runs.values()), 1500)
    assert Counter(ended) == Counter({"success": len(orders)}), Counter(ended)
    _once_each(peer, "/charge", orders)
    shipments = _shipments(ledger, "pg-")
    assert set(shipments) == set(orders) and max(shipments.values()) == 1, (
        len(shipments),
        shipments.most_common(3),
    )
    _ledger_agrees(ledger, ORDER_DAG, list(runs.values()))
    assert _count_runs(stack, ORDER_DAG, "success") - before == len(orders)
