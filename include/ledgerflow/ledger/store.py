"""The ledger: the durable record of runs, steps, attempts, effects, sagas, dead letters
and events, through repository functions (SQLAlchemy Core). Every write is a short
transaction.

The ledger is addressed by the Airflow connection ``ledgerflow_db``: Postgres through
the postgres provider, or a SQLite file under ``AIRFLOW_HOME`` when the connection is
not defined (the embedded default).

``Ledger`` is composed by concern: ``_runs`` (runs, the saga, compensations), ``_steps``
(checkpoints, attempts), ``_effects`` (effects, dead letters), on ``_base`` (engine,
transactions, events); ``_engine`` finds the database. Every status it writes follows
``ledgerflow.lifecycle``: an illegal transition raises ``IllegalTransition``.

One rule for transactions: every method that writes takes ``conn: Connection | None =
None`` and opens ``self.begin(conn)``. Given a connection, it joins that transaction and
never commits it (the caller's ``with ledger.begin()`` does); given none, it runs in a
short transaction of its own.

One rule for statuses: a status is written by a guarded statement (``WHERE status IN
machine.sources(new)``), so concurrent writers stay correct without locks. When the
statement changed nothing, the current status is read: a same-status repeat the machine
lists is a no-op, anything else raises ``IllegalTransition`` (and the caller's
transaction rolls back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select, text

from ledgerflow.ledger import schema as t
from ledgerflow.ledger._effects import EffectsMixin
from ledgerflow.ledger._engine import (
    DEFAULT_CONN_ID,
    _airflow_connection,
    _airflow_connection_uri,
    _engine,
    _sqlite_pragmas,
    _uri_from_json,
    default_sqlite_path,
    dumps,
    embedded_url,
    ledger_conn_id,
    loads,
    now,
    resolve_url,
)
from ledgerflow.ledger._records import (
    Checkpoint,
    Effect,
    _checkpoint,
    _error_text,
    _error_type,
    _outputs,
)
from ledgerflow.ledger._runs import RunsMixin
from ledgerflow.ledger._steps import StepsMixin

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "DEFAULT_CONN_ID",
    "Checkpoint",
    "Effect",
    "Ledger",
    "_airflow_connection",
    "_airflow_connection_uri",
    "_checkpoint",
    "_engine",
    "_error_text",
    "_error_type",
    "_outputs",
    "_sqlite_pragmas",
    "_uri_from_json",
    "default_sqlite_path",
    "dumps",
    "embedded_url",
    "ledger_conn_id",
    "loads",
    "now",
    "resolve_url",
]


class Ledger(RunsMixin, StepsMixin, EffectsMixin):
    """The durable record of runs, steps, attempts, effects, dead letters and events."""

    def __init__(self, url: str, conn_id: str | None = None) -> None:
        self.url = url
        # The Airflow connection the URL came from (None: given as a URL, or the embedded
        # SQLite file): what a trigger carries instead of the URL and its credentials.
        self.conn_id = conn_id
        self.engine = _engine(url)
        self._migrated = False

    @classmethod
    def from_airflow(cls, conn_id: str | None = None) -> Ledger:
        conn_id = ledger_conn_id(conn_id)
        url = resolve_url(conn_id)
        return cls(url, conn_id=None if url == embedded_url() else conn_id)

    # -- schema -----------------------------------------------------------------

    def migrate(self, progress: Callable[[int, str], None] | None = None) -> int:
        """Apply pending migrations; safe to call from many processes at once.
        ``progress(version, title)`` is called before each migration is applied."""
        if self._migrated:
            return t.LATEST
        if self.schema_version() >= t.LATEST:  # the common case: one query, no lock
            self._migrated = True
            return t.LATEST
        with self.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
            t.schema_version.create(conn, checkfirst=True)
            # By set, not by maximum: a migration number reserved by one change and
            # added after a later one was applied still runs.
            applied = set(conn.execute(select(t.schema_version.c.version)).scalars())
            for version, title, apply in t.MIGRATIONS:
                if version not in applied:
                    if progress is not None:
                        progress(version, title)
                    apply(conn)
                    conn.execute(
                        t.schema_version.insert().values(version=version, applied_at=now())
                    )
        self._migrated = True
        return t.LATEST

    def schema_version(self, _again: bool = False) -> int:
        """The applied schema version: the highest N with 1..N all applied (0 for an empty
        database). One query: every task is a new process that asks this once."""
        from sqlalchemy.exc import DBAPIError

        try:
            with self.engine.connect() as conn:
                applied = set(conn.execute(select(t.schema_version.c.version)).scalars())
                version = 0
                while version + 1 in applied:
                    version += 1
                return version
        except DBAPIError:
            with self.engine.connect() as conn:
                exists = self.engine.dialect.has_table(conn, "lf_schema_version")
            if exists and not _again:
                # Another process's migration created the table since our read: read again.
                return self.schema_version(_again=True)
            if exists:
                raise
            return 0
