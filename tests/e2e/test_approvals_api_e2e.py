"""The approvals app as the Airflow plugin serves it: real api-server, real auth, Postgres ledger.

Approval rows are created directly in the e2e ledger (the one the stack's api-server reads
through ``AIRFLOW_CONN_LEDGERFLOW_DB``); every call goes over HTTP to the api-server, with
tokens minted by Airflow's SimpleAuthManager for users of different roles.
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from sqlalchemy import select

from ledgerflow.api import create_app
from ledgerflow.ledger import approvals
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

PREFIX = "/ledgerflow"


def make_approval(
    ledger: Ledger,
    *,
    users: tuple[str, ...] = ("manager",),
    roles: tuple[str, ...] = (),
    body: str = "Please approve **ACME** for a credit line.",
    payload: Any = None,
    workflow: str = "api_e2e",
) -> approvals.Approval:
    """A pending approval of a made-up run (no task waits on it). Its DAG is one the stack
    has: approvals are shown only to users whom Airflow lets read their DAG."""
    run = f"{workflow}__v1/manual__{secrets.token_hex(6)}"
    approval, created = approvals.request(
        ledger,
        run_id=run,
        step_key="manager_approval",
        dag_id="approval_strict__v1",
        task_id="manager_approval",
        workflow=workflow,
        version=1,
        subject=f"Credit line for {run[-6:]}",
        body=body,
        payload=payload if payload is not None else {"customer": "ACME", "limit": 5000},
        approvers={"users": list(users), "roles": list(roles)},
        deadline=datetime.now(timezone.utc) + timedelta(days=3),
        at_deadline="reject",
    )
    assert created
    return approval


def client(stack: AirflowStack, user: str | None = None, *, cookie: bool = False) -> httpx.Client:
    """An HTTP client for the stack: anonymous, or ``user`` by Bearer token or UI cookie."""
    headers: dict[str, str] = {}
    cookies: dict[str, str] = {}
    if user is not None:
        token = stack.token(user)
        if cookie:
            cookies["_token"] = token
        else:
            headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=stack.base_url, headers=headers, cookies=cookies, timeout=30)


def decision_events(ledger: Ledger, approval: approvals.Approval) -> list[dict[str, Any]]:
    return [e for e in ledger.events(approval.run_id) if e["kind"] == "approval_decided"]


def snapshot(ledger: Ledger, *subjects: approvals.Approval) -> tuple[Any, ...]:
    """Everything a GET could change about these approvals: their rows and their runs'
    event logs. (Scoped to them: other tests' runs keep the shared stack busy meanwhile.)"""
    ids = [a.id for a in subjects]
    runs = [a.run_id for a in subjects]
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            select(t.approvals).where(t.approvals.c.id.in_(ids)).order_by(t.approvals.c.id)
        ).all()
        events = conn.execute(
            select(t.events.c.id, t.events.c.kind).where(t.events.c.run_id.in_(runs))
        ).all()
    assert len(rows) == len(ids)
    return (tuple(tuple(r) for r in rows), tuple(sorted(tuple(e) for e in events)))


def routes() -> list[tuple[str, str]]:
    out = []
    for route in create_app().routes:
        if isinstance(route, APIRoute):
            out.extend((method, route.path) for method in sorted(route.methods))
    return out


def test_plugin_is_loaded_with_its_app_and_menu_entry(stack: AirflowStack) -> None:
    """Airflow lists the ledgerflow plugin with its FastAPI app at /ledgerflow and the
    Approvals menu entry pointing at the pending page."""
    plugins = stack.api("GET", "/api/v2/plugins", params={"limit": 100})["plugins"]
    ours = next(p for p in plugins if p["name"] == "ledgerflow")
    assert [a["url_prefix"] for a in ours["fastapi_apps"]] == [PREFIX]
    assert any(
        v["href"] == f"{PREFIX}/approvals" and v["destination"] == "nav"
        for v in ours["external_views"]
    )


# Routes without an Airflow login, each on purpose: liveness, and signed webhooks (runs and
# events; their
# credential is an HMAC of the body with the workflow's secret: a request without one is 401,
# a workflow without the webhook opt-in 404; tests/e2e/test_triggers_e2e.py covers both).
NO_LOGIN = {("GET", "/health"), ("POST", "/hooks/{name}"), ("POST", "/hooks/events/{name}")}


def test_every_route_but_health_answers_401_without_credentials(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Each route of create_app() (enumerated, not listed by hand) answers 401 to an
    anonymous caller, GET or POST, and stores nothing; /health is the one open route and
    the signed webhook the one other route without a login (NO_LOGIN), which refuses an
    unsigned request; the same routes answer an authenticated caller (so the 401 is auth,
    not a missing route)."""
    approval = make_approval(ledger)
    ledger.ensure_run(  # the run page and its JSON answer a run the ledger knows
        run_id=approval.run_id,
        dag_id=approval.dag_id,
        workflow=approval.workflow,
        version=1,
        params={},
        trigger_kind="manual",
    )
    found = routes()
    assert ("GET", "/health") in found and len(found) >= 8
    before = snapshot(ledger, approval)
    bodies = {
        "/api/approvals/{approval_id}/decision": {"json": {"decision": "approve"}},
        "/approvals/{approval_id}/decide": {"data": {"decision": "approve", "csrf_token": "x"}},
        "/api/events/{name}": {"json": {"key": "k", "id": "anon-1", "payload": {}}},
    }
    forger = httpx.Client(base_url=stack.base_url, cookies={"_token": "not-a-jwt"}, timeout=30)
    with client(stack) as anon, forger, client(stack, "viewer") as viewer:
        for method, path in found:
            url = PREFIX + path.replace("{approval_id}", str(approval.id)).replace(
                "{run_id:path}", approval.run_id
            )
            resp = anon.request(method, url, **bodies.get(path, {}))
            if path == "/health":
                assert resp.status_code == 200, (method, url)
                continue
            if (method, path) in NO_LOGIN:
                assert resp.status_code in (401, 404), (method, url, resp.status_code)
                continue
            assert resp.status_code == 401, (method, url, resp.status_code, resp.text)
            # A forged cookie is not a credential either.
            forged = forger.request(method, url, **bodies.get(path, {}))
            assert forged.status_code in (401, 403), (method, url, forged.status_code)
            if method == "GET":
                assert viewer.get(url).status_code == 200, url
    assert snapshot(ledger, approval) == before


def test_a_browser_without_a_login_gets_401_with_a_link_to_airflow_login(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A page opened by a browser without Airflow's cookie is still 401, as a small HTML
    page linking to Airflow's login with a way back; the REST API stays JSON."""
    approval = make_approval(ledger)
    with client(stack) as anon:
        page = anon.get(f"{PREFIX}/approvals/{approval.id}", headers={"Accept": "text/html"})
        rest = anon.get(f"{PREFIX}/api/approvals", headers={"Accept": "text/html"})
    assert page.status_code == 401 and page.headers["content-type"].startswith("text/html")
    assert "/auth/login" in page.text and approval.subject not in page.text
    assert rest.status_code == 401 and rest.json() == {"detail": "Not authenticated"}


def test_a_user_who_is_not_an_approver_gets_403(stack: AirflowStack, ledger: Ledger) -> None:
    """Only a named user or a holder of a named role may decide: others get 403 and the
    approval stays pending; a role match (case-insensitive) is enough."""
    by_name = make_approval(ledger, users=("manager",))
    by_role = make_approval(ledger, users=(), roles=("OP",))
    for user, approval in (("viewer", by_name), ("clerk", by_name), ("manager", by_role)):
        with client(stack, user) as c:
            resp = c.post(
                f"{PREFIX}/api/approvals/{approval.id}/decision",
                json={"decision": "approve", "comment": "not mine"},
            )
        assert resp.status_code == 403, (user, resp.text)
        assert approvals.get(ledger, approval.id).status == "pending"
    with client(stack, "clerk") as c:
        resp = c.post(f"{PREFIX}/api/approvals/{by_role.id}/decision", json={"decision": "reject"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "rejected" and resp.json()["decided_by"] == "clerk"


def test_unknown_approval_404_and_bad_body_422(stack: AirflowStack, ledger: Ledger) -> None:
    """An unknown id is 404; a decision that is neither approve nor reject, an unknown
    field or a malformed hash is 422, and nothing is stored."""
    approval = make_approval(ledger)
    with client(stack, "manager") as c:
        assert c.get(f"{PREFIX}/api/approvals/999999999").status_code == 404
        missing = c.post(f"{PREFIX}/api/approvals/999999999/decision", json={"decision": "approve"})
        assert missing.status_code == 404
        url = f"{PREFIX}/api/approvals/{approval.id}/decision"
        for body in (
            {"decision": "maybe"},
            {"decision": "approve", "by": "someone-else"},
            {"decision": "approve", "seen_hash": "abc"},
            {},
        ):
            assert c.post(url, json=body).status_code == 422, body
    assert approvals.get(ledger, approval.id).status == "pending"


def test_a_second_decision_gets_409(stack: AirflowStack, ledger: Ledger) -> None:
    """Once decided, any further decision (same or other verdict) is 409 and the first one
    stays stored, with one approval_decided event."""
    approval = make_approval(ledger, users=("manager", "clerk"))
    url = f"{PREFIX}/api/approvals/{approval.id}/decision"
    with client(stack, "manager") as c:
        assert c.post(url, json={"decision": "approve", "comment": "first"}).status_code == 200
        assert c.post(url, json={"decision": "approve"}).status_code == 409
    with client(stack, "clerk") as c:
        second = c.post(url, json={"decision": "reject", "comment": "second"})
    assert second.status_code == 409
    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by, stored.comment) == ("approved", "manager", "first")
    assert len(decision_events(ledger, approval)) == 1


def test_twenty_concurrent_decisions_store_exactly_one(stack: AirflowStack, ledger: Ledger) -> None:
    """20 threads decide the same approval at once over HTTP: exactly one gets 200, the
    others 409; the row changed once and the log has one approval_decided event whose
    comment is the winner's."""
    approval = make_approval(ledger)
    stack.token("manager")  # mint before the threads start, so they race on the decision
    barrier = threading.Barrier(20)
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def decide(i: int) -> None:
        with client(stack, "manager") as c:
            barrier.wait()
            resp = c.post(
                f"{PREFIX}/api/approvals/{approval.id}/decision",
                json={"decision": "approve" if i % 2 else "reject", "comment": f"thread {i}"},
            )
        with lock:
            results.append((i, resp.status_code))

    threads = [threading.Thread(target=decide, args=(i,)) for i in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    codes = sorted(code for _, code in results)
    assert codes == [200] + [409] * 19, codes
    winner = next(i for i, code in results if code == 200)
    stored = approvals.get(ledger, approval.id)
    assert stored.comment == f"thread {winner}"
    assert stored.status == ("approved" if winner % 2 else "rejected")
    events = decision_events(ledger, approval)
    assert [e["data"]["comment"] for e in events] == [f"thread {winner}"]


def test_no_get_changes_state(stack: AirflowStack, ledger: Ledger) -> None:
    """Every GET route (pages and REST, with every filter) leaves the approvals' rows and
    their runs' event logs exactly as they were, even for a user allowed to decide."""
    approval = make_approval(ledger)
    decided = make_approval(ledger)
    approvals.decide(ledger, decided.id, decision="approved", by="manager", comment="ok")
    for a in (approval, decided):  # the runs pages read the run of each approval
        ledger.ensure_run(
            run_id=a.run_id,
            dag_id=a.dag_id,
            workflow=a.workflow,
            version=1,
            params={},
            trigger_kind="manual",
        )
    before = snapshot(ledger, approval, decided)
    approval_queries = ("", "?status=all", "?status=decided&workflow=api_e2e", "?assignee=manager")
    run_queries = ("", "?status=all", "?status=failed&workflow=api_e2e&version=1", "?since=1d")
    with client(stack, "manager") as c:
        for method, path in routes():
            if method != "GET":
                continue
            for query in run_queries if "/runs" in path else approval_queries:
                for target in (approval, decided):
                    url = PREFIX + path.replace("{approval_id}", str(target.id)).replace(
                        "{run_id:path}", target.run_id
                    )
                    assert c.get(url + query).status_code == 200, url + query
    assert snapshot(ledger, approval, decided) == before


def test_a_decision_records_approver_time_comment_and_payload_hash(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A decision stores the Airflow user name as approver, the time, the comment and the
    hash of the payload shown; the event log holds the same plus the payload snapshot. A
    decision on a payload other than the one recorded is 409 and stores nothing."""
    payload = {"customer": "Globex", "limit": 12000, "notes": ["vip"]}
    approval = make_approval(ledger, payload=payload)
    assert approval.payload_hash == approvals.payload_hash(payload)
    url = f"{PREFIX}/api/approvals/{approval.id}/decision"
    with client(stack, "manager") as c:
        shown = c.get(f"{PREFIX}/api/approvals/{approval.id}").json()
        assert shown["payload"] == payload and shown["may_decide"] is True
        stale = c.post(url, json={"decision": "approve", "seen_hash": "0" * 64})
        assert stale.status_code == 409
        assert approvals.get(ledger, approval.id).status == "pending"
        before = datetime.now(timezone.utc)
        resp = c.post(
            url,
            json={
                "decision": "approve",
                "comment": "Limit checked.",
                "seen_hash": shown["payload_hash"],
            },
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    stored = approvals.get(ledger, approval.id)
    assert stored.status == "approved" == body["status"]
    assert stored.decided_by == "manager" == body["decided_by"]
    assert stored.comment == "Limit checked."
    assert stored.seen_hash == approval.payload_hash
    assert stored.decided_at is not None and stored.decided_at >= before - timedelta(seconds=5)
    [event] = decision_events(ledger, approval)
    assert event["data"]["by"] == "manager"
    assert event["data"]["decision"] == "approved"
    assert event["data"]["comment"] == "Limit checked."
    assert event["data"]["payload_hash"] == approval.payload_hash
    assert event["data"]["payload"] == payload


def test_listing_filters_by_status_workflow_and_assignee(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """status=pending|decided|all, workflow=<name> and assignee=<user> (what that user may
    decide: by name or by their Airflow role) select the right approvals."""
    wf = f"filter_{secrets.token_hex(3)}"
    for_manager = make_approval(ledger, workflow=wf, users=("manager",))
    for_ops = make_approval(ledger, workflow=wf, users=(), roles=("op",))
    done = make_approval(ledger, workflow=wf, users=("manager",))
    approvals.decide(ledger, done.id, decision="rejected", by="manager")

    def ids(**params: str) -> set[int]:
        with client(stack, "viewer") as c:
            resp = c.get(f"{PREFIX}/api/approvals", params={"workflow": wf, **params})
        assert resp.status_code == 200, resp.text
        return {a["id"] for a in resp.json()["approvals"]}

    assert ids() == {for_manager.id, for_ops.id}
    assert ids(status="decided") == {done.id}
    assert ids(status="all") == {for_manager.id, for_ops.id, done.id}
    assert ids(assignee="manager") == {for_manager.id}
    assert ids(assignee="clerk") == {for_ops.id}
    assert ids(assignee="viewer") == set()


def test_page_renders_markdown_body_safely_with_the_ui_cookie(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """With the Airflow UI's _token cookie, the approval page renders the Markdown body
    with raw HTML escaped (a <script> is text), shows the payload and its hash, and offers
    the form only to an approver."""
    body = "## Customer\n\n**ACME** <script>alert('x')</script> [bad](javascript:alert(1))"
    approval = make_approval(ledger, body=body, payload={"customer": "<img src=x onerror=1>"})
    with client(stack, "manager", cookie=True) as c:
        page = c.get(f"{PREFIX}/approvals/{approval.id}")
    assert page.status_code == 200
    html = page.text
    assert "<h2>Customer</h2>" in html and "<strong>ACME</strong>" in html
    assert "&lt;script&gt;alert(" in html
    assert "<script" not in html and 'href="javascript:' not in html
    assert "<img" not in html and "&lt;img src=x onerror=1&gt;" in html
    assert approval.payload_hash in html
    assert f'action="{PREFIX}/approvals/{approval.id}/decide"' in html
    with client(stack, "viewer", cookie=True) as c:
        other = c.get(f"{PREFIX}/approvals/{approval.id}").text
    assert f"/approvals/{approval.id}/decide" not in other
    assert "not among this approval" in other


def test_form_decision_needs_the_page_token_and_redirects(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """The page's form posts a CSRF token bound to the user and the approval: a wrong
    token, one minted for another approval, or a post from another origin is 403 and
    stores nothing; the right one stores the decision and redirects (303) to the approval
    page with a message."""
    approval = make_approval(ledger)
    other = make_approval(ledger)
    with client(stack, "manager", cookie=True) as c:
        html = c.get(f"{PREFIX}/approvals/{approval.id}").text
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', html)
        other_html = c.get(f"{PREFIX}/approvals/{other.id}").text
        other_token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', other_html)
        assert token and other_token
        url = f"{PREFIX}/approvals/{approval.id}/decide"
        form = {"decision": "approve", "comment": "via form", "seen_hash": approval.payload_hash}
        for bad in ("0" * 64, other_token.group(1)):
            assert c.post(url, data={**form, "csrf_token": bad}).status_code == 403
        # The right token, sent by a page of another origin (a cross-site form post).
        foreign = {"Origin": "http://evil.example"}
        good = {**form, "csrf_token": token.group(1)}
        assert c.post(url, data=good, headers=foreign).status_code == 403
        assert approvals.get(ledger, approval.id).status == "pending"
        resp = c.post(url, data={**form, "csrf_token": token.group(1)})
        assert resp.status_code == 303
        assert resp.headers["location"] == f"{PREFIX}/approvals/{approval.id}?msg=approved"
        again = c.post(url, data={**form, "csrf_token": token.group(1)})
        assert again.status_code == 303 and again.headers["location"].endswith("msg=conflict")
        shown = c.get(resp.headers["location"]).text
    assert "Approved. The workflow continues." in shown
    stored = approvals.get(ledger, approval.id)
    assert (stored.status, stored.decided_by, stored.comment) == ("approved", "manager", "via form")
    assert len(decision_events(ledger, approval)) == 1


PROBE = """
import sys
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger, resolve_url
print(resolve_url(sys.argv[1]))
print(approvals.get(Ledger.from_airflow(sys.argv[1]), int(sys.argv[2])).subject)
"""


def test_server_processes_read_the_ledger_connection_stored_in_airflow(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A ledger connection kept in Airflow's metadata database (no environment variable)
    resolves to that Postgres database in a server process (``_AIRFLOW_PROCESS_CONTEXT=
    server``, as in the api-server) and in a process without a task supervisor; neither
    falls back to the SQLite file, and both read the approvals the workers wrote."""
    approval = make_approval(ledger)
    url = ledger.engine.url
    conn_id = f"lf_probe_{secrets.token_hex(4)}"
    stack.api(
        "POST",
        "/api/v2/connections",
        json={
            "connection_id": conn_id,
            "conn_type": "postgres",
            "host": url.host,
            "port": url.port,
            "login": url.username,
            "schema": url.database,
        },
    )
    try:
        for context in ("server", None):
            env = {
                k: v
                for k, v in stack.env.items()
                if not k.startswith("AIRFLOW_CONN_") and k != "_AIRFLOW_PROCESS_CONTEXT"
            }
            if context:
                env["_AIRFLOW_PROCESS_CONTEXT"] = context
            out = subprocess.run(
                [sys.executable, "-c", PROBE, conn_id, str(approval.id)],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr[-2000:]
            resolved, subject = out.stdout.strip().splitlines()[-2:]
            assert resolved == url.render_as_string(hide_password=False), context
            assert subject == approval.subject
    finally:
        stack.api("DELETE", f"/api/v2/connections/{conn_id}")
