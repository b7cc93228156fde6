"""Throw-away Postgres databases for tests and benchmarks (127.0.0.1:5432 by default)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

ADMIN_URL = os.environ.get("LEDGERFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _admin() -> object:
    import psycopg2

    conn = psycopg2.connect(ADMIN_URL)
    conn.autocommit = True
    return conn


def create_database(prefix: str = "lf_test") -> str:
    """Create an empty database; returns its ``postgresql://`` URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = _admin()
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()  # type: ignore[attr-defined]
    return ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = _admin()
    try:
        with conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()  # type: ignore[attr-defined]


@contextmanager
def fresh_database(prefix: str = "lf_test") -> Iterator[str]:
    url = create_database(prefix)
    try:
        yield url
    finally:
        drop_database(url)
