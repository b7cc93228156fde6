"""Model-based test of the run lifecycle where features meet (SQLite and Postgres).

Hypothesis drives random sequences of what happens to checkout runs — start a run,
run its next step, crash in the middle of a step, fail late and compensate, retry any
run of a chain through the retry route (plain, ``--from`` a step, with new params that
fix the cause or change a step's inputs, again and again, an older run of the chain),
clear a task of an ended run — through the same functions the Airflow tasks and the
retry route call, against a small reference model. After every operation it checks the
promises:

* each business effect is live at most once per order (one captured payment, one
  reserved reservation, one booked shipment);
* a succeeded run's effects are all live (nothing another run's saga undid);
* every ended run's saga says what happened: failed with something undone →
  ``compensated``; failed with nothing undone → ``nothing_to_compensate``; succeeded →
  no saga;
* the ledger and "Airflow" (the model's run states) agree on every run's status;
* a dead letter is open exactly when its step has not completed since, in its run or a
  retry of it;
* the retry route accepts a request exactly when the model says so (the run ended, no
  other run of its chain is live or a succeeded retry, none newer failed; a succeeded
  run only ``--from`` a step), and the retry run gets the params the model expects.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from sqlalchemy import text

from ledgerflow.errors import InjectedFault
from ledgerflow.ledger.store import Ledger
from ledgerflow.retries import RetryRefused, plan_retry, record_retry
from ledgerflow.spec.validate import load_workflow
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.saga import NothingToUndo, compensate_step, finish_saga, saga_started

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
SPEC = load_workflow(DAGS / "workflows" / "checkout" / "v1.yaml")
FORWARD = ["reserve_inventory", "charge_payment", "create_shipment", "send_confirmation"]
COMPENSABLE = ["create_shipment", "charge_payment", "reserve_inventory"]
ORDERS = ["o-1", "o-2"]
POINTS = ["before_effect", "after_effect", "before_commit", "after_commit"]
_fresh = itertools.count()


class Run:
    """The model of one run: what Airflow would know about it."""

    def __init__(
        self,
        run_id: str,
        order: str,
        fail: bool,
        retry_of: str | None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.ref = RunRef(run_id=run_id, dag_id="checkout__v1", retry_of=retry_of)
        self.order = order
        self.fail = fail
        self.overrides = dict(overrides or {})  # params other than the defaults
        self.cleared = False  # the carrier accepts now (a failed task was cleared)
        self.next = 0  # index into FORWARD
        self.status = "running"
        self.tries: dict[str, int] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {
            **{n: p.default for n, p in SPEC.params.items()},
            **self.overrides,
            "order_id": self.order,
            "fail_shipment": self.fail and not self.cleared,
        }


class Lifecycle(RuleBasedStateMachine):
    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(self.url)
        self.ledger.migrate()
        with self.ledger.begin() as conn:
            for table in (
                "lf_events", "lf_dead_letters", "lf_compensations", "lf_effects",
                "lf_attempts", "lf_steps", "lf_runs", "demo_payments", "demo_reservations",
                "demo_shipments", "demo_emails",
            ):  # fmt: skip
                conn.execute(text(f"DELETE FROM {table}"))
            conn.execute(text("UPDATE demo_inventory SET reserved = 0"))
        self.runs: dict[str, Run] = {}

    # -- operations ----------------------------------------------------------------

    def _new(
        self,
        order: str,
        fail: bool,
        retry_of: str | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Run:
        run = Run(f"checkout__v1/m{next(_fresh)}", order, fail, retry_of, overrides)
        self.runs[run.ref.run_id] = run
        return run

    @rule(order=st.sampled_from(ORDERS), fail=st.booleans())
    def start(self, order: str, fail: bool) -> None:
        self._new(order, fail)

    def _running(self) -> list[Run]:
        return [r for r in self.runs.values() if r.status == "running"]

    def _step(self, run: Run) -> None:
        step_id = FORWARD[run.next]
        run.tries[step_id] = run.tries.get(step_id, 0) + 1
        try:
            execute_step(
                self.ledger,
                SPEC,
                SPEC.tool_step(step_id),
                run.ref,
                params=run.params,
                try_number=run.tries[step_id],
                max_attempts=1,  # every failure is final: the run fails late
            )
        except InjectedFault:
            raise
        except Exception:
            self._fail(run, step_id)
            return
        run.next += 1
        if run.next == len(FORWARD):
            run.status = "succeeded"
            self.ledger.finish_run(run.ref.run_id, "succeeded")

    def _fail(self, run: Run, step_id: str) -> None:
        """The failure callback, the compensation tasks in reverse, saga__finish, and the
        DAG's end-of-run callback, in Airflow's order."""
        saga_started(self.ledger, SPEC, run.ref.run_id, step_id)
        for i, undo in enumerate(COMPENSABLE):
            with contextlib.suppress(NothingToUndo):
                compensate_step(self.ledger, SPEC, run.ref, undo, params=run.params, first=i == 0)
        finish_saga(self.ledger, run.ref.run_id)
        run.status = "failed"
        self.ledger.finish_run(run.ref.run_id, "failed")

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def next_step(self, data: st.DataObject) -> None:
        self._step(data.draw(st.sampled_from(self._running())))

    @precondition(lambda self: self._running())
    @rule(data=st.data(), point=st.sampled_from(POINTS))
    def crash_then_retry_the_task(self, data: st.DataObject, point: str) -> None:
        """A crash at a commit point, then Airflow's next try of the same task."""
        run = data.draw(st.sampled_from(self._running()))
        os.environ["LEDGERFLOW_FAULT"] = f"{point}:raise"
        try:
            with contextlib.suppress(InjectedFault):
                self._step(run)
        finally:
            del os.environ["LEDGERFLOW_FAULT"]
        if run.status == "running":
            self._step(run)

    def _failed(self) -> list[Run]:
        return [r for r in self.runs.values() if r.status == "failed"]

    def _ended(self) -> list[Run]:
        return [r for r in self.runs.values() if r.status != "running"]

    def _family(self, run: Run) -> list[Run]:
        """The runs linked to ``run`` through retries, oldest first."""
        root = run
        while root.ref.retry_of is not None:
            root = self.runs[root.ref.retry_of]
        family, todo = [], [root]
        while todo:
            member = todo.pop()
            family.append(member)
            todo += [r for r in self.runs.values() if r.ref.retry_of == member.ref.run_id]
        return sorted(family, key=lambda r: int(r.ref.run_id.rsplit("m", 1)[1]))

    def _may_retry(self, source: Run, from_step: str | None) -> bool:
        """The retry rules, as the model states them."""
        family = self._family(source)
        others = [r for r in family if r is not source]
        newer = family[family.index(source) + 1 :]
        return (
            source.status != "running"
            and not any(r.status == "running" for r in others)
            and not any(r.status == "succeeded" and r.ref.retry_of for r in others)
            and (source.status == "failed" or from_step is not None)
            and not any(r.status == "failed" for r in newer)
        )

    @precondition(lambda self: self._ended())
    @rule(
        data=st.data(),
        from_step=st.sampled_from([None, *FORWARD]),
        fix=st.booleans(),
        amount=st.sampled_from([None, 25.0, 40.0]),
        address=st.sampled_from([None, "2 Side Street"]),
    )
    def retry(
        self,
        data: st.DataObject,
        from_step: str | None,
        fix: bool,
        amount: float | None,
        address: str | None,
    ) -> None:
        """A retry request for any ended run, through the retry route's own functions
        (``plan_retry`` then ``record_retry``): plain or ``--from`` a step, with params
        that fix the cause (``fail_shipment=false``) or change a step's inputs (the
        amount charged, the address shipped to)."""
        source = data.draw(st.sampled_from(self._ended()))
        overrides: dict[str, Any] = {}
        if fix:
            overrides["fail_shipment"] = False
        if amount is not None:
            overrides["amount"] = amount
        if address is not None:
            overrides["address"] = address
        allowed = self._may_retry(source, from_step)
        try:
            plan = plan_retry(self.ledger, source.ref.run_id, from_step, DAGS, params=overrides)
            run = self._new(
                source.order,
                bool(overrides.get("fail_shipment", source.fail)),
                retry_of=source.ref.run_id,
                overrides={**source.overrides, **overrides},
            )
            record_retry(self.ledger, plan, run.ref.run_id, user="model", via="cli")
        except RetryRefused as refused:
            assert not allowed, f"refused {source.ref.run_id} --from {from_step}: {refused}"
            return
        assert allowed, f"accepted {source.ref.run_id} --from {from_step}"
        assert plan.params == run.params, (plan.params, run.params)

    @precondition(lambda self: self._failed())
    @rule(data=st.data())
    def clear_the_failed_task(self, data: st.DataObject) -> None:
        """An operator clears the failed task of a failed run in Airflow (the carrier
        accepts now): the run runs on from that step."""
        run = data.draw(st.sampled_from(self._failed()))
        run.status = "running"
        run.cleared = True
        self._step(run)

    # -- invariants ----------------------------------------------------------------

    def _rows(self, sql: str, **binds: Any) -> list[Any]:
        with self.ledger.engine.connect() as conn:
            return list(conn.execute(text(sql), binds))

    @invariant()
    def each_effect_is_live_at_most_once(self) -> None:
        for table, live in (
            ("demo_payments", "captured"),
            ("demo_reservations", "reserved"),
            ("demo_shipments", "booked"),
        ):
            for order in ORDERS:
                n = self._rows(
                    f"SELECT count(*) FROM {table} WHERE order_id = :o AND status = :s",
                    o=order,
                    s=live,
                )[0][0]
                assert n <= 1, f"{n} live rows in {table} for {order}"

    @invariant()
    def no_payment_is_left_captured_by_failed_runs_only(self) -> None:
        """Never lost the other way: a captured payment has a run standing on it
        (running or succeeded); once every run of its order failed, it was refunded."""
        for (order,) in self._rows("SELECT order_id FROM demo_payments WHERE status = 'captured'"):
            mine = [r for r in self.runs.values() if r.order == order]
            assert any(r.status != "failed" for r in mine), f"{order}: captured, all failed"

    @invariant()
    def a_succeeded_run_has_its_effects_live(self) -> None:
        for run in self.runs.values():
            if run.status != "succeeded":
                continue
            charge = self.ledger.checkpoint(run.ref.run_id, "charge_payment")
            assert charge is not None and charge.status == "completed", run.ref.run_id
            (status,) = self._rows(
                "SELECT status FROM demo_payments WHERE id = :i", i=charge.output["payment_id"]
            )[0]
            assert status == "captured", f"{run.ref.run_id} succeeded on a {status} payment"

    @invariant()
    def ledger_and_airflow_agree_and_sagas_say_what_happened(self) -> None:
        for run in self.runs.values():
            row = self.ledger.run(run.ref.run_id)
            if row is None:
                continue  # not started yet: no task has run
            assert row["status"] == run.status, run.ref.run_id
            if run.status == "succeeded":
                assert row["saga"] is None, run.ref.run_id
            elif run.status == "failed":
                comps = self.ledger.compensations(run.ref.run_id).values()
                undone = any(c["status"] == "completed" for c in comps)
                want = "compensated" if undone else "nothing_to_compensate"
                assert row["saga"] == want, (run.ref.run_id, row["saga"], want)

    @invariant()
    def dead_letters_are_open_exactly_while_unfixed(self) -> None:
        for letter in self.ledger.dead_letters(status=None):
            completed_later = False
            for run in self.runs.values():
                chain, current = set(), run.ref.run_id
                while current is not None and current not in chain:
                    chain.add(current)
                    current = self.runs[current].ref.retry_of if current in self.runs else None
                if letter["run_id"] in chain:
                    cp = self.ledger.checkpoint(run.ref.run_id, letter["step_key"])
                    completed_later |= cp is not None and cp.status in ("completed", "compensated")
            assert (letter["status"] == "resolved") == completed_later, letter


def test_lifecycle_model(ledger_url: str) -> None:
    """Random sequences of runs, steps, crashes, failures with compensation, retries of
    any run of a chain and cleared tasks keep every promise of the lifecycle (see the
    module docstring), on SQLite and on Postgres."""
    Lifecycle.url = ledger_url
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        Lifecycle,
        settings=settings(
            max_examples=20,
            stateful_step_count=20,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
