"""Airflow responses to an approval, applied once.

A response given in Airflow's Required Actions can reach the ledger twice: Airflow
resumes the deferred task with it, and the approval's trigger, still running until the
triggerer cancels it, may read the same response from the entry on its next look. Both
apply it (``triggers.required_action.apply_response``). A response is known by who gave
it and when Airflow stored it (``responded_at``); every event recorded for it carries
that time. Applications take turns on the approval's row (:func:`turn`), and the second
finds the first's event (:func:`applied`) and records nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, select, update

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, loads

# The event each outcome of a response records, and back.
KIND_OF_OUTCOME = {
    "refused": "approval_response_refused",
    "late": "approval_response_ignored",
    "decided": "approval_decided",
    "partial": "approval_partial",
}
OUTCOME_OF_KIND = {kind: outcome for outcome, kind in KIND_OF_OUTCOME.items()}


def stamp(value: Any) -> str | None:
    """``responded_at`` as one string whichever way it came: a datetime (the resume
    event, the Task SDK's response) or an ISO string; None when there is none."""
    if value is None or value == "":
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat()


@contextmanager
def turn(ledger: Ledger, approval_id: int) -> Iterator[Connection]:
    """A transaction that holds the approval's row (a no-op update) until it ends: two
    applications of one response take turns, and the second sees the first's event."""
    with ledger.begin() as conn:
        conn.execute(
            update(t.approvals).where(t.approvals.c.id == approval_id).values(id=t.approvals.c.id)
        )
        yield conn


def applied(
    conn: Connection, run_id: str, step_key: str, approval_id: int, by: str | None, at: str
) -> str | None:
    """The outcome recorded for the response ``by`` gave at ``at``, or None if it is new."""
    e = t.events
    rows = conn.execute(
        select(e.c.kind, e.c.data).where(
            e.c.run_id == run_id,
            e.c.step_key == step_key,
            e.c.kind.in_(list(OUTCOME_OF_KIND)),
        )
    )
    for kind, raw in rows:
        data = loads(raw) if raw else {}
        if (
            data.get("responded_at") == at
            and data.get("approval_id") == approval_id
            and data.get("by") == by
        ):
            return OUTCOME_OF_KIND[kind]
    return None
