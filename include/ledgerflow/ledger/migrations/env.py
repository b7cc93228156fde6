"""Alembic's environment for the ledger, run by ``ledgerflow.ledger._migrate``.

Online, the caller hands over an open connection (``config.attributes["connection"]``)
inside its own transaction, which already holds the migration lock: every revision and
the version table update commit together, or not at all. Offline (``--sql``), the SQL is
written for the dialect of ``sqlalchemy.url`` without connecting.
"""

from __future__ import annotations

from alembic import context

from ledgerflow.ledger.schema import VERSION_TABLE, metadata

config = context.config

if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
        target_metadata=metadata,
    )
else:
    context.configure(
        connection=config.attributes["connection"],
        version_table=VERSION_TABLE,
        target_metadata=metadata,
    )
with context.begin_transaction():
    context.run_migrations()
