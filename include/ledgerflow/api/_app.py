"""Ledgerflow's FastAPI app, mounted by the Airflow plugin at ``/ledgerflow``.

Routes (relative to the mount point):

- ``GET /health``: liveness, without authentication; ``POST /hooks/{name}``: a signed
  webhook, authenticated by the workflow's secret instead of a login (``_triggers.py``).
- ``POST /api/workflows/{name}/runs``: start a run (``_triggers.py``); with ``?wait=30s``
  answer its end if it comes in time (``_wait.py``).
- ``POST /api/events/{name}`` and the signed ``POST /hooks/events/{name}``: deliver an
  event to the ``kind: event`` steps waiting for it (``_events.py``).
- REST: ``GET /api/approvals`` (``limit``, default 100 and at most 1000, ``offset``;
  ``total`` counts every match), ``GET /api/approvals/{id}``,
  ``POST /api/approvals/{id}/decision``; ``POST /api/runs/{run_id}/retry``
  (``_retry.py``); ``POST /api/runs/{run_id}/cancel`` (``_cancel.py``).
- Operating (``_ops.py``): ``GET /dashboard``, ``GET /api/slo``, ``GET /api/export``.
- Pages: ``GET /approvals``, ``GET /approvals/decided`` (100 a page, ``?page=N``),
  ``GET /approvals/{id}``,
  ``POST /approvals/{id}/decide`` (form, CSRF token, redirects 303 with a message).

Every other route depends on Airflow's authentication (:data:`CallerDep`): anonymous
callers get 401. Deciding needs the approval to name the caller or one of their roles
(403 otherwise); a decision on a decided approval, on a payload other than the one the
caller saw, or a second decision by the same person on a quorum approval, is 409 (the
ledger's conditional update, so concurrent decisions store one). A quorum approval
(``required`` > 1) answers ``approvals`` (how many so far) and, for one approval, every
person's ``decisions``; it stays ``pending`` until the quorum is met or someone rejects.
No GET changes state. Every 401 and 403 answer is counted (``ledger.audit.AuthFailures``:
in memory, added to ``lf_auth_failures`` every few seconds) for the SLO indicators.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledgerflow.api import _render
from ledgerflow.api._auth import (
    Caller,
    CallerDep,
    csrf_ok,
    csrf_token,
    roles_of_name,
    server_secret,
)
from ledgerflow.api._limits import MAX_BODY_BYTES, BodyLimit
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger

DECISION_OF = {"approve": "approved", "reject": "rejected"}
StatusFilter = Literal["pending", "decided", "all"]


class DecisionBody(BaseModel):
    """``POST /api/approvals/{id}/decision``."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "reject"]
    comment: str = Field(default="", max_length=10_000)
    seen_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """The payload hash the approver was shown; a different current payload is 409."""


class _LedgerSource:
    """The ledger, resolved on first use (the api-server reads the workers' ledger)."""

    def __init__(self, ledger: Ledger | None) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()

    def __call__(self) -> Ledger:
        with self._lock:
            if self._ledger is None:
                self._ledger = Ledger.from_airflow()
            self._ledger.migrate()
            return self._ledger


def _approval(ledger: Ledger, approval_id: int, caller: Caller) -> approvals.Approval:
    """The approval, if the caller may read its DAG; 404 otherwise (its existence, subject
    and payload are the DAG's to show)."""
    try:
        approval = approvals.get(ledger, approval_id)
    except approvals.ApprovalNotFound:
        approval = None
    if approval is None or not caller.may_read(approval.dag_id):
        raise HTTPException(404, f"no approval {approval_id}")
    return approval


def _may_decide(approval: approvals.Approval, caller: Caller) -> bool:
    return approval.may_decide(caller.name, set(caller.roles))


PAGE_SIZE = 100
"""Approvals per page (pages and the REST API's default ``limit``)."""
MAX_LIMIT = 1000


def _page(
    ledger: Ledger,
    status: StatusFilter,
    workflow: str | None,
    assignee: str | None,
    caller: Caller,
    offset: int = 0,
    limit: int | None = PAGE_SIZE,
) -> tuple[list[approvals.Approval], int]:
    """One page of the approvals of DAGs the caller may read, filtered, and how many match
    in all (the DAG filter is part of the query, so a page is full whatever the caller may
    read)."""
    query: dict[str, Any] = {
        "status": None if status == "all" else status,
        "workflow": workflow or None,
        "dag_ids": caller.dags,
    }
    if not assignee:
        rows = approvals.listing(ledger, **query, limit=limit, offset=offset)
        return rows, approvals.count(ledger, **query)
    roles = set(roles_of_name(assignee) or ())
    mine = [
        a for a in approvals.listing(ledger, **query, limit=None) if a.may_decide(assignee, roles)
    ]
    end = None if limit is None else offset + limit
    return mine[offset:end], len(mine)


def _listing(
    ledger: Ledger,
    status: StatusFilter,
    workflow: str | None,
    assignee: str | None,
    caller: Caller,
) -> list[approvals.Approval]:
    """Every approval of DAGs the caller may read, filtered."""
    return _page(ledger, status, workflow, assignee, caller, limit=None)[0]


def _workflows(ledger: Ledger, caller: Caller) -> list[str]:
    """The workflow filter's choices: those with an approval the caller may read."""
    rows = approvals.listing(ledger, status=None, dag_ids=caller.dags, limit=None)
    return sorted({a.workflow for a in rows})


def _pager(request: Request, page: int, total: int) -> dict[str, Any]:
    """The pages' pager: this page (1-based), how many, and links keeping the filters."""
    from urllib.parse import urlencode

    pages = max(1, -(-total // PAGE_SIZE))
    kept = {k: v for k, v in request.query_params.items() if k not in ("page", "msg") and v}

    def href(n: int) -> str | None:
        return "?" + urlencode({**kept, "page": n}) if 1 <= n <= pages and n != page else None

    return {
        "page": page,
        "pages": pages,
        "total": total,
        "prev": href(page - 1),
        "next": href(page + 1),
    }


def _decide(
    ledger: Ledger,
    approval_id: int,
    caller: Caller,
    decision: str,
    comment: str,
    seen_hash: str | None,
) -> approvals.Approval:
    approval = _approval(ledger, approval_id, caller)
    if not _may_decide(approval, caller):
        raise HTTPException(403, f"{caller.name} may not decide approval {approval_id}")
    try:
        decided = approvals.decide(
            ledger,
            approval_id,
            decision=DECISION_OF[decision],
            by=caller.name,
            comment=comment or None,
            seen_hash=seen_hash,
        )
    except approvals.ApprovalConflict as exc:
        raise HTTPException(409, str(exc)) from None
    if not decided.pending:  # short of a quorum there is nothing to end
        _end_task_now(ledger, decided)
    return decided


def _end_task_now(ledger: Ledger, approval: approvals.Approval) -> None:
    """End the parked task here, as Airflow's own approval route does, so the next task
    is scheduled without waiting for the triggerer; if that fails the stored decision
    still stands and the trigger (woken by NOTIFY, or its poll) ends the task instead."""
    import logging

    from ledgerflow.triggers.approval_end import end_task_now

    try:
        end_task_now(ledger, approval)
    except Exception:
        logging.getLogger(__name__).exception(
            "approval %s: could not end its task from the api-server; the trigger will",
            approval.id,
        )


def _view(
    approval: approvals.Approval,
    caller: Caller,
    ledger: Ledger | None = None,
    tally: dict[int, int] | None = None,
) -> dict[str, Any]:
    """The approval as the API answers it; with ``ledger``: every person's decision
    (one approval), with ``tally``: how many approvals it has (a listing)."""
    from ledgerflow.ledger import quorum

    out = approval.as_dict()
    out["may_decide"] = approval.pending and _may_decide(approval, caller)
    if ledger is not None:
        decisions = quorum.decisions(ledger, approval.id)
        out["decisions"] = [d.as_dict() for d in decisions]
        out["approvals"] = sum(d.decision == "approved" for d in decisions)
        out["may_decide"] = out["may_decide"] and all(d.by != caller.name for d in decisions)
    elif tally is not None:
        out["approvals"] = tally.get(approval.id, 0)
    return out


def _same_origin(request: Request) -> bool:
    """A browser's ``Origin`` must be this server (a sandboxed frame sends ``null``)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


def _login_url(next_url: str) -> str | None:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return str(get_auth_manager().get_url_login(next_url=next_url))
    except Exception:
        return None


def create_app(ledger: Ledger | None = None) -> FastAPI:
    """The app; ``ledger`` defaults to the Airflow connection ``ledgerflow_db``."""
    source = _LedgerSource(ledger)
    app = FastAPI(
        title="Ledgerflow",
        description="Approvals of Ledgerflow workflows (authenticated by Airflow).",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    # Before anything reads a body (authentication, FastAPI's parsing, the webhook route).
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness only: says nothing about approvals or the ledger."""
        return {"status": "ok"}

    # The menu icons (light and dark), public as Airflow's own /static: no data in them.
    from pathlib import Path

    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=Path(__file__).with_name("static")), "static")

    def root(request: Request) -> str:
        """Where the app is mounted (``/ledgerflow`` in Airflow), for links and redirects."""
        return str(request.scope.get("root_path", "")).rstrip("/")

    api = APIRouter(prefix="/api")

    @api.get("/approvals")
    def list_approvals(
        caller: CallerDep,
        status: StatusFilter = "pending",
        workflow: str | None = None,
        assignee: Annotated[str | None, Query(description="approvals this user may decide")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = PAGE_SIZE,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        from ledgerflow.ledger.quorum import approvals_so_far

        ledger = source()
        rows, total = _page(ledger, status, workflow, assignee, caller, offset, limit)
        tally = approvals_so_far(ledger, (a.id for a in rows))
        return {
            "approvals": [_view(a, caller, tally=tally) for a in rows],
            "total": total,
            "limit": limit,
            "offset": offset,
        }

    @api.get("/approvals/{approval_id}")
    def get_approval(approval_id: int, caller: CallerDep) -> dict[str, Any]:
        ledger = source()
        return _view(_approval(ledger, approval_id, caller), caller, ledger)

    @api.post("/approvals/{approval_id}/decision")
    def post_decision(approval_id: int, body: DecisionBody, caller: CallerDep) -> dict[str, Any]:
        ledger = source()
        stored = _decide(ledger, approval_id, caller, body.decision, body.comment, body.seen_hash)
        return _view(stored, caller, ledger)

    # Starting runs: POST /api/workflows/{name}/runs and the signed POST /hooks/{name}.
    from ledgerflow.api._triggers import triggers_router

    app.include_router(triggers_router(source))
    from ledgerflow.api._events import events_router

    app.include_router(events_router(source))

    app.include_router(api)

    # Retry runs: POST /api/runs/{run_id}/retry (authenticated and authorized per DAG).
    from ledgerflow.api._retry import retry_router

    app.include_router(retry_router(source))

    # Cancel runs: POST /api/runs/{run_id}/cancel and the run page's Cancel button.
    from ledgerflow.api._cancel import cancel_router

    app.include_router(cancel_router(source))

    # Runs: the run page, the runs list and their JSON API (``_runs.py``); only reads.
    from ledgerflow.api._runs import runs_router

    app.include_router(runs_router(source))

    # Operating: the dashboard, SLO indicators and the audit export (``_ops.py``).
    from ledgerflow.api._ops import ops_router
    from ledgerflow.ledger.audit import AuthFailures

    app.include_router(ops_router(source))
    # Every 401 and 403 of these routes passes the handler below: counted there.
    app.state.auth_failures = AuthFailures(source)

    @app.exception_handler(StarletteHTTPException)
    async def errors(request: Request, exc: StarletteHTTPException) -> Response:
        """JSON for the REST API and other clients; a small page for a browser on a page
        (a 401 there links to Airflow's login page and back)."""
        if exc.status_code in (401, 403):
            app.state.auth_failures.record(exc.status_code)
        pages = tuple(f"{root(request)}/{p}" for p in ("approvals", "runs", "dashboard"))
        page = request.method == "GET" and request.url.path.startswith(pages)
        if not page or "text/html" not in request.headers.get("accept", ""):
            return await http_exception_handler(request, exc)
        login = None
        if exc.status_code == 401:
            login = _login_url(str(request.url.path))
        html = _render.page(
            "error",
            title=f"Error {exc.status_code}",
            root=root(request),
            status=exc.status_code,
            detail=str(exc.detail),
            login=login,
        )
        return HTMLResponse(html, status_code=exc.status_code, headers=exc.headers)

    @app.get("/approvals", response_class=HTMLResponse)
    def pending_page(
        request: Request,
        caller: CallerDep,
        workflow: str | None = None,
        assignee: str | None = None,
        msg: str | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
    ) -> str:
        ledger = source()
        offset = (page - 1) * PAGE_SIZE
        rows, total = _page(ledger, "pending", workflow, assignee, caller, offset)
        workflows = _workflows(ledger, caller)
        from ledgerflow.ledger.quorum import approvals_so_far

        return _render.page(
            "pending",
            title="Pending approvals",
            root=root(request),
            caller=caller,
            approvals=rows,
            tally=approvals_so_far(ledger, (a.id for a in rows)),
            workflows=workflows,
            workflow=workflow,
            assignee=assignee,
            message_code=msg,
            pager=_pager(request, page, total),
        )

    @app.get("/approvals/decided", response_class=HTMLResponse)
    def decided_page(
        request: Request,
        caller: CallerDep,
        workflow: str | None = None,
        page: Annotated[int, Query(ge=1)] = 1,
    ) -> str:
        ledger = source()
        workflows = _workflows(ledger, caller)
        offset = (page - 1) * PAGE_SIZE
        rows, total = _page(ledger, "decided", workflow, None, caller, offset)
        return _render.page(
            "decided",
            title="Decided approvals",
            root=root(request),
            caller=caller,
            approvals=rows,
            workflows=workflows,
            workflow=workflow,
            pager=_pager(request, page, total),
        )

    @app.get("/approvals/{approval_id}", response_class=HTMLResponse)
    def approval_page(
        approval_id: int, request: Request, caller: CallerDep, msg: str | None = None
    ) -> str:
        from ledgerflow.ledger.quorum import decisions

        ledger = source()
        approval = _approval(ledger, approval_id, caller)
        taken = decisions(ledger, approval_id)
        return _render.page(
            "detail",
            decisions=taken,
            approved=sum(d.decision == "approved" for d in taken),
            mine=next((d for d in taken if d.by == caller.name), None),
            title=approval.subject,
            root=root(request),
            caller=caller,
            a=approval,
            body_html=_render.markdown(approval.body),
            payload_json=_render.pretty_json(approval.payload),
            may_decide=_may_decide(approval, caller),
            csrf=csrf_token(server_secret(), caller.name, approval_id),
            message_code=msg,
        )

    @app.post("/approvals/{approval_id}/decide")
    def decide_form(
        approval_id: int,
        request: Request,
        caller: CallerDep,
        decision: Annotated[Literal["approve", "reject"], Form()],
        csrf_token: Annotated[str, Form()],
        comment: Annotated[str, Form(max_length=10_000)] = "",
        seen_hash: Annotated[str | None, Form()] = None,
    ) -> RedirectResponse:
        if not _same_origin(request) or not csrf_ok(
            server_secret(), caller.name, approval_id, csrf_token
        ):
            raise HTTPException(
                403, "the form expired or is not from this server's approval page: reload it"
            )
        try:
            stored = _decide(source(), approval_id, caller, decision, comment, seen_hash)
            code = stored.status
        except HTTPException as exc:
            if exc.status_code != 409:
                raise
            code = "conflict"
        return RedirectResponse(f"{root(request)}/approvals/{approval_id}?msg={code}", 303)

    return app
