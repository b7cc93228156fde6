"""Ledgerflow as an Airflow provider: ``get_provider_info`` and the ``airflow ledgerflow`` CLI.

``pyproject.toml`` declares both entry points Airflow looks for in an installed package:
``apache_airflow_provider`` (this module's :func:`get_provider_info`: ``airflow providers
list`` shows Ledgerflow, and Airflow's CLI gains the ``ledgerflow`` command group) and
``airflow.plugins`` (the plugin, ``ledgerflow.plugin``: the app and the menu entries).

No ``connection-types``: Ledgerflow has no hook of its own. The ledger is a ``postgres`` or
``sqlite`` connection, LLM steps use common.ai's ``pydanticai``, the http tool ``http``:
each type is declared by the provider that owns its hook, and a ``ledgerflow`` type would
only make those connections second-class.

The plugin is named twice, as Airflow's own providers do (common.ai): the entry point is
what Airflow loads by default; the ``plugins`` key is read only with ``[core]
lazy_discover_providers = False``, where Airflow then notes every such provider's second
copy as "already registered" (measured on 3.3.2; the plugin is still loaded once).

Importing this module is cheap (Airflow imports it for every CLI command): Airflow's CLI
classes and Ledgerflow's parser are imported by :func:`get_cli_commands` itself.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ledgerflow.settings import provider_config

PACKAGE = "ledgerflow"


def get_provider_info() -> dict[str, Any]:
    """The provider's description, as Airflow's ``provider_info.schema.json`` defines it.

    One key per kind of extension; ``config`` is the ``[ledgerflow]`` section
    (``ledgerflow.settings``).
    """
    return {
        "package-name": PACKAGE,
        "name": "Ledgerflow",
        "description": "Durable workflows on Apache Airflow 3: declared workflows, idempotent "
        "steps, approvals, sagas, and a ledger that outlives any process.",
        "plugins": [{"name": "ledgerflow", "plugin-class": "ledgerflow.plugin.LedgerflowPlugin"}],
        "cli": [f"{__name__}.get_cli_commands"],
        # The [ledgerflow] section: `airflow config list` shows it with its defaults.
        "config": provider_config(),
    }


# argparse actions Airflow's ``Arg`` can carry, by the name ``add_argument`` takes.
_ACTIONS: dict[type[argparse.Action], str] = {
    argparse._StoreAction: "store",
    argparse._StoreTrueAction: "store_true",
    argparse._StoreFalseAction: "store_false",
    argparse._AppendAction: "append",
    argparse.BooleanOptionalAction: "boolean_optional",  # --demo / --no-demo
}


def get_cli_commands() -> list[Any]:
    """``airflow ledgerflow COMMAND``: the ``ledgerflow`` CLI's commands, built from its own
    parser (``ledgerflow.cli.build_parser``), so both CLIs take the same arguments and run
    the same code."""
    from airflow.cli.cli_config import GroupCommand

    from ledgerflow.cli import build_parser

    parser = build_parser()
    return [
        GroupCommand(
            name="ledgerflow",
            help="Ledgerflow: validate workflows, read the ledger, retry runs "
            "(the commands of the `ledgerflow` CLI)",
            subcommands=[_command(*found) for found in _subparsers(parser)],
        )
    ]


def _subparsers(
    parser: argparse.ArgumentParser,
) -> list[tuple[str, argparse.ArgumentParser, str | None]]:
    """Each command of ``parser``: its name, its parser, and its one-line help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            return [(name, sub, helps.get(name)) for name, sub in action.choices.items()]
    return []


def _command(name: str, sub: argparse.ArgumentParser, help_text: str | None) -> Any:
    from airflow.cli.cli_config import ActionCommand

    return ActionCommand(
        name=name,
        help=_text(help_text or sub.description or name) or name,
        description=_text(sub.description),
        func=_runner(name, sub.get_default("func")),
        args=tuple(_arg(name, a) for a in sub._actions if not isinstance(a, argparse._HelpAction)),
    )


def _text(text: str | None) -> str | None:
    """Help text as Airflow's help (rich markup) shows it: ``[ledgerflow]`` is not a style."""
    from rich.markup import escape

    return None if text is None else escape(text)


def _runner(name: str, handler: Callable[[argparse.Namespace], int]) -> Callable[..., None]:
    def run_ledgerflow_command(args: argparse.Namespace) -> None:
        from ledgerflow.cli import run

        # Airflow's parser set ``func`` to this function; the command's own goes back.
        args.command, args.func = name, handler
        code = run(args)
        if code:
            sys.exit(code)  # Airflow's main ignores what a command returns

    return run_ledgerflow_command


def _arg(command: str, action: argparse.Action) -> Any:
    from airflow.cli.cli_config import Arg

    kind = _ACTIONS.get(type(action))
    if kind is None:
        flag = "/".join(action.option_strings) or action.dest
        raise TypeError(f"ledgerflow {command} {flag}: {type(action).__name__} has no Arg form")
    kwargs: dict[str, Any] = {"help": _text(action.help), "default": action.default}
    if kind in ("store", "append"):
        for key in ("nargs", "type", "choices", "metavar"):
            if getattr(action, key) is not None:
                kwargs[key] = getattr(action, key)
    flags = tuple(action.option_strings) or (action.dest,)
    if kind == "boolean_optional":  # the action adds the --no- form itself
        kwargs["action"] = argparse.BooleanOptionalAction
        flags = tuple(f for f in flags if not f.startswith("--no-"))
    elif kind != "store":
        kwargs["action"] = kind
    if action.option_strings:  # positionals take neither (argparse refuses them)
        kwargs["dest"] = action.dest
        if action.required:
            kwargs["required"] = True
    return Arg(flags=flags, **kwargs)
