"""``ledgerflow retry``: retry a failed run as a new run linked to it (``retries``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--param``: the value as JSON when it parses (``5``, ``true``,
    ``["a"]``, ``"5"``), else the text as it is."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def add_param_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--param KEY=VALUE`` (repeatable, into ``params``), as ``retry`` and ``run`` take it."""
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        type=parse_param,
        metavar="KEY=VALUE",
        help=f"{what} (repeatable); VALUE is JSON when it parses, else text",
    )


def add_dags_folder_option(parser: argparse.ArgumentParser) -> None:
    """``--dags-folder``, as every command that reads workflow files takes it."""
    from ledgerflow.settings import DAGS_FOLDER_HELP

    parser.add_argument("--dags-folder", metavar="DIR", help=DAGS_FOLDER_HELP)


def cmd_retry(args: argparse.Namespace) -> int:
    from ledgerflow.errors import InvalidParams, LedgerflowError, RetryRefused
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.retries import airflow_state, plan_retry, start_retry

    ledger = Ledger(args.url) if args.url else Ledger.from_airflow(args.conn_id)
    ledger.migrate()
    folder = Path(args.dags_folder) if args.dags_folder else None
    overrides = dict(args.params or [])
    try:
        plan = plan_retry(
            ledger, args.run_id, args.from_step, folder, airflow_state, params=overrides
        )
    except (RetryRefused, InvalidParams) as exc:
        print(f"cannot retry: {exc}", file=sys.stderr)
        return 2
    run = plan.run
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    say(f"run {run['run_id']}: {plan.spec.name} v{plan.spec.version}, {run['status']}")
    if len(plan.chain) > 1:
        say("retry chain: " + " <- ".join(f"{r['run_id']} ({r['status']})" for r in plan.chain))
    if plan.overrides:
        say("params: " + json.dumps(plan.overrides, sort_keys=True, default=str))
    for step_id, source in plan.reused.items():
        say(f"  reuse  {step_id}  (completed in {source}; no task runs)")
    for step_id, source in plan.reused_in_task.items():
        say(f"  reuse  {step_id}  (its task reuses {source})")
    for step_id in plan.rerun:
        say(f"  run    {step_id}")
    try:
        started = start_retry(ledger, plan, user=args.user, via="cli")
    except RetryRefused as exc:
        print(f"cannot retry: {exc}", file=sys.stderr)
        return 2
    except LedgerflowError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    say(f"started {started.run_id} (retry of {started.retry_of})")
    if args.json:
        print(json.dumps(started.as_dict(), indent=2))
    if not args.wait:
        return 0
    return _wait_for(ledger, started.run_id, args.wait, say)


def _wait_for(ledger: Any, run_id: str, timeout: float, say: Any) -> int:
    """Follow the run until it ends: one line per step as it ends, and on a terminal a
    live status line (steps ended, seconds waited) instead of silence."""
    import contextlib
    import time

    from rich.console import Console

    console = Console(stderr=True)
    started = time.monotonic()
    deadline = started + timeout
    seen: set[str] = set()
    live = console.status(f"waiting for {run_id}") if console.is_terminal else None
    with live if live is not None else contextlib.nullcontext():
        while time.monotonic() < deadline:
            for cp in ledger.checkpoints(run_id):
                if cp.status in ("completed", "skipped", "failed") and cp.step_key not in seen:
                    seen.add(cp.step_key)
                    say(f"  {cp.status:9}  {cp.step_key}")
            run = ledger.run(run_id)
            if run is not None and run["status"] != "running":
                say(f"{run_id}: {run['status']}")
                return 0 if run["status"] == "succeeded" else 1
            if live is not None:
                waited = time.monotonic() - started
                live.update(f"waiting for {run_id}: {len(seen)} step(s) ended, {waited:.0f} s")
            time.sleep(1.0)
    say(f"{run_id}: still running after {timeout:.0f} s")
    return 1
