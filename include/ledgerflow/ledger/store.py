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

from sqlalchemy import Connection, text

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
    from ledgerflow.ledger._migrate import Progress

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

    @classmethod
    def from_airflow(cls, conn_id: str | None = None) -> Ledger:
        conn_id = ledger_conn_id(conn_id)
        url = resolve_url(conn_id)
        return cls(url, conn_id=None if url == embedded_url() else conn_id)

    # -- schema -----------------------------------------------------------------

    def migrate(self, progress: Progress | None = None, *, demo: bool | None = None) -> int:
        """Apply pending migrations; safe to call from many processes at once.

        ``demo``: also the example workflows' tables (the ``demo`` branch); by default
        where the demo's tools are on (``[ledgerflow] demo_tools``, ``LEDGERFLOW_DEMO_TOOLS``). ``progress(revision,
        title, upgrade)`` is called before each revision is applied.

        Checked once per process and database: a ledger found (or brought) at the code's
        revision is not asked again by any ``Ledger`` of the same URL in this process
        (every step calls this; a task process runs many in a fused segment), until
        ``migrate_to`` moves it. A fresh database (a new URL) is checked and migrated.
        The check itself costs one query and does not import Alembic.
        """
        done = _CHECKED.get(self.url)
        if done:  # checked with the demo tables: nothing can be missing
            return t.LATEST
        if demo is None:
            demo = _demo_tools_on()
        if done is not None and not demo:
            return t.LATEST
        revisions = self.revisions()
        if _number(revisions) < t.LATEST or (demo and t.DEMO_HEAD not in revisions):
            from ledgerflow.ledger import _migrate

            _migrate.upgrade(self.engine, demo=demo, progress=progress)
        _CHECKED[self.url] = bool(done) or demo
        return t.LATEST

    def migrate_to(self, target: str, progress: Progress | None = None) -> None:
        """Upgrade or downgrade to the revision ``target`` (``0005``, ``base``,
        ``demo@base``...)."""
        from ledgerflow.ledger import _migrate

        _CHECKED.pop(self.url, None)
        _migrate.migrate_to(self.engine, target, progress)

    def revisions(self) -> set[str]:
        """The Alembic revisions the ledger is at (one per branch; empty for a new
        database or one from before Alembic). One query: every task asks this once."""
        from sqlalchemy.exc import DBAPIError

        try:
            with self.engine.connect() as conn:
                rows = conn.execute(text(f"SELECT version_num FROM {t.VERSION_TABLE}"))
                return set(rows.scalars())
        except DBAPIError:  # no version table yet: the slow path looks closer, under a lock
            return set()

    def schema_version(self) -> int:
        """The revision of the ledger's tables as a number (8 for ``0008``; 0 when none)."""
        return _number(self.revisions())

    # -- event waits ----------------------------------------------------------------

    def withdraw_event_waits(
        self, run_id: str, reason: str = "", conn: Connection | None = None
    ) -> int:
        """Withdraw the run's parked event waits (``waiting -> withdrawn``; a cancelled
        run): no delivery or deadline completes them any more, and each one's trigger
        wakes and ends its task. Returns how many were withdrawn."""
        from ledgerflow.ledger import event_waits

        return event_waits.withdraw(self, run_id, reason, conn)


# The ledgers (by URL) this process found at the code's revision: True when the demo
# branch was checked too.
_CHECKED: dict[str, bool] = {}


def _demo_tools_on() -> bool:
    """``[ledgerflow] demo_tools`` (``LEDGERFLOW_DEMO_TOOLS``): the demo's tables go with
    its tools."""
    from ledgerflow import settings

    return bool(settings.get("demo_tools"))


def _number(revisions: set[str]) -> int:
    return max((int(r) for r in revisions if r.isdigit()), default=0)
