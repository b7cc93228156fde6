"""Starting runs over HTTP: ``POST /api/workflows/{name}/runs`` and ``POST /hooks/{name}``.

``/api/workflows/{name}/runs`` is authenticated by Airflow like every route of the app,
and authorized like Airflow's own trigger endpoint: the caller must be allowed to create
runs of the workflow's DAG (403 otherwise). Body: ``{"params": {...},
"idempotency_key": "...", "version": N}`` (only ``params`` matters; the latest version
unless ``version`` is named). 201 with the new run; 200 with the run an earlier request
started under the same key; 409 when that key was used with other params; 422 naming each
param that does not fit the workflow's params schema.

``/hooks/{name}`` is the one route besides ``/health`` without an Airflow login: a
workflow opts in with ``triggers: {webhook: {secret_conn_id: ...}}``, and each request
must carry ``X-Ledgerflow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
"<t>.<key>.<raw body>">`` keyed by that Airflow connection's password, signed within
``[ledgerflow] webhook_tolerance`` seconds (``ledgerflow.webhooks``; 401 otherwise; 404 for
a workflow without the opt-in). The body (a JSON object) is the run's params;
``Idempotency-Key`` or ``X-Ledgerflow-Delivery`` (signed too) makes a redelivery return
the same run, and a delivery without one is keyed by its signature, so a replay within
the window returns the run it started.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ledgerflow import webhooks
from ledgerflow.errors import InvalidParams, TriggerRefused
from ledgerflow.launch import KEY_PATTERN, Launched
from ledgerflow.ledger.store import Ledger

HOOK_KEY_HEADERS = ("idempotency-key", "x-ledgerflow-delivery")


class TriggerBody(BaseModel):
    """``POST /api/workflows/{name}/runs``."""

    model_config = ConfigDict(extra="forbid")

    params: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(default=None, pattern=KEY_PATTERN)
    """The same key returns the same run instead of starting a second one."""
    version: int | None = Field(default=None, ge=1)
    """A published version of the workflow (default: the latest)."""


def _may_trigger(user: Any) -> Callable[[str], bool]:
    from ledgerflow.api._auth import may_create_runs

    return lambda dag_id: may_create_runs(user, dag_id)


def _answer(launched: Launched) -> JSONResponse:
    return JSONResponse(launched.as_dict(), status_code=201 if launched.created else 200)


def _params_error(exc: InvalidParams) -> HTTPException:
    return HTTPException(
        422,
        [
            {
                "loc": ["body", "params", p.field],
                "field": p.field,
                "msg": p.message,
                "type": "param_invalid",
            }
            for p in exc.problems
        ],
    )


def triggers_router(source: Callable[[], Ledger]) -> APIRouter:
    router = APIRouter()

    @router.post("/api/workflows/{name}/runs", status_code=201)
    def trigger_run(name: str, body: TriggerBody, user: GetUserDep) -> JSONResponse:
        """Start a run of the workflow's latest (or named) version with validated params."""
        from ledgerflow.launch import launch

        try:
            launched = launch(
                name,
                body.params,
                idempotency_key=body.idempotency_key,
                version=body.version,
                user=str(user.get_name()),
                via="rest_api",
                may_trigger=_may_trigger(user),
                ledger=source(),
            )
        except InvalidParams as exc:
            raise _params_error(exc) from None
        except TriggerRefused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return _answer(launched)

    @router.post("/hooks/{name}", status_code=201)
    async def webhook(name: str, request: Request) -> JSONResponse:
        """Start a run from a signed webhook delivery (no Airflow login: the signature)."""
        body = await request.body()  # bounded by the app's BodyLimit before it is read
        key = next((request.headers[h] for h in HOOK_KEY_HEADERS if h in request.headers), None)
        signature = request.headers.get(webhooks.HEADER)
        return await run_in_threadpool(_deliver, source, name, body, signature, key)

    return router


def _deliver(
    source: Callable[[], Ledger], name: str, body: bytes, signature: str | None, key: str | None
) -> JSONResponse:
    import json
    import re

    from ledgerflow import settings
    from ledgerflow.launch import latest_spec, launch

    try:
        spec = latest_spec(name)
    except Exception:
        spec = None
    hook = spec.triggers.webhook if spec is not None else None
    if spec is None or hook is None:
        raise HTTPException(404, f"no workflow {name!r} with a webhook")
    secret = webhooks.secret_of(hook.secret_conn_id)
    if secret is None:
        raise HTTPException(503, f"the webhook of {name} has no secret configured")
    if key is not None and not re.match(KEY_PATTERN, key):
        raise HTTPException(400, "an idempotency key is 1-200 printable ASCII characters")
    verdict = webhooks.verify(
        secret, body, signature, key=key, tolerance=settings.get("webhook_tolerance")
    )
    if not verdict.ok:
        raise HTTPException(401, verdict.reason, headers={"WWW-Authenticate": "Signature"})
    try:
        params = json.loads(body) if body.strip() else {}
    except ValueError:
        raise HTTPException(400, "the body is not JSON") from None
    if not isinstance(params, dict):
        raise HTTPException(422, "the body must be a JSON object: the run's params")
    try:
        launched = launch(
            name,
            params,
            idempotency_key=verdict.delivery_key,
            user=f"webhook:{name}",
            via="webhook",
            ledger=source(),
        )
    except InvalidParams as exc:
        raise _params_error(exc) from None
    except TriggerRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    return _answer(launched)
