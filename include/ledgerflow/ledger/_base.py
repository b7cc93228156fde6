"""What every part of the ``Ledger`` shares: its engine, transactions and the event log.

One rule for transactions: a method that writes takes ``conn: Connection | None``.
Given a connection, it joins that transaction and never commits it (the caller's
``with ledger.begin()`` does); given none, it runs in a short transaction of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite

from ledgerflow.errors import IllegalTransition
from ledgerflow.ledger import outbox
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import dumps, now
from ledgerflow.lifecycle import Machine

_INSERT_EVENT = t.events.insert()


class LedgerBase:
    url: str
    engine: Engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def begin(self, conn: Connection | None = None) -> Iterator[Connection]:
        """A transaction; inside an open one (``conn`` given), just that connection."""
        if conn is not None:
            yield conn
            return
        committed, own = False, None
        try:
            with self.engine.begin() as own:
                yield own
            committed = True
        finally:
            # The notices this transaction recorded go out once it commits (never before:
            # a rolled-back event notifies no one).
            if own is not None:
                outbox.after_commit(self, own, committed)

    @contextmanager
    def _read(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as own:
            yield own

    def _insert(self, table: Any) -> Any:
        return dialect_insert(self.dialect, table)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        from sqlalchemy import select

        from ledgerflow.ledger._engine import loads

        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.events).where(t.events.c.run_id == run_id).order_by(t.events.c.id)
            ).mappings()
            return [{**r, "data": loads(r["data"])} for r in rows]

    def record_event(
        self,
        run_id: str,
        step_key: str | None,
        kind: str,
        data: Any = None,
        conn: Connection | None = None,
    ) -> None:
        with self.begin(conn) as conn:
            self._event(conn, run_id, step_key, kind, data)

    def _event(
        self, conn: Connection, run_id: str, step_key: str | None, kind: str, data: Any
    ) -> None:
        if kind in _NOTIFYING:
            outbox.enqueue(self, conn, run_id, step_key, kind, data)
        conn.execute(
            _INSERT_EVENT,
            {
                "run_id": run_id,
                "step_key": step_key,
                "kind": kind,
                "data": None if data is None else dumps(data),
                "at": now(),
            },
        )


# The event kinds that notify (``ledger.outbox.EVENTS``), kept here so that the others
# cost one set lookup.
_NOTIFYING = frozenset(
    {
        "approval_requested",
        "approval_escalated",
        "approval_decided",
        "dead_lettered",
        "saga_compensation_failed",
    }
)


def dialect_insert(dialect: str, table: Any) -> Any:
    """The dialect's own INSERT (it has ``on_conflict_do_*``): Postgres', else SQLite's."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def refuse(machine: Machine, current: str | None, new: str, subject: str) -> None:
    """After a guarded UPDATE changed nothing: a repeat the machine allows is a no-op,
    anything else is refused."""
    if current == new and machine.allowed(current, new):
        return
    raise IllegalTransition(machine.name, current, new, subject)
