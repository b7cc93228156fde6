"""The lifecycle model's shorter version on real Airflow processes: a seeded random walk of
checkout runs that fail late and compensate, retries (with new params, of the newest and
of an older run of a chain), and a task cleared after the saga; after every operation
the promises are checked against Airflow's REST API and the ledger."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack, StackError

pytestmark = pytest.mark.e2e

DAG = "checkout__v1"
LIVE = {"demo_payments": "captured", "demo_reservations": "reserved", "demo_shipments": "booked"}


class Walk:
    def __init__(self, stack: AirflowStack, ledger: Ledger) -> None:
        self.stack = stack
        self.ledger = ledger
        self.orders: set[str] = set()
        self.runs: dict[str, str] = {}  # ledger run id -> order
        self.chains: list[list[str]] = []  # each chain: oldest first

    def _rows(self, sql: str, **binds: Any) -> list[Any]:
        with self.ledger.engine.connect() as conn:
            return list(conn.execute(text(sql), binds))

    def settle(self, run_id: str) -> str:
        dag_id, airflow_id = run_id.split("/", 1)
        state = self.stack.wait_for_run(dag_id, airflow_id, timeout=300)
        want = "succeeded" if state == "success" else "failed"
        # The DAG's end-of-run callback (dag-processor) writes the ledger's status.
        wait_for(
            lambda: (self.ledger.run(run_id) or {}).get("status") == want,
            timeout=60,
            what=f"the ledger to say {run_id} {want}",
        )
        return state

    def trigger(self, fail: bool) -> str:
        order = f"walk-{uuid.uuid4().hex[:8]}"
        self.orders.add(order)
        run = f"{DAG}/" + self.stack.trigger(DAG, {"order_id": order, "fail_shipment": fail})
        self.runs[run] = order
        self.chains.append([run])
        self.settle(run)
        return run

    def retry(self, run_id: str, params: dict[str, Any] | None = None) -> str:
        body: dict[str, Any] = {"params": params} if params else {}
        started = self.stack.api("POST", f"/ledgerflow/api/runs/{run_id}/retry", json=body)
        new = str(started["run_id"])
        self.runs[new] = self.runs[run_id]
        next(c for c in self.chains if run_id in c).append(new)
        self.settle(new)
        return new

    def check(self) -> None:
        for order in self.orders:
            for table, live in LIVE.items():
                (n,) = self._rows(
                    f"SELECT count(*) FROM {table} WHERE order_id = :o AND status = :s",
                    o=order,
                    s=live,
                )[0]
                assert n <= 1, f"{n} live {table} rows for {order}"
        for run_id in self.runs:
            dag_id, airflow_id = run_id.split("/", 1)
            state = self.stack.run(dag_id, airflow_id)["state"]
            row = self.ledger.run(run_id) or {}
            assert row.get("status") == {"success": "succeeded", "failed": "failed"}[state]
            if state == "success":
                charge = self.ledger.checkpoint(run_id, "charge_payment")
                assert charge is not None and charge.status == "completed"
                (status,) = self._rows(
                    "SELECT status FROM demo_payments WHERE id = :i",
                    i=charge.output["payment_id"],  # type: ignore[index]
                )[0]
                assert status == "captured", f"{run_id} succeeded on a {status} payment"
                assert row.get("saga") is None
            else:
                undone = any(
                    c["status"] == "completed" for c in self.ledger.compensations(run_id).values()
                )
                want = "compensated" if undone else "nothing_to_compensate"
                wait_for(
                    lambda run_id=run_id, want=want: (
                        (self.ledger.run(run_id) or {}).get("saga") == want
                    ),
                    timeout=60,
                    what=f"saga {want} of {run_id}",
                )


def test_random_walk_of_runs_retries_and_clears(stack: AirflowStack, ledger: Ledger) -> None:
    """Seeded: failed runs compensate; the newest failed run of a chain is retried with
    the cause fixed (a params override) and succeeds with new, live effects; an older run
    of a continued chain is refused (409) and starts nothing; a task cleared after the
    saga fails instead of succeeding on undone effects. After every operation: each
    order's effects live at most once, a succeeded run's payment is live, the ledger and
    Airflow agree on every run, every failed run's saga says what happened."""
    rnd = random.Random(20261203)
    walk = Walk(stack, ledger)
    stack.unpause(DAG)
    failed = walk.trigger(fail=True)
    walk.check()
    for _ in range(2):
        op = rnd.choice(["retry_fixed", "retry_again", "clear"])
        chain = rnd.choice(walk.chains)
        newest = chain[-1]
        if op == "clear" or (ledger.run(newest) or {}).get("status") != "failed":
            # Clear the failed shipment of a compensated run: it must not succeed.
            run = walk.trigger(fail=True)
            dag_id, airflow_id = run.split("/", 1)
            stack.api(
                "POST",
                f"/api/v2/dags/{dag_id}/clearTaskInstances",
                json={
                    "dag_run_id": airflow_id,
                    "task_ids": ["create_shipment"],
                    "include_downstream": True,
                    "only_failed": False,
                    "dry_run": False,
                },
            )
            wait_for(
                lambda a=airflow_id: any(
                    t["task_id"] == "create_shipment" and t["try_number"] > 3
                    for t in stack.task_instances(DAG, a)
                ),
                timeout=60,
                what="the cleared shipment task to run",
            )
            assert walk.settle(run) == "failed"
            events = [e["kind"] for e in ledger.events(run)]
            assert "run_reopened" in events
        else:
            walk.retry(newest, {"fail_shipment": False} if op == "retry_fixed" else None)
        walk.check()
    # The first chain, continued by a succeeded retry, refuses a second continuation.
    if len(walk.chains[0]) == 1:
        walk.retry(failed, {"fail_shipment": False})
        walk.check()
    if (ledger.run(walk.chains[0][-1]) or {}).get("status") == "succeeded":
        with pytest.raises(StackError, match="409"):
            stack.api("POST", f"/ledgerflow/api/runs/{failed}/retry", json={})
    walk.check()
