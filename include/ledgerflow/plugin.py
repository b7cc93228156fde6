"""The Ledgerflow Airflow plugin: mounts the app at /ledgerflow and adds its views.

Airflow finds it through the package's ``airflow.plugins`` entry point (``pip install
ledgerflow`` and a restart are enough); ``plugins/ledgerflow_plugin.py`` is kept for
deployments that copy that file into their plugins folder (see :func:`registered_by_entry_point`).
Every route of the app but ``/health`` and the icons authenticates through Airflow's auth
manager. Views: Browse -> Approvals, Browse -> Runs, Browse -> Ledgerflow dashboard, and a "Ledgerflow" tab on each DAG
run's page in Airflow's UI (the run page of that run), each with an icon for light and dark
mode. Links start with the path of ``[api] base_url``, so Airflow served under a sub-path
(``http://host/airflow``) keeps them working.

Importing this module also imports the step code once per component
(``ledgerflow.preload``), so task processes start with it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from ledgerflow import run_listener
from ledgerflow.api import create_app
from ledgerflow.links import base_path
from ledgerflow.preload import preload

# Every Airflow component loads its plugins before it forks its task or parse processes:
# they inherit the step code instead of importing it each time (see ledgerflow.preload).
preload()

NAME = "ledgerflow"
URL_PREFIX = "/ledgerflow"
ENTRY_POINT = f"{__name__}:LedgerflowPlugin"


def external_views() -> list[dict[str, Any]]:
    """Airflow's menu entries and run-page tab, under ``[api] base_url``'s path.

    An external view's ``href`` and ``icon`` go unchanged into the UI (an iframe's ``src``,
    an ``<img>``): a root-relative ``/ledgerflow/...`` would leave Airflow's sub-path.
    """
    root = f"{base_path()}{URL_PREFIX}"

    def icons(name: str) -> dict[str, str]:
        return {
            "icon": f"{root}/static/{name}.svg",
            "icon_dark_mode": f"{root}/static/{name}-dark.svg",
        }

    return [
        {
            "name": "Approvals",
            "href": f"{root}/approvals",
            "destination": "nav",
            "category": "browse",
            "url_route": "ledgerflow-approvals",
            **icons("approvals"),
        },
        {
            "name": "Runs",
            "href": f"{root}/runs",
            "destination": "nav",
            "category": "browse",
            "url_route": "ledgerflow-runs",
            **icons("runs"),
        },
        {
            "name": "Ledgerflow dashboard",
            "href": f"{root}/dashboard",
            "destination": "nav",
            "category": "browse",
            "url_route": "ledgerflow-dashboard",
            **icons("dashboard"),
        },
        # A tab on Airflow's own run page: the UI fills in {DAG_ID} and {RUN_ID}.
        {
            "name": "Ledgerflow",
            "href": f"{root}/runs/{{DAG_ID}}/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "ledgerflow-run",
            **icons("ledgerflow"),
        },
    ]


class LedgerflowPlugin(AirflowPlugin):
    name = NAME
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Ledgerflow"}]
    external_views = external_views()
    # A successful run's end in the ledger, written by the scheduler as it marks the run.
    listeners = [run_listener]


@cache
def registered_by_entry_point() -> bool:
    """Whether an installed distribution declares this plugin as an ``airflow.plugins``
    entry point (Airflow then loads it from there).

    Airflow registers a plugin name once: it loads the plugins folder first, then entry
    points, and records a second ``ledgerflow`` as an import error ("already registered,
    skipping"). The plugins-folder file exposes the class only when this is false.
    """
    from importlib.metadata import entry_points

    return any(ep.value == ENTRY_POINT for ep in entry_points(group="airflow.plugins"))
