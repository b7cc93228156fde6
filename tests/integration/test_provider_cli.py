"""The installed package as Airflow's own CLI sees it, in real ``airflow`` processes with a
throw-away AIRFLOW_HOME: ``airflow providers list`` knows Ledgerflow and its version,
``airflow plugins`` lists its plugin once (with or without the plugins-folder file), and
``airflow ledgerflow ...`` runs the ``ledgerflow`` CLI's commands on a SQLite ledger."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from ledgerflow.ledger.store import Ledger

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = Path(sys.executable).with_name("airflow")


def _env(home: Path, plugins: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("AIRFLOW__") and k not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")
    }
    home.mkdir(parents=True, exist_ok=True)
    plugins.mkdir(parents=True, exist_ok=True)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
    )
    return env


def _airflow(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(AIRFLOW), *args], env=env, capture_output=True, text=True, timeout=180
    )


def test_airflow_providers_list_shows_ledgerflow_with_its_version(tmp_path: Path) -> None:
    """``airflow providers list`` has a ``ledgerflow`` line with the installed version."""
    env = _env(tmp_path / "home", tmp_path / "plugins")
    done = _airflow(env, "providers", "list", "-o", "json")
    assert done.returncode == 0, done.stderr
    rows = {row["package_name"]: row for row in json.loads(done.stdout)}
    assert rows["ledgerflow"]["version"] == version("ledgerflow")
    assert "Durable workflows" in rows["ledgerflow"]["description"]
    table = _airflow(env, "providers", "list")
    print(next(line for line in table.stdout.splitlines() if line.startswith("ledgerflow ")))


# What every Airflow component does first: load the plugins (folder, then entry points).
PLUGINS_LOADED = """
import json
from airflow import plugins_manager
plugins, errors = plugins_manager._get_plugins()
print(json.dumps({"names": [p.name for p in plugins], "errors": errors,
                  "sources": {p.name: str(p.source) for p in plugins}}))
"""


@pytest.mark.parametrize("folder", ["with the plugins file", "entry point only"])
def test_airflow_loads_the_plugin_once(tmp_path: Path, folder: str) -> None:
    """``airflow plugins`` lists ``ledgerflow`` once, from the package's entry point,
    whether or not the plugins folder holds ``plugins/ledgerflow_plugin.py``; and loading
    the plugins records no import error (Airflow keeps the first plugin of a name and
    records each further one as "already registered")."""
    plugins = ROOT / "plugins" if folder == "with the plugins file" else tmp_path / "plugins"
    env = _env(tmp_path / "home", plugins)
    done = _airflow(env, "plugins", "-o", "json")
    assert done.returncode == 0, done.stderr
    names = [p["name"] for p in json.loads(done.stdout)]
    assert names.count("ledgerflow") == 1, names
    loaded = subprocess.run(
        [sys.executable, "-c", PLUGINS_LOADED], env=env, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["errors"] == {}
    assert result["names"].count("ledgerflow") == 1
    assert "ledgerflow.plugin:LedgerflowPlugin" in result["sources"]["ledgerflow"]


def test_airflow_ledgerflow_commands_run_on_a_sqlite_ledger(tmp_path: Path) -> None:
    """``airflow ledgerflow --help`` lists the commands; ``airflow ledgerflow runs`` and
    ``show`` read a SQLite ledger as ``ledgerflow runs`` does, and a missing run exits 1."""
    env = _env(tmp_path / "home", tmp_path / "plugins")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.migrate()
    ledger.ensure_run(
        run_id="checkout__v1/manual__1",
        dag_id="checkout__v1",
        workflow="checkout",
        version=1,
        params={"order_id": "A-1"},
        trigger_kind="manual",
    )
    helped = _airflow(env, "ledgerflow", "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("runs", "show", "retry", "dead-letters", "validate", "versions"):
        assert re.search(rf"^\s+{command}(\s|$)", helped.stdout, re.MULTILINE), command
    runs = _airflow(env, "ledgerflow", "runs", "--url", url, "-o", "json")
    assert runs.returncode == 0, runs.stderr
    assert [r["run_id"] for r in json.loads(runs.stdout)] == ["checkout__v1/manual__1"]
    own = subprocess.run(
        [str(AIRFLOW.with_name("ledgerflow")), "runs", "--url", url, "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert json.loads(own.stdout) == json.loads(runs.stdout)
    missing = _airflow(env, "ledgerflow", "show", "checkout__v1/nope", "--url", url)
    assert missing.returncode == 1
    assert "no run 'checkout__v1/nope' in the ledger" in missing.stderr
