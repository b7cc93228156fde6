"""``ledgerflow migrate``: create or upgrade the ledger's tables (Alembic revisions),
downgrade them (``--to REV``), or print the SQL for a DBA (``--sql``, offline)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable


def add_migrate_command(
    sub: argparse._SubParsersAction, ledger_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    p = sub.add_parser(
        "migrate",
        help="create, upgrade or downgrade the ledger's tables, or print their SQL (--sql)",
    )
    ledger_args(p)
    p.add_argument(
        "--sql",
        action="store_true",
        help="print the SQL instead of running it, for the ledger's dialect (offline: the "
        "database is not touched)",
    )
    p.add_argument(
        "--to",
        metavar="REV",
        help="upgrade or downgrade to this revision (default: the newest): e.g. 0005, "
        "base (every table), demo@base (the demo tables)",
    )
    p.add_argument(
        "--from",
        dest="start",
        metavar="REV",
        help="with --sql: the revision the ledger is at (default: an empty database)",
    )
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also the example workflows' tables (demo_*); default: when the demo's tools "
        "are on ([ledgerflow] demo_tools, LEDGERFLOW_DEMO_TOOLS=1)",
    )
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from ledgerflow.ledger import schema
    from ledgerflow.ledger.store import Ledger, _demo_tools_on, resolve_url

    url = args.url or resolve_url(args.conn_id)
    demo = _demo_tools_on() if args.demo is None else args.demo
    if args.sql:
        from ledgerflow.ledger import _migrate

        target = args.to or ("heads" if demo else "ledger@head")
        _migrate.offline_sql(url, target=target, start=args.start, stdout=sys.stdout)
        return 0
    if args.start:
        print("ledgerflow migrate: --from goes with --sql", file=sys.stderr)
        return 2

    def applying(revision: str, title: str, upgrade: bool) -> None:
        verb = "applying" if upgrade else "reverting"
        name = f"{int(revision)}/{schema.LATEST}" if revision.isdigit() else revision
        print(f"  {verb} migration {name}: {title}", file=sys.stderr)

    # The lines above say what Alembic's INFO log would say; keep its warnings.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    ledger = Ledger(url)
    if args.to:
        ledger.migrate_to(args.to, progress=applying)
    else:
        ledger.migrate(progress=applying, demo=demo)
    revisions = ledger.revisions()
    extra = " (with the demo tables)" if schema.DEMO_HEAD in revisions else ""
    print(
        f"ledger at {ledger.engine.url.render_as_string(hide_password=True)}: "
        f"schema v{ledger.schema_version()}{extra}"
    )
    return 0
