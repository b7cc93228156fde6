"""``ledgerflow pools``: create and size the Airflow pools of the workflows' concurrency
limits (``workflow.limits``) in Airflow's metadata database.

A task whose pool does not exist is never scheduled, so run it wherever workflows are
published (after ``ledgerflow sync``, as the deployment's Airflow user)."""

from __future__ import annotations

import argparse
import sys


def cmd_pools(args: argparse.Namespace) -> int:
    from ledgerflow.cli_publish import _missing, _no_such, _workflow_files
    from ledgerflow.errors import SpecError
    from ledgerflow.workflow.limits import pools
    from ledgerflow.workflow.validate import load_workflow

    missing = _missing(args.paths)
    if missing:
        return _no_such(missing)
    specs = []
    invalid = 0
    for file in _workflow_files(args.paths):
        try:
            specs.append(load_workflow(file, display_path=str(file)))
        except SpecError as exc:
            invalid += 1
            print(f"FAIL {exc}", file=sys.stderr)
    wanted = pools(specs)
    if not args.dry_run and wanted:
        from airflow.models.pool import Pool

        for name, (slots, description) in wanted.items():
            Pool.create_or_update_pool(
                name=name, slots=slots, description=description, include_deferred=False
            )
    verb = "would set" if args.dry_run else "set"
    for name, (slots, _) in sorted(wanted.items()):
        print(f"{verb} pool {name}: {slots} slots")
    print(f"{len(wanted)} pool(s), {invalid} invalid workflow file(s)", file=sys.stderr)
    return 1 if invalid else 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "pools",
        help="create/size the Airflow pools of the workflows' concurrency limits",
        description="Create or resize, in Airflow's metadata database, one pool per "
        "concurrency limit the workflow files declare: ledgerflow.tool.<tool> for a tool's "
        "limit, ledgerflow.step.<workflow>.<step> for a step's. A task whose pool does not "
        "exist is never scheduled: run this wherever workflows are published.",
    )
    p.add_argument("paths", nargs="+", help="workflow files or folders")
    p.add_argument("--dry-run", action="store_true", help="only print the pools")
    p.set_defaults(func=cmd_pools)
