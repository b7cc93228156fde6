"""Ledgerflow installed as a package only, and Airflow served under a sub-path.

One real stack: no plugins folder file (the plugin comes from the package's
``airflow.plugins`` entry point), ``[api] base_url = http://127.0.0.1:PORT/airflow``, and in
front of the api-server a proxy that serves only ``/airflow/...`` (as an ingress does), so a
link that forgets the sub-path is a 404 here as it would be in production. Pages are fetched
as the UI's browser fetches them (the ``_token`` cookie after logging in); every link, form
action, image and script URL on them must stay under the sub-path and answer (not 404).

The same deployment runs Airflow in multi-team mode, where the last test asks every route
of the app as four roles (anonymous, another team's op, a reader, an approver): one stack
for both, as starting one costs most of a minute.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

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
BASE = "/airflow"
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
    # Cancel: who may not read the run gets 404, who may read but not change it 403; the
    # API without a body (the reason) is 422 once authorized, the form without a reason
    # goes back to the run page (303): nothing is cancelled here.
    ("POST", "/api/runs/{run_id:path}/cancel"): ("401", "404", "403", "422"),
    ("POST", "/runs/{run_id:path}/cancel"): ("401", "404", "403", "303"),
    # Events: delivering needs Airflow's asset POST (op and above); with no step waiting
    # the delivery is kept (202). The webhook's credential is its signature, checked with
    # the secret of [ledgerflow] event_webhook_conn_id: none here, so 503 to everyone.
    ("POST", "/api/events/{name}"): ("401", "202", "403", "403"),
    ("POST", "/hooks/events/{name}"): ("503", "503", "503", "503"),
    # Operating: the team's workflow (its run's indicators, its events) or not.
    ("GET", "/api/slo"): ("401", "200-", "200+", "200+"),
    ("GET", "/api/export"): ("401", "200-", "200+", "200+"),
    ("GET", "/dashboard"): ("401", "200-", "200+", "200+"),
}


@pytest.fixture(scope="module")
def ledger_url() -> Iterator[str]:
    with fresh_database("lf_e2e_provider") as url:
        yield url


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, ledger_url: str) -> Iterator[AirflowStack]:
    """One deployment for this file's tests (one stack instead of two): the plugin from its
    entry point only, Airflow under ``/airflow``, and ``[core] multi_team`` with the
    ``payroll`` workflow in a bundle of team ``team_a`` (the route matrix below)."""
    base = tmp_path_factory.mktemp("subpath")
    dags, team_dags = base / "dags", base / "team_a_dags"
    shutil.copytree(ROOT / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
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
    with AirflowStack(
        dags_folder=dags,
        home=base / "home",  # plugins folder: home/plugins, empty
        extra_env={
            "AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url,
            "AIRFLOW__CORE__MULTI_TEAM": "True",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
            "AIRFLOW_CONN_PAYROLL_HOOK": json.dumps({"conn_type": "generic", "password": "s"}),
            "AIRFLOW__LEDGERFLOW__DEMO_TOOLS": "True",
        },
        base_path=BASE,
        users=USERS,
        setup=[["teams", "sync"], ["teams", "create", "team_b"]],
    ) as stack:
        assert stack.base_url.endswith(f":{stack.port}{BASE}")
        stack.wait_for_dags(["onboarding__v1", "checkout__v1", "payroll__v1"], timeout=240)
        yield stack


@pytest.fixture(scope="module")
def browser(stack: AirflowStack) -> Iterator[httpx.Client]:
    """An HTTP client holding the UI's cookie after logging in, at the proxy's root."""
    origin = stack.base_url.removesuffix(BASE)
    with httpx.Client(base_url=origin, timeout=60) as client:
        resp = client.post(
            f"{BASE}/auth/token", json={"username": "admin", "password": stack.password()}
        )
        assert resp.status_code in (200, 201), resp.text
        client.cookies.set("_token", resp.json()["access_token"])
        yield client


@pytest.fixture(scope="module")
def runs(stack: AirflowStack, browser: httpx.Client) -> dict[str, str]:
    """A run parked at its approval (onboarding) and a failed run (checkout, card declined),
    so the pages carry approval, run, retry and Airflow task links."""
    parked = stack.trigger("onboarding__v1", {"customer_id": "c-subpath"})
    failed = stack.trigger("checkout__v1", {"order_id": "o-subpath", "decline_card": True})
    assert stack.wait_for_run("checkout__v1", failed, timeout=300) == "failed"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pending = browser.get(f"{BASE}/ledgerflow/api/approvals").json()["approvals"]
        if pending:
            break
        time.sleep(1)
    else:
        pytest.fail("the onboarding run never asked for its approval")
    return {"onboarding__v1": parked, "checkout__v1": failed}


def _component(value: str) -> str:
    return quote(value, safe="!~*'()")


class _Refs(HTMLParser):
    """Every URL an HTML page makes the browser load or follow, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str, str]] = []  # tag, attribute, URL, method
        self.scripts: list[str] = []
        self._script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        method = (dict(attrs).get("method") or "get").upper()
        for key, value in attrs:
            if key in ("href", "src", "action") and value is not None:
                self.refs.append((tag, key, value, method))
        self._script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = False

    def handle_data(self, data: str) -> None:
        if self._script:
            self.scripts.append(data)


def test_the_plugin_comes_from_the_entry_point_without_the_plugins_file(
    stack: AirflowStack,
) -> None:
    """With an empty plugins folder Airflow still loads ``ledgerflow``, from the installed
    package's entry point, with its app, its four views and no plugin import error."""
    assert not any((stack.home / "plugins").iterdir())
    plugins = stack.api("GET", "/api/v2/plugins", params={"limit": 100})["plugins"]
    ours = [p for p in plugins if p["name"] == "ledgerflow"]
    assert len(ours) == 1
    assert "ledgerflow.plugin:LedgerflowPlugin" in ours[0]["source"]
    assert [a["url_prefix"] for a in ours[0]["fastapi_apps"]] == ["/ledgerflow"]
    assert {v["url_route"] for v in ours[0]["external_views"]} == {
        "ledgerflow-approvals",
        "ledgerflow-runs",
        "ledgerflow-run",
        "ledgerflow-dashboard",
    }
    errors = stack.api("GET", "/api/v2/plugins/importErrors")
    assert errors["total_entries"] == 0, errors


def test_every_link_of_the_pages_stays_under_the_sub_path(
    stack: AirflowStack, browser: httpx.Client, runs: dict[str, str]
) -> None:
    """Starting from the menu entries and the run-page tab Airflow's UI shows (with their
    icons), every href, src and form action on Ledgerflow's pages, and every path in their
    scripts, starts with the sub-path and answers something other than 404 through the
    proxy; the pages themselves answer 200. The proxy refuses the same paths without the
    sub-path, so a root-relative link fails this test."""
    assert browser.get("/ledgerflow/runs").status_code == 404  # what the old links did
    ui = browser.get(f"{BASE}/")
    assert f'<base href="{BASE}/"' in ui.text  # how the UI resolves relative URLs
    plugin = next(
        p
        for p in stack.api("GET", "/api/v2/plugins", params={"limit": 100})["plugins"]
        if p["name"] == "ledgerflow"
    )
    pages: list[str] = []
    checked: dict[str, int] = {}

    def check(url: str, where: str, method: str = "GET") -> None:
        """``url`` is under the sub-path and answers. A POST form's action is posted empty
        (no CSRF token: refused, nothing changes): a GET there is another route's."""
        parts = urlsplit(url)
        assert parts.path.startswith(f"{BASE}/"), f"{where}: {url} leaves {BASE}"
        if url not in checked:
            checked[url] = browser.request(method, url).status_code
        assert checked[url] != 404, f"{where}: {method} {url} -> 404"

    ui_url = f"{stack.base_url}/"
    for view in plugin["external_views"]:
        for key in ("icon", "icon_dark_mode"):
            icon = urljoin(ui_url, view[key])
            check(icon, f"view {view['name']} {key}")
            assert browser.get(icon).headers["content-type"].startswith("image/svg+xml")
        href = view["href"]
        if view["destination"] == "dag_run":
            for dag_id, run_id in runs.items():
                # As the UI fills them in (encodeURIComponent).
                filled = href.format(DAG_ID=_component(dag_id), RUN_ID=_component(run_id))
                pages.append(urljoin(ui_url, filled))
        else:
            pages.append(urljoin(ui_url, href))

    seen: set[str] = set()
    followed = 0
    while pages and followed < 40:
        page = pages.pop(0)
        if page in seen:
            continue
        seen.add(page)
        followed += 1
        resp = browser.get(page, headers={"accept": "text/html"})
        assert resp.status_code == 200, (page, resp.status_code, resp.text[:300])
        assert urlsplit(str(resp.url)).path.startswith(f"{BASE}/ledgerflow/")
        refs = _Refs()
        refs.feed(resp.text)
        for tag, key, value, method in refs.refs:
            if value.startswith("#"):
                continue
            url = urljoin(page, value)
            check(url, f"{page} <{tag} {key}>", method if tag == "form" else "GET")
            parts = urlsplit(url)
            if tag == "a" and parts.path.startswith(f"{BASE}/ledgerflow/"):
                pages.append(url.split("#")[0])
        for script in refs.scripts:
            for path in re.findall(r"""["'`](/[A-Za-z0-9_./{}-]*)""", script):
                assert path.startswith(f"{BASE}/"), f"{page}: script path {path}"
    kinds = {urlsplit(u).path.split("/")[3] for u in seen if len(urlsplit(u).path.split("/")) > 3}
    assert {"approvals", "runs"} <= kinds, seen
    assert any("/approvals/" in u and u.rstrip("/").split("/")[-1].isdigit() for u in seen)
    assert any(f"{BASE}/dags/" in u for u in checked), "no link into Airflow's run grid"
    assert any(u.endswith("/retry") for u in checked), "no retry form on the failed run"
    assert any(u.endswith("/decide") for u in checked), "no decision form on the approval"


def test_redirects_and_the_login_link_keep_the_sub_path(
    stack: AirflowStack, browser: httpx.Client, runs: dict[str, str]
) -> None:
    """Deciding on the approval page redirects to the approval under the sub-path, and a
    page opened without a login links to Airflow's login page under the sub-path."""
    approval = browser.get(f"{BASE}/ledgerflow/api/approvals").json()["approvals"][0]
    page = browser.get(f"{BASE}/ledgerflow/approvals/{approval['id']}").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    seen = re.search(r'name="seen_hash" value="([^"]+)"', page)
    assert csrf and seen
    origin = stack.base_url.removesuffix(BASE)
    resp = browser.post(
        f"{BASE}/ledgerflow/approvals/{approval['id']}/decide",
        data={
            "decision": "approve",
            "comment": "fine",
            "csrf_token": csrf.group(1),
            "seen_hash": seen.group(1),
        },
        headers={"origin": origin},
    )
    assert resp.status_code == 303, resp.text
    location = resp.headers["location"]
    assert location.startswith(f"{BASE}/ledgerflow/approvals/{approval['id']}?msg="), location
    assert browser.get(location).status_code == 200
    with httpx.Client(base_url=origin, timeout=30) as anonymous:
        resp = anonymous.get(f"{BASE}/ledgerflow/runs", headers={"accept": "text/html"})
        assert resp.status_code == 401
        login = re.search(r'<a href="([^"]+)">Sign in to Airflow</a>', resp.text)
        assert login and login.group(1).startswith(f"{BASE}/auth/login"), resp.text
        assert anonymous.get(login.group(1).replace("&amp;", "&")).status_code != 404


# -- every route x {anonymous, outsider, reader, approver} ------------------------------
#
# On this stack's multi-team deployment the ``payroll`` workflow lives in a DAG bundle of
# team ``team_a``; ``outsider`` is an ``op`` of ``team_b`` (an op may trigger runs, but not
# of another team's DAGs), ``reader`` a ``viewer`` of ``team_a``, ``approver`` a ``user``
# of ``team_a`` named as the approver. The routes are enumerated from ``create_app()`` (a
# new route without a row in MATRIX fails the test) and every permission goes through
# Airflow's own ``requires_access_dag`` with the DAG the route resolved
# (``api._auth.require_dag``): before, the trigger and retry routes asked the auth manager
# without the DAG's team, so another team's ``op`` started a run of ``payroll`` (201).


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


def app_routes() -> list[tuple[str, str]]:
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
    assert set(app_routes()) == set(MATRIX), "a route without a row in MATRIX, or a row too many"
    run_id = f"payroll__v1/manual__{secrets.token_hex(6)}"
    ledger.ensure_run(
        run_id=run_id,
        dag_id="payroll__v1",
        workflow="payroll",
        version=1,
        params={},
        trigger_kind="manual",
    )
    cells = [
        (method, path, role, want, team_approval(ledger))  # a fresh one: deciding changes it
        for (method, path), expected in MATRIX.items()
        for role, want in zip(ROLES, expected, strict=True)
    ]
    for role in ROLES[1:]:
        stack.token(role)  # logged in once, before the threads ask
    # Every cell is its own request on its own approval: asked 8 at a time.
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda c: ask(stack, c[2], c[0], c[1], c[4], run_id), cells))
    seen: dict[tuple[str, str], list[str]] = {}
    for (method, path, *_), got in zip(cells, answers, strict=True):
        seen.setdefault((method, path), []).append(got)
    wrong = [
        f"{method} {path} as {role}: {got}, designed {want}"
        for (method, path, role, want, _), got in zip(cells, answers, strict=True)
        if got != want
    ]
    width = max(len(f"{m} {p}") for m, p in seen)
    print("\n" + f"{'route':<{width}}  " + "  ".join(f"{r:<9}" for r in ROLES))
    for (method, path), row in seen.items():
        print(f"{method + ' ' + path:<{width}}  " + "  ".join(f"{c:<9}" for c in row))
    assert not wrong, "\n".join(wrong)


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
    elif path == "/runs/{run_id:path}/cancel":
        token = form_token(server_secret(stack), role, f"cancel:{run_id}")
        kw["data"] = {"csrf_token": token}
    elif path == "/api/events/{name}":
        kw["json"] = {"key": "matrix", "id": f"matrix-{role}", "payload": {}}
    elif path in ("/api/export", "/api/slo"):
        kw["params"] = {"since": "1d"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
        resp = client.request(method, url, follow_redirects=False, **kw)
    code = str(resp.status_code)
    if code == "200" and method == "GET" and path in ("/api/approvals", "/approvals"):
        return code + ("+" if _lists(resp, f"/approvals/{approval.id}", approval.id) else "-")
    if code == "200" and method == "GET" and path in ("/api/runs", "/runs", "/api/export"):
        return code + ("+" if run_id in resp.text or _quoted(run_id) in resp.text else "-")
    if code == "200" and path in ("/api/slo", "/dashboard"):
        return code + ("+" if '"payroll"' in resp.text or "wf-payroll" in resp.text else "-")
    return code


def _lists(resp: httpx.Response, href: str, approval_id: int) -> bool:
    if resp.headers.get("content-type", "").startswith("application/json"):
        return any(a["id"] == approval_id for a in resp.json()["approvals"])
    return href in resp.text


def _quoted(run_id: str) -> str:
    from urllib.parse import quote

    return quote(run_id, safe="")
