"""The ledger's Alembic revisions and the cheap checks around them (SQLite; both
databases: tests/integration/test_migrations.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ledgerflow.cli import main
from ledgerflow.ledger import schema


def test_the_constants_the_tasks_check_are_the_heads_of_the_revisions() -> None:
    """``schema.LATEST`` and ``DEMO_HEAD`` (what a task compares with, without Alembic)
    are the heads of the ``ledger`` and ``demo`` branches; every revision has a title and
    a downgrade, and ledger revisions are numbers in order."""
    from ledgerflow.ledger._migrate import revisions, scripts, title

    heads = {scripts().get_revision(h).branch_labels.pop(): h for h in scripts().get_heads()}  # type: ignore[union-attr]
    assert heads == {"ledger": f"{schema.LATEST:04d}", "demo": schema.DEMO_HEAD}
    ledger = revisions("ledger")
    assert [int(s.revision) for s in ledger] == sorted(int(s.revision) for s in ledger)
    for script in [*ledger, *revisions("demo")]:
        assert title(script) and title(script) != script.revision
        assert callable(script.module.downgrade), script.revision


def test_an_up_to_date_ledger_is_checked_without_importing_alembic(tmp_path: Path) -> None:
    """A process that finds the ledger at its version (every task but the first) asks
    one query and never imports Alembic; one that has to migrate does import it."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    code = (
        "import sys; from ledgerflow.ledger.store import Ledger; "
        f"Ledger({url!r}).migrate(); print('alembic' in sys.modules)"
    )

    def run() -> str:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert run() == "True"  # the first: migrates
    assert run() == "False"  # the next ones: one query


def test_sql_is_printed_without_connecting_and_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migrate --sql`` writes the SQL for the URL's dialect and never connects (the
    host does not exist, the SQLite file is not created); the password is not in it."""
    pg = "postgresql+psycopg2://lf:s3cret-pw@ledger.invalid:5432/ledger"
    assert main(["migrate", "--sql", "--no-demo", "--url", pg]) == 0
    sql = capsys.readouterr().out
    assert "TIMESTAMP WITH TIME ZONE" in sql  # Postgres's dialect
    assert "INSERT INTO lf_alembic_version (version_num) VALUES ('0001')" in sql
    assert "s3cret-pw" not in sql and "demo_" not in sql

    path = tmp_path / "never.db"
    assert main(["migrate", "--sql", "--demo", "--url", f"sqlite:///{path}"]) == 0
    sql = capsys.readouterr().out
    assert "CREATE TABLE demo_payments" in sql and "CREATE TABLE lf_runs" in sql
    assert not path.exists()


def test_sql_of_a_downgrade_and_bad_revisions(capsys: pytest.CaptureFixture[str]) -> None:
    """``--sql --from 0008 --to 0007`` prints the downgrade of 0008 only, ``--from 0005``
    the upgrades after 0005; an unknown
    revision is one line naming it, exit 2, no traceback."""
    url = "postgresql://ledger.invalid/x"
    assert main(["migrate", "--sql", "--from", "0008", "--to", "0007", "--url", url]) == 0
    sql = capsys.readouterr().out
    assert "DROP INDEX lf_runs_retry_of" in sql and "DROP TABLE" not in sql
    assert main(["migrate", "--sql", "--no-demo", "--from", "0005", "--url", url]) == 0
    sql = capsys.readouterr().out
    assert [x for x in sql.splitlines() if x.startswith("-- Running")] == [
        "-- Running upgrade 0005 -> 0006",
        "-- Running upgrade 0006 -> 0007",
        "-- Running upgrade 0007 -> 0008",
        "-- Running upgrade 0008 -> 0009",
        "-- Running upgrade 0009 -> 0010",
        "-- Running upgrade 0010 -> 0011",
        "-- Running upgrade 0011 -> 0012",
        "-- Running upgrade 0012 -> 0013",
        "-- Running upgrade 0013 -> 0014",
        "-- Running upgrade 0014 -> 0016",
        "-- Running upgrade 0016 -> 0017",
    ]
    assert main(["migrate", "--sql", "--to", "0042", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "LedgerError" in err and "0042" in err and "Traceback" not in err


def test_to_an_unknown_revision_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migrate --to`` a revision that does not exist exits 2 naming it; ``--from``
    without ``--sql`` is refused."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["migrate", "--url", url, "--to", "0042"]) == 2
    assert "cannot migrate the ledger to '0042'" in capsys.readouterr().err
    assert main(["migrate", "--url", url, "--from", "0001"]) == 2


def test_the_demo_setting_brings_the_demo_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's tables go with its tools: ``[ledgerflow] demo_tools`` (here from
    ``AIRFLOW__LEDGERFLOW__DEMO_TOOLS``) decides whether ``migrate()`` applies them."""
    from ledgerflow.ledger.store import Ledger

    monkeypatch.delenv("LEDGERFLOW_DEMO_TOOLS", raising=False)
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__DEMO_TOOLS", "false")
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.migrate()
    assert ledger.revisions() == {f"{schema.LATEST:04d}"}
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__DEMO_TOOLS", "true")
    ledger.migrate()
    assert ledger.revisions() == {f"{schema.LATEST:04d}", schema.DEMO_HEAD}


def test_the_migrations_ship_as_packages_and_the_package_data_names_real_files() -> None:
    """The revisions are modules of packages setuptools finds (no data file to forget),
    and every pattern of ``package-data`` matches a file that exists."""
    import tomllib
    from setuptools import find_packages

    root = Path(__file__).resolve().parents[2]
    found = set(find_packages(root / "include"))
    assert {"ledgerflow.ledger.migrations", "ledgerflow.ledger.migrations.versions"} <= found
    folder = root / "include/ledgerflow/ledger/migrations"
    shipped = {p.suffix for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert shipped == {".py"}
    config = tomllib.loads((root / "pyproject.toml").read_text())
    for package, patterns in config["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((root / "include" / package).glob(pattern)), (package, pattern)
