"""Report the tables a step touches to Airflow's hook lineage collector.

Airflow 3.3.2's collector (``airflow.sdk.lineage.get_hook_lineage_collector``) is what
the OpenLineage provider reads when a task ends (its ``ExtractorManager.get_hook_lineage``
turns each collected asset into an input or output dataset). Without a registered
``HookLineageReader`` (the OpenLineage provider registers one) the collector is a
``NoOpCollector``: nothing here parses or queries anything then.

Tables are reported as assets of the ``postgres`` scheme through the factory the
Postgres provider registers (``airflow/providers/postgres/assets/postgres.py``:
``postgres://host:port/database/schema/table``, which its OpenLineage converter maps to
namespace ``postgres://host:port`` and name ``database.schema.table``). No installed
provider defines an asset scheme for SQLite, so a SQLite database reports nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection

    from ledgerflow.tools.sql_tables import SqlTables, TableRef

log = logging.getLogger(__name__)

POSTGRES_TYPES = frozenset({"postgres", "postgresql"})


def collector() -> Any | None:
    """The hook lineage collector, or None when nobody reads it."""
    from airflow.sdk.lineage import NoOpCollector, get_hook_lineage_collector

    found = get_hook_lineage_collector()
    return None if isinstance(found, NoOpCollector) else found


def report_sql_on_ledger(db: Connection, statement: str, conn_id: str) -> None:
    """The ``sql`` tool ran ``statement`` in the ledger's transaction ``db``."""
    try:
        sink = collector()
        if sink is None or db.dialect.name != "postgresql":
            return
        from ledgerflow.tools.sql_tables import tables_in

        tables = tables_in(statement)
        if not tables.inputs and not tables.outputs:
            return
        url = db.engine.url

        def default_schema() -> str | None:
            # In a savepoint: whatever happens, the step's own transaction stays usable.
            with db.begin_nested():
                return db.exec_driver_sql("SELECT current_schema()").scalar()

        _report(
            sink,
            context=_postgres_hook(conn_id, url.database),
            host=url.host or "localhost",
            port=url.port or 5432,
            database=url.database or "",
            tables=tables,
            default_schema=default_schema,
        )
    except Exception:  # lineage never fails a step
        log.debug("sql lineage on the ledger not reported", exc_info=True)


def report_sql_on_hook(hook: Any, conn: Any, statement: str) -> None:
    """The ``sql`` tool ran ``statement`` through ``hook`` (a connection's DbApiHook)."""
    try:
        sink = collector()
        if sink is None or conn.conn_type not in POSTGRES_TYPES:
            return
        from ledgerflow.tools.sql_tables import tables_in

        tables = tables_in(statement)
        if not tables.inputs and not tables.outputs:
            return

        _report(
            sink,
            context=hook,
            host=conn.host or "localhost",
            port=conn.port or 5432,
            database=getattr(hook, "database", None) or conn.schema or "",
            tables=tables,
            default_schema=lambda: _current_schema(hook),
        )
    except Exception:  # lineage never fails a step
        log.debug("sql lineage on a connection not reported", exc_info=True)


def report_dataset_read(url: str, conn_id: str, *, table: str | None, query: str | None) -> None:
    """A quality step read ``table`` (``schema.table`` or ``table``), or what ``query``
    reads, in the database at the SQLAlchemy ``url`` (the connection ``conn_id``)."""
    try:
        sink = collector()
        if sink is None:
            return
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.get_backend_name() != "postgresql":
            return
        from ledgerflow.tools.sql_tables import tables_in

        tables = tables_in(f"SELECT * FROM {table}" if table else query or "")
        if not tables.inputs:
            return

        def default_schema() -> str | None:
            from sqlalchemy import create_engine
            from sqlalchemy.pool import NullPool

            engine = create_engine(parsed, poolclass=NullPool)
            try:
                with engine.connect() as conn:
                    return conn.exec_driver_sql("SELECT current_schema()").scalar()
            finally:
                engine.dispose()

        _report(
            sink,
            context=_postgres_hook(conn_id, parsed.database),
            host=parsed.host or "localhost",
            port=parsed.port or 5432,
            database=parsed.database or "",
            tables=tables,
            default_schema=default_schema,
        )
    except Exception:  # lineage never fails a step
        log.debug("quality lineage not reported", exc_info=True)


def _current_schema(hook: Any) -> str | None:
    # On a connection of its own, not hook.get_first(): that would report the probe as
    # one more SQL job of the task.
    from contextlib import closing

    with closing(hook.get_conn()) as raw, closing(raw.cursor()) as cur:
        cur.execute("SELECT current_schema()")
        row = cur.fetchone()
    return row[0] if row else None


def _report(
    sink: Any,
    *,
    context: Any,
    host: str,
    port: int,
    database: str,
    tables: SqlTables,
    default_schema: Callable[[], str | None],
) -> None:
    schema: list[str] = []  # asked once, only when a name is unqualified

    def kwargs(table: TableRef) -> dict[str, Any]:
        if table.schema is None and not schema:
            schema.append(default_schema() or "public")
        return {
            "host": host,
            "port": int(port),
            "database": database,
            "schema": table.schema or schema[0],
            "table": table.name,
        }

    for table in tables.inputs:
        sink.add_input_asset(context=context, scheme="postgres", asset_kwargs=kwargs(table))
    for table in tables.outputs:
        sink.add_output_asset(context=context, scheme="postgres", asset_kwargs=kwargs(table))


def _postgres_hook(conn_id: str, database: str | None) -> Any:
    """A hook for the ledger's connection: the lineage context a converter may consult
    (built without connecting)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    from ledgerflow import settings
    from ledgerflow.ledger._engine import DEFAULT_CONN_ID

    if conn_id == DEFAULT_CONN_ID:
        conn_id = str(settings.get("conn_id"))
    return PostgresHook(postgres_conn_id=conn_id, database=database)
