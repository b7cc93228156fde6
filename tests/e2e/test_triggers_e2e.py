"""Starting runs on real Airflow processes: Ledgerflow's trigger endpoint, its signed
webhook, Airflow's own REST trigger (conf checked by the first task) and asset events.

Workflows: ``tests/e2e/workflows/triggered.yaml`` (params ``ref`` required, ``amount``
number, ``plan`` enum; a webhook keyed by the Airflow connection
``ledgerflow_hook_triggered``, created over Airflow's REST API by the fixture below) and
``asset_fed.yaml`` (scheduled on the asset ``ledgerflow://e2e/orders``), and
``waited.yaml`` (two steps and a ``result:``; the second fails while the path in its
``block`` param exists) for ``?wait=``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.webhooks import sign

pytestmark = pytest.mark.e2e

DAG = "triggered__v1"
RUNS = "/ledgerflow/api/workflows/triggered/runs"
HOOK = "/ledgerflow/hooks/triggered"
SECRET_CONN = "ledgerflow_hook_triggered"


def client(stack: AirflowStack, user: str | None = "admin") -> httpx.Client:
    headers = {} if user is None else {"Authorization": f"Bearer {stack.token(user)}"}
    return httpx.Client(base_url=stack.base_url, headers=headers, timeout=60)


def run_count(stack: AirflowStack, dag_id: str = DAG) -> int:
    """DagRuns of ``dag_id`` as Airflow's REST API counts them."""
    page = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 1})
    return int(page["total_entries"])


def finished_run(ledger: Ledger, run_id: str, timeout: float = 60) -> dict[str, Any]:
    """The ledger's run once the DAG's callback (a moment after the run ends) finished it."""
    deadline = time.monotonic() + timeout
    while True:
        run = ledger.run(run_id)
        if run is not None and run["status"] != "running":
            return run
        assert time.monotonic() < deadline, f"{run_id} still {run and run['status']} in the ledger"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def hook_secret(stack: AirflowStack) -> Iterator[bytes]:
    """The webhook's secret, stored as the password of an Airflow connection."""
    secret = secrets.token_urlsafe(32)
    stack.api(
        "POST",
        "/api/v2/connections",
        json={"connection_id": SECRET_CONN, "conn_type": "generic", "password": secret},
    )
    yield secret.encode()
    stack.api("DELETE", f"/api/v2/connections/{SECRET_CONN}")


def test_invalid_params_are_422_naming_each_field_and_start_nothing(stack: AirflowStack) -> None:
    """A request whose params do not fit the workflow's schema is 422 with one entry per
    bad field (a wrong type, an undeclared key, a value outside the enum, a missing required
    param), and Airflow holds no new run; unknown workflows and versions are 404."""
    before = run_count(stack)
    with client(stack) as c:
        resp = c.post(RUNS, json={"params": {"ref": 5, "amuont": 3, "plan": "gold"}})
        assert resp.status_code == 422, resp.text
        problems = {p["field"]: p["msg"] for p in resp.json()["detail"]}
        assert problems == {
            "ref": "expected string, got integer",
            "amuont": "unknown param (declared: amount, plan, ref)",
            "plan": "'gold' is not one of 'free', 'pro'",
        }
        missing = c.post(RUNS, json={"params": {"amount": 2}})
        assert missing.status_code == 422
        assert [(p["field"], p["msg"]) for p in missing.json()["detail"]] == [
            ("ref", "is required")
        ]
        reserved = c.post(RUNS, json={"params": {"ref": "r", "ledgerflow_retry_of": "x/y"}})
        assert reserved.status_code == 422
        assert reserved.json()["detail"][0]["field"] == "ledgerflow_retry_of"
        assert c.post("/ledgerflow/api/workflows/nope/runs", json={}).status_code == 404
        assert c.post(RUNS, json={"params": {"ref": "r"}, "version": 9}).status_code == 404
    assert run_count(stack) == before


def test_only_users_allowed_to_trigger_the_dag_start_runs(stack: AirflowStack) -> None:
    """Anonymous is 401, a viewer (no permission to create runs of the DAG) 403; neither
    starts a run."""
    before = run_count(stack)
    body = {"params": {"ref": "auth"}}
    with client(stack, None) as anon, client(stack, "viewer") as viewer:
        assert anon.post(RUNS, json=body).status_code == 401
        assert viewer.post(RUNS, json=body).status_code == 403
    assert run_count(stack) == before


def test_fifty_concurrent_requests_with_one_key_start_one_run_that_succeeds(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """50 concurrent requests with the same idempotency key: Airflow holds exactly one new
    DagRun, exactly one response is 201 (created) and the other 49 are 200, all naming that
    run; the run succeeds with the request's params (defaults filled in), and the ledger
    records who triggered it and under which key. The same key with other params is 409."""
    key = f"order-{uuid.uuid4().hex[:10]}"
    body = {"params": {"ref": key, "plan": "pro"}, "idempotency_key": key}
    before = run_count(stack)
    answers: list[httpx.Response] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def post() -> None:
        with client(stack, "manager") as c:
            start.wait()
            resp = c.post(RUNS, json=body)
        with lock:
            answers.append(resp)

    threads = [threading.Thread(target=post) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in answers) == [200] * 49 + [201], [
        (r.status_code, r.text[:200]) for r in answers if r.status_code not in (200, 201)
    ]
    runs = {r.json()["run_id"] for r in answers}
    assert len(runs) == 1
    assert run_count(stack) == before + 1
    first = answers[0].json()
    run_id = first["run_id"]
    assert first["dag_id"] == DAG and first["ledger_run_id"] == f"{DAG}/{run_id}"
    assert first["links"] == {
        "run_page": f"/ledgerflow/runs/{DAG}/{run_id}",
        "grid": f"/dags/{DAG}/runs/{run_id}",
    }
    dag_run = stack.run(DAG, run_id)
    assert dag_run["run_type"] == "manual" and dag_run["triggered_by"] == "rest_api"
    assert dag_run["conf"] == body["params"]
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "success"
    run = finished_run(ledger, f"{DAG}/{run_id}")
    assert run["status"] == "succeeded"
    assert run["params"] == {"ref": key, "plan": "pro", "amount": 1}
    triggered = [e for e in ledger.events(f"{DAG}/{run_id}") if e["kind"] == "triggered"]
    assert [e["data"] for e in triggered] == [
        {"via": "rest_api", "by": "manager", "idempotency_key": key}
    ]
    with client(stack, "manager") as c:
        again = c.post(RUNS, json=body)
        assert again.status_code == 200 and again.json()["run_id"] == run_id
        other = c.post(RUNS, json={**body, "params": {"ref": key, "plan": "free"}})
        assert other.status_code == 409 and run_id in other.text
    assert run_count(stack) == before + 1


def test_requests_without_a_key_start_a_run_each(stack: AirflowStack) -> None:
    """Without an idempotency key every request is a new run of the latest version."""
    before = run_count(stack)
    with client(stack) as c:
        a = c.post(RUNS, json={"params": {"ref": "no-key-a"}})
        b = c.post(RUNS, json={"params": {"ref": "no-key-b"}, "version": 1})
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["run_id"] != b.json()["run_id"]
    assert run_count(stack) == before + 2
    for resp in (a, b):
        assert stack.wait_for_run(DAG, resp.json()["run_id"], timeout=180) == "success"


def _deliver(
    stack: AirflowStack,
    payload: Any,
    secret: bytes | None,
    *,
    path: str = HOOK,
    delivery: str | None = None,
    signature: str | None = None,
) -> httpx.Response:
    raw = json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Ledgerflow-Signature"] = signature or sign(secret, raw, key=delivery)
    if delivery is not None:
        headers["X-Ledgerflow-Delivery"] = delivery
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        return c.post(path, content=raw, headers=headers)


def test_a_signed_webhook_starts_a_run_and_a_redelivery_returns_it(
    stack: AirflowStack, ledger: Ledger, hook_secret: bytes
) -> None:
    """A delivery signed with the workflow's secret (no Airflow login) starts a run whose
    params are the body; the same delivery id again returns the same run (200) and Airflow
    holds one run for it; the run succeeds and the ledger says it came by webhook."""
    ref = f"hook-{uuid.uuid4().hex[:8]}"
    delivery = f"dlv-{uuid.uuid4().hex}"
    before = run_count(stack)
    first = _deliver(stack, {"ref": ref, "amount": 2.5}, hook_secret, delivery=delivery)
    assert first.status_code == 201, first.text
    again = _deliver(stack, {"ref": ref, "amount": 2.5}, hook_secret, delivery=delivery)
    assert again.status_code == 200 and again.json()["run_id"] == first.json()["run_id"]
    assert run_count(stack) == before + 1
    run_id = first.json()["run_id"]
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "success"
    assert ledger.outputs(f"{DAG}/{run_id}")["second"]["output"] == {"value": "free:2.5"}
    [event] = [e for e in ledger.events(f"{DAG}/{run_id}") if e["kind"] == "triggered"]
    assert event["data"] == {
        "via": "webhook",
        "by": "webhook:triggered",
        "idempotency_key": delivery,
    }
    assert stack.run(DAG, run_id)["triggering_user_name"] == "webhook:triggered"


def test_a_captured_webhook_cannot_start_a_second_run(
    stack: AirflowStack, hook_secret: bytes
) -> None:
    """Sent again as it was (no key of its own): the run it started, not a new one; the
    same signature under another key, a delivery signed ten minutes ago, or the untimed
    ``sha256=`` form of earlier versions: 401, and nothing starts."""
    body = {"ref": f"replay-{uuid.uuid4().hex[:8]}", "amount": 1.0}
    raw = json.dumps(body).encode()
    captured = sign(hook_secret, raw)
    before = run_count(stack)
    first = _deliver(stack, body, hook_secret, signature=captured)
    assert first.status_code == 201, first.text
    again = _deliver(stack, body, hook_secret, signature=captured)
    assert again.status_code == 200 and again.json()["run_id"] == first.json()["run_id"]
    rekeyed = _deliver(stack, body, hook_secret, signature=captured, delivery="other-key")
    stale = sign(hook_secret, raw, at=int(time.time()) - 600)
    untimed = "sha256=" + hmac.new(hook_secret, raw, hashlib.sha256).hexdigest()
    refused = [
        rekeyed,
        _deliver(stack, body, hook_secret, signature=stale),
        _deliver(stack, body, hook_secret, signature=untimed),
    ]
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert "stale" in refused[1].json()["detail"]
    assert "t=<unix seconds>,v1=" in refused[2].json()["detail"]
    assert run_count(stack) == before + 1


def test_unsigned_or_badly_signed_webhooks_are_401_and_start_nothing(
    stack: AirflowStack, hook_secret: bytes
) -> None:
    """No signature, a signature by another secret, a signature of another body, or a bare
    hex digest: 401 each, and no run; a valid signature over params that do not fit is 422;
    a workflow without the webhook opt-in is 404 even with a good signature."""
    before = run_count(stack)
    body = {"ref": "forged"}
    assert _deliver(stack, body, None).status_code == 401
    assert _deliver(stack, body, b"not-the-secret").status_code == 401
    assert _deliver(stack, body, hook_secret, signature=sign(hook_secret, b"{}")).status_code == 401
    bare = sign(hook_secret, json.dumps(body).encode()).partition("v1=")[2]
    assert _deliver(stack, body, hook_secret, signature=bare).status_code == 401
    bad = _deliver(stack, {"ref": "x", "amount": "lots"}, hook_secret)
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "amount"
    assert run_count(stack) == before
    other = _deliver(stack, {"order_id": "x"}, hook_secret, path="/ledgerflow/hooks/flaky_http")
    assert other.status_code == 404
    assert _deliver(stack, body, hook_secret, path="/ledgerflow/hooks/nope").status_code == 404
    # A body over the app's limit is refused by its size, before it is read (no login).
    with httpx.Client(base_url=stack.base_url, timeout=60) as c:
        big = c.post(HOOK, content=b"x" * 5_000_000, headers={"Content-Type": "application/json"})
    assert big.status_code == 413 and "at most 1,000,000 bytes" in big.text
    assert run_count(stack) == before


def test_airflow_rest_trigger_keeps_working_and_its_conf_is_checked_by_the_first_task(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Airflow's own ``POST /api/v2/dags/{id}/dagRuns`` still starts runs; a declared param
    of the wrong type is refused there (400, Airflow's own Params check), and an undeclared
    key, which Airflow lets through, fails the first task on its first try (no retry) with
    a message naming the field, recorded in the ledger; no later step runs."""
    good = stack.trigger(DAG, {"ref": "airflow-rest"})
    assert stack.wait_for_run(DAG, good, timeout=180) == "success"
    with pytest.raises(Exception, match="-> 400"):
        stack.trigger(DAG, {"ref": 12})
    run_id = stack.trigger(DAG, {"ref": "typo", "amuont": 3})
    assert stack.wait_for_run(DAG, run_id, timeout=180) == "failed"
    tis = {t["task_id"]: t for t in stack.task_instances(DAG, run_id)}
    assert tis["first"]["state"] == "failed" and tis["first"]["try_number"] == 1
    assert tis["second"]["state"] == "upstream_failed"
    [event] = [e for e in ledger.events(f"{DAG}/{run_id}") if e["kind"] == "params_rejected"]
    assert event["step_key"] == "first"
    assert event["data"]["problems"] == [
        {"field": "amuont", "message": "unknown param (declared: amount, plan, ref)"}
    ]
    assert finished_run(ledger, f"{DAG}/{run_id}")["status"] == "failed"
    assert ledger.checkpoint(f"{DAG}/{run_id}", "first") is None
    log = stack.api(
        "GET",
        f"/api/v2/dags/{DAG}/dagRuns/{run_id}/taskInstances/first/logs/1",
        headers={"Accept": "application/json"},
    )
    text = json.dumps(log)
    assert "InvalidParams" in text and "amuont: unknown param" in text


def test_an_asset_event_starts_a_run_of_a_workflow_scheduled_on_it(stack: AirflowStack) -> None:
    """``triggers.assets``: an event on the asset (posted through Airflow's REST API) makes
    the scheduler start an asset-triggered run of the workflow, which succeeds."""
    dag_id = "asset_fed__v1"
    assets = stack.api("GET", "/api/v2/assets", params={"uri_pattern": "ledgerflow://e2e/orders"})
    [asset] = [a for a in assets["assets"] if a["uri"] == "ledgerflow://e2e/orders"]
    before = run_count(stack, dag_id)
    stack.api("POST", "/api/v2/assets/events", json={"asset_id": asset["id"], "extra": {}})
    deadline = time.monotonic() + 120
    while run_count(stack, dag_id) == before:
        assert time.monotonic() < deadline, "no run after the asset event"
        time.sleep(0.5)
    runs = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "-run_after"})
    newest = runs["dag_runs"][0]
    assert newest["run_type"] == "asset_triggered"
    assert stack.wait_for_run(dag_id, newest["dag_run_id"], timeout=180) == "success"


WAITED = "/ledgerflow/api/workflows/waited/runs"


def test_a_wait_that_cannot_be_honoured_is_refused_and_one_that_runs_out_is_202(
    stack: AirflowStack,
) -> None:
    """``wait`` that is not a duration, or above 60 s, is 422 naming ``wait`` and starts
    nothing; anonymous is 401 and a viewer 403, as without a wait; a run still going when
    the wait runs out is 202 with its state and the same links as the plain trigger."""
    dag_id = "waited__v1"
    before = run_count(stack, dag_id)
    body = {"params": {"ref": "refused"}}
    with client(stack) as c, client(stack, None) as anon, client(stack, "viewer") as viewer:
        for bad in ("soon", "-1s", "61s", "2m", ""):
            resp = c.post(WAITED, params={"wait": bad}, json=body)
            assert resp.status_code == 422, (bad, resp.text)
            [problem] = resp.json()["detail"]
            assert problem["loc"] == ["query", "wait"] and problem["field"] == "wait", bad
        assert anon.post(WAITED, params={"wait": "5s"}, json=body).status_code == 401
        assert viewer.post(WAITED, params={"wait": "5s"}, json=body).status_code == 403
        assert run_count(stack, dag_id) == before
        short = c.post(WAITED, params={"wait": "300ms"}, json={"params": {"ref": "short"}})
    assert short.status_code == 202, short.text
    doc = short.json()
    assert doc["state"] in ("queued", "running") and "results" not in doc
    assert doc["links"] == {
        "run_page": f"/ledgerflow/runs/{dag_id}/{doc['run_id']}",
        "grid": f"/dags/{dag_id}/runs/{doc['run_id']}",
    }
    assert stack.wait_for_run(dag_id, doc["run_id"], timeout=180) == "success"


def test_a_run_that_ends_within_the_wait_answers_its_result_or_its_failure(
    stack: AirflowStack,
) -> None:
    """With ``?wait=60s`` the call returns when the run ends: 200, Airflow's state
    ``success`` and the workflow's declared ``results`` rendered from the run's
    checkpoints (native types kept); the same key again answers the ended run at once.
    A run that fails answers ``failed``, the step that failed and its error, and links."""
    dag_id = "waited__v1"
    key = f"wait-{uuid.uuid4().hex[:8]}"
    body = {"params": {"ref": key}, "idempotency_key": key}
    with client(stack, "manager") as c:
        done = c.post(WAITED, params={"wait": "60s"}, json=body)
        again = c.post(WAITED, params={"wait": "1s"}, json=body)
        failed = c.post(
            WAITED, params={"wait": "60s"}, json={"params": {"ref": "blocked", "block": "/"}}
        )
    assert done.status_code == 200, done.text
    answer = done.json()
    assert answer["state"] == "success" and answer["created"] is True
    assert answer["results"] == {"ref": key, "items": 3, "label": f"waited:{key}"}
    assert again.status_code == 200 and again.json()["run_id"] == answer["run_id"]
    assert again.json()["results"] == answer["results"] and again.json()["created"] is False
    assert stack.run(dag_id, answer["run_id"])["state"] == "success"
    assert failed.status_code == 200, failed.text
    lost = failed.json()
    assert lost["state"] == "failed" and "results" not in lost
    assert lost["failed_step"] == "second"
    assert lost["error_type"] == "ledgerflow.errors.BlockedByFlag"
    assert lost["error"] == "blocked while / exists"
    assert lost["links"]["run_page"] == f"/ledgerflow/runs/{dag_id}/{lost['run_id']}"
    assert stack.run(dag_id, lost["run_id"])["state"] == "failed"
