"""The Ledgerflow Airflow plugin: mounts the approvals app at /ledgerflow and adds a menu entry.

Airflow loads this file from ``[core] plugins_folder``. The app itself lives in the
installed package (``ledgerflow.api``); every route but ``/health`` authenticates through
Airflow's auth manager.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from ledgerflow.api import create_app


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
        }
    ]
