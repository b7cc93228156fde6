"""Operating: the dashboard page, the SLO indicators and the audit export.

- ``GET /dashboard`` (``workflow``, ``window``: ``1d``, ``7d`` or ``30d``): per workflow,
  each SLO's status and error-budget burn, the indicators, and charts over the window
  (runs by outcome, completion p50/p95, human wait, retries, compensations, LLM
  fallbacks, dead letters, breaker openings), drawn on the server as SVG (``_charts``).
- ``GET /api/slo`` (``workflow``, ``since``, ``until``): the same indicators and
  objectives as ``ledgerflow slo --json``.
- ``GET /api/export`` (``since``, default the last 24 hours; ``until``; ``format``:
  ``jsonl`` or ``csv``): the event log of that span, streamed, as ``ledgerflow export``
  writes it.

Like every route they need an Airflow login and show only the DAGs the caller may read
(Airflow's own rule, as the runs and approvals routes apply it): a workflow with no
readable DAG is not there; the export holds only events of runs of readable DAGs.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Annotated, Any, Literal

import jinja2
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from markupsafe import Markup

from ledgerflow.api import _charts, _render
from ledgerflow.api._auth import Caller, CallerDep
from ledgerflow.ledger.store import Ledger

WINDOWS = {"1d": 24, "7d": 7 * 24, "30d": 30 * 24}
MAX_CHARTED = 8  # workflows charted on the "all" view; choose one for the rest

_DASHBOARD = """{% extends "layout" %}{% block content %}
<h1>Ledgerflow dashboard</h1>
<form class="filters" method="get" action="{{ root }}/dashboard">
<div><label for="workflow">Workflow</label>
<select id="workflow" name="workflow"><option value="">all</option>
{% for w in workflows %}<option value="{{ w }}"{% if w == workflow %} selected{% endif %}>{{ w }}</option>{% endfor %}
</select></div>
<div><label for="window">Window</label>
<select id="window" name="window">{% for w in windows %}<option value="{{ w }}"{% if w == window %} selected{% endif %}>last {{ w }}</option>{% endfor %}</select></div>
<button type="submit">Show</button></form>
<p class="muted">Runs started <time class="ts" datetime="{{ since }}">{{ since }}</time> .. now.
Authorization failures: <b id="auth-401">{{ auth.unauthenticated_401 }}</b> unauthenticated (401), <b id="auth-403">{{ auth.forbidden_403 }}</b> forbidden (403);
breaker openings: <b>{{ breakers }}</b>.</p>

<h2>Objectives</h2>
{% if objectives %}<table id="objectives"><thead><tr><th>Workflow</th><th>Objective</th><th>Target</th><th>Measured</th><th>Bad / allowed runs</th><th>Error budget burn</th><th>Status</th></tr></thead><tbody>
{% for o in objectives %}<tr><td>{{ o.workflow }}</td><td>{{ o.name }}</td><td>{{ show(o, o.target) }}</td><td>{{ show(o, o.measured) }}</td>
<td>{{ o.bad }} / {{ '%.1f' % o.allowed }}</td><td>{{ burn(o.burn, o.state) }}</td><td class="state-{{ o.state }}">{{ o.state }}</td></tr>{% endfor %}
</tbody></table>{% else %}<p class="muted">No workflow here declares an <code>slo:</code>.</p>{% endif %}

{% for w in sections %}<section class="workflow" id="wf-{{ w.name }}">
<h2>{{ w.name }}</h2>
<div class="tiles">
<div class="tile"><b>{{ w.s.runs }}</b><span>runs started</span></div>
<div class="tile"><b>{{ pct(w.s.success_rate) }}</b><span>success rate</span></div>
<div class="tile"><b>{{ secs(w.s.completion_p50_s) }} / {{ secs(w.s.completion_p95_s) }}</b><span>completion p50 / p95</span></div>
<div class="tile"><b>{{ secs(w.s.human_wait_p95_s) }}</b><span>human wait p95</span></div>
<div class="tile"><b>{{ secs(w.s.first_step_p95_s) }}</b><span>first step p95</span></div>
<div class="tile"><b>{{ pct(w.s.retry_rate) }}</b><span>retry rate</span></div>
<div class="tile"><b>{{ pct(w.s.step_failure_rate) }}</b><span>step failure rate</span></div>
<div class="tile"><b>{{ w.s.pending }} / {{ w.s.orphaned }}</b><span>pending / orphaned</span></div>
<div class="tile"><b>{{ w.s.throughput_per_h }}</b><span>finished runs / hour</span></div>
<div class="tile"><b>{{ pct(w.s.sla_breach_rate) }}</b><span>SLA breach rate</span></div>
</div>
{% if w.charts %}<div class="charts">{% for c in w.charts %}{{ c }}{% endfor %}</div>{% endif %}
</section>{% else %}<p class="muted">No runs in this window.</p>{% endfor %}
{% if uncharted %}<p class="muted">{{ uncharted }} more workflows: choose one above to see its charts.</p>{% endif %}
{% endblock %}
{% block head %}<script>{{ theme }}</script>{% endblock %}
{% block scripts %}<script>{{ local_times }}</script>{% endblock %}"""


def _pct(value: float | None) -> str:
    from ledgerflow.slo import shown_pct

    return shown_pct(value, 1)


def _secs(value: float | None) -> str:
    from ledgerflow.slo import shown_secs

    return shown_secs(value, 1, days=True)


def _show(objective: Any, value: float | None) -> str:
    return _pct(value) if objective.kind == "rate" else _secs(value)


@cache
def _env() -> jinja2.Environment:
    base = _render._env()
    env = base.overlay(
        loader=jinja2.ChoiceLoader(
            [jinja2.DictLoader({"dashboard": _DASHBOARD}), base.loader]  # type: ignore[list-item]
        )
    )
    env.globals.update(
        pct=_pct,
        secs=_secs,
        show=_show,
        burn=_charts.burn_bar,
        css=Markup(base.globals["css"]) + Markup(_charts.CSS),  # constants of these modules
    )
    return env


def readable_workflows(caller: Caller, names: Any) -> list[str]:
    """Workflows with at least one DAG (``<name>__v<N>``) the caller may read."""
    from ledgerflow.observability import workflow_of

    if caller.dags is None:
        return sorted(names)
    allowed = {workflow_of(d) for d in caller.dags}
    return sorted(n for n in names if n.replace("-", "_") in allowed or n in allowed)


def _time(value: str | None, name: str) -> datetime | None:
    from ledgerflow.ledger import runview

    if not value:
        return None
    try:
        return runview.parse_since(value)
    except ValueError as exc:
        raise HTTPException(422, f"{name}: {exc}") from None


def _report(
    ledger: Ledger,
    caller: Caller,
    workflow: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Any:
    from ledgerflow import slo

    slos = slo.load_slos()
    slos = {n: s for n, s in slos.items() if n in readable_workflows(caller, slos)}
    return slo.report(
        ledger,
        slos=slos,
        since=since,
        until=until,
        workflows=[workflow] if workflow else None,
        dag_ids=caller.dags,
    )


def _charts_of(window: Any, name: str) -> list[Markup]:
    from ledgerflow.ledger.indicators import series

    data = series(window, name)
    edges, hours = data["edges"], window.hours
    kw: dict[str, Any] = {"span_hours": hours}
    chart = f"{name}-"
    out = [
        _charts.bars(chart + "outcomes", "Runs by outcome", edges, data["outcomes"], **kw),
        _charts.lines(
            chart + "completion",
            "Completion time (human wait excluded)",
            edges,
            {"p50": data["completion_p50"], "p95": data["completion_p95"]},
            **kw,
        ),
        _charts.lines(
            chart + "human-wait", "Human wait p95", edges, {"p95": data["human_wait_p95"]}, **kw
        ),
    ]
    for key, title in (
        ("retries", "Retries"),
        ("compensations", "Compensations"),
        ("llm_fallbacks", "LLM fallbacks"),
        ("dead_letters", "Dead letters"),
        ("breaker_openings", "Breaker openings (all workflows)"),
    ):
        out.append(
            _charts.bars(
                chart + key.replace("_", "-"),
                title,
                edges,
                {"count": data[key]},
                classes={"count": "count"},
                **kw,
            )
        )
    return out


def ops_router(source: Callable[[], Ledger]) -> APIRouter:
    router = APIRouter()

    @router.get("/api/slo")
    def api_slo(
        caller: CallerDep,
        workflow: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> dict[str, Any]:
        rep = _report(source(), caller, workflow, _time(since, "since"), _time(until, "until"))
        return rep.as_dict()  # type: ignore[no-any-return]

    @router.get("/api/export")
    def api_export(
        caller: CallerDep,
        since: str | None = None,
        until: str | None = None,
        format: Literal["jsonl", "csv"] = "jsonl",
    ) -> StreamingResponse:
        from datetime import timedelta

        from ledgerflow.ledger import audit
        from ledgerflow.ledger._engine import now

        # Optional, so a caller without credentials gets 401 before any 422; without
        # ``since``: the last 24 hours.
        end = _time(until, "until") or now()
        start = _time(since, "since") or end - timedelta(days=1)
        rows = audit.export_rows(source(), since=start, until=end, dag_ids=caller.dags)
        media = "application/x-ndjson" if format == "jsonl" else "text/csv"
        name = f"ledgerflow-events-{start:%Y%m%dT%H%M}-{end:%Y%m%dT%H%M}.{format}"
        return StreamingResponse(
            (line.encode() for line in audit.lines(rows, format)),
            media_type=f"{media}; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.get("/dashboard", response_class=HTMLResponse)
    def dashboard(
        request: Request,
        caller: CallerDep,
        workflow: str | None = None,
        window: Annotated[str, Query(pattern="^(1d|7d|30d)$")] = "7d",
    ) -> str:
        from ledgerflow.ledger import runview

        ledger = source()
        since = runview.parse_since(window)
        rep = _report(ledger, caller, workflow or None, since, None)
        summaries = rep.workflows()
        names = list(summaries)
        charted = names if workflow else names[:MAX_CHARTED]
        sections = [
            {
                "name": n,
                "s": summaries[n],
                "charts": _charts_of(rep.base, n) if n in charted else [],
            }
            for n in names
        ]
        every = sorted(
            {w for w, _v in runview.workflows(ledger)} | set(rep.slos),
        )
        return (
            _env()
            .get_template("dashboard")
            .render(
                title="Dashboard",
                root=str(request.scope.get("root_path", "")).rstrip("/"),
                caller=caller,
                message=None,
                workflows=readable_workflows(caller, every),
                workflow=workflow,
                windows=list(WINDOWS),
                window=window,
                since=rep.base.since.isoformat(timespec="seconds"),
                objectives=rep.objectives,
                sections=sections,
                uncharted=len(names) - len(charted),
                auth={
                    "unauthenticated_401": rep.base.auth_failures.get(401, 0),
                    "forbidden_403": rep.base.auth_failures.get(403, 0),
                },
                breakers=len(rep.base.breaker_openings),
            )
        )

    return router
