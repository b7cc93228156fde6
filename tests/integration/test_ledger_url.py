"""The ledger's URL from an Airflow connection: built by SQLAlchemy, not by string
concatenation, so a password with ``@/#:?`` reaches the right server and libpq extras
(``sslmode``, ``application_name``...) are kept. Against the real Postgres on
127.0.0.1:5432 (trust authentication: the server ignores the password, so a URL that
parses is one that connects; a mangled one pointed at a host named after the password)."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger, resolve_url
from ledgerflow.testing.postgres import fresh_database

pytestmark = pytest.mark.integration

PASSWORD = "p@ss/w#rd:?x=1"


def test_a_json_connection_with_an_awkward_password_and_extras_reaches_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fresh_database("lf_url") as url:
        database = url.rsplit("/", 1)[1]
        conn = {
            "conn_type": "postgres",
            "login": "postgres",
            "password": PASSWORD,
            "host": "127.0.0.1",
            "port": 5432,
            "schema": database,
            "extra": {"sslmode": "disable", "application_name": "lf-url-test"},
        }
        monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_DB", json.dumps(conn))
        resolved = resolve_url()
        ledger = Ledger(resolved)
        try:
            ledger.migrate()
            with ledger.engine.connect() as c:
                assert c.execute(text("SELECT current_database()")).scalar_one() == database
                name = c.execute(text("SELECT current_setting('application_name')")).scalar_one()
            assert name == "lf-url-test"
            assert ledger.engine.url.password == PASSWORD
            assert ledger.engine.url.query["sslmode"] == "disable"
        finally:
            ledger.engine.dispose()
