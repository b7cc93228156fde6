"""How the ledger is reached: its URL from Airflow's connection (or the embedded SQLite
file), one engine per URL per process, and the JSON encoding of stored values."""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event

from ledgerflow import secrets
from ledgerflow.errors import LedgerError

DEFAULT_CONN_ID = "ledgerflow_db"


def now() -> datetime:
    return datetime.now(timezone.utc)


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))


def loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def default_sqlite_path() -> Path:
    from ledgerflow.settings import airflow_home

    return airflow_home() / "ledgerflow.db"


def embedded_url() -> str:
    """The embedded ledger: the SQLite file ``$AIRFLOW_HOME/ledgerflow.db``."""
    return f"sqlite:///{default_sqlite_path()}"


def ledger_conn_id(conn_id: str | None = None) -> str:
    """The id of the ledger's connection: ``None`` or ``ledgerflow_db`` mean the one
    configured (``[ledgerflow] conn_id``, default ``ledgerflow_db``)."""
    if conn_id is None or conn_id == DEFAULT_CONN_ID:
        from ledgerflow import settings

        return str(settings.get("conn_id"))
    return conn_id


def resolve_url(conn_id: str | None = DEFAULT_CONN_ID, *, required: bool = False) -> str:
    """The SQLAlchemy URL of the ledger.

    Order: the Airflow connection ``conn_id`` (environment variable, secrets backend or
    the metadata database, whatever Airflow is configured with), else the SQLite file
    ``$AIRFLOW_HOME/ledgerflow.db`` (unless ``required``: then a missing connection is
    an error, not another ledger). ``None`` or ``ledgerflow_db`` mean the ledger's
    connection as configured (``ledger_conn_id``).
    """
    conn_id = ledger_conn_id(conn_id)
    uri = _airflow_connection_uri(conn_id)
    if uri is None:
        if required:
            raise LedgerError(f"the ledger's connection {conn_id!r} is not defined here")
        return embedded_url()
    if uri.startswith(("postgres://", "postgresql://", "postgresql+")):  # any driver: psycopg2
        rest = uri.split("://", 1)[1]
        return f"postgresql+psycopg2://{rest}"
    if uri.startswith("sqlite"):
        return uri if uri.startswith("sqlite:///") else "sqlite:///" + uri.split("://", 1)[1]
    raise LedgerError(
        f"connection {conn_id!r} must be postgres or sqlite, got {uri.split('://', 1)[0]!r}"
    )


def _airflow_connection_uri(conn_id: str) -> str | None:
    env = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env:
        if env.lstrip().startswith("{"):
            return _uri_from_json(json.loads(env))
        return env
    conn = _airflow_connection(conn_id)
    if conn is None:
        return None
    if conn.conn_type in ("postgres", "postgresql"):
        return _postgres_url(
            conn.login, conn.password, conn.host, conn.port, conn.schema, conn.extra_dejson
        )
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}"
    return str(conn.get_uri())


def _airflow_connection(conn_id: str) -> Any | None:
    """The connection from Airflow's secrets chain, in a task or in a server process.

    The Task SDK's lookup serves tasks and triggers; a process without a task supervisor
    and without ``_AIRFLOW_PROCESS_CONTEXT=server`` (a plugin imported by a CLI, a
    scheduler helper) only sees environment variables there, so the metadata database is
    asked through Airflow core instead of silently falling back to SQLite.
    """
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    except Exception:
        pass
    try:
        from airflow.models.connection import Connection

        return Connection.get_connection_from_secrets(conn_id)
    except Exception:
        return None


# Extras of a Postgres connection that libpq (psycopg2) takes as connection parameters.
_LIBPQ_EXTRAS = (
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "connect_timeout",
    "application_name",
    "options",
    "keepalives",
    "keepalives_idle",
    "target_session_attrs",
)


def _postgres_url(
    login: str | None,
    password: str | None,
    host: str | None,
    port: Any,
    schema: str | None,
    extra: dict[str, Any] | None,
) -> str:
    """A psycopg2 URL built by SQLAlchemy, not by string concatenation: a password with
    ``@``, ``/``, ``#`` or ``:`` is escaped, and libpq's extras (``sslmode``...) and
    ``sqlalchemy_query`` (as PostgresHook reads it) are kept as query parameters."""
    from sqlalchemy.engine import URL

    extra = extra or {}
    query = {k: str(extra[k]) for k in _LIBPQ_EXTRAS if extra.get(k) is not None}
    more = extra.get("sqlalchemy_query")
    if isinstance(more, dict):
        query.update({str(k): str(v) for k, v in more.items()})
    return URL.create(
        "postgresql+psycopg2",
        username=login or None,
        password=password or None,
        host=host or None,
        port=int(port) if port else None,
        database=schema or None,
        query=query,
    ).render_as_string(hide_password=False)


def _uri_from_json(data: dict[str, Any]) -> str:
    """An ``AIRFLOW_CONN_*`` variable in Airflow's JSON form."""
    kind = data.get("conn_type", "postgres")
    if kind == "sqlite":
        return f"sqlite:///{data['host']}"
    extra = data.get("extra") or {}
    if isinstance(extra, str):
        extra = json.loads(extra) if extra.strip() else {}
    return _postgres_url(
        data.get("login"),
        data.get("password"),
        data.get("host", "localhost"),
        data.get("port"),
        data.get("schema"),
        extra,
    )


_ENGINES: dict[str, Engine] = {}
_ENGINE_LOCK = threading.Lock()


def _forget_parent_connections() -> None:
    """In a forked child: the pooled connections belong to the parent, which may still use
    them (the scheduler writes run ends while its LocalExecutor forks workers). The child
    drops them unclosed and opens its own (SQLAlchemy's rule for fork). The lock is new too:
    another thread of the parent may have held it at the fork."""
    global _ENGINE_LOCK
    _ENGINE_LOCK = threading.Lock()
    for engine in _ENGINES.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


def _engine(url: str) -> Engine:
    with _ENGINE_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 60})
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
            else:
                # No pre-ping: a task is a fresh process with a fresh pool; long-lived
                # processes recycle connections instead of paying a round trip per checkout.
                engine = create_engine(url, pool_recycle=300, pool_size=2, max_overflow=2)
            # Every value written passes Airflow's secrets masker (ledgerflow.secrets).
            secrets.install(engine)
            _ENGINES[url] = engine
        return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # The driver's own transaction handling is turned off: BEGIN IMMEDIATE takes the
    # write lock up front, so two writers queue instead of failing mid-transaction.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()
