"""Ledgerflow on Airflow's CeleryExecutor: RabbitMQ broker, Postgres result backend, two
Celery workers as separate processes (``worker1`` also serves the ``payments`` queue).

Every Celery test is in this module and shares its one stack (a second stack costs the
suite ~40 s): queues, concurrency limits (Airflow pools) and rate limits (the ledger's
token buckets) that hold across workers, and a worker SIGKILLed in the middle of keyed
steps, 20 times. The tests run in this order; the kills come last.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import text

from ledgerflow.cli import SHIM
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.http_peer import CountingPeer
from ledgerflow.testing.postgres import fresh_database

# Not in the default run (pyproject addopts: -m "not celery"): one Celery stack and its
# worker-kill test take 5-12 minutes here; `./scripts/test.sh -m celery` runs them.
pytestmark = [pytest.mark.e2e, pytest.mark.celery]

# Payment steps run on the `payments` queue, which only worker1 serves; `pay` and
# `receipt` are one fused task there, `prepare` runs on the default queue (either worker).
PAY = """
name: cel_pay
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: prepare
    tool: demo.noop
    args: {{value: "{{{{ params.order_id }}}}"}}
    idempotency: natural
  - id: pay
    needs: [prepare]
    queue: payments
    segment: payment
    tool: http
    args: {{url: "{url}/pay", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "pay-{{{{ params.order_id }}}}"}}
  - id: receipt
    needs: [pay]
    queue: payments
    segment: payment
    tool: demo.noop
    args: {{value: "{{{{ steps.pay.output.body.effect }}}}"}}
    idempotency: natural
"""

# At most 2 calls in flight (the step's own pool), however many runs and workers.
LIMITED = """
name: cel_limited
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: call
    concurrency: 2
    tool: http
    args: {{url: "{url}/limited", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "limited-{{{{ params.order_id }}}}"}}
"""

# The same limit on a step fused with the next one: the segment's task takes the pool.
LIMITED_FUSED = """
name: cel_limited_fused
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: call
    concurrency: 2
    segment: limited
    tool: http
    args: {{url: "{url}/limited_fused", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "fused-{{{{ params.order_id }}}}"}}
  - id: after
    needs: [call]
    segment: limited
    tool: demo.noop
    args: {{value: "{{{{ steps.call.output.body.effect }}}}"}}
    idempotency: natural
"""

RATE = 4.0  # calls per second
RATED = """
name: cel_rated
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: tick
    rate: {rate:g}/s
    tool: http
    args: {{url: "{url}/rated", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "rated-{{{{ params.order_id }}}}"}}
"""

# Keyed steps, each call slow enough (1 s at the peer) for a kill to land in it: an HTTP
# effect, a transactional one (a row of demo_shipments with its checkpoint), an HTTP one.
KEYED = """
name: cel_keyed
version: 1
params:
  order_id: {{type: string, required: true}}
defaults:
  retry: {{max_attempts: 6, backoff: {{initial: 1s, multiplier: 1}}}}
steps:
  - id: charge
    tool: http
    args: {{url: "{url}/charge", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "charge-{{{{ params.order_id }}}}"}}
  - id: ship
    needs: [charge]
    tool: demo.create_shipment
    args: {{order_id: "{{{{ params.order_id }}}}", address: "1 Loop Rd"}}
    idempotency: {{key: "ship-{{{{ params.order_id }}}}"}}
  - id: confirm
    needs: [ship]
    tool: http
    args: {{url: "{url}/confirm", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "confirm-{{{{ params.order_id }}}}"}}
"""

# One step that reports where it ran (its process, and the process that preloaded the
# step code).
WHERE = """
name: cel_where
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: where
    tool: demo.task_process
"""

WORKFLOWS = {
    "cel_where": WHERE,
    "cel_pay": PAY,
    "cel_limited": LIMITED,
    "cel_limited_fused": LIMITED_FUSED,
    "cel_rated": RATED,
    "cel_keyed": KEYED,
}


@pytest.fixture(scope="module")
def peer() -> Iterator[CountingPeer]:
    delays = {"/limited": 0.8, "/limited_fused": 0.8, "/charge": 1.0, "/confirm": 1.0}
    with CountingPeer(delay=0.05, delays=delays) as peer:
        yield peer


@pytest.fixture(scope="module")
def ledger_url() -> Iterator[str]:
    with fresh_database("lf_celery_ledger") as url:
        yield url


@pytest.fixture(scope="module")
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    ledger.migrate(demo=True)
    return ledger


@pytest.fixture(scope="module")
def celery(
    tmp_path_factory: pytest.TempPathFactory, ledger_url: str, ledger: Ledger, peer: CountingPeer
) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("celery")
    dags = base / "dags"
    for name, body in WORKFLOWS.items():
        folder = dags / "workflows" / name
        folder.mkdir(parents=True)
        (folder / "v1.yaml").write_text(body.format(url=peer.url, rate=RATE))
        (folder / "v1.py").write_text(SHIM)
    stack = AirflowStack(
        dags_folder=dags,
        home=base / "home",
        executor="celery",
        celery_workers=2,
        worker_queues={"worker1": ["default", "payments"]},
        worker_concurrency=2,
        parallelism=6,
        extra_env={
            "AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url,
            "LEDGERFLOW_DEMO_TOOLS": "1",
            # A task whose worker was killed is failed (and retried) 30 s after its last
            # heartbeat, not 60.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
        },
    )
    with stack:
        # The pools of the concurrency limits, as a deployment creates them.
        ledgerflow = Path(sys.executable).parent / "ledgerflow"
        done = subprocess.run(
            [str(ledgerflow), "pools", str(dags / "workflows")],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "set pool ledgerflow.step.cel_limited.call: 2 slots" in done.stdout, done.stdout
        stack.wait_for_dags([f"{name}__v1" for name in WORKFLOWS], timeout=180)
        yield stack


def _trigger_all(stack: AirflowStack, dag_id: str, orders: list[str]) -> list[str]:
    return [stack.trigger(dag_id, {"order_id": order}) for order in orders]


def _hosts(stack: AirflowStack, dag_id: str, run_ids: list[str]) -> dict[str, set[str]]:
    """task_id -> the hostnames (worker names) its task instances ran on."""
    hosts: dict[str, set[str]] = {}
    for rid in run_ids:
        for ti in stack.task_instances(dag_id, rid):
            if ti["state"] == "success":
                hosts.setdefault(ti["task_id"], set()).add(ti["hostname"])
    return hosts


def test_payment_steps_run_only_on_the_workers_of_their_queue(
    celery: AirflowStack, peer: CountingPeer
) -> None:
    orders = [f"pay-{i}" for i in range(6)]
    run_ids = _trigger_all(celery, "cel_pay__v1", orders)
    assert celery.wait_for_runs("cel_pay__v1", run_ids, timeout=300) == ["success"] * len(orders)
    hosts = _hosts(celery, "cel_pay__v1", run_ids)
    # The fused payment segment (pay + receipt) ran on worker1 alone, the one worker that
    # serves `payments`; the queue is the task's own.
    assert hosts["payment"] == {"worker1"}, hosts
    assert hosts["prepare"] <= {"worker1", "worker2"}, hosts
    tis = celery.task_instances("cel_pay__v1", run_ids[0])
    assert {t["task_id"]: t["queue"] for t in tis} == {"prepare": "default", "payment": "payments"}
    assert sorted(e["order"] for e in peer.effects_at("/pay")) == sorted(orders)


def test_task_processes_inherit_the_plugin_and_step_code_from_their_worker(
    celery: AirflowStack, ledger: Ledger
) -> None:
    """A Celery task process finds the Ledgerflow plugin and the step code already loaded,
    preloaded by the worker that forked it (``AIRFLOW__CORE__LAZY_LOAD_PLUGINS=False`` on
    the workers). With Airflow's lazy default, every task process loaded the plugin itself
    after its fork, 2-3 s of CPU per task (the LLM modules included)."""
    run_ids = _trigger_all(celery, "cel_where__v1", [f"where-{i}" for i in range(4)])
    assert celery.wait_for_runs("cel_where__v1", run_ids, timeout=300) == ["success"] * 4
    facts = [ledger.outputs(f"cel_where__v1/{rid}")["where"]["output"] for rid in run_ids]
    for fact in facts:
        assert fact["preloaded_in"] is not None, facts
        assert fact["preloaded_in"] != fact["pid"], facts


@pytest.mark.parametrize(
    ("workflow", "path"),
    [("cel_limited", "/limited"), ("cel_limited_fused", "/limited_fused")],
    ids=["task", "fused-segment"],
)
def test_concurrency_limit_holds_across_two_workers(
    celery: AirflowStack, peer: CountingPeer, workflow: str, path: str
) -> None:
    orders = [f"{workflow}-{i}" for i in range(8)]
    run_ids = _trigger_all(celery, f"{workflow}__v1", orders)
    states = celery.wait_for_runs(f"{workflow}__v1", run_ids, timeout=400)
    assert states == ["success"] * len(orders)
    assert sorted(e["order"] for e in peer.effects_at(path)) == sorted(orders)
    # The peer counted the calls in flight: never more than the limit, though the two
    # workers had 4 slots and 8 runs were waiting.
    assert 1 <= peer.max_in_flight[path] <= 2, peer.max_in_flight
    pool = {t["pool"] for rid in run_ids for t in celery.task_instances(f"{workflow}__v1", rid)}
    assert pool == {f"ledgerflow.step.{workflow}.call"}, pool


def test_rate_limit_holds_across_two_workers(celery: AirflowStack, peer: CountingPeer) -> None:
    orders = [f"rated-{i}" for i in range(12)]
    run_ids = _trigger_all(celery, "cel_rated__v1", orders)
    assert celery.wait_for_runs("cel_rated__v1", run_ids, timeout=400) == ["success"] * len(orders)
    arrivals = sorted(peer.arrivals["/rated"])
    assert len(arrivals) == len(orders)
    hosts = _hosts(celery, "cel_rated__v1", run_ids)["tick"]
    # The bucket is the ledger's: whichever worker calls, the calls are spaced by 1/rate
    # (a little jitter on the way to the peer allowed).
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert (arrivals[-1] - arrivals[0]) >= (len(orders) - 1) / RATE - 0.3, (gaps, hosts)
    window = max(sum(1 for t in arrivals if s <= t < s + 1.0) for s in arrivals)
    assert window <= RATE + 1, (window, gaps)


# 20 kills, each waiting for a new keyed call in flight, then the runs' recovery (a killed
# task is failed 30 s after its last heartbeat, then retried): longer than most tests.
@pytest.mark.timeout(1800)
def test_sigkill_a_worker_in_the_middle_of_keyed_steps_20_times(
    celery: AirflowStack, peer: CountingPeer, ledger: Ledger
) -> None:
    dag_id = "cel_keyed__v1"
    runs = {f"kill-{n}": "" for n in range(40)}
    for order in runs:
        runs[order] = celery.trigger(dag_id, {"order_id": order})
    kills: Counter[str] = Counter()
    seen = 0  # keyed calls the peer had received at the last kill
    # A task still "running" on a worker started before that worker's last restart is the
    # killed one (until its heartbeat times out): not a live call to kill.
    started = {w: datetime.now(timezone.utc) for w in celery.workers}
    for round_ in range(20):
        # Wait until a keyed HTTP call that started after the last kill is in flight, then
        # SIGKILL the worker running it (and start it again, without waiting: the other
        # worker goes on meanwhile).
        deadline = time.monotonic() + 180
        victim = None
        while victim is None and time.monotonic() < deadline:
            calls = len(peer.arrivals.get("/charge", [])) + len(peer.arrivals.get("/confirm", []))
            if calls > seen and (peer.in_flight["/charge"] or peer.in_flight["/confirm"]):
                running = celery.api(
                    "GET",
                    f"/api/v2/dags/{dag_id}/dagRuns/~/taskInstances",
                    params={"state": "running", "limit": 100},
                )["task_instances"]
                busy = {
                    t["hostname"]
                    for t in running
                    if t["task_id"] in ("charge", "confirm")
                    and t["hostname"] in started
                    and datetime.fromisoformat(t["start_date"]) > started[t["hostname"]]
                }
                hosts = sorted(busy)
                victim = hosts[round_ % len(hosts)] if hosts else None
                seen = calls
            time.sleep(0.05)
        assert victim is not None, f"round {round_}: no keyed call in flight within 180 s"
        celery.restart(victim, wait=False)
        started[victim] = datetime.now(timezone.utc)
        kills[victim] += 1
    assert sum(kills.values()) == 20
    celery.wait_healthy(timeout=300, components=celery.workers)

    ended = celery.wait_for_runs(dag_id, list(runs.values()), timeout=600)
    states = dict(zip(runs, ended, strict=True))
    # Every run ended; none was lost (each has its effects) and none was done twice.
    assert set(states.values()) == {"success"}, states
    for path in ("/charge", "/confirm"):
        per_order = Counter(e["order"] for e in peer.effects_at(path))
        assert set(per_order) == set(runs), path
        assert max(per_order.values()) == 1, (path, per_order.most_common(3))
    with ledger.engine.connect() as conn:
        shipments = Counter(
            row.order_id
            for row in conn.execute(
                text("SELECT order_id FROM demo_shipments WHERE order_id LIKE 'kill-%'")
            )
        )
    assert set(shipments) == set(runs) and max(shipments.values()) == 1, shipments

    # The ledger agrees with Airflow: every run succeeded there too (the DAG's end-of-run
    # callback, run by the dag-processor, writes it: a few seconds after the DagRun ends).
    def statuses() -> Counter[str]:
        with ledger.engine.connect() as conn:
            query = text("SELECT status FROM lf_runs WHERE dag_id = :d")
            return Counter(row.status for row in conn.execute(query, {"d": dag_id}))

    deadline = time.monotonic() + 60
    while statuses() != Counter({"succeeded": len(runs)}) and time.monotonic() < deadline:
        time.sleep(1)
    assert statuses() == Counter({"succeeded": len(runs)}), statuses()
