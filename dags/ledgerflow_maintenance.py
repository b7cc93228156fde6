"""Ledgerflow's maintenance DAGs (paused when created: unpause them where they should run).

- ``ledgerflow_slo_alerts`` (every 5 minutes): indicators as metrics, and an alert when a
  workflow's SLO starts burning its error budget or is breached, once per breach.
- ``ledgerflow_notifications`` (every 2 minutes): sends again the notices that are due
  (a notifier that was down: ``ledgerflow notifications``).
- ``ledgerflow_prune`` (daily): removes finished runs older than ``[ledgerflow] retention``
  (90 days), keeping effect keys for ``[ledgerflow] effect_key_horizon``; never an
  unfinished run.
- ``ledgerflow_doctor`` (every 15 minutes): ``ledgerflow doctor``, a report of the runs,
  attempts, sagas, effects and approvals the ledger and Airflow disagree about, and the
  ``orphaned_runs`` gauge; it repairs what is safe only with ``[ledgerflow] doctor_fix``.

Cheap to parse: the work is imported inside the tasks.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import dag, task

COMMON = {
    "start_date": datetime(2026, 1, 1),
    "catchup": False,
    "max_active_runs": 1,
    "is_paused_upon_creation": True,
    "default_args": {"retries": 1, "retry_delay": timedelta(minutes=1)},
}


@dag(
    dag_id="ledgerflow_slo_alerts",
    schedule="*/5 * * * *",
    tags=["ledgerflow", "maintenance"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(minutes=10),
    **COMMON,  # type: ignore[arg-type]
)
def ledgerflow_slo_alerts() -> None:
    @task
    def check_slos() -> dict[str, object]:
        from ledgerflow.maintenance import check_slos

        return check_slos()

    check_slos()


@dag(
    dag_id="ledgerflow_notifications",
    schedule="*/2 * * * *",
    tags=["ledgerflow", "maintenance"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(minutes=10),
    **COMMON,  # type: ignore[arg-type]
)
def ledgerflow_notifications() -> None:
    @task
    def send_notifications() -> dict[str, object]:
        from ledgerflow.maintenance import send_notifications

        return send_notifications()

    send_notifications()


@dag(
    dag_id="ledgerflow_prune",
    schedule="@daily",
    tags=["ledgerflow", "maintenance"],
    doc_md=__doc__,
    **COMMON,  # type: ignore[arg-type]
)
def ledgerflow_prune() -> None:
    @task
    def prune_ledger() -> dict[str, object]:
        from ledgerflow.maintenance import prune_ledger

        return prune_ledger()

    prune_ledger()


@dag(
    dag_id="ledgerflow_doctor",
    schedule="*/15 * * * *",
    tags=["ledgerflow", "maintenance"],
    doc_md=__doc__,
    dagrun_timeout=timedelta(minutes=10),
    **COMMON,  # type: ignore[arg-type]
)
def ledgerflow_doctor() -> None:
    @task
    def check_orphans() -> dict[str, object]:
        from ledgerflow.maintenance import check_orphans

        return check_orphans()

    check_orphans()


ledgerflow_slo_alerts()
ledgerflow_notifications()
ledgerflow_prune()
ledgerflow_doctor()
