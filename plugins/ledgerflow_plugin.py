"""The Ledgerflow Airflow plugin: mounts the app at /ledgerflow and adds its views.

Airflow loads this file from ``[core] plugins_folder``. The app itself lives in the
installed package (``ledgerflow.api``); every route but ``/health`` authenticates through
Airflow's auth manager. Views: Browse -> Approvals, Browse -> Runs, and a "Ledgerflow" tab
on each DAG run's page in Airflow's UI (the run page of that run). It also imports the
step code once per component (``ledgerflow.preload``), so task processes start with it.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ledgerflow.api import create_app
from ledgerflow.preload import preload

# Every Airflow component loads this file before it forks its task or parse processes:
# they inherit the step code instead of importing it each time (see ledgerflow.preload).
preload()


class LedgerflowPlugin(AirflowPlugin):
    name = "ledgerflow"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/ledgerflow", "name": "Ledgerflow"}]
    external_views = [
        {
            "name": "Approvals",
            "href": "/ledgerflow/approvals",
            "destination": "nav",
            "category": "browse",
            "url_route": "ledgerflow-approvals",
        },
        {
            "name": "Runs",
            "href": "/ledgerflow/runs",
            "destination": "nav",
            "category": "browse",
            "url_route": "ledgerflow-runs",
        },
        # A tab on Airflow's own run page: the UI fills in {DAG_ID} and {RUN_ID}.
        {
            "name": "Ledgerflow",
            "href": "/ledgerflow/runs/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "ledgerflow-run",
        },
    ]
