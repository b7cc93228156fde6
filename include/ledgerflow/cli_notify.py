"""``ledgerflow notifications``: the outbox of notices, and sending again what is due."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_notify_commands(
    sub: argparse._SubParsersAction, ledger_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    p = sub.add_parser(
        "notifications",
        help="the notices of notify: targets (sent, failed, pending); --retry sends what is due",
        description="List the outbox (lf_notifications): one row per event and target, with "
        "its status (pending, sending, sent, failed, gave_up), attempts and last error. "
        "--retry first sends every notice that is due (pending, failed past its backoff, or "
        "claimed by a sender that died): what the maintenance DAG ledgerflow_notifications "
        "runs every 2 minutes. Exit 1 when a listed notice failed or was given up.",
    )
    ledger_args(p)
    p.add_argument("--run", help="only this run (<dag_id>/<run id>)")
    p.add_argument(
        "--status",
        choices=("pending", "sending", "sent", "failed", "gave_up"),
        help="only notices in this status",
    )
    p.add_argument("--retry", action="store_true", help="send what is due first")
    p.set_defaults(func=cmd_notifications)


def cmd_notifications(args: argparse.Namespace) -> int:
    from ledgerflow.ledger import outbox
    from ledgerflow.ledger.store import Ledger, resolve_url

    ledger = Ledger(args.url or resolve_url(args.conn_id))
    ledger.migrate()
    if args.retry:
        done = outbox.send_due(ledger)
        print(f"retried {len(done)}: {sum(s == 'sent' for s in done.values())} sent")
    from ledgerflow.cli_output import default_format, print_rows

    rows: list[dict[str, Any]] = outbox.listing(ledger, run_id=args.run, status=args.status)
    columns = ["created_at", "status", "attempts", "event", "target", "run_id", "last_error"]
    print_rows(rows, getattr(args, "fmt", None) or default_format(), columns)
    return 1 if any(r["status"] in ("failed", "gave_up") for r in rows) else 0
