"""Operating commands: ``ledgerflow slo``, ``ledgerflow export`` and ``ledgerflow prune``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any


def add_ops_commands(
    sub: argparse._SubParsersAction,
    ledger_args: Callable[[argparse.ArgumentParser], None],
    add_dags_folder_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "slo",
        help="health indicators per workflow, and each SLO's status and error budget",
        description="Indicators of the runs started in the window (per workflow): success "
        "rate, step failure and retry rates, time to completion p50/p95 (without the time "
        "spent waiting for people), human wait, time to first step, timer lag, pending and "
        "orphaned runs, compensations, dead letters, LLM fallbacks, throughput, audit "
        "latency and the SLA breach rate; breaker openings and the plugin's authorization "
        "failures (401/403). Each objective of a workflow's `slo:` (its latest version's "
        "file) is judged: ok, burning (half its error budget spent), breached, or no_data. "
        "Exit 1 when an objective is breached.",
    )
    ledger_args(p)
    p.add_argument("--workflow", action="append", help="only this workflow (repeatable)")
    p.add_argument(
        "--since",
        help="runs started since: 30m, 2h, 7d, or an ISO date/time (default: each "
        "workflow's SLO window, 7d without one)",
    )
    p.add_argument("--until", help="runs started before (default: now)")
    p.add_argument(
        "--alert",
        action="store_true",
        help="also notify objectives that entered burning or breached (once per breach) "
        "and send the indicators as metrics: what the maintenance DAG runs",
    )
    add_dags_folder_option(p)
    p.set_defaults(func=cmd_slo)

    p = sub.add_parser(
        "export",
        help="the audit trail: every ledger event in a time span, as JSON lines or CSV",
        description="Stream the event log (id, at, run_id, dag_id, workflow, step_key, "
        "kind, who, data) of events recorded in [--since, --until), oldest first, to "
        "stdout or --file. Progress goes to stderr.",
    )
    p.add_argument("--conn-id", help="Airflow connection of the ledger")
    p.add_argument("--url", help="SQLAlchemy URL of the ledger (overrides --conn-id)")
    p.add_argument("--since", required=True, help="from: 30m, 2h, 7d (ago) or an ISO time")
    p.add_argument("--until", help="to (excluded): 2h (ago) or an ISO time; default: now")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--file", help="write to this file instead of stdout")
    p.add_argument("--dag-id", action="append", help="only events of this DAG's runs")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "prune",
        help="remove old finished runs' payloads and events (keeps effect keys, unfinished runs)",
        description="Remove every run that finished (succeeded, failed or cancelled, saga done) before "
        "--older-than ago: its row, checkpoints, attempts, events, approvals, LLM calls, "
        "quality results, compensations and dead letters. Effects (idempotency keys) stay "
        "until --effect-horizon has passed. Never touched: running runs, runs with an open "
        "dead letter, runs a running retry reuses. Prints what it removed.",
    )
    ledger_args(p)
    p.add_argument(
        "--older-than",
        help="e.g. 90d (default: [ledgerflow] retention)",
    )
    p.add_argument(
        "--effect-horizon",
        help="keep effects younger than this, e.g. 365d (default: [ledgerflow] effect_key_horizon)",
    )
    p.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    p.set_defaults(func=cmd_prune)


def _ledger(args: argparse.Namespace) -> Any:
    from ledgerflow.ledger.store import Ledger, resolve_url

    ledger = Ledger(args.url or resolve_url(args.conn_id))
    ledger.migrate()
    return ledger


def _time(value: str | None, name: str) -> datetime | None:
    from ledgerflow.ledger import runview

    if not value:
        return None
    try:
        return runview.parse_since(value)
    except ValueError as exc:
        print(f"{name}: {exc}", file=sys.stderr)  # as `ledgerflow runs --since` says it
        raise SystemExit(2) from None


def _duration(value: str | None, option: str, setting: str) -> Any:
    from ledgerflow import settings

    if not value:
        return settings.get(setting)
    try:
        return settings.parse_duration(value)
    except ValueError as exc:
        print(f"{option}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _pct(value: float | None) -> str:
    from ledgerflow.slo import shown_pct

    return shown_pct(value, 2)


def _secs(value: float | None) -> str:
    from ledgerflow.slo import shown_secs

    return shown_secs(value, 2, days=False)


def cmd_slo(args: argparse.Namespace) -> int:
    from ledgerflow import slo

    since = _time(args.since, "--since")
    until = _time(args.until, "--until")
    ledger = _ledger(args)
    slos = slo.load_slos(args.dags_folder)
    rep = slo.report(ledger, slos=slos, since=since, until=until, workflows=args.workflow)
    if args.alert:
        sent = slo.emit_metrics(rep)
        notified = slo.check_alerts(ledger, rep.objectives)
        print(f"sent {sent} metrics; {len(notified)} new alerts", file=sys.stderr)
        for o in notified:
            print(f"ALERT {o.state}: {o.describe()}", file=sys.stderr)
    data = rep.as_dict()
    breached = any(o.state == "breached" for o in rep.objectives)
    if args.fmt in ("json", "yaml"):
        if args.fmt == "json":
            print(json.dumps(data, indent=2, default=str))
        else:
            import yaml

            print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
        return 1 if breached else 0
    print(f"runs started {data['since']} .. {data['until']}")
    if not data["workflows"]:
        print("(no runs)")
    for name, w in data["workflows"].items():
        o = w["outcomes"]
        print(
            f"\n{name}: {w['runs']} runs ({o['succeeded']} succeeded, {o['failed']} failed, "
            f"{o['compensated'] + o['compensation_failed']} compensated, {o['running']} running)"
            f"  since {w['since'][:16]}"
        )
        rows = [
            ("success rate", _pct(w["success_rate"])),
            ("step failure rate", _pct(w["step_failure_rate"])),
            ("retry rate", _pct(w["retry_rate"])),
            (
                "completion p50 / p95",
                f"{_secs(w['completion_p50_s'])} / {_secs(w['completion_p95_s'])}",
            ),
            (
                "human wait p50 / p95",
                f"{_secs(w['human_wait_p50_s'])} / {_secs(w['human_wait_p95_s'])}",
            ),
            (
                "first step p50 / p95",
                f"{_secs(w['first_step_p50_s'])} / {_secs(w['first_step_p95_s'])}",
            ),
            ("timer lag p95", _secs(w["timer_lag_p95_s"])),
            ("pending / orphaned", f"{w['pending']} / {w['orphaned']}"),
            ("compensations", str(w["compensations"])),
            ("dead letters / LLM fallbacks", f"{w['dead_letters']} / {w['llm_fallbacks']}"),
            ("throughput", f"{w['throughput_per_h']} runs/h"),
            (
                "audit latency mean / max",
                "-"
                if w["audit_latency_mean_ms"] is None
                else f"{w['audit_latency_mean_ms']:.1f}ms / {w['audit_latency_max_ms']:.1f}ms",
            ),
            ("SLA breach rate", _pct(w["sla_breach_rate"])),
        ]
        for label, value in rows:
            print(f"  {label:<30} {value}")
        for obj in w["objectives"]:
            rate = obj["objective"] == "success_rate"
            show = _pct if rate else _secs
            burn = obj["budget_burn"]
            burn_text = "-" if burn is None else (burn if isinstance(burn, str) else f"{burn:.2f}")
            print(
                f"  SLO {obj['objective']:<26} {show(obj['measured'])} (target "
                f"{show(obj['target'])}) burn {burn_text}  {obj['state'].upper()}"
            )
    a = data["auth_failures"]
    print(
        f"\nbreaker openings: {data['breaker_openings']}; authorization failures: "
        f"{a['unauthenticated_401']} x 401, {a['forbidden_403']} x 403"
    )
    return 1 if breached else 0


def cmd_export(args: argparse.Namespace) -> int:
    from ledgerflow.ledger import audit
    from ledgerflow.ledger._engine import now

    since = _time(args.since, "--since")
    assert since is not None
    until = _time(args.until, "--until") or now()
    ledger = _ledger(args)
    rows = audit.export_rows(ledger, since=since, until=until, dag_ids=args.dag_id)
    out = open(args.file, "w", encoding="utf-8", newline="") if args.file else sys.stdout  # noqa: SIM115
    try:
        n = audit.write(_progress(rows), args.format, out)
    finally:
        if args.file:
            out.close()
    print(
        f"exported {n} events ({args.format}) recorded {since:%Y-%m-%d %H:%M} .. {until:%Y-%m-%d %H:%M} UTC",
        file=sys.stderr,
    )
    return 0


def _progress(rows: Any, every: int = 10_000) -> Any:
    for i, row in enumerate(rows, 1):
        if i % every == 0:
            print(f"  {i} events ...", file=sys.stderr)
        yield row


def cmd_prune(args: argparse.Namespace) -> int:
    from ledgerflow.ledger.retention import prune

    older = _duration(args.older_than, "--older-than", "retention")
    horizon = _duration(args.effect_horizon, "--effect-horizon", "effect_key_horizon")
    result = prune(_ledger(args), older_than=older, effect_horizon=horizon, dry_run=args.dry_run)
    if args.fmt == "json":
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print("\n".join(result.lines()))
    return 0
