"""``ledgerflow``: validate workflow files, write their DAG files, read the ledger."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHIM = '''"""Airflow DAG of the Ledgerflow workflow file beside this one (written by `ledgerflow sync`)."""

from ledgerflow import dag_for_spec_file

dag = dag_for_spec_file(__file__)
'''


def _workflow_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def cmd_validate(args: argparse.Namespace) -> int:
    from ledgerflow.errors import SpecError
    from ledgerflow.factory import display_path
    from ledgerflow.spec.validate import load_workflow

    files = _workflow_files(args.paths)
    if not files:
        print("no workflow files found", file=sys.stderr)
        return 2
    bad = 0
    for file in files:
        try:
            spec = load_workflow(file, display_path=str(file))
        except SpecError as exc:
            bad += 1
            print(f"FAIL {exc}", file=sys.stderr)
            continue
        shim = file.with_suffix(".py")
        note = (
            "" if shim.exists() else f"  (no DAG file: run `ledgerflow sync {display_path(file)}`)"
        )
        print(f"ok   {file}: {spec.dag_id}, {len(spec.steps)} steps{note}")
    print(f"{len(files) - bad} valid, {bad} invalid", file=sys.stderr)
    return 1 if bad else 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Write the two-line DAG file beside each workflow file that has none."""
    written = 0
    for file in _workflow_files(args.paths):
        shim = file.with_suffix(".py")
        if shim.exists() and shim.read_text() == SHIM:
            continue
        if shim.exists() and not args.force:
            print(f"skip {shim}: exists with other content (use --force)", file=sys.stderr)
            continue
        shim.write_text(SHIM)
        written += 1
        print(f"wrote {shim}")
    print(f"{written} DAG file(s) written", file=sys.stderr)
    return 0


def _ledger(args: argparse.Namespace) -> Any:
    from ledgerflow.ledger.store import Ledger, resolve_url

    ledger = Ledger(args.url or resolve_url(args.conn_id))
    ledger.migrate()
    return ledger


def _print(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
        return
    if not rows:
        print("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))[:60]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, ""))[:60].ljust(widths[c]) for c in columns))


def cmd_migrate(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    print(
        f"ledger at {ledger.engine.url.render_as_string(hide_password=True)}: schema v{ledger.schema_version()}"
    )
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    rows = _ledger(args).runs(args.workflow, args.limit)
    _print(
        rows, args.json, ["run_id", "workflow", "version", "status", "trigger_kind", "created_at"]
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    ledger = _ledger(args)
    run = ledger.run(args.run_id)
    if run is None:
        print(f"no run {args.run_id!r} in the ledger", file=sys.stderr)
        return 1
    steps = [c.__dict__ for c in ledger.checkpoints(args.run_id)]
    compensations = list(ledger.compensations(args.run_id).values())
    from ledgerflow.ledger import llm

    llm_calls = [c.__dict__ for c in llm.calls(ledger, args.run_id)]
    if args.json:
        document = {
            "run": run,
            "steps": steps,
            "compensations": compensations,
            "llm_calls": llm_calls,
            "events": ledger.events(args.run_id),
        }
        print(json.dumps(document, default=str, indent=2))
        return 0
    saga = f"  saga={run['saga']} (failed at {run['failed_step']})" if run.get("saga") else ""
    print(f"{run['run_id']}  {run['workflow']} v{run['version']}  {run['status']}{saga}")
    print(f"params={json.dumps(run['params'])}")
    _print(steps, False, ["step_key", "status", "attempts", "idempotency_key", "output", "error"])
    if compensations:
        print()
        _print(compensations, False, ["step_key", "status", "tool", "detail"])
    if llm_calls:
        print()
        columns = ["step_key", "model", "status", "path", "requests", "input_tokens"]
        _print(llm_calls, False, [*columns, "output_tokens", "latency_ms", "reason"])
    return 0


def cmd_effects(args: argparse.Namespace) -> int:
    rows = _ledger(args).effects(args.run_id)
    _print(
        rows, args.json, ["idempotency_key", "tool", "status", "run_id", "step_key", "created_at"]
    )
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    if args.retry is not None:
        from ledgerflow.deadletters import default_dags_folder, retry_dead_letter
        from ledgerflow.errors import LedgerflowError

        folder = Path(args.dags_folder) if args.dags_folder else default_dags_folder()
        try:
            result = retry_dead_letter(_ledger(args), args.retry, folder)
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
        states(_ledger(args)), args.json, ["name", "state", "failures", "open_until", "updated_at"]
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ledgerflow",
        description="Durable workflows on Apache Airflow 3: validate workflow files and read the ledger.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check workflow files (exit 1 if any is invalid)")
    p.add_argument("paths", nargs="+", help="workflow files or folders (e.g. dags/workflows)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "sync", help="write the DAG file (vN.py) beside each workflow file (vN.yaml)"
    )
    p.add_argument("paths", nargs="+", help="workflow files or folders")
    p.add_argument("--force", action="store_true", help="overwrite DAG files with other content")
    p.set_defaults(func=cmd_sync)

    def ledger_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--conn-id", default="ledgerflow_db", help="Airflow connection of the ledger"
        )
        p.add_argument("--url", help="SQLAlchemy URL of the ledger (overrides --conn-id)")
        p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("migrate", help="create or upgrade the ledger's tables")
    ledger_args(p)
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("runs", help="list runs recorded in the ledger")
    ledger_args(p)
    p.add_argument("--workflow", help="only this workflow")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("show", help="one run: its steps, attempts and outputs")
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
    p.add_argument(
        "--dags-folder",
        help="where workflows/<name>/v<N>.yaml live (default: $AIRFLOW__CORE__DAGS_FOLDER or ./dags)",
    )
    p.set_defaults(func=cmd_dead_letters)

    p = sub.add_parser("breakers", help="circuit breakers: state, consecutive failures, open until")
    ledger_args(p)
    p.set_defaults(func=cmd_breakers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
