"""What the maintenance DAGs (``dags/ledgerflow_maintenance.py``) run, in a task.

- ``check_slos``: every workflow's indicators over its SLO window, sent as metrics, and
  an alert for each objective that entered ``burning`` or ``breached`` (once per breach).
- ``prune_ledger``: the retention prune with ``[ledgerflow] retention`` and
  ``effect_key_horizon``.
- ``check_orphans``: ``ledgerflow doctor`` (a report; with ``[ledgerflow] doctor_fix`` also
  its safe repairs), and the ``orphaned_runs`` gauge.

Each prints what it found or removed (the task's log) and returns it (its XCom).
"""

from __future__ import annotations

from typing import Any


def check_slos() -> dict[str, Any]:
    from ledgerflow import slo
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger.from_airflow()
    ledger.migrate()
    rep = slo.report(ledger, slos=slo.load_slos())
    sent = slo.emit_metrics(rep)
    notified = slo.check_alerts(ledger, rep.objectives)
    for objective in rep.objectives:
        print(objective.describe())
    print(f"sent {sent} metrics; {len(notified)} new alerts")
    return {
        "objectives": [o.as_dict() for o in rep.objectives],
        "alerted": [o.as_dict() for o in notified],
    }


def prune_ledger() -> dict[str, Any]:
    from ledgerflow import settings
    from ledgerflow.ledger.retention import prune
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger.from_airflow()
    ledger.migrate()
    result = prune(
        ledger,
        older_than=settings.get("retention"),
        effect_horizon=settings.get("effect_key_horizon"),
    )
    print("\n".join(result.lines()))
    return result.as_dict()


def check_orphans() -> dict[str, Any]:
    """``ledgerflow doctor`` (``--fix`` with ``[ledgerflow] doctor_fix``) and the gauge.

    The doctor reads Airflow's metadata database, which Airflow 3 forbids inside a task
    process (``block_orm_access``): it runs as a child process, the ``ledgerflow doctor``
    command with the worker's own Airflow configuration, as an operator would run it."""
    import json
    import subprocess
    import sys

    from ledgerflow import observability, settings

    command = [
        sys.executable,
        "-m",
        "ledgerflow.cli",
        "doctor",
        "--json",
        "--via",
        "maintenance DAG",
    ]
    if settings.get("doctor_fix"):
        command.append("--fix")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"ledgerflow doctor failed ({done.returncode}): {done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    observability.orphaned_runs(int(report["orphaned_runs"]))
    for f in report["findings"]:
        print(f"{f['cause']} {f['run_id']} {f['subject']}: {f['why']} [{f['status']}]")
        if f["manual"]:
            print(f"  manual: {f['manual']}")
    print(
        f"orphaned runs: {report['orphaned_runs']}; repaired: {report['repaired']}; "
        f"left for a person: {report['needs_person']}"
    )
    return report
