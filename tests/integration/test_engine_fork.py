"""A process forked from one that uses the ledger opens its own connections.

The scheduler writes run ends to the ledger (``ledgerflow.run_listener``) and its
LocalExecutor forks workers, whose task processes use the ledger too. A child that took
a connection from the pool it inherited would talk on the parent's socket: two processes
on one Postgres session, their statements and results interleaved. After a fork the
child drops what it inherited (``_engine._forget_parent_connections``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.postgres import fresh_database

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with fresh_database("lf_engine_fork") as url:
        ledger = Ledger(url.replace("postgresql://", "postgresql+psycopg2://", 1))
        yield ledger
        ledger.engine.dispose()


def _backend(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_forked_child_does_not_use_its_parents_pooled_connection(ledger: Ledger) -> None:
    parent = _backend(ledger)  # now checked in to the pool, open
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the same URL gives the same (inherited) engine
        try:
            os.close(read)
            child = _backend(Ledger(str(ledger.url)))
            os.write(write, str(child).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        child = int(answer.read() or 0)
    os.waitpid(pid, 0)
    assert child and child != parent
    assert _backend(ledger) == parent  # the parent's session is intact and still pooled
