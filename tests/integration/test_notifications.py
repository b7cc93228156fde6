"""Notifications on real Postgres, a real SMTP server (aiosmtpd) and a loopback webhook peer.

The events are recorded by the ledger's own code (the approval request, escalation and
decision, the dead letter, the saga's outcome), as the tasks, the triggerer and the
api-server record them; the notices go out through Airflow's SmtpNotifier and
SlackWebhookNotifier on Airflow connections.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from ledgerflow.ledger import approvals, outbox
from ledgerflow.ledger.store import Ledger, now
from ledgerflow.steps.run import RunRef, register_run
from ledgerflow.testing.http_peer import SlackPeer
from ledgerflow.testing.mail import MailServer, html_text
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

WORKFLOW = """\
name: notified
version: 1
params:
  order: {type: string}
notify:
  - kind: smtp
    conn_id: lf_notify_mail
    to: [ops@example.com]
    on: [dead_letter, compensation_failed]
  - kind: slack_webhook
    conn_id: lf_notify_slack
steps:
  - id: pay
    tool: demo.noop
    idempotency: natural
  - id: ask
    kind: approval
    needs: [pay]
    subject: "Refund {{ params.order }}?"
    approvers: {users: [manager]}
    notify:
      - kind: smtp
        conn_id: lf_notify_mail
        to: [manager@example.com]
        on: [approval_requested, approval_escalated]
      - kind: slack_webhook
        conn_id: lf_notify_down
        on: [approval_requested]
"""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    down_port = closed_port()
    with (
        fresh_database("notify_int") as url,
        MailServer() as mail,
        SlackPeer() as slack,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("AIRFLOW_CONN_LF_NOTIFY_MAIL", mail.conn_uri())
        env.setenv(
            "AIRFLOW_CONN_LF_NOTIFY_SLACK",
            json.dumps({"conn_type": "slackwebhook", "password": f"{slack.url}/hook/T0/B0"}),
        )
        env.setenv(
            "AIRFLOW_CONN_LF_NOTIFY_DOWN",
            json.dumps(
                {"conn_type": "slackwebhook", "password": f"http://127.0.0.1:{down_port}/hook"}
            ),
        )
        env.setenv("AIRFLOW__API__BASE_URL", "http://ledgerflow.example/airflow")
        path = tmp_path_factory.mktemp("wf") / "notified.yaml"
        path.write_text(WORKFLOW)
        ledger = Ledger(url)
        ledger.migrate()
        yield {
            "ledger": ledger,
            "spec": load_workflow(Path(path)),
            "mail": mail,
            "slack": slack,
            "down_port": down_port,
        }
        ledger.engine.dispose()


def start_run(stack: dict[str, Any], name: str) -> RunRef:
    spec = stack["spec"]
    run = RunRef(run_id=f"{spec.dag_id}/{name}", dag_id=spec.dag_id, trigger_kind="manual")
    register_run(stack["ledger"], spec, run, {"order": name})
    return run


def ask(stack: dict[str, Any], run: RunRef, **kw: Any) -> approvals.Approval:
    ledger = stack["ledger"]
    approval, _ = approvals.request(
        ledger,
        run_id=run.run_id,
        step_key="ask",
        dag_id=run.dag_id,
        task_id="ask",
        workflow="notified",
        version=1,
        subject=f"Refund {run.run_id}?",
        body="",
        payload={},
        approvers={"users": ["manager"], "roles": []},
        deadline=now() + timedelta(hours=1),
        at_deadline=kw.get("at_deadline", "reject"),
    )
    approvals.notify_once(ledger, approval)
    return approval


def rows(ledger: Ledger, run: RunRef) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["event"], r["target"]): r for r in outbox.listing(ledger, run_id=run.run_id)}


def test_approval_request_mails_the_step_targets_with_a_link_and_a_down_one_is_recorded(
    stack: dict[str, Any],
) -> None:
    """The request is mailed (once) to the approval step's target with the approval page's
    full link (under [api] base_url's sub-path); the step's webhook target that is down
    does not hold the request up past the bound, and its row is ``failed`` with the
    error; the workflow's Slack target does not hear of it (the step's notify replaces
    the workflow's)."""
    ledger, mail = stack["ledger"], stack["mail"]
    run = start_run(stack, "req")
    before = len(mail.messages)
    started = time.monotonic()
    approval = ask(stack, run)
    took = time.monotonic() - started
    message = mail.wait_for(before + 1)[before]
    assert message["To"] == "manager@example.com"
    assert message["Subject"] == f"Approval needed: Refund {run.run_id}?"
    link = f"http://ledgerflow.example/airflow/ledgerflow/approvals/{approval.id}"
    assert f'href="{link}"' in html_text(message)
    found = rows(ledger, run)
    assert set(found) == {
        ("approval_requested", "smtp:lf_notify_mail"),
        ("approval_requested", "slack_webhook:lf_notify_down"),
    }
    assert found["approval_requested", "smtp:lf_notify_mail"]["status"] == "sent"
    down = found["approval_requested", "slack_webhook:lf_notify_down"]
    assert down["status"] == "failed" and down["attempts"] == 1
    assert "Connection refused" in (down["last_error"] or "")
    # Bounded: two sends of SEND_WAIT_S at most (the commit's, then notify_once's).
    assert took < 2 * outbox.SEND_WAIT_S + 5
    time.sleep(0.3)
    assert len(mail.messages) == before + 1  # once


def test_a_down_webhook_is_delivered_by_a_later_retry_once_it_is_up(
    stack: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The notice a down peer missed stays in the outbox; a retry before its next_at
    sends nothing; once the peer is up and the row is due, the maintenance task delivers
    it, and further retries (the task again, ``ledgerflow notifications --retry``, a
    direct send) never send it again."""
    from ledgerflow.cli import main
    from ledgerflow.maintenance import send_notifications

    ledger = stack["ledger"]
    run = start_run(stack, "retry")
    ask(stack, run)
    row = rows(ledger, run)["approval_requested", "slack_webhook:lf_notify_down"]
    assert row["status"] == "failed"
    assert outbox.send_due(ledger).get(row["id"]) is None  # not due yet (backoff)
    assert main(["notifications", "--url", ledger.url, "--run", run.run_id]) == 1
    assert "failed" in capsys.readouterr().out

    peer = SlackPeer()
    peer.port = stack["down_port"]  # the peer comes up where the target was refused
    with peer, pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_LEDGERFLOW_DB", ledger.url)
        _make_due(ledger, row["id"])
        assert send_notifications()[row["id"]] == "sent"
        assert send_notifications().get(row["id"]) is None
        assert main(["notifications", "--url", ledger.url, "--retry", "--run", run.run_id]) == 0
        outbox.send(ledger, [row["id"]])
        mine = [b for b in peer.bodies if run.run_id in b["text"]]
        assert len(mine) == 1
        assert mine[0]["text"].startswith(f"Approval needed: Refund {run.run_id}?")
    done = rows(ledger, run)["approval_requested", "slack_webhook:lf_notify_down"]
    assert (done["status"], done["attempts"], done["sent_at"] is not None) == ("sent", 2, True)


def test_escalation_and_decision_notify_their_targets(stack: dict[str, Any]) -> None:
    """An escalation mails the step's target (its new approvers, with the link); the
    decision goes to no one of the step (its targets do not take approval_decided) and
    not to the workflow's Slack either (replaced for approval events)."""
    ledger, mail = stack["ledger"], stack["mail"]
    run = start_run(stack, "esc")
    chain = {
        "escalate": {
            "approvers": {"users": ["director"], "roles": []},
            "deadline": 60,
            "at_deadline": "reject",
        }
    }
    approval = ask(stack, run, at_deadline=chain)
    before = len(mail.messages)
    escalated = approvals.escalate(ledger, approval, now())
    assert escalated is not None
    message = mail.wait_for(before + 1)[before]
    assert message["Subject"] == f"Approval escalated (level 1): Refund {run.run_id}?"
    assert "director" in html_text(message)
    approvals.decide(ledger, approval.id, decision="approved", by="director")
    assert {e for e, _ in rows(ledger, run)} == {"approval_requested", "approval_escalated"}


def test_dead_letter_and_failed_compensation_notify_the_workflow_targets(
    stack: dict[str, Any],
) -> None:
    """A dead letter mails ops (the workflow's smtp target) and posts the Slack webhook
    JSON (text and a section block with the run page's link); a saga that ends
    ``compensation_failed`` does the same, once, however many times it is finished."""
    ledger, mail, slack = stack["ledger"], stack["mail"], stack["slack"]
    run = start_run(stack, "dead")
    before_mail, before_slack = len(mail.messages), len(slack.bodies)
    ledger.dead_letter(
        workflow="notified",
        version=1,
        run_id=run.run_id,
        step_key="pay",
        attempts=3,
        error=RuntimeError("card declined"),
        args={},
        idempotency_key=None,
    )
    message = mail.wait_for(before_mail + 1)[before_mail]
    assert message["Subject"] == "Dead letter: notified v1, step pay failed for good"
    run_link = f"http://ledgerflow.example/airflow/ledgerflow/runs/{run.run_id}"
    assert "RuntimeError: card declined" in html_text(message)
    assert f'href="{run_link}"' in html_text(message)
    _wait(lambda: len(slack.bodies) > before_slack)
    body = slack.bodies[before_slack]
    assert body["blocks"][0]["type"] == "section"
    assert f"<{run_link}|Open>" in body["blocks"][0]["text"]["text"]

    ledger.start_saga(run.run_id, "pay")
    ledger.record_compensation(run.run_id, "pay", "running")
    ledger.record_compensation(run.run_id, "pay", "failed", detail="refund API down")
    assert ledger.finish_saga(run.run_id) == "compensation_failed"
    assert ledger.finish_saga(run.run_id) == "compensation_failed"
    message = mail.wait_for(before_mail + 2)[before_mail + 1]
    assert message["Subject"] == f"Compensation failed: notified v1, run {run.run_id}"
    assert "Not undone: pay" in html_text(message)
    events = [e for e, _ in rows(ledger, run)]
    assert sorted(events) == sorted(["dead_letter", "dead_letter"] + ["compensation_failed"] * 2)
    time.sleep(0.3)
    assert len(mail.messages) == before_mail + 2
    assert all(r["status"] == "sent" for r in rows(ledger, run).values())


def test_a_rolled_back_event_notifies_no_one(stack: dict[str, Any]) -> None:
    """An event whose transaction rolls back leaves no row and sends nothing."""
    ledger, mail = stack["ledger"], stack["mail"]
    run = start_run(stack, "rollback")
    before = len(mail.messages)
    with pytest.raises(RuntimeError), ledger.begin() as conn:
        ledger.dead_letter(
            workflow="notified",
            version=1,
            run_id=run.run_id,
            step_key="pay",
            attempts=1,
            error=RuntimeError("x"),
            args={},
            idempotency_key=None,
            conn=conn,
        )
        raise RuntimeError("rolled back")
    time.sleep(0.5)
    assert rows(ledger, run) == {} and len(mail.messages) == before


def letter(ledger: Ledger, run: RunRef, conn: Any = None) -> None:
    ledger.dead_letter(
        workflow="notified",
        version=1,
        run_id=run.run_id,
        step_key="pay",
        attempts=1,
        error=RuntimeError("boom"),
        args={},
        idempotency_key=None,
        conn=conn,
    )


def slack_row(ledger: Ledger, run: RunRef) -> dict[str, Any]:
    return rows(ledger, run)["dead_letter", "slack_webhook:lf_notify_slack"]


def test_concurrent_senders_deliver_a_notice_once(stack: dict[str, Any]) -> None:
    """A pending notice (its event committed outside Ledger.begin, so nobody sent it yet)
    that eight senders try at once (the maintenance task, the CLI, a task's thread...) is
    posted once: the guarded claim lets one sender have it."""
    ledger, slack = stack["ledger"], stack["slack"]
    run = start_run(stack, "race")
    with ledger.engine.begin() as conn:
        letter(ledger, run, conn)
    row = slack_row(ledger, run)
    assert row["status"] == "pending"
    barrier = threading.Barrier(8)
    results: list[dict[str, str]] = []

    def sender() -> None:
        barrier.wait()
        results.append(outbox.send(ledger, [row["id"]]))

    threads = [threading.Thread(target=sender) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(len(r) for r in results) == [0] * 7 + [1]
    assert len([b for b in slack.bodies if run.run_id in b["text"]]) == 1
    assert (slack_row(ledger, run)["status"], slack_row(ledger, run)["attempts"]) == ("sent", 1)


def test_a_stale_claim_is_taken_over_and_a_fresh_one_is_not(stack: dict[str, Any]) -> None:
    """A sender that died while sending leaves its row ``sending``: send_due leaves it
    alone while the claim is fresh (its sender may still answer) and takes it over once
    it is older than STALE_CLAIM, sending it."""
    ledger, slack = stack["ledger"], stack["slack"]
    run = start_run(stack, "stale")
    with ledger.engine.begin() as conn:
        letter(ledger, run, conn)
    nid = slack_row(ledger, run)["id"]
    _set(ledger, nid, status="sending", attempts=1, updated_at=now())
    assert outbox.send_due(ledger).get(nid) is None
    _set(ledger, nid, updated_at=now() - outbox.STALE_CLAIM - timedelta(seconds=1))
    assert outbox.send_due(ledger)[nid] == "sent"
    assert len([b for b in slack.bodies if run.run_id in b["text"]]) == 1
    assert slack_row(ledger, run)["attempts"] == 2


def test_after_the_last_attempt_it_is_given_up_with_its_error(stack: dict[str, Any]) -> None:
    """A notice whose notifier stays down is ``gave_up`` after MAX_ATTEMPTS, with the last
    error, and no retry picks it again; each failure pushed ``next_at`` back."""
    ledger = stack["ledger"]
    run = start_run(stack, "giveup")
    ask(stack, run)
    nid = rows(ledger, run)["approval_requested", "slack_webhook:lf_notify_down"]["id"]
    for attempt in range(2, outbox.MAX_ATTEMPTS + 1):
        _make_due(ledger, nid)
        status = outbox.send_due(ledger)[nid]
        row = rows(ledger, run)["approval_requested", "slack_webhook:lf_notify_down"]
        assert row["attempts"] == attempt
        if attempt < outbox.MAX_ATTEMPTS:
            assert status == "failed" and row["next_at"] > now()
    assert (status, row["status"]) == ("gave_up", "gave_up")
    assert "Connection refused" in row["last_error"]
    _make_due(ledger, nid)
    assert outbox.send_due(ledger).get(nid) is None


def test_an_inner_commit_does_not_send_the_outer_transactions_notices(
    stack: dict[str, Any],
) -> None:
    """A notice recorded in an open transaction is not sent when another (inner)
    transaction on the same thread commits (its row is not committed yet); it goes out
    when its own transaction commits."""
    ledger, slack = stack["ledger"], stack["slack"]
    run = start_run(stack, "nested")
    with ledger.begin() as outer:
        letter(ledger, run, outer)
        with ledger.begin() as inner:
            inner.execute(select(1))
        time.sleep(0.3)
        assert not [b for b in slack.bodies if run.run_id in b["text"]]
    _wait(
        lambda: [b for b in slack.bodies if run.run_id in b["text"]],
        explain=lambda: f"at {now()} the rows were {rows(ledger, run)}",
    )
    assert slack_row(ledger, run)["status"] == "sent"


# ---------------------------------------------------------------- helpers


def _wait(check: Any, timeout: float = 30.0, explain: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            facts = explain() if explain is not None else ""
            raise AssertionError(f"timed out; {facts}\nthe threads were:\n{_stacks()}")
        time.sleep(0.05)


def _stacks() -> str:
    """Where every thread of this process is (a sender that never sent shows where it waits)."""
    import sys
    import traceback

    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)}\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def _make_due(ledger: Ledger, nid: str) -> None:
    from sqlalchemy import update

    from ledgerflow.ledger import schema as t

    with ledger.engine.begin() as conn:
        conn.execute(
            update(t.notifications)
            .where(t.notifications.c.id == nid)
            .values(next_at=now() - timedelta(seconds=1))
        )


def _set(ledger: Ledger, nid: str, **values: Any) -> None:
    from sqlalchemy import update

    from ledgerflow.ledger import schema as t

    with ledger.engine.begin() as conn:
        conn.execute(update(t.notifications).where(t.notifications.c.id == nid).values(**values))
