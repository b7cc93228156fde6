"""What the maintenance DAGs (``dags/ledgerflow_maintenance.py``) run, in a task.

- ``check_slos``: every workflow's indicators over its SLO window, sent as metrics, and
  an alert for each objective that entered ``burning`` or ``breached`` (once per breach).
- ``send_notifications``: every notice of the outbox that is due (a notifier that was
  down, a sender that died), sent again.
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


def send_notifications() -> dict[str, Any]:
    from ledgerflow.ledger import outbox
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger.from_airflow()
    ledger.migrate()
    done = outbox.send_due(ledger)
    for nid, status in done.items():
        print(f"{nid}: {status}")
    print(f"retried {len(done)} notifications, {sum(s == 'sent' for s in done.values())} sent")
    return done


def check_orphans() -> dict[str, Any]:
    """``ledgerflow doctor`` (its repairs with ``[ledgerflow] doctor_fix``) and the gauge.
    In a task Airflow's ORM is blocked: Airflow is asked through the Task SDK."""
    from ledgerflow import doctor, observability, settings
    from ledgerflow.doctor_airflow import MetadataFacts, TaskSdkFacts, in_task
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger.from_airflow()
    ledger.migrate()
    report = doctor.run_doctor(
        ledger,
        TaskSdkFacts() if in_task() else MetadataFacts(),
        fix=bool(settings.get("doctor_fix")),
        grace=settings.get("doctor_grace"),
        by=doctor.who("maintenance DAG"),
    )
    observability.orphaned_runs(report.orphaned_runs)
    for f in report.findings:
        print(f"{f.cause} {f.run_id} {f.subject}: {f.why} [{f.status}]")
        if f.manual:
            print(f"  manual: {f.manual}")
    for line in doctor.summary(report):
        print(line)
    return report.as_dict()
