"""Ledgerflow as an Airflow provider: the provider info Airflow validates, the entry points
of the installed package, the ``airflow ledgerflow`` command group built from the
``ledgerflow`` CLI's own parser, and the plugin's links under ``[api] base_url``.

The Airflow processes that read all this (``airflow providers list``, ``airflow plugins``,
``airflow ledgerflow ...``) run in tests/integration/test_provider_cli.py; a stack loading
the plugin by its entry point only, under a sub-path, in tests/e2e/test_provider_e2e.py."""

from __future__ import annotations

import argparse
import json
from importlib.metadata import distributions, entry_points
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from ledgerflow.cli import build_parser
from ledgerflow.provider import get_cli_commands, get_provider_info


def test_provider_info_is_valid_for_airflow() -> None:
    """get_provider_info() passes the validator Airflow's provider discovery applies
    (provider_info.schema.json), and uses no key unknown to Airflow's provider.yaml schema
    (which, unlike the runtime one, refuses extra keys: a misspelt ``plugin`` would pass the
    runtime check and be ignored)."""
    import airflow
    from airflow.providers_manager import _create_provider_info_schema_validator

    info = get_provider_info()
    _create_provider_info_schema_validator().validate(info)
    assert info["package-name"] == "ledgerflow"  # must equal the distribution's name

    strict = json.loads((Path(airflow.__file__).parent / "provider.yaml.schema.json").read_text())
    # Keys only Airflow's own repository uses for its release process.
    strict["required"] = [k for k in strict["required"] if k in info]
    jsonschema.validate(info, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**info, "plugin": info["plugins"]}, strict)


def test_every_class_and_function_the_provider_names_imports() -> None:
    """The plugin class and the CLI function named in the provider info import (Airflow
    drops an entry it cannot import with only a log line)."""
    from airflow._shared.module_loading import import_string
    from airflow.plugins_manager import is_valid_plugin

    info = get_provider_info()
    plugins = [import_string(p["plugin-class"]) for p in info["plugins"]]
    assert all(is_valid_plugin(p) for p in plugins)
    assert [p.name for p in plugins] == [p["name"] for p in info["plugins"]] == ["ledgerflow"]
    assert [import_string(path) for path in info["cli"]] == [get_cli_commands]


def test_installed_metadata_declares_the_provider_and_the_plugin_once() -> None:
    """After bootstrap's editable install the package's metadata carries both entry points,
    and exactly one copy of that metadata is on sys.path: Airflow does not de-duplicate
    plugin entry points, so a second copy (a build's leftover ``include/*.egg-info``) would
    register the plugin twice, the second time as an import error."""
    copies = [d for d in distributions() if d.metadata["Name"] == "ledgerflow"]
    assert len(copies) == 1, [str(getattr(d, "_path", d)) for d in copies]
    providers = [
        ep for ep in entry_points(group="apache_airflow_provider") if ep.dist.name == "ledgerflow"
    ]
    assert [ep.value for ep in providers] == ["ledgerflow.provider:get_provider_info"]
    assert providers[0].load() is get_provider_info
    plugins = [ep for ep in entry_points(group="airflow.plugins") if ep.dist.name == "ledgerflow"]
    assert [(ep.name, ep.value) for ep in plugins] == [
        ("ledgerflow", "ledgerflow.plugin:LedgerflowPlugin")
    ]
    assert installed_version("ledgerflow")


def _airflow_parser() -> argparse.ArgumentParser:
    """A parser with only the ``ledgerflow`` group, added the way Airflow's CLI adds it."""
    from airflow.cli.cli_parser import _add_command

    parser = argparse.ArgumentParser(prog="airflow")
    subparsers = parser.add_subparsers(dest="subcommand")
    for command in get_cli_commands():
        _add_command(subparsers, command)
    return parser


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(parser: argparse.ArgumentParser) -> list[tuple[Any, ...]]:
    return sorted(
        (
            (tuple(a.option_strings), a.dest, a.nargs, a.choices, a.default, a.required)
            for a in parser._actions
            if not isinstance(a, argparse._HelpAction)
        ),
        key=repr,
    )


def test_airflow_ledgerflow_has_every_command_with_the_same_arguments() -> None:
    """``airflow ledgerflow`` has each command of the ``ledgerflow`` CLI, each with the
    same options and positionals (flags, destination, choices, defaults)."""
    ours = _commands(build_parser())
    group = _commands(_commands(_airflow_parser())["ledgerflow"])
    assert set(group) == set(ours) >= {"runs", "show", "retry", "dead-letters", "validate"}
    for name, parser in ours.items():
        assert _options(group[name]) == _options(parser), name


@pytest.mark.parametrize(
    "argv",
    [
        ["runs", "--status", "failed", "--since", "2h", "--limit", "5", "-o", "json"],
        ["show", "checkout__v1/manual__1", "--url", "sqlite:///x.db", "--json"],
        ["retry", "w__v1/r", "--from", "charge", "--param", "n=2", "--param", "s=x"],
        ["dead-letters", "--all", "--retry", "3", "--dags-folder", "/tmp/d"],
        ["validate", "a.yaml", "b.yaml"],
        ["run", "w/v1.yaml", "--decide", "ok=approve", "--keep", "-v"],
    ],
)
def test_both_clis_parse_a_command_line_the_same_way(argv: list[str]) -> None:
    """A command line means the same in both CLIs: the parsed values are equal (types such
    as ``--param``'s JSON parsing included), and the command run is the CLI's own."""
    mine = vars(build_parser().parse_args(argv))
    theirs = vars(_airflow_parser().parse_args(["ledgerflow", *argv]))
    runner = theirs.pop("func")
    assert runner.__name__ == "run_ledgerflow_command"
    theirs.pop("subcommand")
    assert mine.pop("command") == argv[0]
    mine.pop("func")
    assert theirs == mine


def test_a_failing_command_exits_with_its_code_under_airflow(tmp_path: Path) -> None:
    """Airflow's CLI ignores what a command returns, so the group exits with the code the
    ``ledgerflow`` CLI would return (1: no such run), and 0 on success."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    args = _airflow_parser().parse_args(["ledgerflow", "show", "w__v1/none", "--url", url])
    with pytest.raises(SystemExit) as exited:
        args.func(args)
    assert exited.value.code == 1
    args = _airflow_parser().parse_args(["ledgerflow", "runs", "--url", url, "--json"])
    assert args.func(args) is None


def test_menu_entries_and_icons_live_under_the_base_url_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The menu entries, the run-page tab and their icons start with the path of
    ``[api] base_url`` (none at the root; ``/airflow`` under a sub-path), and every icon
    they name is a file the app serves."""
    from ledgerflow.plugin import external_views

    static = Path(__file__).resolve().parents[2] / "include/ledgerflow/api/static"
    for base, prefix in (("", ""), ("http://h:8080/airflow/", "/airflow")):
        monkeypatch.setenv("AIRFLOW__API__BASE_URL", base)
        views = external_views()
        assert {v["url_route"] for v in views} == {
            "ledgerflow-approvals",
            "ledgerflow-runs",
            "ledgerflow-dashboard",
            "ledgerflow-run",
        }
        for view in views:
            for key in ("href", "icon", "icon_dark_mode"):
                assert view[key].startswith(f"{prefix}/ledgerflow/"), (base, view)
            for key in ("icon", "icon_dark_mode"):
                name = view[key].removeprefix(f"{prefix}/ledgerflow/static/")
                assert (static / name).read_text().startswith("<svg"), view[key]
            assert view["icon"] != view["icon_dark_mode"]
