"""What the maintenance DAGs (``dags/ledgerflow_maintenance.py``) run, in a task.

- ``check_slos``: every workflow's indicators over its SLO window, sent as metrics, and
  an alert for each objective that entered ``burning`` or ``breached`` (once per breach).
- ``send_notifications``: every notice of the outbox that is due (a notifier that was
  down, a sender that died), sent again.
- ``prune_ledger``: the retention prune with ``[ledgerflow] retention`` and
  ``effect_key_horizon``.

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
