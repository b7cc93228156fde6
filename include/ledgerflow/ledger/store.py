"""Repository functions of the ledger. Every write is a short transaction.

The ledger is addressed by the Airflow connection ``ledgerflow_db``: Postgres through
the postgres provider, or a SQLite file under ``AIRFLOW_HOME`` when the connection is
not defined (the embedded default).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    event,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from ledgerflow import observability
from ledgerflow.errors import LedgerError
from ledgerflow.ledger import schema as t

DEFAULT_CONN_ID = "ledgerflow_db"
_HOSTNAME = socket.gethostname()


def now() -> datetime:
    return datetime.now(timezone.utc)


def dumps(value: Any) -> str:
    return json.dumps(value, default=str, sort_keys=True, separators=(",", ":"))


def loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    step_key: str
    step_id: str
    map_index: int
    status: str
    attempts: int
    idempotency_key: str | None
    output: Any
    error: str | None


@dataclass(frozen=True)
class Effect:
    idempotency_key: str
    tool: str
    status: str
    result: Any
    run_id: str
    step_key: str


def default_sqlite_path() -> Path:
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    return home / "ledgerflow.db"


def resolve_url(conn_id: str = DEFAULT_CONN_ID) -> str:
    """The SQLAlchemy URL of the ledger.

    Order: the Airflow connection ``conn_id`` (environment variable, secrets backend or
    the metadata database, whatever Airflow is configured with), else the SQLite file
    ``$AIRFLOW_HOME/ledgerflow.db``.
    """
    uri = _airflow_connection_uri(conn_id)
    if uri is None:
        return f"sqlite:///{default_sqlite_path()}"
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
        from sqlalchemy.engine import URL

        query = conn.extra_dejson.get("sqlalchemy_query") or {}  # as PostgresHook reads it
        return URL.create(
            "postgresql+psycopg2",
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=int(conn.port) if conn.port else None,
            database=conn.schema or None,
            query=query if isinstance(query, dict) else {},
        ).render_as_string(hide_password=False)
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


def _uri_from_json(data: dict[str, Any]) -> str:
    kind = data.get("conn_type", "postgres")
    if kind == "sqlite":
        return f"sqlite:///{data['host']}"
    auth = data.get("login") or ""
    if data.get("password"):
        auth += f":{data['password']}"
    host = data.get("host", "localhost")
    port = f":{data['port']}" if data.get("port") else ""
    return f"postgresql://{auth}{'@' if auth else ''}{host}{port}/{data.get('schema', '')}"


_ENGINES: dict[str, Engine] = {}
_ENGINE_LOCK = threading.Lock()


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


class Ledger:
    """The durable record of runs, steps, attempts, effects, dead letters and events."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        self._migrated = False

    @classmethod
    def from_airflow(cls, conn_id: str = DEFAULT_CONN_ID) -> Ledger:
        return cls(resolve_url(conn_id))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def begin(self, conn: Connection | None = None) -> Iterator[Connection]:
        """A transaction; inside an open one (``conn`` given), just that connection."""
        if conn is not None:
            yield conn
            return
        with self.engine.begin() as own:
            yield own

    @contextmanager
    def _read(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
            return
        with self.engine.connect() as own:
            yield own

    def _insert(self, table: Any) -> Any:
        return (postgresql if self.dialect == "postgresql" else sqlite).insert(table)

    # -- schema -----------------------------------------------------------------

    def migrate(self) -> int:
        """Apply pending migrations; safe to call from many processes at once."""
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
            for version, _title, apply in t.MIGRATIONS:
                if version not in applied:
                    apply(conn)
                    conn.execute(
                        t.schema_version.insert().values(version=version, applied_at=now())
                    )
        self._migrated = True
        return t.LATEST

    def schema_version(self) -> int:
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
                if self.engine.dialect.has_table(conn, "lf_schema_version"):
                    raise
            return 0

    # -- runs -------------------------------------------------------------------

    def ensure_run(
        self,
        *,
        run_id: str,
        dag_id: str,
        workflow: str,
        version: int,
        params: dict[str, Any],
        trigger_kind: str,
        retry_of: str | None = None,
        retry_from: str | None = None,
        spec_hash: str | None = None,
        conn: Connection | None = None,
    ) -> bool:
        """Register a run once; returns True when this call created it."""
        stamp = now()
        with self.begin(conn) as conn:
            result = conn.execute(
                self._insert(t.runs)
                .values(
                    run_id=run_id,
                    dag_id=dag_id,
                    workflow=workflow,
                    version=version,
                    params=dumps(params),
                    trigger_kind=trigger_kind,
                    retry_of=retry_of,
                    retry_from=retry_from,
                    spec_hash=spec_hash,
                    status="running",
                    created_at=stamp,
                    updated_at=stamp,
                )
                .on_conflict_do_nothing()
            )
            created = bool(result.rowcount)
            if created:
                started: dict[str, Any] = {"trigger": trigger_kind}
                if retry_of:
                    started.update(retry_of=retry_of, retry_from=retry_from)
                self._event(conn, run_id, None, "run_started", started)
                observability.run_started(workflow, version, trigger_kind)
        return created

    def finish_run(self, run_id: str, status: str) -> None:
        with self.begin() as conn:
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id)
                .values(status=status, updated_at=now())
            )
            self._event(conn, run_id, None, f"run_{status}", None)
        observability.run_finished(run_id, status)

    def run(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).mappings().first()
        return None if row is None else {**row, "params": loads(row["params"])}

    def runs(self, workflow: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        query = select(t.runs).order_by(t.runs.c.created_at.desc()).limit(limit)
        if workflow:
            query = query.where(t.runs.c.workflow == workflow)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def retries_of(self, run_id: str) -> list[dict[str, Any]]:
        """The runs that retry ``run_id`` (directly), oldest first."""
        query = (
            select(t.runs)
            .where(t.runs.c.retry_of == run_id)
            .order_by(t.runs.c.created_at, t.runs.c.run_id)
        )
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def unfinished_runs(self) -> dict[tuple[str, int], int]:
        """``{(workflow, version): runs still running}``."""
        from sqlalchemy import func

        query = (
            select(t.runs.c.workflow, t.runs.c.version, func.count())
            .where(t.runs.c.status == "running")
            .group_by(t.runs.c.workflow, t.runs.c.version)
        )
        with self.engine.connect() as conn:
            return {(w, int(v)): int(n) for w, v, n in conn.execute(query)}

    # -- the saga ---------------------------------------------------------------

    def start_saga(self, run_id: str, failed_step: str | None) -> bool:
        """Mark the run's saga ``compensating`` (once); True when this call did it."""
        with self.begin() as conn:
            changed = conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id, t.runs.c.saga.is_(None))
                .values(saga="compensating", failed_step=failed_step, updated_at=now())
            ).rowcount
            if changed:
                self._event(conn, run_id, failed_step, "saga_compensating", None)
        return bool(changed)

    def finish_saga(self, run_id: str) -> str | None:
        """``compensated`` or ``compensation_failed`` from the compensation records."""
        with self.begin() as conn:
            saga = conn.execute(select(t.runs.c.saga).where(t.runs.c.run_id == run_id)).scalar()
            if saga != "compensating":
                return saga
            statuses = {
                r[0]
                for r in conn.execute(
                    select(t.compensations.c.status).where(t.compensations.c.run_id == run_id)
                )
            }
            outcome = "compensation_failed" if "failed" in statuses else "compensated"
            conn.execute(
                update(t.runs)
                .where(t.runs.c.run_id == run_id)
                .values(saga=outcome, updated_at=now())
            )
            self._event(conn, run_id, None, f"saga_{outcome}", None)
        observability.run_finished(run_id, outcome)
        return outcome

    def record_compensation(
        self,
        run_id: str,
        step_key: str,
        status: str,
        tool: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self.begin() as conn:
            values = {"tool": tool, "status": status, "detail": detail, "updated_at": now()}
            insert = self._insert(t.compensations).values(
                run_id=run_id, step_key=step_key, **values
            )
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[t.compensations.c.run_id, t.compensations.c.step_key],
                    set_=values,
                )
            )
            self._event(conn, run_id, step_key, f"compensation_{status}", None)

    def compensations(self, run_id: str) -> dict[str, dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.compensations).where(t.compensations.c.run_id == run_id)
            ).mappings()
            return {r["step_key"]: dict(r) for r in rows}

    # -- checkpoints ------------------------------------------------------------

    def checkpoint(
        self, run_id: str, step_key: str, conn: Connection | None = None
    ) -> Checkpoint | None:
        with self._read(conn) as conn:
            row = (
                conn.execute(
                    select(t.steps).where(
                        t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _checkpoint(row)

    def checkpoint_and_outputs(
        self, run_id: str, step_key: str, step_ids: Iterable[str], conn: Connection
    ) -> tuple[Checkpoint | None, dict[str, dict[str, Any]]]:
        """A step's own checkpoint and the outputs of ``step_ids``, in one query."""
        wanted = sorted(step_ids)
        condition = t.steps.c.step_key == step_key
        if wanted:
            condition = condition | t.steps.c.step_id.in_(wanted)
        rows = conn.execute(
            select(t.steps)
            .where(t.steps.c.run_id == run_id, condition)
            .order_by(t.steps.c.step_id, t.steps.c.map_index)
        ).mappings()
        found = [_checkpoint(r) for r in rows]
        own = next((c for c in found if c.step_key == step_key), None)
        return own, _outputs(c for c in found if c.step_id in wanted)

    def checkpoints(self, run_id: str) -> list[Checkpoint]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.steps)
                .where(t.steps.c.run_id == run_id)
                .order_by(t.steps.c.step_id, t.steps.c.map_index)
            ).mappings()
            return [_checkpoint(r) for r in rows]

    def begin_attempt(
        self,
        *,
        run_id: str,
        step_key: str,
        step_id: str,
        map_index: int,
        try_number: int,
        args: Any,
        idempotency_key: str | None,
        first: bool = False,
        conn: Connection | None = None,
    ) -> int:
        """Record an attempt; ``first``: no checkpoint row existed (skips the lost-attempt sweep)."""
        stamp = now()
        with self.begin(conn) as conn:
            insert = self._insert(t.steps).values(
                run_id=run_id,
                step_key=step_key,
                step_id=step_id,
                map_index=map_index,
                status="running",
                attempts=1,
                idempotency_key=idempotency_key,
                args=dumps(args),
                started_at=stamp,
            )
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[t.steps.c.run_id, t.steps.c.step_key],
                    set_={
                        "status": "running",
                        "attempts": t.steps.c.attempts + 1,
                        "idempotency_key": idempotency_key,
                        "args": insert.excluded.args,
                        "error": None,
                    },
                )
            )
            if not first:
                # A new attempt proves that an earlier one still marked running is gone
                # (its process was killed or lost); say so instead of leaving it running.
                conn.execute(
                    update(t.attempts)
                    .where(
                        t.attempts.c.run_id == run_id,
                        t.attempts.c.step_key == step_key,
                        t.attempts.c.status == "running",
                    )
                    .values(status="lost", ended_at=stamp)
                )
            attempt_id = conn.execute(
                _INSERT_ATTEMPT,
                {
                    "run_id": run_id,
                    "step_key": step_key,
                    "try_number": try_number,
                    "status": "running",
                    "pid": os.getpid(),
                    "hostname": _HOSTNAME,
                    "started_at": stamp,
                },
            ).scalar_one()
        observability.attempt_started(run_id, step_key, try_number, int(attempt_id))
        return int(attempt_id)

    def complete_step(
        self,
        conn: Connection,
        *,
        run_id: str,
        step_key: str,
        attempt_id: int,
        output: Any,
        reused: bool,
    ) -> None:
        """Mark the step completed; call inside the transaction that holds the effect."""
        stamp = now()
        conn.execute(
            _COMPLETE_STEP,
            {"b_run": run_id, "b_key": step_key, "output": dumps(output), "stamp": stamp},
        )
        conn.execute(_COMPLETE_ATTEMPT, {"b_id": attempt_id, "stamp": stamp})
        self._event(conn, run_id, step_key, "step_completed", {"reused_effect": reused})
        observability.attempt_ended(attempt_id)

    def mark_step(
        self,
        *,
        run_id: str,
        step_key: str,
        step_id: str,
        map_index: int,
        status: str,
        conn: Connection | None = None,
    ) -> None:
        """Record a step that ended without an attempt (``skipped``)."""
        with self.begin(conn) as conn:
            conn.execute(
                self._insert(t.steps)
                .values(
                    run_id=run_id,
                    step_key=step_key,
                    step_id=step_id,
                    map_index=map_index,
                    status=status,
                    attempts=0,
                    completed_at=now(),
                )
                .on_conflict_do_nothing()
            )
            self._event(conn, run_id, step_key, f"step_{status}", None)

    def fail_attempt(
        self,
        *,
        run_id: str,
        step_key: str,
        attempt_id: int,
        error: BaseException,
        final: bool,
        conn: Connection | None = None,
    ) -> None:
        stamp = now()
        message = _error_text(error)
        with self.begin(conn) as conn:
            conn.execute(
                update(t.attempts)
                .where(t.attempts.c.id == attempt_id)
                .values(
                    status="failed", error_type=_error_type(error), error=message, ended_at=stamp
                )
            )
            conn.execute(
                update(t.steps)
                .where(t.steps.c.run_id == run_id, t.steps.c.step_key == step_key)
                .values(status="failed" if final else "retrying", error=message)
            )
            self._event(
                conn,
                run_id,
                step_key,
                "step_failed" if final else "attempt_failed",
                {"error_type": _error_type(error), "error": message[:500]},
            )
        observability.attempt_ended(attempt_id, error)

    def attempts(self, run_id: str, step_key: str | None = None) -> list[dict[str, Any]]:
        query = select(t.attempts).where(t.attempts.c.run_id == run_id).order_by(t.attempts.c.id)
        if step_key is not None:
            query = query.where(t.attempts.c.step_key == step_key)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def outputs(
        self, run_id: str, step_ids: Iterable[str] | None = None, conn: Connection | None = None
    ) -> dict[str, dict[str, Any]]:
        """``{step_id: {"status", "output"}}`` of the run's steps (or only ``step_ids``).

        A for_each step's output is the list of its items' outputs, in item order.
        """
        query = select(t.steps).where(t.steps.c.run_id == run_id)
        if step_ids is not None:
            wanted = sorted(step_ids)
            if not wanted:
                return {}
            query = query.where(t.steps.c.step_id.in_(wanted))
        with self._read(conn) as conn:
            rows = conn.execute(query.order_by(t.steps.c.step_id, t.steps.c.map_index)).mappings()
            return _outputs(_checkpoint(r) for r in rows)

    # -- effects ----------------------------------------------------------------

    def effect(self, key: str, conn: Connection | None = None) -> Effect | None:
        query = select(t.effects).where(t.effects.c.idempotency_key == key)
        with self._read(conn) as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return Effect(
            idempotency_key=row["idempotency_key"],
            tool=row["tool"],
            status=row["status"],
            result=loads(row["result"]),
            run_id=row["run_id"],
            step_key=row["step_key"],
        )

    def claim_effect(
        self, conn: Connection, *, key: str, tool: str, run_id: str, step_key: str
    ) -> bool:
        """Insert a pending effect row; False when the key is already claimed."""
        result = conn.execute(
            self._insert(t.effects)
            .values(
                idempotency_key=key,
                tool=tool,
                run_id=run_id,
                step_key=step_key,
                status="pending",
                created_at=now(),
            )
            .on_conflict_do_nothing()
        )
        return bool(result.rowcount)

    def insert_effect(
        self, conn: Connection, *, key: str, tool: str, run_id: str, step_key: str, result: Any
    ) -> None:
        """Record a finished effect. A plain INSERT: a concurrent twin with the same key fails
        on the unique key and its transaction (with its effect) rolls back."""
        stamp = now()
        conn.execute(
            t.effects.insert().values(
                idempotency_key=key,
                tool=tool,
                run_id=run_id,
                step_key=step_key,
                status="done",
                result=dumps(result),
                created_at=stamp,
                completed_at=stamp,
            )
        )

    def finish_effect(self, conn: Connection, *, key: str, result: Any) -> None:
        conn.execute(_FINISH_EFFECT, {"b_key": key, "result": dumps(result), "stamp": now()})

    def effects(self, run_id: str | None = None) -> list[dict[str, Any]]:
        query = select(t.effects).order_by(t.effects.c.id)
        if run_id is not None:
            query = query.where(t.effects.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    # -- dead letters and events ------------------------------------------------

    def dead_letter(
        self,
        *,
        workflow: str,
        version: int,
        run_id: str,
        step_key: str,
        attempts: int,
        error: BaseException,
        args: Any,
        idempotency_key: str | None,
        conn: Connection | None = None,
    ) -> None:
        with self.begin(conn) as conn:
            conn.execute(
                self._insert(t.dead_letters)
                .values(
                    workflow=workflow,
                    version=version,
                    run_id=run_id,
                    step_key=step_key,
                    attempts=attempts,
                    error_type=_error_type(error),
                    error=_error_text(error),
                    args=dumps(args),
                    idempotency_key=idempotency_key,
                    created_at=now(),
                )
                .on_conflict_do_nothing()
            )
            self._event(conn, run_id, step_key, "dead_lettered", {"attempts": attempts})
        observability.dead_lettered(workflow, step_key)

    def dead_letters(self, status: str | None = "open") -> list[dict[str, Any]]:
        query = select(t.dead_letters).order_by(t.dead_letters.c.id)
        if status:
            query = query.where(t.dead_letters.c.status == status)
        with self.engine.connect() as conn:
            return [{**r, "args": loads(r["args"])} for r in conn.execute(query).mappings()]

    def dead_letter_by_id(self, letter_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(t.dead_letters).where(t.dead_letters.c.id == letter_id))
                .mappings()
                .first()
            )
        return None if row is None else {**row, "args": loads(row["args"])}

    def resolve_dead_letter(self, letter_id: int, how: str) -> None:
        with self.begin() as conn:
            row = conn.execute(
                select(t.dead_letters.c.run_id, t.dead_letters.c.step_key).where(
                    t.dead_letters.c.id == letter_id
                )
            ).first()
            conn.execute(
                update(t.dead_letters)
                .where(t.dead_letters.c.id == letter_id)
                .values(status="resolved")
            )
            if row is not None:
                self._event(conn, row[0], row[1], "dead_letter_resolved", {"how": how})

    def events(self, run_id: str) -> list[dict[str, Any]]:
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


# The statements of every step, built once: building a Core statement per call costs
# more Python than the database needs to run it.
_COMPLETE_STEP = (
    update(t.steps)
    .where(t.steps.c.run_id == bindparam("b_run"), t.steps.c.step_key == bindparam("b_key"))
    .values(
        status="completed", output=bindparam("output"), completed_at=bindparam("stamp"), error=None
    )
)
_COMPLETE_ATTEMPT = (
    update(t.attempts)
    .where(t.attempts.c.id == bindparam("b_id"))
    .values(status="completed", ended_at=bindparam("stamp"))
)
_INSERT_EVENT = t.events.insert()
_INSERT_ATTEMPT = t.attempts.insert().returning(t.attempts.c.id)
_FINISH_EFFECT = (
    update(t.effects)
    .where(t.effects.c.idempotency_key == bindparam("b_key"))
    .values(status="done", result=bindparam("result"), completed_at=bindparam("stamp"))
)


def _outputs(checkpoints: Iterable[Checkpoint]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for cp in checkpoints:
        if cp.map_index < 0:
            result[cp.step_id] = {"status": cp.status, "output": cp.output}
        else:
            entry = result.setdefault(cp.step_id, {"status": "completed", "output": []})
            entry["output"].append(cp.output)
            if cp.status != "completed":
                entry["status"] = cp.status
    return result


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        run_id=row["run_id"],
        step_key=row["step_key"],
        step_id=row["step_id"],
        map_index=row["map_index"],
        status=row["status"],
        attempts=row["attempts"],
        idempotency_key=row["idempotency_key"],
        output=loads(row["output"]),
        error=row["error"],
    )


def _error_type(error: BaseException) -> str:
    kind = type(error)
    return (
        kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    )


def _error_text(error: BaseException) -> str:
    return (str(error) or type(error).__name__)[:4000]
