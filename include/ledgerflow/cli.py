# PYTHON_ARGCOMPLETE_OK
"""``ledgerflow``: validate workflow files, write their DAG files, read the ledger."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ledgerflow.cli_local import add_local_commands
from ledgerflow.cli_migrate import add_migrate_command
from ledgerflow.cli_output import FORMATS, default_format
from ledgerflow.cli_publish import SHIM as SHIM  # re-exported: `from ledgerflow.cli import SHIM`
from ledgerflow.cli_publish import cmd_sync, cmd_validate


def _ledger(args: argparse.Namespace) -> Any:
    from ledgerflow.ledger.store import Ledger, resolve_url

    ledger = Ledger(args.url or resolve_url(args.conn_id))
    ledger.migrate()
    return ledger


def _print(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str]) -> None:
    from ledgerflow.cli_output import print_rows

    print_rows(rows, fmt, columns)


def cmd_runs(args: argparse.Namespace) -> int:
    from ledgerflow.ledger import runview

    try:
        since = runview.parse_since(args.since) if args.since else None
    except ValueError as exc:
        print(f"--since: {exc}", file=sys.stderr)
        return 2
    rows = runview.list_runs(
        _ledger(args),
        workflow=args.workflow,
        version=args.version,
        status=args.status,
        since=since,
        limit=args.limit,
    )
    columns = ["run_id", "workflow", "version", "status", "saga", "trigger_kind", "retry_of"]
    _print(rows, args.fmt, [*columns, "created_at", "duration_s"])
    return 0


def _print_view(view: dict[str, Any], fmt: str = "plain") -> None:
    """The run view (``ledger.runview``) as text: steps with their attempts, effects,
    approvals, LLM calls, quality results, compensations, dead letters. Secrets masked."""
    print(f"grid: {view['links']['grid']}")
    for s in view["steps"]:
        took = f" {s['duration_s']}s" if s["duration_s"] is not None else ""
        reused = f" (reused from {s['reused_from']})" if s["reused_from"] else ""
        if s.get("effect_from"):
            reused = f" (the effect of {s['effect_from']})"
        print(f"\nstep {s['step_key']}: {s['status']}{took}{reused}  key={s['idempotency_key']}")
        for a in s["attempts"]:
            err = f"  {a['error_type']}: {a['error']}" if a["error"] else ""
            took = f" {a['duration_s']}s" if a["duration_s"] is not None else ""
            print(f"  try {a['try_number']}: {a['status']}{took}{err}")
        for label, name in (("input: ", "args"), ("output:", "output")):
            value = s[name] if s[f"{name}_truncated"] else json.dumps(s[name], default=str)
            more = f" ({s[f'{name}_bytes']} bytes)" if len(value) > 300 else ""
            print(f"  {label} {value[:300]}{more}")
        for e in s["effects"]:
            print(f"  effect {e['tool']} {e['status']} under {e['idempotency_key']}")
    for a in view["approvals"]:
        who = f" by {a['decided_by']}" if a["decided_by"] else ""
        print(f"\napproval {a['id']} ({a['step_key']}): {a['status']}{who}  {a['subject']}")
        for e in a["audit"]:
            print(f"  {e['at']}  {e['kind']}")
    sections = [
        ("llm_calls", ["step_key", "model", "status", "path", "requests", "input_tokens"]),
        ("quality_results", ["step_key", "try_number", "dataset", "outcome", "failed_count"]),
        ("compensations", ["step_key", "status", "tool", "detail"]),
        ("dead_letters", ["id", "step_key", "attempts", "error_type", "error", "status"]),
    ]
    for name, columns in sections:
        if view[name]:
            print(f"\n{name.replace('_', ' ')}:")
            _print(view[name], fmt, columns)
    if view["saga"]["outcome"]:
        print(f"\nsaga: {view['saga']['outcome']} (failed at {view['saga']['failed_step']})")


def cmd_show(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    run = ledger.run(args.run_id)
    if run is None:
        print(f"no run {args.run_id!r} in the ledger", file=sys.stderr)
        return 1
    from ledgerflow.ledger import runview

    view = runview.run_document(ledger, args.run_id) or {}
    if args.fmt in ("json", "yaml"):
        document = {
            **view,
            "retry_chain": _retry_chain(ledger, args.run_id),
        }
        if args.fmt == "yaml":
            import yaml

            from ledgerflow.cli_output import jsonable

            print(yaml.safe_dump(jsonable(document), sort_keys=False).rstrip())
        else:
            print(json.dumps(document, default=str, indent=2))
        return 0
    saga = f"  saga={run['saga']} (failed at {run['failed_step']})" if run.get("saga") else ""
    print(f"{run['run_id']}  {run['workflow']} v{run['version']}  {run['status']}{saga}")
    print(f"params={json.dumps(view['run']['params'])}")
    _print_retry_chain(ledger, run)
    _print_view(view, args.fmt)
    return 0


def _retry_chain(ledger: Any, run_id: str) -> dict[str, Any]:
    from ledgerflow.ledger import chains

    return {
        "retries": [r["run_id"] for r in chains.chain(ledger, run_id)[1:]],
        "retried_by": [
            {"run_id": r["run_id"], "retry_of": r["retry_of"], "status": r["status"]}
            for r in chains.descendants(ledger, run_id)
        ],
    }


def _print_retry_chain(ledger: Any, run: dict[str, Any]) -> None:
    """The attempts of this run, oldest first, both ways: what it retries, what retries it."""
    from ledgerflow.ledger import chains

    before = list(reversed(chains.chain(ledger, run["run_id"])[1:]))
    after = chains.descendants(ledger, run["run_id"])
    if not before and not after:
        return
    print("retry chain (oldest first):")
    for row in before:
        print(f"  {row['run_id']}  {row['status']}")
    start = f" (from {run['retry_from']})" if run.get("retry_from") else ""
    print(f"> {run['run_id']}  {run['status']}{start}   <- this run")
    for row in after:
        start = f", from {row['retry_from']}" if row.get("retry_from") else ""
        print(f"  {row['run_id']}  {row['status']}  (retry of {row['retry_of']}{start})")


from ledgerflow.cli_retry import add_dags_folder_option, add_param_option, cmd_retry  # noqa: E402
from ledgerflow.cli_retry import parse_param as parse_param  # noqa: E402  (re-exported)


def cmd_versions(args: argparse.Namespace) -> int:
    from ledgerflow import versions
    from ledgerflow.settings import dags_folder

    folder = dags_folder(args.dags_folder) / "workflows"
    if not folder.is_dir():
        print(f"no workflows folder at {folder} (use --dags-folder)", file=sys.stderr)
        return 2
    if args.name and not (folder / args.name).is_dir():
        print(f"no workflow {args.name!r} in {folder}", file=sys.stderr)
        return 2
    infos = versions.workflow_versions(folder, _ledger(args).unfinished_runs(), args.name)
    rows = [
        {
            "workflow": i.workflow,
            "version": f"v{i.version}",
            "dag_id": i.dag_id,
            "latest": "yes" if i.latest else "no",
            "unfinished_runs": i.unfinished_runs,
            "retirable": "yes" if i.retirable else "no",
            "published": ("yes" if i.intact else "CHANGED") if i.published else "no (sync)",
        }
        for i in infos
    ]
    _print(rows, args.fmt, list(rows[0]) if rows else ["workflow"])
    return 1 if any(i.published and not i.intact for i in infos) else 0


def cmd_effects(args: argparse.Namespace) -> int:
    rows = _ledger(args).effects(args.run_id)
    _print(
        rows, args.json, ["idempotency_key", "tool", "status", "run_id", "step_key", "created_at"]
    )
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    if args.retry is not None:
        from ledgerflow.deadletters import retry_dead_letter
        from ledgerflow.errors import LedgerflowError

        try:
            result = retry_dead_letter(_ledger(args), args.retry, args.dags_folder)
        except LedgerflowError as exc:
            print(f"cannot re-run: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:
            print(f"the step failed again: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(f"dead letter {args.retry}: step {result.status}, resolved")
        print(json.dumps(result.output, default=str))
        return 0
    rows = _ledger(args).dead_letters(None if args.all else "open")
    _print(
        rows, args.json, ["id", "workflow", "run_id", "step_key", "attempts", "error_type", "error"]
    )
    return 0


def cmd_breakers(args: argparse.Namespace) -> int:
    from ledgerflow.ledger.breakers import states

    _print(
        states(_ledger(args)), args.fmt, ["name", "state", "failures", "open_until", "updated_at"]
    )
    return 0


def _version() -> str:
    """Ledgerflow's installed version, and Airflow's (read from package metadata:
    importing Airflow would cost a second)."""
    from importlib.metadata import PackageNotFoundError, version

    from ledgerflow import __version__ as mine

    try:
        airflow = version("apache-airflow")
    except PackageNotFoundError:
        airflow = "(not installed)"
    return f"{mine} (Apache Airflow {airflow})"


class _VersionAction(argparse.Action):
    """``--version``, read from package metadata only when asked (reading it costs a
    quarter of a second, which every other command would otherwise pay)."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kw: Any) -> None:
        print(f"{parser.prog} {_version()}")  # on stdout, as argparse's own version action
        parser.exit()


def cmd_schema(args: argparse.Namespace) -> int:
    from ledgerflow.spec.jsonschema import render

    text = render()
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledgerflow",
        description="Durable workflows on Apache Airflow 3: validate workflow files and read the ledger.",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print Ledgerflow's version and Apache Airflow's, then exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check workflow files (exit 1 if any is invalid)")
    p.add_argument("paths", nargs="+", help="workflow files or folders (e.g. dags/workflows)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "sync",
        help="publish: write the DAG file (vN.py) and the hash (vN.lock) beside each vN.yaml",
        description="Write the two-line DAG file vN.py beside each workflow file vN.yaml and "
        "record the file's SHA-256 in vN.lock. A published version is immutable: a DAG file "
        "whose YAML no longer matches its lock fails to import; publish vN+1 instead.",
    )
    p.add_argument("paths", nargs="+", help="workflow files or folders")
    p.add_argument("--force", action="store_true", help="overwrite DAG files with other content")
    p.add_argument(
        "--rehash",
        action="store_true",
        help="re-record the hash of a changed version file (only for a version that never ran)",
    )
    p.set_defaults(func=cmd_sync)

    from ledgerflow.cli_pools import add_parser as add_pools

    add_pools(sub)

    def ledger_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--conn-id",
            help="Airflow connection of the ledger (default: [ledgerflow] conn_id, ledgerflow_db)",
        )
        p.add_argument("--url", help="SQLAlchemy URL of the ledger (overrides --conn-id)")
        p.add_argument(
            "-o",
            "--output",
            dest="fmt",
            choices=FORMATS,
            help="table (the default on a terminal), json, yaml, or plain (the default when "
            "piped: padded columns)",
        )
        p.add_argument("--json", action="store_true", help="the same as -o json")

    add_local_commands(sub)  # new, run

    p = sub.add_parser(
        "schema",
        help="print the JSON Schema of workflow files (for editors; generated from the models)",
    )
    p.add_argument("-o", "--output", help="write it to this file instead of stdout")
    p.set_defaults(func=cmd_schema)

    add_migrate_command(sub, ledger_args)

    p = sub.add_parser("runs", help="list runs recorded in the ledger (newest first)")
    ledger_args(p)
    p.add_argument("--workflow", help="only this workflow")
    p.add_argument("--version", type=int, help="only this version of the workflow")
    p.add_argument(
        "--status",
        choices=[
            "running",
            "succeeded",
            "failed",
            "cancelled",
            "compensated",
            "compensation_failed",
        ],
        help="the run's status, or its saga's outcome (compensated, compensation_failed)",
    )
    p.add_argument("--since", help="started since: 30m, 2h, 7d, or an ISO date/time (UTC)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "show",
        help="one run: steps with attempts, inputs/outputs, effects, approvals, compensations",
    )
    ledger_args(p)
    p.add_argument("run_id", help="ledger run id (<dag_id>/<airflow run id>)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("effects", help="effects recorded under idempotency keys")
    ledger_args(p)
    p.add_argument("--run-id", help="only this run")
    p.set_defaults(func=cmd_effects)

    p = sub.add_parser("dead-letters", help="steps that exhausted their attempts")
    ledger_args(p)
    p.add_argument("--all", action="store_true", help="include resolved ones")
    p.add_argument(
        "--retry",
        type=int,
        metavar="ID",
        help="run dead letter ID's step once more, here, under the same idempotency key",
    )
    add_dags_folder_option(p)
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser(
        "retry",
        help="retry a run as a NEW run that reuses every completed step",
        description="Start a new run of the same workflow version (same DAG) with the "
        "original params, or with some overridden (--param). Every step completed anywhere "
        "in the run's retry chain (the run, the run it retried, ...) with the same inputs is "
        "reused with its recorded output: no effect, LLM call or approval happens twice. The "
        "new run starts at the first step that did not complete, or at --from STEP (that "
        "step and everything downstream run again); a step whose inputs change under the "
        "new params runs again too. The original run stays as it was. Refused (exit 2) for "
        "a run that is still running, for an unknown run or step, for params that do not "
        "fit the workflow's schema, for a run that succeeded unless --from is given, for a "
        "run whose retry chain is already continued (a retry running or succeeded), and for "
        "a run that is not the newest failed run of its chain. Needs Airflow's metadata "
        "database (like `airflow dags trigger`).",
    )
    ledger_args(p)
    p.add_argument("run_id", help="ledger run id (<dag_id>/<airflow run id>)")
    p.add_argument(
        "--from",
        dest="from_step",
        metavar="STEP",
        help="re-run this step and everything downstream of it (not reused)",
    )
    add_dags_folder_option(p)
    add_param_option(p, "override a param")
    p.add_argument("--user", help="recorded as the user who asked for the retry")
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        help="wait up to SECONDS for the new run to finish, printing steps as they end",
    )
    p.set_defaults(func=cmd_retry)

    from ledgerflow.cli_cancel import add_cancel_command

    add_cancel_command(sub, ledger_args)

    p = sub.add_parser(
        "versions",
        help="workflow versions: latest, unfinished runs, retirable",
        description="Each version of each workflow (or of NAME): whether it is the latest "
        "(the one new runs use; older ones have no schedule), its unfinished runs in the "
        "ledger, whether it can be retired (not latest, no unfinished run), and whether its "
        "file still matches the hash recorded when it was published.",
    )
    ledger_args(p)
    p.add_argument("name", nargs="?", help="only this workflow")
    add_dags_folder_option(p)
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("breakers", help="circuit breakers: state, consecutive failures, open until")
    ledger_args(p)
    p.set_defaults(func=cmd_breakers)

    from ledgerflow.cli_ops import add_ops_commands

    add_ops_commands(sub, ledger_args, add_dags_folder_option)  # slo, export, prune

    from ledgerflow.cli_notify import add_notify_commands

    add_notify_commands(sub, ledger_args)  # notifications

    from ledgerflow.cli_doctor import add_doctor_command

    add_doctor_command(sub, ledger_args, add_dags_folder_option)

    p = sub.add_parser(
        "config", help="the [ledgerflow] settings: value, where it came from, what it does"
    )
    p.add_argument("-o", "--output", dest="fmt", choices=FORMATS, help="output format")
    p.add_argument("--json", action="store_true", help="same as -o json")
    p.set_defaults(func=cmd_config)
    return parser


def cmd_config(args: argparse.Namespace) -> int:
    from ledgerflow import settings

    _print(settings.describe(), args.fmt, ["option", "value", "source", "about"])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if argv is None:
        import argcomplete

        # Completing (the shell set _ARGCOMPLETE): print the candidates and exit; else a
        # no-op. Enable with: eval "$(register-python-argcomplete ledgerflow)"
        argcomplete.autocomplete(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command (``ledgerflow X`` and ``airflow ledgerflow X``): its exit code."""
    from ledgerflow.errors import LedgerflowError

    if hasattr(args, "fmt"):  # the ledger commands: one output format, --json its alias
        args.fmt = "json" if args.json else (args.fmt or default_format())
        args.json = args.fmt == "json"
    try:
        return int(args.func(args))
    except (LedgerflowError, OSError) as exc:
        # A clear line, never a traceback, for what the user can fix (a path, a file, a
        # ledger that cannot be reached).
        print(f"ledgerflow {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
