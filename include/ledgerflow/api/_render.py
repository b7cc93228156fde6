"""Server-rendered HTML for the approval pages: Jinja2 with autoescape, Markdown without HTML.

The body of an approval is author-written Markdown with templated values from the run
(params, earlier outputs): it is rendered with raw HTML disabled and markdown-it's link
validation (no ``javascript:`` links), and everything else goes through autoescaping.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from functools import cache
from typing import Any

import jinja2
from markupsafe import Markup

MESSAGES = {
    "approved": ("ok", "Approved. The workflow continues."),
    "rejected": ("ok", "Rejected. The workflow takes its reject path."),
    "pending": ("ok", "Recorded. The approval waits for more approvals (its quorum)."),
    "conflict": (
        "warn",
        "Not stored: this approval was already decided, changed since, or you decided it before.",
    ),
}


@cache
def _markdown() -> Any:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})


def markdown(text: str) -> Markup:
    """Markdown to HTML; raw HTML in the source is shown as text, never interpreted."""
    return Markup(_markdown().render(text or ""))


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


# Colours are variables: light, or dark where the browser prefers it. A page that knows the
# theme chosen in Airflow's UI (the runs pages read it: ``_THEME``) sets ``data-theme`` on
# its root, which wins over the browser's preference. (An iframe's prefers-color-scheme is
# the browser's, not the colour scheme of Airflow's page around it: measured in Chromium.)
_LIGHT = """color-scheme:light;--fg:#1f2933;--bg:#f7f9fb;--panel:#fff;--line:#e1e7ec;
--head:#eef2f6;--label:#52606d;--muted:#7b8794;--bar:#0b3d5c;--link:#0b5cad;
--ok-bg:#e3f6e8;--ok-line:#8fd1a2;--warn-bg:#fff4e0;--warn-line:#f0c36d;--good:#1f7a3d;
--bad:#b3261e;--wait:#8a5a00;--gone:#6b6b6b;--code-bg:#0f1720;--code-fg:#e6edf3;
--sub:#fafcfd;--badge:#fbe9e7;--badge-line:#e0a39a"""
_DARK = """color-scheme:dark;--fg:#e3e8ee;--bg:#14181d;--panel:#1b2026;--line:#2e3640;
--head:#232a32;--label:#aab4bf;--muted:#8d99a6;--bar:#0d2c42;--link:#8cc0ff;
--ok-bg:#143220;--ok-line:#2f7a47;--warn-bg:#33280e;--warn-line:#8a6a1f;--good:#63c788;
--bad:#f28b82;--wait:#e3b95f;--gone:#a3a3a3;--code-bg:#0b0f14;--code-fg:#e6edf3;
--sub:#181d23;--badge:#3b211e;--badge-line:#7a3d35"""

_CSS = f"""
:root{{{_LIGHT}}}
@media (prefers-color-scheme:dark){{:root:not([data-theme=light]){{{_DARK}}}}}
:root[data-theme=dark]{{{_DARK}}}
"""
_CSS += """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:var(--fg);
background:var(--bg)}
a{color:var(--link)}
header{background:var(--bar);color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;
align-items:center}
header a{color:#fff;text-decoration:none;font-weight:600}
header .who{margin-left:auto;font-size:.9rem;opacity:.85}
main{padding:1rem 1.2rem;max-width:75rem}
table{border-collapse:collapse;width:100%;background:var(--panel)}
th,td{border-bottom:1px solid var(--line);padding:.45rem .6rem;text-align:left;vertical-align:top;
font-size:.92rem}
th{background:var(--head)}
.msg{padding:.6rem .8rem;border-radius:4px;margin-bottom:1rem}
.msg.ok{background:var(--ok-bg);border:1px solid var(--ok-line)}
.msg.warn{background:var(--warn-bg);border:1px solid var(--warn-line)}
.body{background:var(--panel);border:1px solid var(--line);padding:.2rem 1rem;margin:.8rem 0}
pre{background:var(--code-bg);color:var(--code-fg);padding:.8rem;overflow:auto;border-radius:4px}
code.hash{font-size:.8rem;word-break:break-all}
form.filters{display:flex;gap:.6rem;margin-bottom:.8rem;align-items:end}
.pager{display:flex;gap:1rem;margin-top:.8rem;align-items:center}
label{display:block;font-size:.85rem;color:var(--label)}
textarea{width:100%;min-height:5rem}
button{padding:.45rem 1rem;border-radius:4px;border:1px solid var(--muted);cursor:pointer}
button.approve{background:#1f7a3d;color:#fff;border-color:#1f7a3d}
button.reject{background:#b3261e;color:#fff;border-color:#b3261e}
.status-pending{color:var(--wait);font-weight:600}
.status-approved{color:var(--good);font-weight:600}
.status-rejected,.status-expired{color:var(--bad);font-weight:600}
.status-abandoned{color:var(--gone);font-weight:600}
.muted{color:var(--muted)}
time.ts{white-space:nowrap}
"""

_ERROR = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }} · Ledgerflow</title>
<style>{{ css }}</style></head>
<body><header><span>Ledgerflow</span></header><main>
<h1>{{ status }}</h1><p>{{ detail }}</p>
{% if login %}<p><a href="{{ login }}">Sign in to Airflow</a> to see this page.</p>{% endif %}
<p><a href="{{ root }}/approvals">Pending approvals</a></p>
</main></body></html>
"""

_LAYOUT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} · Ledgerflow</title><style>{{ css }}</style>{% block head %}{% endblock %}</head>
<body>
<header><span>Ledgerflow</span>
<a href="{{ root }}/approvals">Pending approvals</a>
<a href="{{ root }}/approvals/decided">Decided</a>
<a href="{{ root }}/runs">Runs</a>
<a href="{{ root }}/dashboard">Dashboard</a>
<span class="who">signed in as <b>{{ caller.name }}</b>
{%- if caller.roles %} ({{ caller.roles | sort | join(', ') }}){% endif %}</span></header>
<main>
{% if message %}<div class="msg {{ message[0] }}" role="status">{{ message[1] }}</div>{% endif %}
{% block content %}{% endblock %}
</main>{% block scripts %}{% endblock %}</body></html>
"""

# Times are written in UTC (readable without JavaScript). The run pages (a page that fills
# the ``scripts`` block with ``local_times``) show them in the time zone the user chose in
# Airflow's UI (its ``timezone`` entry in localStorage, same origin), else the browser's
# own, as Airflow's pages do; the UTC value stays in the tooltip. The approval pages carry
# no script at all (they show text that approvers' requests put there).
_LOCAL_TIMES = """(function(){var z;try{z=JSON.parse(localStorage.getItem("timezone")||"null")}
catch(e){}z=z||Intl.DateTimeFormat().resolvedOptions().timeZone;var f;try{f=new
Intl.DateTimeFormat("sv-SE",{timeZone:z,year:"numeric",month:"2-digit",day:"2-digit",
hour:"2-digit",minute:"2-digit",second:"2-digit",hour12:false,timeZoneName:"short"})}
catch(e){return}document.querySelectorAll("time.ts").forEach(function(t){var d=new
Date(t.getAttribute("datetime"));if(isNaN(d))return;t.title=t.textContent;
t.textContent=f.format(d)})})();"""

# The theme chosen in Airflow's UI (its ``theme`` entry in localStorage, same origin:
# light, dark or system), followed when it changes there. Only the runs pages carry it
# (in their head, before the first paint); the approval pages carry no script.
_THEME = """(function(){var r=document.documentElement;
function set(t){if(t==="dark"||t==="light")r.setAttribute("data-theme",t);
else r.removeAttribute("data-theme")}
try{set(localStorage.getItem("theme"))}catch(e){}
addEventListener("storage",function(e){if(e.key==="theme")set(e.newValue)})})();"""

_PENDING = """{% extends "layout" %}{% block content %}
<h1>Pending approvals</h1>
<form class="filters" method="get" action="{{ root }}/approvals">
<div><label for="workflow">Workflow</label>
<select id="workflow" name="workflow"><option value="">all</option>
{% for w in workflows %}<option value="{{ w }}"{% if w == workflow %} selected{% endif %}>{{ w }}</option>{% endfor %}
</select></div>
<div><label for="assignee">Assignee</label>
<input id="assignee" name="assignee" value="{{ assignee or '' }}" placeholder="user name"></div>
<button type="submit">Filter</button>
<a href="{{ root }}/approvals?assignee={{ caller.name | urlencode }}">Mine</a>
</form>
{% if approvals %}
<table><thead><tr><th>#</th><th>Subject</th><th>Workflow</th><th>Run</th><th>Step</th>
<th>Approvers</th><th>Deadline</th><th>Requested</th></tr></thead><tbody>
{% for a in approvals %}<tr>
<td>{{ a.id }}</td>
<td><a href="{{ root }}/approvals/{{ a.id }}">{{ a.subject }}</a></td>
<td>{{ a.workflow }} v{{ a.version }}</td><td><a href="{{ root }}/runs/{{ a.run_id | urlencode }}">{{ a.airflow_run_id }}</a></td><td>{{ a.step_key }}</td>
<td>{{ approvers(a) }}{% if a.level %} <span class="muted">(escalation level {{ a.level }})</span>{% endif %}{% if a.required > 1 %} <span class="quorum">{{ tally.get(a.id, 0) }} of {{ a.required }} approvals</span>{% endif %}</td>
<td>{{ a.deadline | when }}</td><td>{{ a.created_at | when }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="muted">Nothing is waiting{% if workflow or assignee %} for this filter{% endif %}.</p>{% endif %}
{% include "pager" %}
{% endblock %}"""

_DECIDED = """{% extends "layout" %}{% block content %}
<h1>Decided approvals</h1>
<form class="filters" method="get" action="{{ root }}/approvals/decided">
<div><label for="workflow">Workflow</label>
<select id="workflow" name="workflow"><option value="">all</option>
{% for w in workflows %}<option value="{{ w }}"{% if w == workflow %} selected{% endif %}>{{ w }}</option>{% endfor %}
</select></div><button type="submit">Filter</button></form>
{% if approvals %}
<table><thead><tr><th>#</th><th>Subject</th><th>Workflow</th><th>Run</th><th>Decision</th>
<th>By</th><th>When</th><th>Comment</th></tr></thead><tbody>
{% for a in approvals %}<tr>
<td>{{ a.id }}</td><td><a href="{{ root }}/approvals/{{ a.id }}">{{ a.subject }}</a></td>
<td>{{ a.workflow }} v{{ a.version }}</td><td><a href="{{ root }}/runs/{{ a.run_id | urlencode }}">{{ a.airflow_run_id }}</a></td>
<td class="status-{{ a.status }}">{{ a.status }}</td><td>{{ a.decided_by or '' }}</td>
<td>{{ a.decided_at | when }}</td><td>{{ a.comment or '' }}</td></tr>
{% endfor %}</tbody></table>
{% else %}<p class="muted">No decisions yet.</p>{% endif %}
{% include "pager" %}
{% endblock %}"""

_PAGER = """{% if pager is defined and pager.pages > 1 %}<nav class="pager" aria-label="Pages">
{% if pager.prev %}<a rel="prev" href="{{ pager.prev }}">&lsaquo; Newer</a>{% endif %}
<span>Page {{ pager.page }} of {{ pager.pages }} ({{ pager.total }} in all)</span>
{% if pager.next %}<a rel="next" href="{{ pager.next }}">Older &rsaquo;</a>{% endif %}
</nav>{% endif %}"""

_DETAIL = """{% extends "layout" %}{% block content %}
<h1>{{ a.subject }}</h1>
<table>
<tr><th>Status</th><td class="status-{{ a.status }}" id="status">{{ a.status }}</td></tr>
<tr><th>Workflow</th><td>{{ a.workflow }} v{{ a.version }}</td></tr>
<tr><th>Run</th><td>{{ a.dag_id }} / <a href="{{ root }}/runs/{{ a.run_id | urlencode }}">{{ a.airflow_run_id }}</a> (step {{ a.step_key }})</td></tr>
<tr><th>Approvers</th><td>{{ approvers(a) }}{% if a.level %} (escalation level {{ a.level }}){% endif %}</td></tr>
{% if a.required > 1 %}<tr><th>Quorum</th><td id="quorum">{{ approved }} of {{ a.required }} approvals</td></tr>{% endif %}
<tr><th>Deadline</th><td>{{ a.deadline | when }}</td></tr>
<tr><th>Requested</th><td>{{ a.created_at | when }}</td></tr>
{% if a.status == "abandoned" %}
<tr><th>Decided by</th><td id="decided-by">nobody: the run ended while this approval waited, so its task can no longer resume (retry the run to ask again)</td></tr>
{% elif a.status == "withdrawn" %}
<tr><th>Withdrawn by</th><td id="decided-by">{{ a.decided_by }}: the run was cancelled at {{ a.decided_at | when }} ({{ a.comment or '' }}); nobody can decide it any more</td></tr>
{% elif not a.pending %}
<tr><th>Decided by</th><td id="decided-by">{{ a.decided_by or '(deadline)' }}</td></tr>
<tr><th>Decided at</th><td>{{ a.decided_at | when }}</td></tr>
<tr><th>Comment</th><td id="comment">{{ a.comment or '' }}</td></tr>
<tr><th>Payload hash seen</th><td><code class="hash">{{ a.seen_hash or '' }}</code></td></tr>
{% endif %}
</table>
<h2>Request</h2>
<div class="body" id="body">{{ body_html }}</div>
<h2>Payload</h2>
<pre id="payload">{{ payload_json }}</pre>
<p>SHA-256 <code class="hash" id="payload-hash">{{ a.payload_hash }}</code></p>
{% if decisions and (a.required > 1 or decisions | length > 1) %}
<h2>Decisions</h2>
<table id="decisions"><thead><tr><th>By</th><th>Decision</th><th>When</th><th>Comment</th><th>Payload hash seen</th></tr></thead><tbody>
{% for d in decisions %}<tr><td>{{ d.by }}</td><td class="status-{{ d.decision }}">{{ d.decision }}</td><td>{{ d.at | when }}</td><td>{{ d.comment or '' }}</td><td><code class="hash">{{ d.seen_hash[:12] }}</code></td></tr>
{% endfor %}</tbody></table>
{% endif %}
{% if a.pending %}
{% if mine %}<p class="muted" id="mine">You ({{ caller.name }}) decided: {{ mine.decision }} ({{ mine.at | when }}). It waits for the other approvers.</p>
{% elif may_decide %}
<h2>Decision</h2>
<form method="post" action="{{ root }}/approvals/{{ a.id }}/decide">
<input type="hidden" name="seen_hash" value="{{ a.payload_hash }}">
<input type="hidden" name="csrf_token" value="{{ csrf }}">
<label for="comment-input">Comment</label>
<textarea id="comment-input" name="comment" maxlength="10000"></textarea>
<p><button class="approve" type="submit" name="decision" value="approve">Approve</button>
<button class="reject" type="submit" name="decision" value="reject">Reject</button></p>
</form>
{% else %}<p class="muted">You ({{ caller.name }}) are not among this approval's approvers.</p>{% endif %}
{% endif %}
{% endblock %}"""


def timestamp(value: datetime | None) -> Markup:
    """A ``<time>`` element: UTC text, shown in the user's time zone by the page's script."""
    if value is None:
        return Markup("")
    utc = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return Markup('<time class="ts" datetime="{}">{}</time>').format(
        utc.isoformat(timespec="seconds"), utc.strftime("%Y-%m-%d %H:%M:%S UTC")
    )


def iso_timestamp(value: str | None) -> Markup:
    """An ISO time string (the run view's) as ``timestamp`` does it."""
    if not value:
        return Markup("")
    try:
        return timestamp(datetime.fromisoformat(value))
    except ValueError:
        return Markup("{}").format(value)


def _approvers(approval: Any) -> str:
    users = approval.approvers.get("users", [])
    roles = approval.approvers.get("roles", [])
    parts = [*users, *(f"role {r}" for r in roles)]
    return ", ".join(parts)


@cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.DictLoader(
            {
                "layout": _LAYOUT,
                "pending": _PENDING,
                "pager": _PAGER,
                "decided": _DECIDED,
                "detail": _DETAIL,
                "error": _ERROR,
            }
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["when"] = timestamp
    env.globals["approvers"] = _approvers
    env.globals["css"] = Markup(_CSS)  # a constant of this module
    env.globals["local_times"] = Markup(_LOCAL_TIMES)  # a constant of this module
    env.globals["theme"] = Markup(_THEME)  # a constant of this module
    return env


def page(name: str, **context: Any) -> str:
    code = context.pop("message_code", None)
    context.setdefault("message", MESSAGES.get(code) if code else None)
    # A quorum's parts (``api._app`` gives them; a page without them shows none).
    for key, empty in (("decisions", []), ("approved", 0), ("mine", None), ("tally", {})):
        context.setdefault(key, empty)
    return _env().get_template(name).render(**context)
