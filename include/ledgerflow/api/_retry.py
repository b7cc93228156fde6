"""``POST /api/runs/{run_id}/retry``: retry a run as a new run (``ledgerflow.retries``).

Authenticated by Airflow like every route of the app, and authorized like Airflow's own
trigger endpoint: the caller must be allowed to create runs of the run's DAG (403
otherwise). The run id is the ledger's (``<dag_id>/<airflow run id>``, slash included).

The body (optional): ``{"from": "<step>", "params": {...}}``. A refusal is 404 (unknown
run), 422 (unknown step; params that do not fit the workflow's schema, one entry per
field, as the trigger endpoint answers) or 409 (still running, already continued by
another run of its chain, not the newest failed run of its chain, succeeded without
``from``, a changed workflow file).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from ledgerflow.api._auth import may_create_runs
from ledgerflow.errors import InvalidParams
from ledgerflow.ledger.store import Ledger


class RetryBody(BaseModel):
    """``{"from": "<step>"}`` re-runs that step and everything downstream; omit to resume.
    ``{"params": {...}}`` overrides params of the run (the others keep their value)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_step: str | None = Field(default=None, alias="from", min_length=1, max_length=100)
    params: dict[str, Any] = Field(default_factory=dict)


def params_error(exc: InvalidParams) -> HTTPException:
    """422 naming each field, in the shape of the trigger endpoint's answer."""
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


def retry_router(source: Callable[[], Ledger]) -> APIRouter:
    router = APIRouter(prefix="/api")

    @router.post("/runs/{run_id:path}/retry", status_code=201)
    def retry_run(run_id: str, user: GetUserDep, body: RetryBody | None = None) -> dict[str, Any]:
        """Start a new run of the same workflow version that resumes ``run_id``."""
        from ledgerflow.errors import RetryRefused
        from ledgerflow.retries import airflow_state, plan_retry, start_retry

        ledger = source()
        body = body or RetryBody()
        # Rights first: a caller who may not trigger the DAG learns nothing of the run's
        # state (a 409 would say it is running or already continued).
        row = ledger.run(run_id)
        if row is not None and not may_create_runs(user, row["dag_id"]):
            raise HTTPException(403, f"{user.get_name()} may not trigger runs of {row['dag_id']}")
        try:
            plan = plan_retry(
                ledger, run_id, body.from_step, state_of=airflow_state, params=body.params
            )
            if not may_create_runs(user, plan.dag_id):
                raise HTTPException(403, f"{user.get_name()} may not trigger runs of {plan.dag_id}")
            started = start_retry(ledger, plan, user=str(user.get_name()), via="rest_api")
        except RetryRefused as exc:
            raise HTTPException(exc.http_status, str(exc)) from None
        except InvalidParams as exc:
            raise params_error(exc) from None
        return started.as_dict()

    return router
