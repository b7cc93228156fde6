"""Answering while the caller waits: ``POST /api/workflows/{name}/runs?wait=30s``.

Matched to Airflow 3.3's own run-result wait (``GET /api/v2/dags/{dag_id}/dagRuns/
{dag_run_id}/wait``, ``DagRunWaiter``): the run's ``state`` in Airflow's words
(``queued``, ``running``, ``success``, ``failed``), the declared outputs under
``results``, RUN read to wait and XCom read to see ``results`` (without it the answer
leaves them out, as Airflow's does for its default results), and a poll of the DagRun
row through a short async session per look, sleeping (``asyncio.sleep``) in between: a
waiting caller holds no thread and no database connection. Unlike Airflow's route, which
streams one line per look until the run ends, the wait is bounded (:data:`MAX_WAIT`) and
the answer is one JSON document: 200 when the run ended in time, 202 when it did not.

What is polled: Airflow's DagRun state, then the ledger. The scheduler marks the DagRun
``success`` or ``failed`` in the same loop that sees its last task end; the ledger's run
status is written later, by the DAG's ``on_success``/``on_failure`` callback in the
dag-processor (seconds later, and never if that process is down). Every step's checkpoint
and failure is committed by its own task before the task ends, so once Airflow says the
run ended, the ledger already holds everything the answer needs: the outputs the
``result`` renders and the failed step's error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.spec.models import WorkflowSpec

MAX_WAIT = 60.0
"""The longest a caller may wait, in seconds (``wait`` above it is 422)."""
FINISHED = frozenset({"success", "failed"})
"""Airflow's finished DagRun states (``State.finished_dr_states``)."""


def parse_wait(value: str | None) -> float | None:
    """``wait`` as seconds (``30``, ``30s``, ``2m``, ``250ms``); None when not given.
    422 naming the parameter when it is not a duration or above :data:`MAX_WAIT`."""
    from ledgerflow.spec.models import parse_duration

    if value is None:
        return None
    try:
        seconds = parse_duration(value.strip()).total_seconds()
    except ValueError as exc:
        raise _wait_error(str(exc)) from None
    if seconds > MAX_WAIT:
        raise _wait_error(f"at most {MAX_WAIT:g}s, got {value!r}")
    return seconds


def _wait_error(message: str) -> HTTPException:
    return HTTPException(
        422,
        [{"loc": ["query", "wait"], "field": "wait", "msg": message, "type": "value_error"}],
    )


def intervals() -> Iterator[float]:
    """Seconds between looks at the run: 50 ms for the first second (a short run is
    answered within one look of its end), 100 ms up to 5 s, then 250 ms."""
    for _ in range(20):
        yield 0.05
    for _ in range(40):
        yield 0.1
    while True:
        yield 0.25


async def dag_run_state(dag_id: str, run_id: str) -> str | None:
    """The DagRun's state (None: no such run), read in a short session of its own."""
    from airflow import settings
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    query = select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)
    if settings.AsyncSession is None:  # no async driver configured: a pooled thread
        return await run_in_threadpool(_state_sync, query)
    from airflow.utils.session import create_session_async

    async with create_session_async() as session:
        return _text(await session.scalar(query))


def _state_sync(query: Any) -> str | None:
    from airflow.utils.session import create_session

    with create_session() as session:
        return _text(session.scalar(query))


def _text(state: Any) -> str | None:
    return None if state is None else str(getattr(state, "value", state))


async def wait_for_end(
    look: Callable[[], Awaitable[str | None]],
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> str | None:
    """Look at the run until it is finished or ``seconds`` have passed; its last state."""
    deadline = clock() + seconds
    pauses = intervals()
    while True:
        state = await look()
        left = deadline - clock()
        if state in FINISHED or left <= 0:
            return state
        await sleep(min(next(pauses), left))


# ---------------------------------------------------------------- the answer


def outcome(
    ledger: Ledger, spec: WorkflowSpec | None, run_id: str, state: str, *, results: bool
) -> dict[str, Any]:
    """What a finished run answers: ``results`` rendered from its checkpoints when it
    succeeded (and ``results`` is allowed), the failed step and its error when it failed."""
    out: dict[str, Any] = {}
    if state == "success" and results and spec is not None and spec.result is not None:
        rendered, problems = render_result(ledger, spec, run_id)
        out["results"] = rendered
        if problems:
            out["result_errors"] = problems
    elif state == "failed":
        out.update(failure(ledger, run_id))
    return out


def render_result(
    ledger: Ledger, spec: WorkflowSpec, run_id: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """The workflow's ``result`` rendered from the ledger's record of the run: its params
    and the checkpoints of the steps the result names. An entry that cannot be rendered
    (it names a step that was skipped, say) is left out and its reason returned."""
    from ledgerflow.spec.templates import render_value
    from ledgerflow.workflow.validate import result_steps

    run = ledger.run(run_id) or {}
    context = {
        "params": run.get("params") or {},
        "steps": ledger.outputs(run_id, result_steps(spec)),
        "run": {"id": run_id, "workflow": spec.name, "version": spec.version},
    }
    rendered: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, template in (spec.result or {}).items():
        try:
            rendered[name] = render_value(template, context)
        except Exception as exc:  # the template's own error, said to the caller
            problems[name] = f"{type(exc).__name__}: {exc}"
    return rendered, problems


FAILURE_EVENTS = ("step_failed", "params_rejected")


def failure(ledger: Ledger, run_id: str) -> dict[str, Any]:
    """The step that failed the run and a summary of its error, from the ledger's event
    log (each written by the failing task before it ended), and the saga's outcome."""
    run = ledger.run(run_id) or {}
    step: str | None = run.get("failed_step")
    error_type: str | None = None
    error: str | None = None
    for event in ledger.events(run_id):
        if event["kind"] not in FAILURE_EVENTS:
            continue
        if step is not None and event["step_key"] != step:
            continue
        data = event["data"] if isinstance(event["data"], dict) else {}
        step = event["step_key"]
        if event["kind"] == "params_rejected":
            error_type = "ledgerflow.errors.InvalidParams"  # as step_failed names errors
            error = "; ".join(
                f"{p.get('field')}: {p.get('message')}" for p in data.get("problems", ())
            )
        else:
            error_type, error = data.get("error_type"), data.get("error")
        break
    return {"failed_step": step, "error_type": error_type, "error": error, "saga": run.get("saga")}
