"""Event steps on real Airflow processes with Postgres: delivered after and before the
wait starts, a duplicate, a payload that does not fit (422 naming the field), the
deadline's outcomes (a branch; a failure the saga compensates), a retry run that reuses
the received event and the signed webhook (a SIGKILLed triggerer with parked waits is in
test_triggerer_kill_e2e.py, with approvals and timers parked beside them)."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ledgerflow import webhooks
from ledgerflow.ledger import event_waits
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

PAY = "event_pay__v1"
PREFIX = "/ledgerflow"
HOOK_CONN = "ledgerflow_events_webhook"


def states(stack: AirflowStack, dag_id: str, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in stack.task_instances(dag_id, run_id)}


def parked(stack: AirflowStack, ledger: Ledger, dag_id: str, run_id: str, step: str) -> Any:
    """Wait until the step's task is deferred and its wait is in the ledger."""

    def ready() -> Any:
        if states(stack, dag_id, run_id).get(step) != "deferred":
            return None
        return event_waits.for_step(ledger, f"{dag_id}/{run_id}", step)

    return wait_for(ready, 180, f"{dag_id}/{run_id} {step} deferred")


def post_event(stack: AirflowStack, name: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        return client.post(
            f"{PREFIX}/api/events/{name}",
            json=body,
            headers={"Authorization": f"Bearer {stack.token()}"},
        )


def kinds(ledger: Ledger, run_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in ledger.events(run_id) if e["kind"] == kind]


def test_delivered_after_the_wait_starts_resumes_with_the_payload(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """The event step parks (deferred, no worker); a POST with the rendered key ends it
    with the payload as its output, which the next step uses; a redelivery of the same
    event id is a duplicate (200) that changes nothing."""
    ref = uuid.uuid4().hex[:8]
    run_id = stack.trigger(PAY, {"ref": ref})
    wait = parked(stack, ledger, PAY, run_id, "settled")
    assert wait.key == f"pay-{ref}" and wait.waiting
    body = {"key": f"pay-{ref}", "id": f"evt-{ref}", "payload": {"amount": 42.5}}
    resp = post_event(stack, "payment.settled", body)
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "delivered"
    assert resp.json()["woke"] == [{"run_id": f"{PAY}/{run_id}", "step": "settled"}]
    again = post_event(stack, "payment.settled", {**body, "payload": {"amount": 1}})
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    assert stack.wait_for_run(PAY, run_id, timeout=180) == "success"
    ledger_run = f"{PAY}/{run_id}"
    outputs = ledger.outputs(ledger_run)
    assert outputs["settled"]["output"] == {"amount": 42.5}
    assert outputs["book"]["output"] == {"value": 42.5}
    assert len(kinds(ledger, ledger_run, "event_received")) == 1
    assert len(kinds(ledger, ledger_run, "event_step_completed")) == 1


def test_delivered_before_the_wait_starts_is_kept_and_consumed_once(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """An event that arrives before its wait is kept (202); the run that then waits for
    that key takes it at once and succeeds; a second run with the same key does not get
    it again (it parks)."""
    ref = uuid.uuid4().hex[:8]
    body = {"key": f"pay-{ref}", "id": f"early-{ref}", "payload": {"amount": 7}}
    resp = post_event(stack, "payment.settled", body)
    assert resp.status_code == 202, resp.text
    assert resp.json()["status"] == "kept"
    first = stack.trigger(PAY, {"ref": ref})
    assert stack.wait_for_run(PAY, first, timeout=180) == "success"
    assert ledger.outputs(f"{PAY}/{first}")["book"]["output"] == {"value": 7}
    second = stack.trigger(PAY, {"ref": ref})
    wait = parked(stack, ledger, PAY, second, "settled")
    assert wait.waiting
    with ledger.engine.connect() as conn:
        row = conn.execute(
            text("SELECT status, consumed_by_run FROM lf_event_deliveries WHERE event_id = :e"),
            {"e": f"early-{ref}"},
        ).one()
    assert tuple(row) == ("consumed", f"{PAY}/{first}")
    # End the second run too: a new event for it.
    done = post_event(stack, "payment.settled", {**body, "id": f"late-{ref}"})
    assert done.json()["status"] == "delivered"
    assert stack.wait_for_run(PAY, second, timeout=180) == "success"


def test_a_payload_that_does_not_fit_gets_422_naming_the_field(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A delivery whose payload does not fit the waiting step's schema is refused (422,
    the field named) and stored nowhere: the step still waits."""
    ref = uuid.uuid4().hex[:8]
    run_id = stack.trigger(PAY, {"ref": ref})
    parked(stack, ledger, PAY, run_id, "settled")
    body = {"key": f"pay-{ref}", "id": f"bad-{ref}", "payload": {"amount": "lots"}}
    resp = post_event(stack, "payment.settled", body)
    assert resp.status_code == 422, resp.text
    detail = resp.json()["detail"][0]
    assert detail["field"] == "payload.amount" and "'lots' is not of type 'number'" in detail["msg"]
    assert event_waits.for_step(ledger, f"{PAY}/{run_id}", "settled").waiting  # type: ignore[union-attr]
    good = post_event(stack, "payment.settled", {**body, "payload": {"amount": 3}})
    assert good.json()["status"] == "delivered", good.text
    assert stack.wait_for_run(PAY, run_id, timeout=180) == "success"


def test_the_deadline_takes_the_branch(stack: AirflowStack, ledger: Ledger) -> None:
    """Nobody sends the event: at the deadline the `late` branch runs, `book` is skipped."""
    run_id = stack.trigger("event_late__v1", {"ref": uuid.uuid4().hex[:8]})
    assert stack.wait_for_run("event_late__v1", run_id, timeout=180) == "success"
    got = states(stack, "event_late__v1", run_id)
    assert got["settled"] == "success" and got["late"] == "success" and got["book"] == "skipped"
    wait = event_waits.for_step(ledger, f"event_late__v1/{run_id}", "settled")
    assert wait is not None and wait.status == "expired"


def test_the_deadline_fails_the_run_and_the_saga_compensates(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """`on_deadline: fail`: the run fails, the reservation made before the wait is
    released by the saga, and the step after the wait never runs."""
    ref = f"evsaga-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger("event_saga__v1", {"ref": ref})
    assert stack.wait_for_run("event_saga__v1", run_id, timeout=180) == "failed"
    ledger_run = f"event_saga__v1/{run_id}"
    wait_for(
        lambda: (ledger.run(ledger_run) or {}).get("saga") == "compensated",
        120,
        "the saga compensated",
    )
    assert states(stack, "event_saga__v1", run_id)["ship"] in ("upstream_failed", "skipped")
    checkpoint = ledger.checkpoint(ledger_run, "reserve")
    assert checkpoint is not None and checkpoint.status == "compensated"


def test_a_retry_run_reuses_the_received_event_without_waiting(
    stack: AirflowStack, ledger: Ledger, tmp_path: Path
) -> None:
    """The run receives its event, then fails at `book`; its retry run reuses the event
    step's payload (no new wait) and books it."""
    flag = tmp_path / f"flag-{uuid.uuid4().hex[:6]}"
    flag.touch()
    ref = uuid.uuid4().hex[:8]
    run_id = stack.trigger(PAY, {"ref": ref, "flag": str(flag)})
    parked(stack, ledger, PAY, run_id, "settled")
    body = {"key": f"pay-{ref}", "id": f"retry-{ref}", "payload": {"amount": 9}}
    assert post_event(stack, "payment.settled", body).json()["status"] == "delivered"
    assert stack.wait_for_run(PAY, run_id, timeout=180) == "failed"
    flag.unlink()
    original = f"{PAY}/{run_id}"
    wait_for(lambda: (ledger.run(original) or {}).get("status") == "failed", 60, "ledger failed")
    stack.api("POST", f"{PREFIX}/api/runs/{original}/retry", json={})
    retry = wait_for(lambda: [r["run_id"] for r in ledger.retries_of(original)], 60, "retry")[0]
    assert stack.wait_for_run(PAY, retry.split("/", 1)[1], timeout=180) == "success"
    assert event_waits.for_step(ledger, retry, "settled") is None  # it never waited
    assert ledger.outputs(retry)["book"]["output"] == {"value": 9}


def test_a_signed_webhook_delivers_and_an_unsigned_one_is_refused(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """``/hooks/events/{name}`` takes a delivery signed with the secret of the connection
    ``ledgerflow_events_webhook`` (made here over Airflow's REST API) and wakes the wait;
    an unsigned one is 401 and stores nothing."""
    secret = secrets.token_urlsafe(32)
    stack.api(
        "POST",
        "/api/v2/connections",
        json={"connection_id": HOOK_CONN, "conn_type": "generic", "password": secret},
    )
    try:
        _webhook_delivery(stack, ledger, secret.encode())
    finally:
        stack.api("DELETE", f"/api/v2/connections/{HOOK_CONN}")


def _webhook_delivery(stack: AirflowStack, ledger: Ledger, secret: bytes) -> None:
    ref = uuid.uuid4().hex[:8]
    run_id = stack.trigger(PAY, {"ref": ref})
    parked(stack, ledger, PAY, run_id, "settled")
    raw = json.dumps({"key": f"pay-{ref}", "id": f"hook-{ref}", "payload": {"amount": 5}}).encode()
    with httpx.Client(base_url=stack.base_url, timeout=60) as client:
        refused = client.post(f"{PREFIX}/hooks/events/payment.settled", content=raw)
        signed = client.post(
            f"{PREFIX}/hooks/events/payment.settled",
            content=raw,
            headers={webhooks.HEADER: webhooks.sign(secret, raw)},
        )
    assert refused.status_code == 401
    assert signed.status_code == 200 and signed.json()["status"] == "delivered", signed.text
    assert stack.wait_for_run(PAY, run_id, timeout=180) == "success"
    assert ledger.outputs(f"{PAY}/{run_id}")["book"]["output"] == {"value": 5}


def test_only_callers_who_may_create_asset_events_deliver(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """Authorized like Airflow's own asset-event route: a viewer and a `user`-role caller
    get 403 and nothing is stored; an `op` caller's delivery is kept (202), with the DAGs
    that caller may trigger."""
    ref = uuid.uuid4().hex[:8]
    body = {"key": f"auth-{ref}", "id": f"auth-{ref}", "payload": {"amount": 1}}
    for user, status in (("viewer", 403), ("manager", 403), ("clerk", 202)):
        with httpx.Client(base_url=stack.base_url, timeout=60) as client:
            resp = client.post(
                f"{PREFIX}/api/events/payment.settled",
                json=body,
                headers={"Authorization": f"Bearer {stack.token(user)}"},
            )
        assert resp.status_code == status, (user, resp.text)
        with ledger.engine.connect() as conn:
            stored = conn.execute(
                text("SELECT received_by FROM lf_event_deliveries WHERE event_id = :e"),
                {"e": f"auth-{ref}"},
            ).all()
        assert [tuple(r) for r in stored] == ([] if status == 403 else [(user,)])
    # Kept (no wait yet) with the DAGs its sender may trigger: a later wait of one of them
    # takes it, a wait of any other does not.
    with ledger.engine.connect() as conn:
        reach = conn.execute(
            text("SELECT allowed_dags FROM lf_event_deliveries WHERE event_id = :e"),
            {"e": f"auth-{ref}"},
        ).scalar_one()
    assert PAY in json.loads(reach), reach
