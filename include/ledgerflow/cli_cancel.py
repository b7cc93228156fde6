"""``ledgerflow cancel``: stop a running run, withdraw what it waits for, and with
``--compensate`` undo its completed steps through its saga (``ledgerflow.cancel``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

DESCRIPTION = (
    "Cancel a running run: its running, deferred and queued tasks stop (Airflow marks them "
    "failed or skipped; a process is killed at its next heartbeat, a deferred task leaves "
    "the triggerer), its open waits are withdrawn (approvals become `withdrawn`, and a "
    "decision after that is refused), and the ledger records who cancelled it, when and "
    "why; the run's status becomes `cancelled` (terminal). With --compensate the steps that "
    "completed are undone by the run's saga: its compensation tasks run in Airflow, in "
    "reverse order, and the saga's outcome is recorded next to `cancelled`. Cancelling a "
    "cancelled run changes nothing (exit 0); a run that already succeeded or failed is "
    "refused (exit 2). A cancelled run can be retried like a failed one (`ledgerflow "
    "retry`). Needs Airflow's metadata database (like `airflow dags trigger`)."
)


def add_cancel_command(
    sub: argparse._SubParsersAction, ledger_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    p = sub.add_parser(
        "cancel",
        help="cancel a running run (optionally undoing its completed steps)",
        description=DESCRIPTION,
    )
    ledger_args(p)
    p.add_argument(
        "run_id",
        metavar="RUN",
        help="ledger run id (<dag_id>/<airflow run id>), or a DAG id followed by AIRFLOW_RUN_ID",
    )
    p.add_argument(
        "airflow_run_id", nargs="?", metavar="AIRFLOW_RUN_ID", help="with a DAG id as RUN"
    )
    p.add_argument("--reason", required=True, help="why (recorded with the cancel; required)")
    p.add_argument(
        "--compensate",
        action="store_true",
        help="undo the completed steps through the saga (compensation tasks, in reverse)",
    )
    p.add_argument("--user", help="recorded as who cancelled (default: the OS user)")
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    import getpass

    from ledgerflow.cancel import cancel
    from ledgerflow.errors import CancelRefused
    from ledgerflow.ledger.store import Ledger

    run_id = f"{args.run_id}/{args.airflow_run_id}" if args.airflow_run_id else args.run_id
    if not args.reason.strip():
        print("cannot cancel: --reason must not be empty", file=sys.stderr)
        return 2
    ledger = Ledger(args.url) if args.url else Ledger.from_airflow(args.conn_id)
    ledger.migrate()
    try:
        done = cancel(
            ledger,
            run_id,
            by=args.user or getpass.getuser(),
            reason=args.reason,
            compensate=args.compensate,
        )
    except CancelRefused as exc:
        print(f"cannot cancel: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(done.as_dict(), indent=2, default=str))
        return 0
    record = done.ledger
    if record.already:
        print(
            f"{run_id} was already cancelled by {record.by} at {record.at:%Y-%m-%d %H:%M:%S}: "
            f"{record.reason} (nothing changed)"
        )
    else:
        print(f"{run_id}: cancelled by {record.by}: {record.reason}")
    for name, state in sorted(done.airflow.items()):
        print(f"  {state:15}  {name}")
    for wait in record.withdrawn:
        print(f"  withdrawn        {wait['kind']} {wait['id']} ({wait.get('step', '')})")
    if record.compensate:
        print(f"saga: {record.saga or 'none'} (compensation tasks undo the completed steps)")
    return 0
