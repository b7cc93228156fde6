"""Model-based test of the run lifecycle where features meet (SQLite and Postgres).

Hypothesis drives random sequences of what happens to checkout runs — start a run,
run its next step, crash in the middle of a step, fail late and compensate, retry any
run of a chain through the retry route (plain, ``--from`` a step, with new params that
fix the cause or change a step's inputs, again and again, an older run of the chain),
clear a task of an ended run, approve or reject a parked run's request (and try to
decide it a second time) — through the same functions the Airflow tasks, the retry route
and the approval page call, against a small reference model. It runs on the demo's
checkout and on ``approved_checkout`` (the same checkout with a manager's sign-off
between the reservation and the charge; a reject fails the run). After every operation
it checks the promises:

* each business effect is live at most once per order (one captured payment, one
  reserved reservation, one booked shipment);
* a succeeded run's effects are all live (nothing another run's saga undid);
* every ended run's saga says what happened: failed with something undone →
  ``compensated``; failed with nothing undone → ``nothing_to_compensate``; succeeded →
  no saga;
* the ledger and "Airflow" (the model's run states) agree on every run's status;
* a dead letter is open exactly when its step has not completed since, in its run or a
  retry of it;
* an approval step completes only on an approve of a request that showed this run's own
  inputs (the amount and order in its payload): never on another run's decision about
  different inputs; a run is parked exactly while its request is pending; a decision is
  taken once (a second one is refused and changes nothing);
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
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.retries import RetryRefused, plan_retry, record_retry
from ledgerflow.spec.models import ApprovalStep, WorkflowSpec
from ledgerflow.steps.approval import ask
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.saga import NothingToUndo, compensate_step, finish_saga, saga_started
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
APPROVAL_DAGS = Path(__file__).resolve().parent / "dags"
ORDERS = ["o-1", "o-2"]
POINTS = ["before_effect", "after_effect", "before_commit", "after_commit"]
_fresh = itertools.count()


class Run:
    """The model of one run: what Airflow would know about it."""

    def __init__(
        self,
        spec: WorkflowSpec,
        run_id: str,
        order: str,
        fail: bool,
        retry_of: str | None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec
        self.ref = RunRef(run_id=run_id, dag_id=spec.dag_id, retry_of=retry_of)
        self.order = order
        self.fail = fail
        self.overrides = dict(overrides or {})  # params other than the defaults
        self.cleared = False  # the carrier accepts now (a failed task was cleared)
        self.clears = 0
        self.next = 0  # index into the workflow's steps
        self.status = "running"
        self.parked: int | None = None  # the pending approval it waits on
        self.tries: dict[str, int] = {}

    @property
    def params(self) -> dict[str, Any]:
        return {
            **{n: p.default for n, p in self.spec.params.items()},
            **self.overrides,
            "order_id": self.order,
            "fail_shipment": self.fail and not self.cleared,
        }


class Lifecycle(RuleBasedStateMachine):
    url: str = ""
    dags: Path = DAGS
    clears: int | None = None  # how often one run's failed task may be cleared
    examples, steps = 20, 20  # Hypothesis: sequences, and operations in each
    postgres_examples = 20  # the same machine on Postgres (each operation costs more there)
    spec: WorkflowSpec = load_workflow(DAGS / "workflows" / "checkout" / "v1.yaml")

    @property
    def forward(self) -> list[str]:
        return [s.id for s in self.spec.steps]

    @property
    def compensable(self) -> list[str]:
        """The steps a saga undoes, in its (reverse) order."""
        return [s.id for s in reversed(self.spec.steps) if getattr(s, "compensate", None)]

    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(self.url)
        self.ledger.migrate()
        with self.ledger.begin() as conn:
            for table in (
                "lf_events", "lf_dead_letters", "lf_compensations", "lf_effects",
                "lf_approval_decisions", "lf_approvals",
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
        run = Run(
            self.spec, f"{self.spec.dag_id}/m{next(_fresh)}", order, fail, retry_of, overrides
        )
        self.runs[run.ref.run_id] = run
        return run

    @rule(order=st.sampled_from(ORDERS), fail=st.booleans())
    def start(self, order: str, fail: bool) -> None:
        self._new(order, fail)

    def _running(self) -> list[Run]:
        """Runs with a task to run (not parked on an approval)."""
        return [r for r in self.runs.values() if r.status == "running" and r.parked is None]

    def _step(self, run: Run) -> None:
        step_id = self.forward[run.next]
        run.tries[step_id] = run.tries.get(step_id, 0) + 1
        step = self.spec.step(step_id)
        if isinstance(step, ApprovalStep):
            self._ask(run, step)
            return
        try:
            execute_step(
                self.ledger,
                self.spec,
                self.spec.tool_step(step_id),
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
        self._advance(run)

    def _advance(self, run: Run) -> None:
        run.next += 1
        if run.next == len(self.forward):
            run.status = "succeeded"
            self.ledger.finish_run(run.ref.run_id, "succeeded")

    def _ask(self, run: Run, step: ApprovalStep) -> None:
        """The approval task's ``execute`` (``ApprovalOperator``): a decision reused from
        the chain lets the run go on; a pending request parks it (the task defers); a
        request decided already (a cleared task) ends the task as ``resume`` does."""
        try:
            asked = ask(
                self.ledger,
                self.spec,
                step,
                run.ref,
                params=run.params,
                try_number=run.tries[step.id],
            )
        except InjectedFault:
            raise
        except Exception:  # e.g. its upstream was undone: the task fails
            self._fail(run, step.id)
            return
        if asked.reused is not None:
            assert asked.reused["approved"], (run.ref.run_id, asked.reused)
            self._advance(run)
        elif asked.approval.pending:
            run.parked = asked.approval.id
        else:
            self._decided(run, asked.approval)

    def _decided(self, run: Run, approval: approvals.Approval) -> None:
        """``ApprovalOperator._complete``: a reject without a branch fails the step (and
        the run, through its failure callback); an approve completes it."""
        run.parked = None
        if approval.fails_step:
            approvals.fail(self.ledger, approval.id, "model")
            self._fail(run, approval.step_key)
        else:
            approvals.complete(self.ledger, approval.id, "model")
            self._advance(run)

    def _fail(self, run: Run, step_id: str) -> None:
        """The failure callback, the compensation tasks in reverse, saga__finish, and the
        DAG's end-of-run callback, in Airflow's order."""
        saga_started(self.ledger, self.spec, run.ref.run_id, step_id)
        for i, undo in enumerate(self.compensable):
            with contextlib.suppress(NothingToUndo):
                compensate_step(
                    self.ledger, self.spec, run.ref, undo, params=run.params, first=i == 0
                )
        finish_saga(self.ledger, run.ref.run_id)
        run.status = "failed"
        self.ledger.finish_run(run.ref.run_id, "failed")

    @precondition(lambda self: self._running())
    @rule(data=st.data())
    def next_step(self, data: st.DataObject) -> None:
        self._step(data.draw(st.sampled_from(self._running())))

    def _at_a_tool_step(self) -> list[Run]:
        return [
            r
            for r in self._running()
            if not isinstance(self.spec.step(self.forward[r.next]), ApprovalStep)
        ]

    @precondition(lambda self: self._at_a_tool_step())
    @rule(data=st.data(), point=st.sampled_from(POINTS))
    def crash_then_retry_the_task(self, data: st.DataObject, point: str) -> None:
        """A crash at a commit point, then Airflow's next try of the same task (an
        approval task has no next try: the contract suite crashes it at each point)."""
        run = data.draw(st.sampled_from(self._at_a_tool_step()))
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
        fix=st.booleans(),
        amount=st.sampled_from([None, 25.0, 40.0]),
        address=st.sampled_from([None, "2 Side Street"]),
    )
    def retry(
        self,
        data: st.DataObject,
        fix: bool,
        amount: float | None,
        address: str | None,
    ) -> None:
        """A retry request for any ended run, through the retry route's own functions
        (``plan_retry`` then ``record_retry``): plain or ``--from`` a step, with params
        that fix the cause (``fail_shipment=false``) or change a step's inputs (the
        amount charged, the address shipped to)."""
        source = data.draw(st.sampled_from(self._ended()))
        from_step = data.draw(st.sampled_from([None, *self.forward]), label="from_step")
        overrides: dict[str, Any] = {}
        if fix:
            overrides["fail_shipment"] = False
        if amount is not None:
            overrides["amount"] = amount
        if address is not None:
            overrides["address"] = address
        allowed = self._may_retry(source, from_step)
        try:
            plan = plan_retry(
                self.ledger, source.ref.run_id, from_step, self.dags, params=overrides
            )
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

    def _clearable(self) -> list[Run]:
        return [r for r in self._failed() if self.clears is None or r.clears < self.clears]

    @precondition(lambda self: self._clearable())
    @rule(data=st.data())
    def clear_the_failed_task(self, data: st.DataObject) -> None:
        """An operator clears the failed task of a failed run in Airflow (the carrier
        accepts now): the run runs on from that step."""
        run = data.draw(st.sampled_from(self._clearable()))
        run.clears += 1
        run.status = "running"
        run.cleared = True
        self._step(run)

    def _parked(self) -> list[Run]:
        return [r for r in self.runs.values() if r.parked is not None]

    @precondition(lambda self: self._parked())
    @rule(data=st.data(), approve=st.booleans())
    def decide(self, data: st.DataObject, approve: bool) -> None:
        """The manager decides on the approval page (``approvals.decide`` with the hash
        of the payload shown); the task resumes and ends as the decision says."""
        run = data.draw(st.sampled_from(self._parked()))
        assert run.parked is not None
        shown = approvals.get(self.ledger, run.parked)
        decided = approvals.decide(
            self.ledger,
            shown.id,
            decision="approved" if approve else "rejected",
            by="manager",
            seen_hash=shown.payload_hash,
        )
        self._decided(run, decided)

    @precondition(lambda self: self._decisions())
    @rule(data=st.data(), approve=st.booleans())
    def decide_again(self, data: st.DataObject, approve: bool) -> None:
        """A second decision (another tab, a replayed request) is refused and changes
        nothing: not the decision, not the step, not the run."""
        before = data.draw(st.sampled_from(self._decisions()))
        with pytest.raises(approvals.ApprovalConflict):
            approvals.decide(
                self.ledger,
                before.id,
                decision="approved" if approve else "rejected",
                by="someone else",
            )
        after = approvals.get(self.ledger, before.id)
        assert (after.status, after.decided_by) == (before.status, before.decided_by)

    def _decisions(self) -> list[approvals.Approval]:
        rows = self._rows("SELECT id FROM lf_approvals WHERE status != 'pending' ORDER BY id")
        return [approvals.get(self.ledger, i) for (i,) in rows]

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
    def approvals_hold_for_the_inputs_they_showed(self) -> None:
        approval_steps = [s.id for s in self.spec.steps if isinstance(s, ApprovalStep)]
        pending = {
            run_id
            for (run_id,) in self._rows("SELECT run_id FROM lf_approvals WHERE status = 'pending'")
        }
        assert pending == {r.ref.run_id for r in self._parked()}, pending
        for run in self.runs.values():
            for step_id in approval_steps:
                cp = self.ledger.checkpoint(run.ref.run_id, step_id)
                if cp is None or cp.status != "completed":
                    continue
                output = cp.output or {}
                decision = approvals.get(self.ledger, output["approval_id"])
                assert decision.status == "approved" and output["approved"], run.ref.run_id
                shown = decision.payload
                assert shown["order_id"] == run.order, (run.ref.run_id, shown)
                assert float(shown["amount"]) == float(run.params["amount"]), (
                    f"{run.ref.run_id} charges {run.params['amount']} on an approval of {shown}"
                )
                assert output["payload_hash"] == decision.payload_hash

    @invariant()
    def dead_letters_are_open_exactly_while_unfixed(self) -> None:
        for letter in self.ledger.dead_letters(status=None):
            completed_later = False
            for run in self.runs.values():
                chain: set[str] = set()
                current: str | None = run.ref.run_id
                while current is not None and current not in chain:
                    chain.add(current)
                    current = self.runs[current].ref.retry_of if current in self.runs else None
                if letter["run_id"] in chain:
                    cp = self.ledger.checkpoint(run.ref.run_id, letter["step_key"])
                    completed_later |= cp is not None and cp.status in ("completed", "compensated")
            assert (letter["status"] == "resolved") == completed_later, letter


class ApprovedLifecycle(Lifecycle):
    # Once per run: clearing a rejected approval again and again (each time refused, as
    # its upstream was undone) would crowd out the retries that reuse decisions.
    clears = 1
    # Longer sequences: a decision reused by a retry needs a run approved, failed later
    # and retried before the sequence ends.
    # Postgres runs half as many: the SQLite run explores, the Postgres run proves the
    # same promises on the other dialect (its 40 took 96 s of a parallel CI run).
    examples, steps, postgres_examples = 40, 40, 20
    dags = APPROVAL_DAGS
    spec = load_workflow(APPROVAL_DAGS / "workflows" / "approved_checkout" / "v1.yaml")


@pytest.mark.parametrize("machine", [Lifecycle, ApprovedLifecycle], ids=["checkout", "approved"])
def test_lifecycle_model(ledger_url: str, machine: type[Lifecycle]) -> None:
    """Random sequences of runs, steps, crashes, failures with compensation, retries of
    any run of a chain, cleared tasks and decisions keep every promise of the lifecycle
    (see the module docstring), on SQLite and on Postgres."""
    machine.url = ledger_url
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=(
                machine.postgres_examples if ledger_url.startswith("postgres") else machine.examples
            ),
            stateful_step_count=machine.steps,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        ),
    )
