"""The ``notify:`` field of a workflow file (and of an approval step): who is told of what.

```yaml
notify:
  - kind: smtp                 # Airflow's SmtpNotifier on an SMTP connection
    conn_id: smtp_default
    to: [approvers@example.com]
    on: [approval_requested, approval_escalated]
  - kind: slack_webhook        # Airflow's SlackWebhookNotifier on a Slack webhook connection
    conn_id: slack_ops         # (every event when ``on`` is left out)
```

A target names an Airflow connection only: the server, the password or the webhook URL's
token live in the connection, never in the file. The events are those of
``ledgerflow.notifications``. An approval step's own ``notify`` replaces the workflow's
for that step's approval events (as a step's ``retry`` replaces ``defaults.retry``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Event = Literal[
    "approval_requested",
    "approval_escalated",
    "approval_decided",
    "dead_letter",
    "compensation_failed",
]
EVENTS: tuple[str, ...] = (
    "approval_requested",
    "approval_escalated",
    "approval_decided",
    "dead_letter",
    "compensation_failed",
)
APPROVAL_EVENTS: tuple[str, ...] = EVENTS[:3]

_ADDRESS = r"^[^@\s,;<>]+@[^@\s,;<>]+$"


class NotifyTarget(BaseModel):
    """One notifier: an Airflow notifier kind, its connection, and the events it gets."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    kind: Literal["smtp", "slack_webhook"]
    """``smtp``: e-mail through the SMTP connection (its extra ``from_email`` is the
    sender). ``slack_webhook``: a message to the connection's Slack incoming webhook."""
    conn_id: str = Field(min_length=1, max_length=250, pattern=r"^[A-Za-z0-9_.-]+$")
    to: tuple[str, ...] = ()
    """E-mail addresses (``smtp`` only, at least one)."""
    on: tuple[Event, ...] = Field(default=EVENTS, min_length=1)  # type: ignore[arg-type]
    """The events this target is told of (every event when left out)."""

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: object) -> object:
        # YAML 1.1 (PyYAML) reads an unquoted ``on:`` key as the boolean true.
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if k is True else k): v for k, v in value.items()}
        return value

    @field_validator("to")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import re

        for address in value:
            if not re.match(_ADDRESS, address):
                raise ValueError(f"{address!r} is not an e-mail address")
        return value

    @field_validator("on")
    @classmethod
    def _once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("an event is listed twice")
        return value

    @model_validator(mode="after")
    def _recipients(self) -> NotifyTarget:
        if self.kind == "smtp" and not self.to:
            raise ValueError("an smtp target needs `to`: at least one e-mail address")
        if self.kind != "smtp" and self.to:
            raise ValueError(
                f"`to` is for smtp targets; a {self.kind} target sends to its connection"
            )
        return self

    @property
    def label(self) -> str:
        """How the ledger names the target: ``smtp:smtp_default``."""
        return f"{self.kind}:{self.conn_id}"


def approval_targets(value: tuple[NotifyTarget, ...] | None) -> tuple[NotifyTarget, ...] | None:
    """An approval step's ``notify``: its targets hear of its approval's events only
    (``on`` left out: all three)."""
    for target in value or ():
        if "on" not in target.model_fields_set:
            continue
        other = [e for e in target.on if e not in APPROVAL_EVENTS]
        if other:
            raise ValueError(
                f"{', '.join(other)}: an approval step's notify takes "
                f"{', '.join(APPROVAL_EVENTS)} (declare the others at the workflow's notify)"
            )
    return value


def routes(spec: object) -> dict[str, object] | None:
    """The workflow's targets as the ledger keeps them with each run
    (``{"workflow": [...], "steps": {approval step: [...]}}``); None: it notifies no one."""
    workflow = [t.model_dump(mode="json") for t in getattr(spec, "notify", ())]
    steps = {
        s.id: [t.model_dump(mode="json") for t in s.notify]
        for s in getattr(spec, "steps", ())
        if getattr(s, "kind", None) == "approval" and s.notify is not None
    }
    if not workflow and not steps:
        return None
    return {"workflow": workflow, "steps": steps}
