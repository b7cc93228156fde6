"""Quorum approvals on real Postgres: concurrent decisions make exactly one quorum, a
decision short of it does not wake the parked trigger (no NOTIFY) and the one that
makes it does, the REST decision API as different users, and a retry run reusing a
quorum that approved."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledgerflow.api import create_app
from ledgerflow.api._auth import Caller, current_user
from ledgerflow.ledger import approvals, quorum
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.triggers.approval import ApprovalTrigger

pytestmark = pytest.mark.integration

NO_POLL = 3600.0  # only a NOTIFY can wake a trigger within these tests


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    with fresh_database("quorum_lf") as url, pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_QUORUM_LEDGER", url)
        ledger = Ledger.from_airflow("quorum_ledger")
        ledger.migrate()
        yield ledger
        ledger.engine.dispose()


def request(
    ledger: Ledger, run: str, users: list[str], required: int, **kw: Any
) -> approvals.Approval:
    approval, created = approvals.request(
        ledger,
        run_id=f"wf__v1/{run}",
        step_key="ask",
        dag_id="wf__v1",
        task_id="ask",
        workflow="wf",
        version=1,
        subject=f"Approve {run}?",
        body="",
        payload={"run": run},
        approvers={"users": users, "roles": []},
        deadline=now() + timedelta(hours=1),
        at_deadline="reject",
        required=required,
        **kw,
    )
    assert created
    return approval


def test_concurrent_decisions_make_exactly_one_quorum(ledger: Ledger) -> None:
    """20 approvers of a 10-of-20 approve at once: 9 are recorded short of the quorum, one
    makes it, 10 are late; never a quorum met and left pending, never two decisions."""
    users = [f"u{n}" for n in range(20)]
    approval = request(ledger, "race", users, 10)
    barrier = threading.Barrier(20)
    outcomes: list[str] = []

    def attempt(user: str) -> None:
        barrier.wait()
        try:
            got = approvals.decide(ledger, approval.id, decision="approved", by=user)
            outcomes.append(got.status)
        except approvals.ApprovalConflict:
            outcomes.append("late")

    threads = [threading.Thread(target=attempt, args=(u,)) for u in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["approved"] + ["late"] * 10 + ["pending"] * 9
    rows = quorum.decisions(ledger, approval.id)
    assert len(rows) == 10 and len({d.by for d in rows}) == 10
    kinds = [e["kind"] for e in ledger.events("wf__v1/race")]
    assert kinds.count("approval_decided") == 1 and kinds.count("approval_partial") == 9
    stored = approvals.get(ledger, approval.id)
    assert stored.status == "approved" and stored.decided_by == rows[-1].by


def test_the_same_person_at_once_counts_once(ledger: Ledger) -> None:
    """One person's two concurrent decisions (two tabs): one is recorded."""
    approval = request(ledger, "twice", ["ann", "bob", "cy"], 2)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def attempt() -> None:
        barrier.wait()
        try:
            outcomes.append(
                approvals.decide(ledger, approval.id, decision="approved", by="ann").status
            )
        except approvals.ApprovalConflict as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["DecidedBefore", "pending"]
    assert [d.by for d in quorum.decisions(ledger, approval.id)] == ["ann"]


def test_a_partial_decision_does_not_wake_the_parked_trigger(ledger: Ledger) -> None:
    """The trigger waits on NOTIFY (its poll an hour away): the first of two approvals
    leaves it parked; the second wakes it at once with the decision."""
    approval = request(ledger, "parked", ["ann", "bob", "cy"], 2)

    async def scenario() -> tuple[bool, dict[str, Any]]:
        trigger = ApprovalTrigger(approval.id, ledger.conn_id, poll_interval=NO_POLL)

        async def first() -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise AssertionError("no event")

        task = asyncio.create_task(first())
        await asyncio.sleep(1.0)  # the listener is connected
        await asyncio.to_thread(
            approvals.decide, ledger, approval.id, decision="approved", by="bob"
        )
        await asyncio.sleep(1.5)
        parked = not task.done()
        await asyncio.to_thread(approvals.decide, ledger, approval.id, decision="approved", by="cy")
        return parked, await asyncio.wait_for(task, timeout=20)

    parked, event = asyncio.run(scenario())
    assert parked
    assert event == {"approval_id": approval.id, "status": "approved", "decided_by": "cy"}


def call(ledger: Ledger, user: str, method: str, path: str, **kw: Any) -> httpx.Response:
    app = create_app(ledger)
    app.dependency_overrides[current_user] = lambda: Caller(
        user, frozenset({"User"}), dags=frozenset({"wf__v1"})
    )

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, f"/api{path}", **kw)

    return asyncio.run(go())


def test_the_decision_api_as_different_users(ledger: Ledger) -> None:
    """2-of-3 through POST /api/approvals/{id}/decision: ann approves (pending, 1 of 2),
    ann again is 409, dave (not an approver) is 403, cy rejects: rejected, and GET shows
    both decisions with what each saw."""
    approval = request(ledger, "api", ["ann", "bob", "cy"], 2)
    decision = f"/approvals/{approval.id}/decision"
    first = call(ledger, "ann", "POST", decision, json={"decision": "approve", "comment": "ok", "seen_hash": approval.payload_hash})  # fmt: skip
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["status"], body["approvals"], body["required"]) == ("pending", 1, 2)
    assert body["may_decide"] is False  # ann decided
    assert call(ledger, "bob", "GET", f"/approvals/{approval.id}").json()["may_decide"] is True
    listed = call(ledger, "bob", "GET", "/approvals").json()["approvals"]
    assert [(a["id"], a["approvals"]) for a in listed if a["id"] == approval.id] == [
        (approval.id, 1)
    ]
    again = call(ledger, "ann", "POST", decision, json={"decision": "reject"})
    assert again.status_code == 409 and "ann already decided" in again.json()["detail"]
    assert call(ledger, "dave", "POST", decision, json={"decision": "approve"}).status_code == 403
    last = call(ledger, "cy", "POST", decision, json={"decision": "reject", "comment": "no"})
    assert last.status_code == 200, last.text
    done = call(ledger, "bob", "GET", f"/approvals/{approval.id}").json()
    assert (done["status"], done["decided_by"], done["approvals"]) == ("rejected", "cy", 1)
    assert [(d["by"], d["decision"], d["comment"]) for d in done["decisions"]] == [
        ("ann", "approved", "ok"),
        ("cy", "rejected", "no"),
    ]
    assert all(d["seen"]["payload"] == {"run": "api"} for d in done["decisions"])
    late = call(ledger, "bob", "POST", decision, json={"decision": "approve"})
    assert late.status_code == 409 and "already decided" in late.json()["detail"]


QUORUM = """\
name: quorum_retry
version: 1
params:
  flag: {type: string, default: ""}
steps:
  - id: ok
    kind: approval
    subject: "Pay 900?"
    approvers: {users: [ann, bob, cy]}
    required: 2
    deadline: 1h
  - id: gate
    needs: [ok]
    tool: demo.fail_while
    args: {flag: "{{ params.flag }}"}
    retry: {max_attempts: 1}
"""


def test_a_retry_run_reuses_an_approved_quorum(ledger: Ledger, tmp_path: Path) -> None:
    """A run whose 2-of-3 approval approved fails later; its retry run reuses the
    decision (no new request), with both approvals in the reused output."""
    from ledgerflow.retries import plan_retry, record_retry
    from ledgerflow.steps.approval import ask
    from ledgerflow.steps.protocol import RunRef, execute_step
    from ledgerflow.tools.demo import BlockedByFlag
    from ledgerflow.workflow.validate import load_workflow

    flag = tmp_path / "broken"
    flag.touch()
    folder = tmp_path / "dags" / "workflows" / "quorum_retry"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(QUORUM, encoding="utf-8")
    spec = load_workflow(folder / "v1.yaml")
    step = spec.step("ok")
    first = RunRef(run_id="quorum_retry__v1/a", dag_id="quorum_retry__v1")
    params = {"flag": str(flag)}
    asked = ask(ledger, spec, step, first, params=params).approval
    assert asked.required == 2
    approvals.decide(ledger, asked.id, decision="approved", by="ann")
    assert approvals.get(ledger, asked.id).pending
    approvals.decide(ledger, asked.id, decision="approved", by="bob")
    output = approvals.complete(ledger, asked.id, "test")
    assert [d["by"] for d in output["decisions"]] == ["ann", "bob"]
    with pytest.raises(BlockedByFlag):
        execute_step(ledger, spec, spec.tool_step("gate"), first, params=params, max_attempts=1)
    ledger.finish_run(first.run_id, "failed")

    plan = plan_retry(ledger, first.run_id, dags_folder=tmp_path / "dags")
    record_retry(ledger, plan, "quorum_retry__v1/b", user="tester", via="cli")
    again = ask(ledger, spec, step, RunRef(run_id="quorum_retry__v1/b", dag_id="quorum_retry__v1"), params=params)  # fmt: skip
    assert again.approval is None and again.reused is not None
    assert again.reused["decision"] == "approved" and again.reused["required"] == 2
    assert approvals.for_step(ledger, "quorum_retry__v1/b", "ok") is None
