"""What a notification says, and how it goes out: through Airflow's own notifiers.

- ``smtp``: ``airflow.providers.smtp.notifications.smtp.SmtpNotifier`` on the target's
  SMTP connection (its ``from_email`` extra is the sender), an HTML mail.
- ``slack_webhook``: ``airflow.providers.slack.notifications.slack_webhook.
  SlackWebhookNotifier`` on the target's Slack incoming-webhook connection: ``text``
  plus one section block, in Slack's mrkdwn.

The notifier is called with the text already written (``notify()``, not ``__call__``):
nothing of a run's data (an approval's subject, an error) goes through Jinja.
"""

from __future__ import annotations

import html
from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import loads


def message(
    conn: Connection, event: str, run_id: str, step_key: str | None, data: dict[str, Any]
) -> tuple[str, str, str]:
    """(subject, text, link) of one event, read in the event's transaction."""
    from ledgerflow.links import approval_page, run_page

    if event.startswith("approval_"):
        row = (
            conn.execute(select(t.approvals).where(t.approvals.c.id == data["approval_id"]))
            .mappings()
            .one()
        )
        link = approval_page(int(row["id"]))
        who = _approvers(loads(row["approvers"]))
        facts = [
            f"Workflow: {row['workflow']} v{row['version']}",
            f"Run: {row['run_id']}",
            f"Step: {row['step_key']}",
        ]
        if event == "approval_requested":
            subject = f"Approval needed: {row['subject']}"
            facts += [f"Approvers: {who}", f"Decide before: {data.get('deadline')}"]
        elif event == "approval_escalated":
            subject = f"Approval escalated (level {data.get('level')}): {row['subject']}"
            facts += [f"Approvers now: {who}", f"Decide before: {data.get('deadline')}"]
        else:
            decision = data.get("decision")
            subject = f"Approval {decision} by {data.get('by')}: {row['subject']}"
            if data.get("comment"):
                facts.append(f"Comment: {data['comment']}")
        return subject, "\n".join(facts), link
    link = run_page(run_id)
    run = conn.execute(
        select(t.runs.c.workflow, t.runs.c.version).where(t.runs.c.run_id == run_id)
    ).first()
    name = f"{run.workflow} v{run.version}" if run is not None else run_id.split("/", 1)[0]
    if event == "dead_letter":
        letter = conn.execute(
            select(t.dead_letters.c.error_type, t.dead_letters.c.error).where(
                t.dead_letters.c.run_id == run_id, t.dead_letters.c.step_key == step_key
            )
        ).first()
        error = f"{letter.error_type}: {letter.error}" if letter is not None else "?"
        subject = f"Dead letter: {name}, step {step_key} failed for good"
        facts = [
            f"Run: {run_id}",
            f"Step: {step_key} (after {data.get('attempts')} attempts)",
            f"Error: {error[:500]}",
        ]
        return subject, "\n".join(facts), link
    failed = [
        r[0]
        for r in conn.execute(
            select(t.compensations.c.step_key).where(
                t.compensations.c.run_id == run_id, t.compensations.c.status == "failed"
            )
        )
    ]
    subject = f"Compensation failed: {name}, run {run_id}"
    facts = [f"Run: {run_id}", f"Not undone: {', '.join(sorted(failed)) or '?'}"]
    return subject, "\n".join(facts), link


def _approvers(approvers: dict[str, list[str]]) -> str:
    users = list(approvers.get("users") or [])
    roles = [f"role {r}" for r in approvers.get("roles") or []]
    return ", ".join(users + roles) or "-"


def deliver(target: dict[str, Any], subject: str, text: str, link: str) -> None:
    """Send one notice through the target's Airflow notifier; raises what it raises."""
    kind = target["kind"]
    if kind == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        lines = "".join(f"<p>{html.escape(line)}</p>" for line in text.splitlines())
        body = (
            f"<h3>{html.escape(subject)}</h3>{lines}"
            f'<p><a href="{html.escape(link, quote=True)}">{html.escape(link)}</a></p>'
        )
        SmtpNotifier(
            to=list(target["to"]),
            smtp_conn_id=target["conn_id"],
            subject=subject,
            html_content=body,
        ).notify({})
    elif kind == "slack_webhook":
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        plain = f"{subject}\n{text}\n{link}"
        block = {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"*{_mrkdwn(subject)}*\n{_mrkdwn(text)}\n<{link}|Open>",
            },
        }
        SlackWebhookNotifier(
            slack_webhook_conn_id=target["conn_id"],
            text=plain,
            blocks=[block],
            timeout=10,
            retry_handlers=[],  # the outbox retries, with its backoff, not slack_sdk's
        ).notify({})
    else:
        raise ValueError(f"unknown notifier kind {kind!r}")


def _mrkdwn(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
