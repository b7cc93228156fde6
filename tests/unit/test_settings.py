"""One ``[ledgerflow]`` settings section, read in one module (``ledgerflow.settings``), and
one dags folder.

The dags folder was resolved three ways: ``ledgerflow new`` and ``dead-letters --retry``
took ``$AIRFLOW__CORE__DAGS_FOLDER`` or ``./dags`` (ignoring ``airflow.cfg``), ``retry``
and the REST trigger took Airflow's configuration, and ``--dags-folder`` was declared four
times with two different defaults. The ledger's connection id was a constant. Each test
runs the real CLI in a fresh process with its own ``AIRFLOW_HOME`` (the settings are read
as a user's process reads them: environment, ``airflow.cfg``, Airflow's ``conf``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ledgerflow.cli import build_parser
from ledgerflow.settings import DAGS_FOLDER_HELP

LEDGERFLOW = str(Path(sys.executable).with_name("ledgerflow"))


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "LEDGERFLOW_"))}
    return {**env, "AIRFLOW_HOME": str(home), **extra}


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def write_cfg(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "airflow.cfg").write_text(text)


def test_new_writes_into_the_dags_folder_of_airflow_cfg(tmp_path: Path) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_cfg(home, f"[core]\ndags_folder = {tmp_path / 'team_dags'}\n")
    done = run([LEDGERFLOW, "new", "onboard"], elsewhere, env_for(home))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "team_dags" / "workflows" / "onboard" / "v1.yaml").is_file()
    assert not (elsewhere / "dags").exists()


def test_the_environment_wins_over_airflow_cfg_and_the_option_over_both(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_cfg(home, f"[core]\ndags_folder = {tmp_path / 'cfg_dags'}\n")
    env = env_for(home, AIRFLOW__CORE__DAGS_FOLDER=str(tmp_path / "env_dags"))
    assert run([LEDGERFLOW, "new", "a"], tmp_path, env).returncode == 0
    assert (tmp_path / "env_dags" / "workflows" / "a" / "v1.yaml").is_file()
    option = ["--dags-folder", str(tmp_path / "opt_dags")]
    assert run([LEDGERFLOW, "new", "b", *option], tmp_path, env).returncode == 0
    assert (tmp_path / "opt_dags" / "workflows" / "b" / "v1.yaml").is_file()


def test_the_ledger_connection_is_a_setting(tmp_path: Path) -> None:
    home = tmp_path / "home"
    db = tmp_path / "team_ledger.db"
    write_cfg(home, "[ledgerflow]\nconn_id = team_ledger\n")
    env = env_for(
        home, AIRFLOW_CONN_TEAM_LEDGER=json.dumps({"conn_type": "sqlite", "host": str(db)})
    )
    done = run([LEDGERFLOW, "migrate"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert db.is_file() and not (home / "ledgerflow.db").exists()
    shown = json.loads(run([LEDGERFLOW, "config", "--json"], tmp_path, env).stdout)
    row = next(r for r in shown if r["option"] == "conn_id")
    assert (row["value"], row["source"]) == ("team_ledger", str(home / "airflow.cfg"))


def test_a_process_that_loaded_airflow_asks_airflows_conf(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_cfg(home, "[ledgerflow]\nwebhook_tolerance = 42\nform_token_ttl = 60\n")
    code = (
        "import airflow.configuration\n"
        "from ledgerflow import settings\n"
        "print(settings.get('webhook_tolerance'), settings.get('form_token_ttl'))\n"
    )
    env = env_for(home, AIRFLOW__LEDGERFLOW__FORM_TOKEN_TTL="90")
    done = run([sys.executable, "-c", code], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "90"]


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("AIRFLOW__LEDGERFLOW__DEMO_TOOLS", "maybe", "[ledgerflow] demo_tools"),
        ("AIRFLOW__LEDGERFLOW__WEBHOOK_TOLERANCE", "-5", "[ledgerflow] webhook_tolerance"),
    ],
)
def test_a_bad_value_is_a_clear_error_naming_the_option_and_its_source(
    tmp_path: Path, variable: str, value: str, named: str
) -> None:
    code = f"from ledgerflow import settings; settings.get({named.split()[-1]!r})"
    done = run([sys.executable, "-c", code], tmp_path, env_for(tmp_path, **{variable: value}))
    assert done.returncode != 0
    assert f"SettingError: {named} (from ${variable})" in done.stderr


def test_the_older_demo_switch_still_works(tmp_path: Path) -> None:
    code = "from ledgerflow.tools.registry import demo_tools_enabled; print(demo_tools_enabled())"
    for env, want in (({}, "False"), ({"LEDGERFLOW_DEMO_TOOLS": "1"}, "True")):
        done = run([sys.executable, "-c", code], tmp_path, env_for(tmp_path, **env))
        assert done.stdout.strip() == want, done.stderr


def test_every_command_declares_dags_folder_the_same_way() -> None:
    parser = build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    helps = {
        name: action.help
        for name, sub in subs.choices.items()  # type: ignore[attr-defined]
        for action in sub._actions
        if "--dags-folder" in action.option_strings
    }
    assert {"new", "retry", "versions", "dead-letters"} <= set(helps)
    assert set(helps.values()) == {DAGS_FOLDER_HELP}
