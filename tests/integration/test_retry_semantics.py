"""Retry semantics of issue 10 at the ledger and kernel level, on SQLite and Postgres.

A retry run is made the way ``retries.start_retry`` makes it, without Airflow:
``plan_retry`` then ``record_retry`` (the ledger's row with ``retry_of``, the reused
checkpoints, the events), then its steps through the kernel (``execute_step``) with a
``RunRef`` that claims no chain: the chain is the ledger's row.

* finding 1: a chain continued by a succeeded (or running) retry is not retried again,
  and two racing requests create one retry;
* only the newest failed run of a chain is retried;
* finding 6: a retry may override params; the steps whose inputs change run again;
* finding 8: a retry chain never crosses workflows, and only the ledger's rows make a chain;
* a compensated checkpoint is never reused, even when an older run of the chain has the
  same step completed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.ledger import chains
from ledgerflow.ledger.store import Ledger
from ledgerflow.retries import RetryPlan, RetryRefused, plan_retry, record_retry
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.spec.params import InvalidParams
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.tools.demo import BlockedByFlag
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

DAG = "retry_params__v1"
STEPS = ["greet", "charge", "notify", "gate"]
WORKFLOW = """\
name: retry_params
version: 1
description: Four steps; charge reads params.amount; gate fails while a flag file exists.
params:
  ref: {type: string, required: true}
  amount: {type: integer, default: 10}
  flag: {type: string, default: ""}
steps:
  - id: greet
    tool: demo.send_email
    args: {to: "{{ params.ref }}", subject: greet, body: "{{ run.id }}"}
    idempotency: {key: "{{ run.id }}"}
  - id: charge
    needs: [greet]
    tool: demo.send_email
    args: {to: "{{ params.ref }}", subject: charge, body: "amount {{ params.amount }}"}
    idempotency: {key: "{{ run.id }}"}
  - id: notify
    needs: [charge]
    tool: demo.send_email
    args: {to: "{{ params.ref }}", subject: notify, body: "after {{ steps.charge.output.email_id }}"}
    idempotency: {key: "{{ run.id }}"}
  - id: gate
    needs: [notify]
    tool: demo.fail_while
    args: {flag: "{{ params.flag }}", value: "{{ steps.notify.output.email_id }}"}
    retry: {max_attempts: 1}
"""


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


@pytest.fixture
def dags(tmp_path: Path) -> Path:
    folder = tmp_path / "dags" / "workflows" / "retry_params"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(WORKFLOW, encoding="utf-8")
    return tmp_path / "dags"


@pytest.fixture
def spec(dags: Path) -> WorkflowSpec:
    return load_workflow(dags / "workflows" / "retry_params" / "v1.yaml")


@pytest.fixture
def flag(tmp_path: Path) -> Path:
    """The file that makes ``gate`` fail while it exists (created broken)."""
    path = tmp_path / "gate-broken"
    path.touch()
    return path


def run_steps(
    ledger: Ledger, spec: WorkflowSpec, run_id: str, params: dict[str, Any]
) -> dict[str, str]:
    """Run the steps in order like the DAG does, stopping at the first failure; the run's
    final status goes to the ledger as the DAG's callback would write it."""
    run = RunRef(run_id=run_id, dag_id=DAG)
    statuses: dict[str, str] = {}
    for step_id in STEPS:
        try:
            result = execute_step(ledger, spec, spec.tool_step(step_id), run, params=params)
        except BlockedByFlag:
            statuses[step_id] = "failed"
            ledger.finish_run(run_id, "failed")
            return statuses
        statuses[step_id] = result.status
    ledger.finish_run(run_id, "succeeded")
    return statuses


def failed_run(ledger: Ledger, spec: WorkflowSpec, name: str, flag: Path) -> str:
    run_id = f"{DAG}/{name}"
    params = {"ref": "r", "amount": 10, "flag": str(flag)}  # Airflow's, defaults included
    assert run_steps(ledger, spec, run_id, params)["gate"] == "failed"
    return run_id


def retry(
    ledger: Ledger,
    dags: Path,
    run_id: str,
    name: str,
    *,
    params: dict[str, Any] | None = None,
    state_of: Callable[[str, str], str | None] | None = None,
) -> tuple[RetryPlan, str]:
    """What ``start_retry`` does in the ledger, before Airflow creates the DagRun."""
    plan = plan_retry(ledger, run_id, dags_folder=dags, state_of=state_of, params=params)
    new_run = f"{DAG}/{name}"
    record_retry(ledger, plan, new_run, user="tester", via="cli", state_of=state_of)
    return plan, new_run


def emails(ledger: Ledger, subject: str) -> list[str]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT body FROM demo_emails WHERE subject = :s ORDER BY id"), {"s": subject}
        )
        return [r.body for r in rows]


def events(ledger: Ledger, run_id: str, kind: str) -> list[Any]:
    return [e["data"] for e in ledger.events(run_id) if e["kind"] == kind]


def test_a_run_whose_retry_succeeded_is_not_retried_again(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """Finding 1: A failed, its retry B succeeded. Retrying A again is refused
    (``continued``, 409) naming B, and nothing is recorded or performed: a second
    continuation would perform every step of the business transaction again. A plan made
    before B existed is refused as well when it is recorded."""
    a = failed_run(ledger, spec, "a", flag)
    stale_plan = plan_retry(ledger, a, dags_folder=dags)
    flag.unlink()
    _plan, b = retry(ledger, dags, a, "b")
    assert run_steps(ledger, spec, b, _plan.params)["gate"] == "completed"
    sent = len(emails(ledger, "greet")) + len(emails(ledger, "charge"))

    with pytest.raises(RetryRefused) as refused:
        plan_retry(ledger, a, dags_folder=dags)
    assert (refused.value.reason, refused.value.http_status) == ("continued", 409)
    assert refused.value.run_id == b and b in str(refused.value)
    with pytest.raises(RetryRefused) as late:
        record_retry(ledger, stale_plan, f"{DAG}/c")
    assert late.value.reason == "continued" and late.value.run_id == b
    assert ledger.run(f"{DAG}/c") is None
    assert [r["run_id"] for r in ledger.retries_of(a)] == [b]
    assert len(emails(ledger, "greet")) + len(emails(ledger, "charge")) == sent
    # B itself succeeded: it is retried only with --from.
    with pytest.raises(RetryRefused) as done:
        plan_retry(ledger, b, dags_folder=dags)
    assert done.value.reason == "succeeded"
    assert plan_retry(ledger, b, "charge", dags_folder=dags).rerun == ["charge", "notify", "gate"]


def test_a_run_with_a_live_retry_is_not_retried_and_airflow_state_decides(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """A retry still running (the ledger says so, or Airflow says queued/running while
    the ledger has not caught up) continues the chain: retrying the original is refused
    naming it; once Airflow says the retry succeeded, it is still refused (continued)."""
    a = failed_run(ledger, spec, "a", flag)
    _plan, b = retry(ledger, dags, a, "b")
    with pytest.raises(RetryRefused) as live:
        plan_retry(ledger, a, dags_folder=dags)
    assert live.value.reason == "continued" and live.value.run_id == b
    assert "(running)" in str(live.value)

    ledger.finish_run(b, "failed")  # the ledger says failed, Airflow says success
    airflow = {b.split("/", 1)[1]: "success"}.get

    def state_of(dag_id: str, dag_run_id: str) -> str | None:
        return airflow(dag_run_id)

    with pytest.raises(RetryRefused) as done:
        plan_retry(ledger, a, dags_folder=dags, state_of=state_of)
    assert done.value.reason == "continued" and "(succeeded)" in str(done.value)


def test_only_the_newest_failed_run_of_a_chain_is_retried(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """A failed, its retry B failed too: retrying A is refused (``not_newest``, 409)
    naming B, the run to retry; retrying B is accepted and reuses what A completed."""
    a = failed_run(ledger, spec, "a", flag)
    plan, b = retry(ledger, dags, a, "b")
    assert run_steps(ledger, spec, b, plan.params)["gate"] == "failed"
    with pytest.raises(RetryRefused) as refused:
        plan_retry(ledger, a, dags_folder=dags)
    assert (refused.value.reason, refused.value.http_status) == ("not_newest", 409)
    assert refused.value.run_id == b and f"retry {b} instead" in str(refused.value)
    again = plan_retry(ledger, b, dags_folder=dags)
    assert again.reused == {"greet": b, "charge": b, "notify": b}


def test_a_retry_airflow_refused_to_create_does_not_stand_in_the_way(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """When Airflow refuses to create the DagRun of a recorded retry, ``start_retry``
    marks that run failed with a ``retry_not_started`` event: it never ran, so the
    original may be retried again (it is not "not the newest failed run")."""
    a = failed_run(ledger, spec, "a", flag)
    _plan, b = retry(ledger, dags, a, "b")
    ledger.finish_run(b, "failed")
    ledger.record_event(b, None, "retry_not_started", {"error": "no such DAG"})
    again = plan_retry(ledger, a, dags_folder=dags)
    assert again.reused == {"greet": a, "charge": a, "notify": a}


def test_two_racing_retries_of_one_run_create_one(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """Two requests to retry the same failed run, both planned before either writes:
    the chain is checked again under a lock in the transaction that writes the run, so
    exactly one retry run exists and the other request is refused naming it."""
    a = failed_run(ledger, spec, "a", flag)
    plans = [plan_retry(ledger, a, dags_folder=dags) for _ in range(2)]
    barrier = threading.Barrier(2)
    outcomes: dict[int, Any] = {}

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            record_retry(ledger, plans[n], f"{DAG}/race-{n}")
            outcomes[n] = "created"
        except RetryRefused as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(str(o) == "created" for o in outcomes.values()) == [False, True]
    (winner,) = [f"{DAG}/race-{n}" for n, o in outcomes.items() if o == "created"]
    (loser,) = [o for o in outcomes.values() if o != "created"]
    assert loser.reason == "continued" and loser.run_id == winner
    assert [r["run_id"] for r in ledger.retries_of(a)] == [winner]


def test_a_retry_with_new_params_reruns_the_steps_whose_inputs_changed(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """Finding 6: a run failed with amount 10; its retry overrides amount to 20. The
    override is checked and recorded (the run's params, ``run_started`` and
    ``retried_by``); greet (which does not read amount) is reused, charge runs again with
    amount 20, notify (which reads charge's new output) runs again, gate runs."""
    a = failed_run(ledger, spec, "a", flag)
    flag.unlink()
    plan, b = retry(ledger, dags, a, "b", params={"amount": 20})
    assert plan.reused == {"greet": a}
    assert plan.rerun == ["charge", "gate"] and plan.reused_in_task == {"notify": a}
    assert (ledger.run(b) or {})["params"] == {"ref": "r", "amount": 20, "flag": str(flag)}
    assert events(ledger, b, "run_started")[0]["params"] == {"amount": 20}
    assert events(ledger, a, "retried_by")[0]["params"] == {"amount": 20}

    statuses = run_steps(ledger, spec, b, plan.params)
    assert statuses == {
        "greet": "reused",
        "charge": "completed",
        "notify": "completed",
        "gate": "completed",
    }
    assert emails(ledger, "charge") == ["amount 10", "amount 20"]
    assert len(emails(ledger, "greet")) == 1 and len(emails(ledger, "notify")) == 2
    charge = ledger.outputs(b)["charge"]["output"]
    assert emails(ledger, "notify")[-1] == f"after {charge['email_id']}"


def test_retry_params_are_checked_against_the_schema(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """Overridden params that do not fit the workflow's params schema are refused naming
    each field (an engine key included), and no run is recorded."""
    a = failed_run(ledger, spec, "a", flag)
    with pytest.raises(InvalidParams) as bad:
        plan_retry(
            ledger,
            a,
            dags_folder=dags,
            params={"amount": "lots", "colour": "red", "ledgerflow_retry_of": a},
        )
    assert {p.field for p in bad.value.problems} == {"amount", "colour", "ledgerflow_retry_of"}
    assert ledger.retries_of(a) == []


def test_a_retry_keeps_reusing_when_params_are_unchanged(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """Overriding a param with its current value changes no input: every completed step
    (greet's args hold the run's own id, which is not an input) is reused; a chain of
    two retries compares with the args the copies carry."""
    a = failed_run(ledger, spec, "a", flag)
    plan, b = retry(ledger, dags, a, "b", params={"amount": 10})
    assert plan.reused == {"greet": a, "charge": a, "notify": a}
    assert run_steps(ledger, spec, b, plan.params)["gate"] == "failed"
    again, _c = retry(ledger, dags, b, "c")
    assert again.reused == {"greet": b, "charge": b, "notify": b}


def _foreign_run(ledger: Ledger, run_id: str, dag_id: str, workflow: str) -> None:
    """A run of another workflow (or DAG) whose step ``greet`` completed."""
    ledger.ensure_run(
        run_id=run_id,
        dag_id=dag_id,
        workflow=workflow,
        version=1,
        params={"ref": "victim"},
        trigger_kind="manual",
    )
    attempt = ledger.begin_attempt(
        run_id=run_id,
        step_key="greet",
        step_id="greet",
        map_index=-1,
        try_number=1,
        args={"to": "victim"},
        idempotency_key=f"{run_id}:greet",
    )
    with ledger.begin() as conn:
        ledger.complete_step(
            conn,
            run_id=run_id,
            step_key="greet",
            attempt_id=attempt,
            output={"email_id": 999},
            reused=False,
        )
    ledger.finish_run(run_id, "failed")


@pytest.mark.parametrize(
    ("dag_id", "workflow"),
    [("other__v1", "other"), ("retry_params__v2", "retry_params")],
    ids=["another-workflow", "another-version"],
)
def test_retry_chain_never_reaches_a_run_of_another_workflow(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path, dag_id: str, workflow: str
) -> None:
    """Finding 8: a run whose ledger row says ``retry_of`` a run of another workflow (or
    another DAG of the same workflow) reuses nothing of it: ``find_reusable`` and the
    plan refuse that source, ``chain`` stops before it, and the step performs its own
    effect."""
    victim = f"{dag_id}/victim"
    _foreign_run(ledger, victim, dag_id, workflow)
    forged = f"{DAG}/forged"
    ledger.ensure_run(
        run_id=forged,
        dag_id=DAG,
        workflow="retry_params",
        version=1,
        params={"ref": "r", "amount": 10, "flag": str(flag)},
        trigger_kind="manual",
        retry_of=victim,
    )
    with ledger.engine.connect() as conn:
        found = chains.find_reusable(
            conn, spec, retry_of=victim, retry_from=None, step_key="greet", step_id="greet"
        )
    assert found is None
    assert [r["run_id"] for r in chains.chain(ledger, forged)] == [forged]
    statuses = run_steps(ledger, spec, forged, {"ref": "r", "amount": 10, "flag": str(flag)})
    assert statuses["greet"] == "completed"
    assert ledger.outputs(forged)["greet"]["output"] != {"email_id": 999}
    plan = plan_retry(ledger, forged, dags_folder=dags)
    assert set(plan.reused.values()) == {forged}
    assert [r["run_id"] for r in plan.chain] == [forged]


def test_params_of_a_run_cannot_claim_a_chain(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """Finding 8: a run triggered with ``ledgerflow_retry_of``/``ledgerflow_retry_from`` in
    its conf (recorded among its params) has no chain: its retry's plan follows only the
    ledger's rows, and the retry run's params carry none of those engine keys."""
    victim = failed_run(ledger, spec, "victim", flag)
    claimed = {
        "ref": "r",
        "amount": 10,
        "flag": str(flag),
        "ledgerflow_retry_of": victim,
        "ledgerflow_retry_from": "gate",
    }
    run = f"{DAG}/claims"
    assert run_steps(ledger, spec, run, claimed)["gate"] == "failed"
    assert (ledger.run(run) or {})["retry_of"] is None
    plan, b = retry(ledger, dags, run, "b")
    assert [r["run_id"] for r in plan.chain] == [run]
    assert set(plan.reused.values()) == {run}
    assert plan.params == {"ref": "r", "amount": 10, "flag": str(flag)}
    assert (ledger.run(b) or {})["params"] == plan.params


def test_a_compensated_checkpoint_is_never_reused(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, flag: Path
) -> None:
    """B (a retry of A) reused A's charge, failed, and its saga undid that charge (B's
    checkpoint ``compensated``). C, retrying B, must run charge again: it may not skip
    over B's compensated checkpoint to A's completed one."""
    a = failed_run(ledger, spec, "a", flag)
    plan, b = retry(ledger, dags, a, "b")
    assert run_steps(ledger, spec, b, plan.params)["gate"] == "failed"
    with ledger.begin() as conn:  # what the saga leaves: the step's effect undone
        conn.execute(
            text(
                "UPDATE lf_steps SET status = 'compensated' "
                "WHERE run_id = :r AND step_key = 'charge'"
            ),
            {"r": b},
        )
    again = plan_retry(ledger, b, dags_folder=dags)
    assert "charge" in again.rerun and "charge" not in again.reused
    assert again.reused == {"greet": b}
    with ledger.engine.connect() as conn:
        assert (
            chains.find_reusable(
                conn, spec, retry_of=b, retry_from=None, step_key="charge", step_id="charge"
            )
            is None
        )


APPROVAL = """\
name: approve_params
version: 1
params:
  amount: {type: integer, default: 10}
  flag: {type: string, default: ""}
steps:
  - id: ok
    kind: approval
    subject: "Refund {{ params.amount }} EUR?"
    approvers: {users: [manager]}
    deadline: 1h
  - id: gate
    needs: [ok]
    tool: demo.fail_while
    args: {flag: "{{ params.flag }}"}
    retry: {max_attempts: 1}
"""


@pytest.mark.parametrize(("amount", "asked_again"), [(10, False), (99, True)])
def test_a_retry_asks_an_approval_again_only_when_what_it_shows_changes(
    ledger: Ledger, tmp_path: Path, flag: Path, amount: int, asked_again: bool
) -> None:
    """An approval's inputs are what the approver is shown: a retry whose params render
    the same subject reuses the decision; one that changes the amount the approver
    agreed to asks again (a new, pending request in the retry run)."""
    from ledgerflow.ledger import approvals
    from ledgerflow.steps.approval import ask

    folder = tmp_path / "adags" / "workflows" / "approve_params"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(APPROVAL, encoding="utf-8")
    spec = load_workflow(folder / "v1.yaml")
    step = spec.step("ok")
    first = RunRef(run_id="approve_params__v1/a", dag_id="approve_params__v1")
    params = {"amount": 10, "flag": str(flag)}
    request = ask(ledger, spec, step, first, params=params).approval
    approvals.decide(ledger, request.id, decision="approved", by="manager")
    approvals.complete(ledger, request.id, "test")
    with pytest.raises(BlockedByFlag):
        execute_step(ledger, spec, spec.tool_step("gate"), first, params=params, max_attempts=1)
    ledger.finish_run(first.run_id, "failed")

    plan = plan_retry(
        ledger, first.run_id, dags_folder=tmp_path / "adags", params={"amount": amount}
    )
    record_retry(ledger, plan, "approve_params__v1/b", user="tester", via="cli")
    again = RunRef(run_id="approve_params__v1/b", dag_id="approve_params__v1")
    asked = ask(ledger, spec, step, again, params={**params, "amount": amount})
    if asked_again:
        assert asked.reused is None and asked.approval.pending
        assert asked.approval.subject == "Refund 99 EUR?"
    else:
        assert asked.approval is None and asked.reused is not None
        assert asked.reused["decision"] == "approved"
