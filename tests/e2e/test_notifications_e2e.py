"""Notifications on real Airflow processes: the approval request is mailed by the task
(SmtpNotifier, a real SMTP server on loopback), with a link that works, and the decision
by the api-server; the outbox records both sent, once. Another approval's request is
posted to a Slack incoming webhook on loopback (SlackWebhookNotifier), its link working."""

from __future__ import annotations

import re
import uuid

import httpx
import pytest

from ledgerflow.ledger import approvals, outbox
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.http_peer import SlackPeer
from ledgerflow.testing.mail import MailServer, html_text

pytestmark = pytest.mark.e2e

DAG = "approval_mailed__v1"


def test_the_request_mail_links_to_a_page_that_opens_and_the_decision_is_mailed(
    stack: AirflowStack, ledger: Ledger, mail: MailServer
) -> None:
    """The parked approval's task mails the approver (its step's notify target): the
    subject names the request, and the mail's link, under ``[api] base_url``, answers 200
    with the approval's page to the approver logged in (401 to nobody). The approve through
    the REST API is mailed too (sent by the api-server), the run goes on, and the outbox
    holds exactly these two notices, ``sent``, each once."""
    ref = f"m-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(DAG, {"ref": ref})
    ledger_run = f"{DAG}/{run_id}"

    def request_mail() -> object:
        return next(
            (m for m in mail.messages if m["Subject"] == f"Approval needed: Mailed {ref}"), None
        )

    message = wait_for(request_mail, 180, "the approval request's mail")
    approval = approvals.for_step(ledger, ledger_run, "ask")
    assert approval is not None and approval.pending
    assert message["To"] == "manager@example.com"
    links = re.findall(r'href="([^"]+)"', html_text(message))
    assert links == [f"{stack.base_url}/ledgerflow/approvals/{approval.id}"]

    # A browser logged into Airflow carries its ``_token`` cookie.
    manager = stack.token("manager")
    page = httpx.get(links[0], cookies={"_token": manager}, timeout=30)
    assert page.status_code == 200 and f"Mailed {ref}" in page.text
    assert httpx.get(links[0], timeout=30).status_code == 401

    decided = httpx.post(
        f"{stack.base_url}/ledgerflow/api/approvals/{approval.id}/decision",
        json={"decision": "approve", "comment": "fine"},
        headers={"Authorization": f"Bearer {manager}"},
        timeout=30,
    )
    assert decided.status_code == 200, decided.text

    def decided_mail() -> object:
        wanted = f"Approval approved by manager: Mailed {ref}"
        return next((m for m in mail.messages if m["Subject"] == wanted), None)

    wait_for(decided_mail, 60, "the decision's mail")
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "success"
    rows = outbox.listing(ledger, run_id=ledger_run)
    assert sorted((r["event"], r["status"], r["attempts"]) for r in rows) == [
        ("approval_decided", "sent", 1),
        ("approval_requested", "sent", 1),
    ]
    mine = [m for m in mail.messages if f"Mailed {ref}" in str(m["Subject"])]
    assert len(mine) == 2


def test_the_triggerer_mails_an_escalation_to_the_new_approver(
    stack: AirflowStack, ledger: Ledger, mail: MailServer
) -> None:
    """Nobody decides in 3 s: the triggerer escalates the parked approval and its notice
    goes out from the triggerer's process (the connection read there), with the page's
    link; the new approver's approve resumes the run; the outbox holds it ``sent`` once."""
    ref = f"e-{uuid.uuid4().hex[:8]}"
    dag = "approval_escalate_mailed__v1"
    run_id = stack.trigger(dag, {"ref": ref})
    wanted = f"Approval escalated (level 1): Escalated {ref}"

    def escalation_mail() -> object:
        return next((m for m in mail.messages if m["Subject"] == wanted), None)

    message = wait_for(escalation_mail, 180, "the escalation's mail")
    approval = approvals.for_step(ledger, f"{dag}/{run_id}", "ask")
    assert approval is not None and approval.level == 1
    assert re.findall(r'href="([^"]+)"', html_text(message)) == [
        f"{stack.base_url}/ledgerflow/approvals/{approval.id}"
    ]
    assert "manager" in html_text(message)
    decided = httpx.post(
        f"{stack.base_url}/ledgerflow/api/approvals/{approval.id}/decision",
        json={"decision": "approve"},
        headers={"Authorization": f"Bearer {stack.token('manager')}"},
        timeout=30,
    )
    assert decided.status_code == 200, decided.text
    assert stack.wait_for_run(dag, run_id, timeout=180) == "success"
    rows = outbox.listing(ledger, run_id=f"{dag}/{run_id}")
    assert [(r["event"], r["status"], r["attempts"]) for r in rows] == [
        ("approval_escalated", "sent", 1)
    ]
    assert len([m for m in mail.messages if m["Subject"] == wanted]) == 1


def test_the_request_is_posted_to_the_slack_webhook_with_a_link_that_opens(
    stack: AirflowStack, ledger: Ledger, slack: SlackPeer
) -> None:
    """The parked approval's task posts the Slack webhook JSON (its step's notify target):
    the text names the request, its section block links the approval page, which answers
    200 to the approver logged in; the outbox row is ``sent`` once."""
    ref = f"h-{uuid.uuid4().hex[:8]}"
    dag = "approval_webhooked__v1"
    run_id = stack.trigger(dag, {"ref": ref})
    ledger_run = f"{dag}/{run_id}"

    def posted() -> object:
        return next((b for b in slack.bodies if f"Hooked {ref}" in str(b.get("text"))), None)

    body = wait_for(posted, 180, "the approval request's webhook post")
    approval = approvals.for_step(ledger, ledger_run, "ask")
    assert approval is not None and approval.pending
    link = f"{stack.base_url}/ledgerflow/approvals/{approval.id}"
    assert body["blocks"][0]["type"] == "section"  # type: ignore[index]
    assert f"<{link}|Open>" in body["blocks"][0]["text"]["text"]  # type: ignore[index]
    page = httpx.get(link, cookies={"_token": stack.token("manager")}, timeout=30)
    assert page.status_code == 200 and f"Hooked {ref}" in page.text
    rows = outbox.listing(ledger, run_id=ledger_run)
    assert [(r["event"], r["status"], r["attempts"]) for r in rows] == [
        ("approval_requested", "sent", 1)
    ]
    assert len([b for b in slack.bodies if f"Hooked {ref}" in str(b.get("text"))]) == 1
