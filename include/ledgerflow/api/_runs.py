"""Runs: the run page, the runs list and their JSON API (``ledger.runview`` renders the data).

- ``GET /api/runs`` (filters ``workflow``, ``version``, ``status``, ``since``, ``until``,
  ``limit``) and ``GET /api/runs/{run_id}``: JSON.
- ``GET /runs`` and ``GET /runs/{run_id}``: the same as pages; the run page's *Retry*
  button posts ``POST /runs/{run_id}/retry`` (a form with a token bound to the user and
  the run; the same retry as ``POST /api/runs/{run_id}/retry``), then shows the new run.

The run id is the ledger's, ``<dag_id>/<airflow run id>`` (slash, ``:`` and ``+``
included). Every route is authenticated by Airflow and shows only runs of DAGs the caller
may read (Airflow's own rule for its run pages); other runs are 404, as if absent.
No GET writes.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import jinja2
from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup

from ledgerflow.api import _render
from ledgerflow.api._auth import (
    Caller,
    form_token,
    form_token_ok,
    may_create_runs,
    may_read_runs,
    readable_dags,
    roles_of,
    server_secret,
)
from ledgerflow.ledger import runview
from ledgerflow.ledger.store import Ledger

_LIST = """{% extends "layout" %}{% block content %}
<h1>Runs</h1>
<form class="filters" method="get" action="{{ root }}/runs">
<div><label for="workflow">Workflow</label>
<select id="workflow" name="workflow"><option value="">all</option>
{% for w in workflows %}<option value="{{ w }}"{% if w == f.workflow %} selected{% endif %}>{{ w }}</option>{% endfor %}
</select></div>
<div><label for="version">Version</label>
<input id="version" name="version" size="4" value="{{ f.version or '' }}" inputmode="numeric"></div>
<div><label for="status">Status</label>
<select id="status" name="status"><option value="">all</option>
{% for s in statuses %}<option value="{{ s }}"{% if s == f.status %} selected{% endif %}>{{ s }}</option>{% endfor %}
</select></div>
<div><label for="since">Since</label>
<input id="since" name="since" size="16" value="{{ f.since or '' }}" placeholder="2h, 7d or 2026-01-31"></div>
<div><label for="until">Until</label>
<input id="until" name="until" size="16" value="{{ f.until or '' }}"></div>
<button type="submit">Filter</button></form>
{% if runs %}
<table id="runs"><thead><tr><th>Run</th><th>Workflow</th><th>Status</th><th>Saga</th>
<th>Trigger</th><th>Retry of</th><th>Retries</th><th>Started</th><th>Duration</th></tr></thead><tbody>
{% for r in runs %}<tr>
<td class="id"><a href="{{ root }}/runs/{{ r.run_id | urlencode }}">{{ r.airflow_run_id }}</a></td>
<td>{{ r.workflow }} v{{ r.version }}</td>
<td class="status-{{ r.status }}">{{ r.status }}</td><td>{{ r.saga or '' }}</td>
<td>{{ r.trigger_kind }}</td>
<td class="id">{% if r.retry_of %}<a href="{{ root }}/runs/{{ r.retry_of | urlencode }}">{{ short(r.retry_of) }}</a>{% endif %}</td>
<td>{{ r.retries or '' }}</td><td>{{ r.created_at | at }}</td><td>{{ r.duration_s | secs }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="muted">No runs{% if filtered %} for this filter{% endif %}.</p>{% endif %}
{% endblock %}
{% block head %}<script>{{ theme }}</script>{% endblock %}
{% block scripts %}<script>{{ local_times }}</script>{% endblock %}"""

_RUN = """{% extends "layout" %}{% block content %}
{% set r = d.run %}
<h1>{{ r.workflow }} v{{ r.version }} <span class="status-{{ r.status }}" id="run-status">{{ r.status }}</span>
{% if r.saga %}<span class="badge" id="saga">saga {{ r.saga }}</span>{% endif %}</h1>
<table class="kv">
<tr><th>Run</th><td><code id="run-id">{{ r.run_id }}</code></td></tr>
<tr><th>Airflow</th><td><a target="_top" href="{{ airflow }}{{ d.links.grid }}" id="grid-link">grid of this run</a></td></tr>
<tr><th>Trigger</th><td>{{ r.trigger_kind }}</td></tr>
<tr><th>Started</th><td>{{ r.created_at | at }}</td></tr>
<tr><th>Updated</th><td>{{ r.updated_at | at }} {% if r.duration_s is not none %}({{ r.duration_s | secs }}){% endif %}</td></tr>
{% if r.failed_step %}<tr><th>Failed at</th><td>{{ r.failed_step }}</td></tr>{% endif %}
<tr><th>Params</th><td><pre class="small">{{ js(r.params) }}</pre></td></tr>
{% for e in d.events if e.kind == "run_started" and e.data is mapping and e.data.get("params") %}<tr><th>Overridden</th><td id="params-overridden">this retry set <code>{{ js1(e.data.params) }}</code></td></tr>{% endfor %}
</table>

<h2>Retry chain</h2>
<ol class="chain" id="retry-chain">
{% for x in d.retry_chain.retries | reverse %}<li><a href="{{ root }}/runs/{{ x.run_id | urlencode }}">{{ x.run_id }}</a> <span class="status-{{ x.status }}">{{ x.status }}</span>{% if x.saga %} · saga {{ x.saga }}{% endif %}</li>
{% endfor %}<li class="this"><b>{{ r.run_id }}</b> <span class="status-{{ r.status }}">{{ r.status }}</span> (this run{% if r.retry_from %}, from {{ r.retry_from }}{% endif %})</li>
{% for x in d.retry_chain.retried_by %}<li><a href="{{ root }}/runs/{{ x.run_id | urlencode }}">{{ x.run_id }}</a> <span class="status-{{ x.status }}">{{ x.status }}</span> (retry of {{ short(x.retry_of) }}{% if x.retry_from %}, from {{ x.retry_from }}{% endif %})</li>
{% endfor %}</ol>
{% if not d.retry_chain.retries and not d.retry_chain.retried_by %}<p class="muted">Not a retry, and not retried.</p>{% endif %}
{% set st = retry if retry is defined else none %}
{% if st and st.continued_by %}<p id="retry-continued" class="muted">Continued by <a href="{{ root }}/runs/{{ st.continued_by.run_id | urlencode }}">{{ st.continued_by.run_id }}</a> <span class="status-{{ st.continued_by.status }}">{{ st.continued_by.status }}</span>: a retry chain has at most one live continuation.</p>
{% elif st and st.newest_failed %}<p id="retry-continued" class="muted">Not the newest failed run of its retry chain: retry <a href="{{ root }}/runs/{{ st.newest_failed.run_id | urlencode }}">{{ st.newest_failed.run_id }}</a> instead.</p>
{% elif (st.status if st else r.status) != "running" %}<form method="post" action="{{ root }}/runs/{{ r.run_id | urlencode }}/retry" id="retry-form" class="filters">
<input type="hidden" name="csrf_token" value="{{ csrf }}">
<div><label for="from_step">Retry as a new run</label>
<select id="from_step" name="from_step"><option value="">{% if r.status == "succeeded" %}choose a step to re-run from{% else %}from the first step that did not complete{% endif %}</option>
{% for s in d.steps %}{% if "[" not in s.step_key %}<option value="{{ s.step_key }}">from {{ s.step_key }} (re-run it and all after it)</option>{% endif %}{% endfor %}
</select></div>
<div><label for="retry-params">with params (JSON; change a value to override it)</label>
<textarea id="retry-params" name="params" rows="3" cols="40">{{ js(retry_params(r.params)) }}</textarea></div>
<div><button type="submit" id="retry-button">Retry</button></div>
</form>{% endif %}
{% if r.status == "running" %}<form method="post" action="{{ root }}/runs/{{ r.run_id | urlencode }}/cancel" id="cancel-form" class="filters">
<input type="hidden" name="csrf_token" value="{{ cancel_csrf if cancel_csrf is defined else '' }}">
<div><label for="cancel-reason">Cancel this run: why?</label>
<input id="cancel-reason" name="reason" required maxlength="2000" size="40"></div>
<div><label><input type="checkbox" id="cancel-compensate" name="compensate" value="1"> undo the completed steps (compensate)</label></div>
<div><button type="submit" id="cancel-button">Cancel run</button></div>
</form>{% elif r.status == "cancelled" %}<p id="cancelled" class="muted">Cancelled by <b>{{ r.cancelled_by }}</b> at {{ r.cancelled_at | at }}: {{ r.cancel_reason }}{% if r.cancel_compensate %} (completed steps undone by the saga){% endif %}.</p>{% endif %}

<h2>Steps</h2>
<table id="steps"><thead><tr><th>Step</th><th>Status</th><th>Tries</th><th>Idempotency key</th>
<th>Started</th><th>Took</th><th>Logs</th></tr></thead><tbody>
{% for s in d.steps %}<tr id="step-{{ s.step_key }}">
<td><b>{{ s.step_key }}</b></td><td class="status-{{ s.status }}">{{ s.status }}{% if s.reused_from %}<br><span class="muted reused">reused from <a href="{{ root }}/runs/{{ s.reused_from | urlencode }}">{{ short(s.reused_from) }}</a></span>{% elif s.effect_from %}<br><span class="muted reused">effect of <a href="{{ root }}/runs/{{ s.effect_from | urlencode }}">{{ short(s.effect_from) }}</a></span>{% endif %}</td>
<td>{{ s.attempt_count }}</td><td><code class="hash">{{ s.idempotency_key or '' }}</code></td>
<td>{{ s.started_at | at }}</td><td>{{ s.duration_s | secs }}</td>
<td><a target="_top" href="{{ airflow }}{{ s.task_log }}">task log</a></td></tr>
<tr class="detail"><td colspan="7">
{% if s.attempts %}<table class="inner"><thead><tr><th>Try</th><th>Status</th><th>Error</th><th>Started</th><th>Took</th><th>Host</th></tr></thead><tbody>
{% for a in s.attempts %}<tr><td>{{ a.try_number }}</td><td class="status-{{ a.status }}">{{ a.status }}</td>
<td>{% if a.error %}<code>{{ a.error_type }}</code>: {{ a.error }}{% endif %}</td>
<td>{{ a.started_at | at }}</td><td>{{ a.duration_s | secs }}</td><td class="muted">{{ a.hostname or '' }} {{ a.pid or '' }}</td></tr>
{% endfor %}</tbody></table>{% endif %}
<div class="io"><div><label>Input</label><pre class="small">{{ js(s.args) }}</pre>{% if s.args_truncated %}<span class="muted">(first {{ cap }} of {{ s.args_bytes }} bytes)</span>{% endif %}</div>
<div><label>Output</label><pre class="small">{{ js(s.output) }}</pre>{% if s.output_truncated %}<span class="muted">(first {{ cap }} of {{ s.output_bytes }} bytes)</span>{% endif %}</div></div>
{% for e in s.effects %}<p class="muted">effect <code>{{ e.tool }}</code> {{ e.status }} under <code class="hash">{{ e.idempotency_key }}</code> at {{ e.created_at | at }}</p>{% endfor %}
{% if s.error %}<p class="status-failed">{{ s.error }}</p>{% endif %}
</td></tr>
{% else %}<tr><td colspan="7" class="muted">No step has run.</td></tr>{% endfor %}
</tbody></table>

{% if d.approvals %}<h2>Approvals</h2>
{% for a in d.approvals %}<div class="card" id="approval-{{ a.id }}">
<p><b><a href="{{ root }}/approvals/{{ a.id }}">{{ a.subject }}</a></b> ({{ a.step_key }}) <span class="status-{{ a.status }}">{{ a.status }}</span>
{% if a.decided_by %} by {{ a.decided_by }} at {{ a.decided_at | at }}{% endif %}{% if a.waited_s is not none %}, after {{ a.waited_s | secs }}{% endif %}</p>
{% if a.comment %}<p>Comment: {{ a.comment }}</p>{% endif %}
<table class="inner"><thead><tr><th>Audit</th><th>At</th><th>Data</th></tr></thead><tbody>
{% for e in a.audit %}<tr><td>{{ e.kind }}</td><td>{{ e.at | at }}</td><td><pre class="small">{{ js(e.data) }}</pre></td></tr>{% endfor %}
</tbody></table></div>{% endfor %}{% endif %}

{% if d.llm_calls %}<h2>LLM calls</h2>
<table><thead><tr><th>Step</th><th>Model</th><th>Status</th><th>Path</th><th>Requests</th><th>Tokens in/out</th><th>Latency</th><th>Reason</th></tr></thead><tbody>
{% for c in d.llm_calls %}<tr><td>{{ c.step_key }}</td><td>{{ c.model or '' }}</td><td>{{ c.status }}</td><td>{{ c.path }}</td>
<td>{{ c.requests }}</td><td>{{ c.input_tokens }}/{{ c.output_tokens }}</td><td>{{ c.latency_ms }} ms</td><td>{{ c.reason or '' }}</td></tr>{% endfor %}
</tbody></table>{% endif %}

{% if d.quality_results %}<h2>Quality results</h2>
<table><thead><tr><th>Step</th><th>Try</th><th>Dataset</th><th>Outcome</th><th>Rows</th><th>Failed expectations</th></tr></thead><tbody>
{% for q in d.quality_results %}<tr><td>{{ q.step_key }}</td><td>{{ q.try_number }}</td><td>{{ q.dataset }}</td>
<td class="status-{{ q.outcome }}">{{ q.outcome }}</td><td>{{ q.row_count if q.row_count is not none else '' }}</td><td>{{ q.failed_count }} of {{ q.evaluated }}</td></tr>{% endfor %}
</tbody></table>{% endif %}

<h2>Compensations</h2>
{% if d.compensations %}<table id="compensations"><thead><tr><th>Step</th><th>Status</th><th>Tool</th><th>Detail</th><th>At</th></tr></thead><tbody>
{% for c in d.compensations %}<tr><td>{{ c.step_key }}</td><td class="status-{{ c.status }}">{{ c.status }}</td><td>{{ c.tool or '' }}</td><td>{{ c.detail or '' }}</td><td>{{ c.updated_at | at }}</td></tr>{% endfor %}
</tbody></table>{% endif %}
<p id="saga-outcome">Saga: <b>{{ d.saga.outcome or 'none (nothing to undo)' }}</b>{% if d.saga.failed_step %} after {{ d.saga.failed_step }} failed{% endif %}</p>

{% if d.dead_letters %}<h2>Dead letters</h2>
<table id="dead-letters"><thead><tr><th>#</th><th>Step</th><th>Attempts</th><th>Error</th><th>Status</th></tr></thead><tbody>
{% for x in d.dead_letters %}<tr><td>{{ x.id }}</td><td>{{ x.step_key }}</td><td>{{ x.attempts }}</td><td><code>{{ x.error_type }}</code>: {{ x.error }}</td><td>{{ x.status }}</td></tr>{% endfor %}
</tbody></table>{% endif %}

<details><summary>Event log ({{ d.events | length }})</summary>
<table class="inner"><tbody>{% for e in d.events %}<tr><td>{{ e.at | at }}</td><td>{{ e.step_key or '' }}</td><td>{{ e.kind }}</td><td>{% if e.data is not none %}<code>{{ js1(e.data) }}</code>{% endif %}</td></tr>{% endfor %}</tbody></table>
</details>
{% endblock %}
{% block head %}<script>{{ theme }}</script>{% endblock %}
{% block scripts %}<script>{{ local_times }}</script>{% endblock %}"""

_NOT_FOUND = """{% extends "layout" %}{% block content %}
<h1>No such run</h1><p>{{ detail }}</p><p><a href="{{ root }}/runs">All runs</a></p>
{% endblock %}"""

_CSS = """
.kv th{width:9rem}
pre.small{font-size:.78rem;padding:.4rem .6rem;margin:.2rem 0;max-height:16rem}
.badge{font-size:.9rem;background:var(--badge);border:1px solid var(--badge-line);border-radius:4px;padding:.1rem .4rem}
tr.detail>td{background:var(--sub);padding-left:1.4rem}
table.inner{margin:.3rem 0}
table.inner th,table.inner td{font-size:.82rem;padding:.25rem .45rem}
.io{display:grid;grid-template-columns:1fr 1fr;gap:.8rem}
.card{background:var(--panel);border:1px solid var(--line);padding:.4rem .8rem;margin:.6rem 0}
#runs th,#runs td{padding:.4rem .45rem}
#runs td.id{overflow-wrap:anywhere;font-size:.82rem;min-width:8rem}
ol.chain li{margin:.2rem 0} ol.chain li.this{list-style:'▶ '}
.status-succeeded,.status-completed,.status-compensated,.status-passed{color:var(--good);font-weight:600}
.status-failed,.status-compensation_failed,.status-lost,.status-cancelled{color:var(--bad);font-weight:600}
.status-running,.status-retrying{color:var(--wait);font-weight:600}
.status-skipped,.status-not_needed,.status-not_compensable,.status-reused{color:var(--label)}
"""


def _secs(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f} s" if value < 120 else f"{value / 60:.1f} min"


def _js(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, indent=2, default=str)


def _js1(value: Any) -> str:
    import json

    return _render_short(json.dumps(value, default=str, sort_keys=True))


def _render_short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _retry_params(params: Any) -> dict[str, Any]:
    """What the Retry form offers to edit: the run's params without the engine's keys."""
    from ledgerflow.spec.params import ENGINE_PREFIX

    items = params.items() if isinstance(params, dict) else ()
    return {k: v for k, v in items if not str(k).startswith(ENGINE_PREFIX)}


def form_overrides(text: str, original: dict[str, Any]) -> dict[str, Any]:
    """The params the Retry form overrides: each key of the JSON object ``text`` whose
    value differs from ``original`` (the run's params as the form showed them; a key
    left out keeps its value). ValueError when the text is not a JSON object."""
    import json

    if not text.strip():
        return {}
    try:
        given = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"params: not JSON ({exc})") from None
    if not isinstance(given, dict):
        raise ValueError("params: expected a JSON object of param names and values")
    return {k: v for k, v in given.items() if k not in original or original[k] != v}


def _short(run_id: str | None) -> str:
    return "" if not run_id else run_id.split("/", 1)[-1]


@cache
def _env() -> jinja2.Environment:
    base = _render._env()
    env = base.overlay(
        loader=jinja2.ChoiceLoader(
            [
                jinja2.DictLoader({"runs": _LIST, "run": _RUN, "run_missing": _NOT_FOUND}),
                base.loader,  # type: ignore[list-item]
            ]
        )
    )
    env.filters.update(at=_render.iso_timestamp, secs=_secs)
    env.globals.update(
        retry_params=_retry_params,
        js=_js,
        js1=_js1,
        short=_short,
        cap=runview.VALUE_CAP,
        css=Markup(base.globals["css"]) + Markup(_CSS),  # constants of these modules
    )
    return env


def _page(name: str, **context: Any) -> str:
    context.setdefault("message", None)
    context.setdefault("airflow", "")  # Airflow's UI at the server's root
    return _env().get_template(name).render(**context)


def _caller(user: Any) -> Caller:
    return Caller(name=str(user.get_name()), roles=roles_of(user))


def _readable_dags(user: Any) -> frozenset[str] | None:
    """The DAG ids whose runs the user may read (None: could not ask; then per run)."""
    try:
        return readable_dags(user)
    except Exception:
        return None


def _filters(
    version: str | None, status: str | None, since: str | None, until: str | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if version:
        if not version.strip().lstrip("v").isdigit():
            raise HTTPException(422, f"version must be a number, got {version!r}")
        out["version"] = int(version.strip().lstrip("v"))
    if status and status != "all":
        if status not in runview.RUN_STATUSES:
            raise HTTPException(
                422, f"status must be all or one of {', '.join(runview.RUN_STATUSES)}"
            )
        out["status"] = status
    try:
        out["since"] = runview.parse_since(since) if since else None
        out["until"] = runview.parse_since(until) if until else None
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return out


def runs_router(source: Callable[[], Ledger]) -> APIRouter:
    router = APIRouter()

    def listing(
        user: Any,
        workflow: str | None,
        version: str | None,
        status: str | None,
        since: str | None,
        until: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        rows = runview.list_runs(
            source(),
            workflow=workflow or None,
            limit=limit,
            **_filters(version, status, since, until),
        )
        allowed = _readable_dags(user)
        if allowed is None:
            return [r for r in rows if may_read_runs(user, r["dag_id"])]
        return [r for r in rows if r["dag_id"] in allowed]

    def document(user: Any, run_id: str) -> dict[str, Any]:
        doc = runview.run_document(source(), run_id)
        if doc is None or not may_read_runs(user, doc["run"]["dag_id"]):
            raise HTTPException(404, f"no run {run_id!r} in the ledger")
        return doc

    @router.get("/api/runs")
    def api_runs(
        user: GetUserDep,
        workflow: str | None = None,
        version: str | None = None,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        rows = listing(user, workflow, version, status, since, until, limit)
        return {"runs": rows, "total": len(rows)}

    @router.get("/api/runs/{run_id:path}")
    def api_run(run_id: str, user: GetUserDep) -> dict[str, Any]:
        return document(user, run_id)

    @router.get("/runs", response_class=HTMLResponse)
    def runs_page(
        request: Request,
        user: GetUserDep,
        workflow: str | None = None,
        version: str | None = None,
        status: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
    ) -> str:
        rows = listing(user, workflow, version, status, since, until, limit)
        return _page(
            "runs",
            title="Runs",
            root=_root(request),
            caller=_caller(user),
            runs=rows,
            workflows=sorted({w for w, _v in runview.workflows(source())}),
            statuses=runview.RUN_STATUSES,
            f={
                "workflow": workflow,
                "version": version,
                "status": status,
                "since": since,
                "until": until,
            },
            filtered=any((workflow, version, status, since, until)),
        )

    def render_run(
        run_id: str,
        request: Request,
        user: Any,
        message: tuple[str, str] | None = None,
        status_code: int = 200,
    ) -> HTMLResponse:
        try:
            doc = document(user, run_id)
        except HTTPException as exc:
            html = _page(
                "run_missing",
                title="No such run",
                root=_root(request),
                caller=_caller(user),
                detail=str(exc.detail),
            )
            return HTMLResponse(html, status_code=exc.status_code)
        caller = _caller(user)
        html = _page(
            "run",
            title=f"{doc['run']['workflow']} {doc['run']['airflow_run_id']}",
            root=_root(request),
            caller=caller,
            airflow=_airflow_root(request),
            d=doc,
            retry=_standing(source(), run_id),
            csrf=form_token(server_secret(), caller.name, f"retry:{run_id}"),
            cancel_csrf=form_token(server_secret(), caller.name, f"cancel:{run_id}"),
            message=message or _RUN_MESSAGES.get(request.query_params.get("msg", "")),
        )
        return HTMLResponse(html, status_code=status_code)

    @router.get("/runs/{run_id:path}", response_class=HTMLResponse)
    def run_page(run_id: str, request: Request, user: GetUserDep) -> HTMLResponse:
        return render_run(run_id, request, user)

    @router.post("/runs/{run_id:path}/retry", response_model=None)
    def retry_button(
        run_id: str,
        request: Request,
        user: GetUserDep,
        csrf_token: Annotated[str, Form()],
        from_step: Annotated[str, Form(max_length=100)] = "",
        params: Annotated[str, Form(max_length=100_000)] = "",
    ) -> HTMLResponse | RedirectResponse:
        """The run page's Retry button: the same retry as ``POST /api/runs/{id}/retry``."""
        from ledgerflow.errors import InvalidParams, RetryRefused
        from ledgerflow.retries import airflow_state, plan_retry, start_retry

        caller = _caller(user)
        if not _same_origin(request) or not form_token_ok(
            server_secret(), caller.name, f"retry:{run_id}", csrf_token
        ):
            raise HTTPException(
                403, "the form expired or came from another site: reload the run page"
            )
        doc = document(user, run_id)  # 404 for a run the caller may not read
        dag_id = doc["run"]["dag_id"]
        if not may_create_runs(user, dag_id):  # before planning: a 409 would tell its state
            raise HTTPException(403, f"{caller.name} may not trigger runs of {dag_id}")
        ledger = source()
        try:
            # Compared with the params as the form showed them (secrets masked): a value
            # left as shown is not an override.
            overrides = form_overrides(params, _retry_params(doc["run"]["params"]))
            plan = plan_retry(
                ledger, run_id, from_step or None, state_of=airflow_state, params=overrides
            )
            if not may_create_runs(user, plan.dag_id):
                raise HTTPException(403, f"{caller.name} may not trigger runs of {plan.dag_id}")
            started = start_retry(ledger, plan, user=caller.name, via="ui")
        except RetryRefused as exc:
            return render_run(
                run_id, request, user, ("warn", f"Not retried: {exc}"), exc.http_status
            )
        except (InvalidParams, ValueError) as exc:
            return render_run(run_id, request, user, ("warn", f"Not retried: {exc}"), 422)
        return RedirectResponse(
            f"{_root(request)}/runs/{quote(started.run_id, safe='/')}?msg=retried", 303
        )

    return router


def _standing(ledger: Ledger, run_id: str) -> Any:
    """Where the run stands in its retry chain (None: cannot tell; the form is shown)."""
    from ledgerflow.retries import airflow_state, standing

    try:
        return standing(ledger, run_id, state_of=airflow_state)
    except Exception:
        return None


_RUN_MESSAGES = {
    "retried": ("ok", "Started: this run retries the one it links to below."),
    "cancelled": ("ok", "Cancelled: its tasks are stopping; its approvals are withdrawn."),
    "cancel_refused": ("warn", "Not cancelled: the run had already ended."),
    "cancel_needs_reason": ("warn", "Not cancelled: say why (the reason is recorded)."),
}


def _same_origin(request: Request) -> bool:
    """A browser's ``Origin`` must be this server (a sandboxed frame sends ``null``)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host")


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def _airflow_root(request: Request) -> str:
    """Where Airflow's own UI is (``[api] base_url``'s path: ``""`` or ``/airflow``)."""
    return str(request.scope.get("app_root_path", "")).rstrip("/")
