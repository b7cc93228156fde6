"""Every route of Ledgerflow's app x {anonymous, a user without access to the DAG, a
reader, an approver}, on a multi-team Airflow deployment.

The stack runs with ``[core] multi_team``: the ``payroll`` workflow lives in a DAG bundle
of team ``team_a``; ``outsider`` is an ``op`` of ``team_b`` (an op may trigger runs, but
not of another team's DAGs), ``reader`` a ``viewer`` of ``team_a``, ``approver`` a
``user`` of ``team_a`` named as the approver. The routes are enumerated from
``create_app()`` (a new route without a row here fails the test), and the expected answer
of each cell is written out below (MATRIX). The same table is printed for the record.

Every permission goes through Airflow's own ``requires_access_dag`` with the DAG the
route resolved (``api._auth.require_dag``): before, the trigger and retry routes asked
the auth manager without the DAG's team, so another team's ``op`` started a run of
``payroll`` (201) and got as far as the retry's planning (409 instead of 403).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from ledgerflow.api import create_app
from ledgerflow.api._auth import csrf_token, form_token
from ledgerflow.cli import SHIM
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.postgres import fresh_database

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/ledgerflow"
ROLES = ("anonymous", "outsider", "reader", "approver")
USERS = {"outsider": "op:team_b", "reader": "viewer:team_a", "approver": "user:team_a"}

PAYROLL = """
name: payroll
version: 1
params:
  month: {type: string, default: "2026-12"}
triggers:
  webhook: {secret_conn_id: payroll_hook}
steps:
  - id: pay
    tool: demo.noop
    args: {value: "{{ params.month }}"}
    idempotency: natural
"""

# (method, route) -> the answer of each role, in ROLES order. "200+" / "200-": a list
# that holds / does not hold the team's approval or run. The webhook's credential is its
# signature (an unsigned request is 401 whoever sends it). Forms carry a valid page token
# here, so the cell shows the authorization, not the CSRF check.
MATRIX: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("GET", "/health"): ("200", "200", "200", "200"),
    ("POST", "/hooks/{name}"): ("401", "401", "401", "401"),
    ("POST", "/api/workflows/{name}/runs"): ("401", "403", "403", "201"),
    ("GET", "/api/approvals"): ("401", "200-", "200+", "200+"),
    ("GET", "/api/approvals/{approval_id}"): ("401", "404", "200", "200"),
    ("POST", "/api/approvals/{approval_id}/decision"): ("401", "404", "403", "200"),
    ("GET", "/approvals"): ("401", "200-", "200+", "200+"),
    ("GET", "/approvals/decided"): ("401", "200", "200", "200"),
    ("GET", "/approvals/{approval_id}"): ("401", "404", "200", "200"),
    ("POST", "/approvals/{approval_id}/decide"): ("401", "404", "403", "303"),
    ("GET", "/api/runs"): ("401", "200-", "200+", "200+"),
    ("GET", "/api/runs/{run_id:path}"): ("401", "404", "200", "200"),
    ("GET", "/runs"): ("401", "200-", "200+", "200+"),
    ("GET", "/runs/{run_id:path}"): ("401", "404", "200", "200"),
    # The run is one Airflow never ran: an authorized retry is refused by its state (409).
    # The API answers 403 to whoever may not trigger the DAG (as Airflow's own trigger
    # route); the page's form first shows the run, so one who may not read it gets 404.
    ("POST", "/api/runs/{run_id:path}/retry"): ("401", "403", "403", "409"),
    ("POST", "/runs/{run_id:path}/retry"): ("401", "404", "403", "409"),
}


@pytest.fixture(scope="module")
def ledger_url() -> Iterator[str]:
    with fresh_database("lf_e2e_matrix") as url:
        yield url.replace("postgresql://", "postgresql+psycopg2://", 1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, ledger_url: str) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("matrix")
    dags, team_dags = base / "dags", base / "team_a_dags"
    for folder in (dags, team_dags):
        folder.mkdir()
    shutil.copytree(ROOT / "dags" / "workflows" / "checkout", dags / "workflows" / "checkout")
    payroll = team_dags / "workflows" / "payroll"
    payroll.mkdir(parents=True)
    (payroll / "v1.yaml").write_text(PAYROLL)
    (payroll / "v1.py").write_text(SHIM)
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = [
        {"name": "dags-folder", "classpath": local, "kwargs": {"path": str(dags)}},
        {
            "name": "payroll",
            "classpath": local,
            "kwargs": {"path": str(team_dags)},
            "team_name": "team_a",
        },
    ]
    stack = AirflowStack(
        dags_folder=dags,
        home=base / "home",
        extra_env={
            "AIRFLOW__CORE__MULTI_TEAM": "True",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            "AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url,
            "AIRFLOW_CONN_PAYROLL_HOOK": json.dumps({"conn_type": "generic", "password": "s"}),
            "AIRFLOW__LEDGERFLOW__DEMO_TOOLS": "True",
        },
        plugins_folder=ROOT / "plugins",
        users=USERS,
        setup=[["teams", "sync"], ["teams", "create", "team_b"]],
    )
    with stack:
        stack.wait_for_dags(["payroll__v1", "checkout__v1"], timeout=240)
        yield stack


def team_approval(ledger: Ledger) -> approvals.Approval:
    run = f"payroll__v1/manual__{secrets.token_hex(6)}"
    approval, _ = approvals.request(
        ledger,
        run_id=run,
        step_key="sign_off",
        dag_id="payroll__v1",
        task_id="sign_off",
        workflow="payroll",
        version=1,
        subject=f"Payroll {run[-6:]}",
        body="Totals attached.",
        payload={"total": 125_000},
        approvers={"users": ["approver"], "roles": []},
        deadline=datetime.now(timezone.utc) + timedelta(days=1),
        at_deadline="reject",
    )
    return approval


def routes() -> list[tuple[str, str]]:
    return [
        (method, route.path)
        for route in create_app().routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]


def server_secret(stack: AirflowStack) -> bytes:
    """The api-server's form-token key (``api._auth.server_secret``, from its secret_key):
    stands for the page that a user would have loaded to get the form."""
    return hashlib.sha256(
        b"ledgerflow-csrf:" + stack.env["AIRFLOW__API__SECRET_KEY"].encode()
    ).digest()


def test_every_route_answers_each_role_as_designed(stack: AirflowStack, ledger_url: str) -> None:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    assert set(routes()) == set(MATRIX), "a route without a row in MATRIX, or a row too many"
    run_id = f"payroll__v1/manual__{secrets.token_hex(6)}"
    ledger.ensure_run(
        run_id=run_id,
        dag_id="payroll__v1",
        workflow="payroll",
        version=1,
        params={},
        trigger_kind="manual",
    )
    seen: dict[tuple[str, str], list[str]] = {}
    for (method, path), expected in MATRIX.items():
        row: list[str] = []
        for role, want in zip(ROLES, expected, strict=True):
            approval = team_approval(ledger)  # a fresh one: deciding changes it
            got = ask(stack, role, method, path, approval, run_id)
            row.append(got)
            assert got == want, f"{method} {path} as {role}: {got}, designed {want}"
        seen[(method, path)] = row
    width = max(len(f"{m} {p}") for m, p in seen)
    print("\n" + f"{'route':<{width}}  " + "  ".join(f"{r:<9}" for r in ROLES))
    for (method, path), row in seen.items():
        print(f"{method + ' ' + path:<{width}}  " + "  ".join(f"{c:<9}" for c in row))


def ask(
    stack: AirflowStack,
    role: str,
    method: str,
    path: str,
    approval: approvals.Approval,
    run_id: str,
) -> str:
    url = PREFIX + (
        path.replace("{name}", "payroll")
        .replace("{approval_id}", str(approval.id))
        .replace("{run_id:path}", run_id)
    )
    headers: dict[str, str] = {}
    if role != "anonymous":
        headers["Authorization"] = f"Bearer {stack.token(role)}"
    kw: dict[str, Any] = {}
    if path == "/api/approvals/{approval_id}/decision":
        kw["json"] = {"decision": "approve", "comment": "ok"}
    elif path == "/api/workflows/{name}/runs":
        kw["json"] = {"params": {}, "idempotency_key": f"matrix-{role}"}
    elif path == "/hooks/{name}":
        kw["json"] = {}
    elif path == "/approvals/{approval_id}/decide":
        token = csrf_token(server_secret(stack), role, approval.id)
        kw["data"] = {"decision": "approve", "csrf_token": token}
    elif path == "/runs/{run_id:path}/retry":
        token = form_token(server_secret(stack), role, f"retry:{run_id}")
        kw["data"] = {"csrf_token": token}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
        resp = client.request(method, url, follow_redirects=False, **kw)
    code = str(resp.status_code)
    if code == "200" and method == "GET" and path in ("/api/approvals", "/approvals"):
        return code + ("+" if _lists(resp, f"/approvals/{approval.id}", approval.id) else "-")
    if code == "200" and method == "GET" and path in ("/api/runs", "/runs"):
        return code + ("+" if run_id in resp.text or _quoted(run_id) in resp.text else "-")
    return code


def _lists(resp: httpx.Response, href: str, approval_id: int) -> bool:
    if resp.headers.get("content-type", "").startswith("application/json"):
        return any(a["id"] == approval_id for a in resp.json()["approvals"])
    return href in resp.text


def _quoted(run_id: str) -> str:
    from urllib.parse import quote

    return quote(run_id, safe="")
