"""Shared fixtures. Every test's docstring states the invariant it pins."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"

os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
# The shipped and test workflows use the demo's tools: on the allow-list for every test
# and for every process a test starts (Airflow stacks, CLI children).
os.environ.setdefault("LEDGERFLOW_DEMO_TOOLS", "1")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty Postgres database (``postgresql://`` URL), dropped afterwards."""
    from ledgerflow.testing.postgres import fresh_database

    with fresh_database("lf_it") as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The ledger on both supported databases."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    from ledgerflow.testing.postgres import fresh_database

    with fresh_database("lf_it") as url:
        yield url.replace("postgresql://", "postgresql+psycopg2://", 1)
