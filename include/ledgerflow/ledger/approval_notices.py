"""Telling an approval's approvers: a log line and the notifiers of the step's
``notify:`` (their notices go through the outbox, ``ledger.outbox``), recorded as an
``approval_notified`` event per escalation level, so a retried task does not tell
them twice."""

from __future__ import annotations

from ledgerflow.ledger.approvals import Approval
from ledgerflow.ledger.store import Ledger


def notify(ledger: Ledger, approval: Approval) -> None:
    """Tell the approvers: one log line, and the notifiers of ``notify:`` (their notices
    are in the outbox, ``ledger.outbox``); record that it was done."""
    import logging

    logging.getLogger("ledgerflow.approvals").warning(
        "approval %s needs a decision from %s before %s: %s (/ledgerflow/approvals/%s)",
        approval.id,
        approval.approvers,
        approval.deadline.isoformat(),
        approval.subject,
        approval.id,
    )
    ledger.record_event(
        approval.run_id,
        approval.step_key,
        "approval_notified",
        {
            "approval_id": approval.id,
            "channel": "log",
            "to": approval.approvers,
            "level": approval.level,
        },
    )
    # The notices its event put in the outbox went out when it committed; any still
    # pending (that send was cut short: a crash, a killed task) go now.
    from ledgerflow.ledger import outbox

    outbox.send_pending(ledger, approval.run_id, approval.step_key)


def notify_once(ledger: Ledger, approval: Approval) -> None:
    """Send the request's notice unless it was recorded as sent (at this escalation
    level): a task that crashed after writing the request sends it on its next try, a
    cleared or resumed one does not send it again."""
    sent = [
        e["data"] or {}
        for e in ledger.events(approval.run_id)
        if e["kind"] == "approval_notified" and e["step_key"] == approval.step_key
    ]
    if not any(
        d.get("approval_id") == approval.id and d.get("level") == approval.level for d in sent
    ):
        notify(ledger, approval)
