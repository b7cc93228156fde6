"""Cancelling a run (``ledgerflow.cancel``): ``POST /api/runs/{run_id}/cancel`` with
``{"reason": "...", "compensate": false}``, and the run page's Cancel button
(``POST /runs/{run_id}/cancel``, a form with a token bound to the user and the run).

Authenticated by Airflow like every route of the app, and authorized like Airflow's own
route that changes a DAG run's state (``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}``,
``PUT`` on the DAG's runs, what clearing or marking a run needs): 403 otherwise, checked
before anything about the run's state is told. A refusal is 404 (unknown run, or one the
caller may not read) or 409 (the run already succeeded or failed: nothing changed); a run
cancelled before answers 200 with ``already_cancelled: true`` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from ledgerflow.api._auth import form_token_ok, may_edit_runs, may_read_runs, server_secret
from ledgerflow.ledger.store import Ledger


class CancelBody(BaseModel):
    """Why (required, recorded), and whether the saga undoes the completed steps."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=2000)
    compensate: bool = False


def _authorized(ledger: Ledger, user: Any, run_id: str) -> dict[str, Any]:
    """The run's row when the caller may change its DagRun (404 / 403 otherwise). A
    DagRun none of whose tasks has started is not in the ledger yet: for a caller who may
    change that DAG's runs it is registered from Airflow first (``register_unstarted``)."""
    row = ledger.run(run_id)
    dag_id = run_id.partition("/")[0]
    if row is None and may_read_runs(user, dag_id) and may_edit_runs(user, dag_id):
        from ledgerflow.cancel import register_unstarted

        register_unstarted(ledger, run_id)
        row = ledger.run(run_id)
    if row is None or not may_read_runs(user, row["dag_id"]):
        raise HTTPException(404, f"no run {run_id!r} in the ledger")
    if not may_edit_runs(user, row["dag_id"]):
        raise HTTPException(403, f"{user.get_name()} may not change runs of {row['dag_id']}")
    return row


def cancel_router(source: Callable[[], Ledger]) -> APIRouter:
    router = APIRouter()

    @router.post("/api/runs/{run_id:path}/cancel")
    def cancel_run(run_id: str, user: GetUserDep, body: CancelBody | None = None) -> dict[str, Any]:
        """Cancel a running run; with ``compensate`` its saga undoes the completed steps."""
        from ledgerflow.cancel import cancel
        from ledgerflow.errors import CancelRefused

        ledger = source()
        _authorized(ledger, user, run_id)
        if body is None:  # optional here so that an anonymous caller gets 401 before 422
            raise HTTPException(
                422,
                [{"loc": ["body", "reason"], "msg": "a cancel needs a reason", "type": "missing"}],
            )
        try:
            done = cancel(
                ledger,
                run_id,
                by=str(user.get_name()),
                reason=body.reason,
                compensate=body.compensate,
            )
        except CancelRefused as exc:
            raise HTTPException(exc.http_status, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return done.as_dict()

    @router.post("/runs/{run_id:path}/cancel", response_model=None)
    def cancel_button(
        run_id: str,
        request: Request,
        user: GetUserDep,
        csrf_token: Annotated[str, Form()],
        reason: Annotated[str, Form(max_length=2000)] = "",
        compensate: Annotated[str, Form(max_length=10)] = "",
    ) -> RedirectResponse:
        """The run page's Cancel button: the same cancel as ``POST /api/runs/{id}/cancel``;
        back to the run page with what happened."""
        from ledgerflow.api._runs import _root, _same_origin
        from ledgerflow.cancel import cancel
        from ledgerflow.errors import CancelRefused

        name = str(user.get_name())
        if not _same_origin(request) or not form_token_ok(
            server_secret(), name, f"cancel:{run_id}", csrf_token
        ):
            raise HTTPException(
                403, "the form expired or came from another site: reload the run page"
            )
        ledger = source()
        _authorized(ledger, user, run_id)
        page = f"{_root(request)}/runs/{quote(run_id, safe='/')}"
        if not reason.strip():
            return RedirectResponse(f"{page}?msg=cancel_needs_reason", 303)
        try:
            cancel(ledger, run_id, by=name, reason=reason, compensate=bool(compensate))
        except CancelRefused:
            return RedirectResponse(f"{page}?msg=cancel_refused", 303)
        return RedirectResponse(f"{page}?msg=cancelled", 303)

    return router
