"""Starting runs over HTTP: ``POST /api/workflows/{name}/runs`` and ``POST /hooks/{name}``.

``/api/workflows/{name}/runs`` is authenticated by Airflow like every route of the app,
and authorized like Airflow's own trigger endpoint: the caller must be allowed to create
runs of the workflow's DAG (403 otherwise). Body: ``{"params": {...},
"idempotency_key": "...", "version": N}`` (only ``params`` matters; the latest version
unless ``version`` is named). 201 with the new run; 200 with the run an earlier request
started under the same key; 409 when that key was used with other params; 422 naming each
param that does not fit the workflow's params schema.

``?wait=30s`` (at most 60 s) also waits for the run to end (``_wait.py``): 200 with its
``state`` (``success`` or ``failed``, Airflow's words) and the workflow's declared
``results``, or its failed step and error; 202 with the same links when it has not ended
by then; 422 naming ``wait`` for a value that is not a duration. Waiting needs RUN read on
the DAG as well (403 before anything starts), and ``results`` XCom read, as Airflow's own
``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}/wait``.

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
from typing import Annotated, Any

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import APIRouter, HTTPException, Query, Request
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
    async def trigger_run(
        name: str,
        body: TriggerBody,
        user: GetUserDep,
        wait: Annotated[str | None, Query(description=WAIT_DOC, max_length=40)] = None,
    ) -> JSONResponse:
        """Start a run of the workflow's latest (or named) version with validated params;
        with ``wait``, answer with its end if it ends within that time (``_wait.py``)."""
        from ledgerflow.api import _wait

        seconds = _wait.parse_wait(wait)
        launched = await run_in_threadpool(
            _launch, source, name, body, user, waiting=seconds is not None
        )
        if seconds is None:
            return _answer(launched)
        state = await _wait.wait_for_end(
            lambda: _wait.dag_run_state(launched.dag_id, launched.run_id), seconds
        )
        doc = {**launched.as_dict(), "state": state}
        if state not in _wait.FINISHED:
            return JSONResponse(doc, status_code=202)
        doc.update(await run_in_threadpool(_ended, source, user, launched, str(state)))
        return JSONResponse(doc, status_code=200)

    @router.post("/hooks/{name}", status_code=201)
    async def webhook(name: str, request: Request) -> JSONResponse:
        """Start a run from a signed webhook delivery (no Airflow login: the signature)."""
        body = await request.body()  # bounded by the app's BodyLimit before it is read
        key = next((request.headers[h] for h in HOOK_KEY_HEADERS if h in request.headers), None)
        signature = request.headers.get(webhooks.HEADER)
        return await run_in_threadpool(_deliver, source, name, body, signature, key)

    return router


WAIT_DOC = (
    "Wait up to this long for the run to end (30, 30s, 2m, 250ms; at most 60s): 200 with "
    "its state and results if it ends in time, else 202 with its links."
)


def _launch(
    source: Callable[[], Ledger], name: str, body: TriggerBody, user: Any, *, waiting: bool
) -> Launched:
    from ledgerflow.launch import launch

    may_trigger = _may_trigger(user)
    if waiting:
        may_trigger = _may_trigger_and_wait(user)
    try:
        return launch(
            name,
            body.params,
            idempotency_key=body.idempotency_key,
            version=body.version,
            user=str(user.get_name()),
            via="rest_api",
            may_trigger=may_trigger,
            ledger=source(),
        )
    except InvalidParams as exc:
        raise _params_error(exc) from None
    except TriggerRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None


def _may_trigger_and_wait(user: Any) -> Callable[[str], bool]:
    """Trigger, as without a wait, and read the DAG's runs (Airflow's wait route asks for
    RUN read): checked before the run starts, so a refused wait starts nothing."""
    from ledgerflow.api._auth import may_create_runs, may_read_runs

    def check(dag_id: str) -> bool:
        if not may_create_runs(user, dag_id):
            return False
        if not may_read_runs(user, dag_id):
            raise TriggerRefused(
                f"{user.get_name()} may trigger {dag_id} but not read its runs, which "
                "waiting for the run needs: trigger it without wait",
                status=403,
            )
        return True

    return check


def _ended(
    source: Callable[[], Ledger], user: Any, launched: Launched, state: str
) -> dict[str, Any]:
    """The ended run's results or failure, from the ledger (``_wait.outcome``); results
    only for a caller who may read the DAG's XCom, as Airflow's own wait route."""
    from ledgerflow.api import _wait
    from ledgerflow.api._auth import may_read_xcom
    from ledgerflow.launch import version_spec

    spec = version_spec(launched.workflow, launched.version) if state == "success" else None
    results = state == "success" and may_read_xcom(user, launched.dag_id)
    return _wait.outcome(source(), spec, launched.ledger_run_id, state, results=results)


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
