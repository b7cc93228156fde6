"""Full links to Ledgerflow's pages, for task logs and notices: under Airflow's
``[api] base_url`` (what Airflow's own links use), or the path alone without one."""

from __future__ import annotations

from urllib.parse import quote


def full_link(path: str) -> str:
    try:
        from airflow.configuration import conf

        base = str(conf.get("api", "base_url", fallback="") or "").rstrip("/")
    except Exception:  # no Airflow configuration here: the path alone
        base = ""
    return f"{base}{path}"


def base_path() -> str:
    """The path of ``[api] base_url`` without its last ``/``: ``""`` when Airflow is served
    at the root, ``"/airflow"`` under a sub-path (what every link into Airflow's api-server,
    Ledgerflow's pages included, starts with)."""
    from urllib.parse import urlsplit

    return urlsplit(full_link("/")).path.rstrip("/")


def run_page(run_id: str) -> str:
    """The run's page (``<dag_id>/<airflow run id>``)."""
    return full_link(f"/ledgerflow/runs/{quote(run_id, safe='/')}")


def approval_page(approval_id: int) -> str:
    return full_link(f"/ledgerflow/approvals/{approval_id}")
