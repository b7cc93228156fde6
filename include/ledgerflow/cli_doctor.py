"""``ledgerflow doctor [--fix]``: where the ledger and Airflow disagree (``ledgerflow.doctor``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

DESCRIPTION = """\
Compare the ledger with Airflow's metadata database (the Airflow that AIRFLOW_HOME /
[database] configures) and list every open ledger record that nothing will move on, with
its cause:

  run_ended          a ledger run still open whose DagRun ended   fix: the run ends as Airflow says
  run_missing        ... whose DagRun no longer exists            fix: the run -> failed
  attempt_lost       an attempt running with no live task          fix: the attempt -> lost
                     (DagRun ended, TaskInstance not running/queued/deferred, its try
                     number moved on, or its process on this host is gone)
  step_stranded      a step running/retrying in a run that ended   fix: the step -> failed
  saga_stuck         a saga compensating whose DagRun ended        fix: its outcome, or
                     compensation_failed when a step may not have been undone (named)
  effect_unfinished  an effect claimed but never finished          never changed: the next
                     attempt under the same key calls again (manual action printed)
  approval_stranded  an approval pending whose run ended           fix: abandoned
  unknown_dag        records of a DAG this Airflow does not know   nothing changed

Without --fix nothing is written. --fix makes the safe repairs through the lifecycle
machines (never a success Airflow did not report), each with a `doctor_repaired` event in
the run's log (who, what, why); running it again changes nothing. A DagRun that ended less
than --grace ago is left alone (its callback may still be writing).

Exit status: 0 no disagreement; 1 disagreements found (with --fix: some need a person,
their manual action is printed); 2 the ledger or Airflow could not be read."""


def add_doctor_command(
    sub: argparse._SubParsersAction,
    ledger_args: Callable[[argparse.ArgumentParser], None],
    add_dags_folder_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "doctor",
        help="find (and --fix) runs, attempts, sagas, effects and approvals the ledger and "
        "Airflow disagree about",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ledger_args(p)
    p.add_argument("--fix", action="store_true", help="make the safe repairs (recorded as events)")
    p.add_argument(
        "--grace",
        help="leave DagRuns that ended less than this ago, e.g. 5m, 0s "
        "(default: [ledgerflow] doctor_grace)",
    )
    p.add_argument(
        "--via",
        default="cli",
        help="what the repair events name as the doctor's caller (default: cli; the "
        "maintenance DAG says so)",
    )
    add_dags_folder_option(p)
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    from ledgerflow import doctor, settings
    from ledgerflow.cli_output import print_rows
    from ledgerflow.doctor_airflow import AirflowUnreachable, MetadataFacts
    from ledgerflow.ledger.store import Ledger, resolve_url

    if args.grace:
        try:
            grace = _grace(args.grace)
        except ValueError as exc:
            print(f"--grace: {exc}", file=sys.stderr)
            return 2
    else:
        grace = settings.get("doctor_grace")
    ledger = Ledger(args.url or resolve_url(args.conn_id))
    ledger.migrate()

    def progress(done: int, total: int) -> None:
        if total >= 2000 or sys.stderr.isatty():
            print(f"\r  asked Airflow about {done}/{total} runs", end="", file=sys.stderr)
            if done == total:
                print(file=sys.stderr)

    try:
        report = doctor.run_doctor(
            ledger,
            MetadataFacts(),
            fix=args.fix,
            grace=grace,
            by=doctor.who(args.via),
            dags_folder=args.dags_folder,
            progress=progress,
        )
    except AirflowUnreachable as exc:
        print(f"ledgerflow doctor: {exc}", file=sys.stderr)
        return 2
    found = bool(report.needs_person) if args.fix else bool(report.findings)
    if args.fmt in ("json", "yaml"):
        data = report.as_dict()
        if args.fmt == "json":
            print(json.dumps(data, indent=2, default=str))
        else:
            import yaml

            print(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
        return 1 if found else 0
    rows = [
        {
            "cause": f.cause,
            "run_id": f.run_id,
            "subject": f.subject,
            "why": f.why,
            "action": _action(f),
        }
        for f in report.findings
    ]
    print_rows(rows, args.fmt, ["cause", "run_id", "subject", "why", "action"])
    for line in doctor.summary(report):
        print(line, file=sys.stderr)
    return 1 if found else 0


def _grace(text: str) -> Any:
    """A duration as ``[ledgerflow]`` settings take it, or zero (``0``, ``0s``): no grace."""
    import re
    from datetime import timedelta

    from ledgerflow import settings

    if re.fullmatch(r"\s*0+\s*[smhd]?\s*", text):
        return timedelta(0)
    return settings.parse_duration(text)


def _action(f: object) -> str:
    from ledgerflow.doctor import Finding

    assert isinstance(f, Finding)
    if f.status == "repaired":
        text = f"repaired: {f.fix}"
    elif f.status == "unchanged":
        text = "already moved on"
    elif f.fix is not None:
        text = f"--fix: {f.fix}"
    else:
        text = "manual"
    return f"{text}; {f.manual}" if f.manual else text
