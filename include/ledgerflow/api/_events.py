"""Delivering events to ``kind: event`` steps: ``POST /api/events/{name}`` and the signed
``POST /hooks/events/{name}``.

Body: ``{"key": "<correlation key>", "id": "<event id>", "payload": {...}}``.

``/api/events/{name}`` is authenticated by Airflow like every route of the app, and
authorized like Airflow's own route that creates asset events (asset ``POST``; 403
otherwise) and, for each run it wakes, like triggering that run's DAG (``POST`` on its
runs; 403, nothing stored, when the caller may not). An event kept for a later wait keeps
the DAGs its sender may trigger: a wait of any other DAG does not take it (it stays kept
for one the sender may wake). ``/hooks/events/{name}`` has no
Airflow login: each request is signed like a workflow's webhook (``ledgerflow.webhooks``)
with the secret of the connection ``[ledgerflow] event_webhook_conn_id``.

Answers: 200 ``{"status": "delivered", "woke": [...]}`` (the waits parked for that name and
key received it; their tasks end at once); 202 ``{"status": "kept", "expires_at": ...}``
(no wait yet: kept for ``[ledgerflow] event_ttl``, validated against the schema of the
wait that takes it); 200 ``{"status": "duplicate"}`` for an event id seen before (it
counts once); 422 naming the field when the payload does not fit a waiting step's schema.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ledgerflow import webhooks
from ledgerflow.errors import EventPayloadInvalid
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.events import EVENT_NAME

log = logging.getLogger(__name__)


class EventBody(BaseModel):
    """One delivery of an event."""

    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=500)
    """The correlation key (what the step's ``key`` rendered to)."""
    id: str = Field(min_length=1, max_length=250, pattern=r"^[\x21-\x7e]+$")
    """The sender's event id: a redelivery with the same id counts once."""
    payload: Any = None


def events_router(source: Callable[[], Ledger]) -> APIRouter:
    router = APIRouter()

    @router.post("/api/events/{name}")
    async def post_event(
        name: str, body: EventBody, request: Request, user: GetUserDep
    ) -> JSONResponse:
        """Deliver an event to the steps waiting for its name and key (or keep it)."""
        _check_name(name)
        return await run_in_threadpool(_deliver, source, name, body, request, user)

    @router.post("/hooks/events/{name}")
    async def hook_event(name: str, request: Request) -> JSONResponse:
        """Deliver an event signed with the events webhook's secret (no Airflow login)."""
        _check_name(name)
        raw = await request.body()  # bounded by the app's BodyLimit before it is read
        signature = request.headers.get(webhooks.HEADER)
        return await run_in_threadpool(_hook, source, name, raw, signature)

    return router


def _check_name(name: str) -> None:
    import re

    if not re.match(EVENT_NAME, name):
        raise HTTPException(404, f"{name!r} is not an event name")


def _deliver(
    source: Callable[[], Ledger], name: str, body: EventBody, request: Request, user: Any
) -> JSONResponse:
    from airflow.api_fastapi.core_api.security import requires_access_asset

    from ledgerflow.api._auth import may_create_runs

    requires_access_asset("POST")(request, user)  # 403 unless allowed

    def authorize(wait: Any) -> None:
        if not may_create_runs(user, wait.dag_id):
            raise HTTPException(
                403, f"{user.get_name()} may not trigger {wait.dag_id}, whose run waits for it"
            )

    def reach() -> list[str]:
        """The DAGs whose runs this sender may wake (a kept event keeps them)."""
        from airflow.api_fastapi.app import get_auth_manager

        readable = get_auth_manager().get_authorized_dag_ids(user=user, method="GET")
        return [dag_id for dag_id in readable if may_create_runs(user, dag_id)]

    return _store(source(), name, body, "api", str(user.get_name()), authorize, reach)


def _hook(
    source: Callable[[], Ledger], name: str, raw: bytes, signature: str | None
) -> JSONResponse:
    import json

    from ledgerflow import settings

    conn_id = str(settings.get("event_webhook_conn_id"))
    secret = webhooks.secret_of(conn_id)
    if secret is None:
        raise HTTPException(503, f"the events webhook has no secret (connection {conn_id!r})")
    verdict = webhooks.verify(
        secret, raw, signature, key=None, tolerance=settings.get("webhook_tolerance")
    )
    if not verdict.ok:
        raise HTTPException(401, verdict.reason, headers={"WWW-Authenticate": "Signature"})
    try:
        body = EventBody.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise HTTPException(422, f"the body must be {{key, id, payload}}: {exc}") from None
    return _store(source(), name, body, "webhook", "webhook", None, None)


def _store(
    ledger: Ledger,
    name: str,
    body: EventBody,
    source: str,
    by: str,
    authorize: Callable[[Any], None] | None,
    reach: Callable[[], list[str]] | None,
) -> JSONResponse:
    from ledgerflow.ledger import event_waits

    try:
        done = event_waits.deliver(
            ledger,
            name=name,
            key=body.key,
            event_id=body.id,
            payload=body.payload,
            source=source,
            by=by,
            authorize=authorize,
            reach=reach,
        )
    except EventPayloadInvalid as exc:
        field = exc.field or "payload"
        raise HTTPException(
            422,
            [
                {
                    "loc": ["body", *field.split(".")],
                    "field": field,
                    "msg": str(exc),
                    "type": "event_payload_invalid",
                }
            ],
        ) from None
    for wait in done.woke:
        _end_task_now(ledger, wait)
    answer: dict[str, Any] = {"status": done.status, "event": name, "key": body.key, "id": body.id}
    if done.woke:
        answer["woke"] = [{"run_id": w.run_id, "step": w.step_key} for w in done.woke]
    return JSONResponse(answer, status_code=202 if done.status == "kept" else 200)


def _end_task_now(ledger: Ledger, wait: Any) -> None:
    """End the parked task here, so the next task is scheduled at once; if that fails
    the stored delivery stands and the trigger (woken by NOTIFY) ends the task."""
    from ledgerflow.triggers.event import end_task_now

    try:
        end_task_now(ledger, wait)
    except Exception:
        log.exception("event wait %s: could not end its task from the api-server", wait.id)
