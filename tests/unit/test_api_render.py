"""Details of the approvals app that need no server: Markdown safety, roles, CSRF tokens,
the ledger URL. Authentication and permissions are tested against the real api-server in
tests/e2e/test_approvals_api_e2e.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from ledgerflow.api import _render
from ledgerflow.api._auth import csrf_ok, csrf_token, roles_of
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger, resolve_url


@pytest.mark.parametrize(
    "source, forbidden",
    [
        ("<script>alert(1)</script>", "<script"),
        ('<img src=x onerror="alert(1)">', "<img"),
        ("[click](javascript:alert(1))", 'href="javascript:'),
        ("[click](vbscript:msgbox(1))", 'href="vbscript:'),
        ('<a href="https://evil.example">x</a>', "<a "),
        ("<iframe src=//evil></iframe>", "<iframe"),
    ],
)
def test_markdown_never_passes_html_or_script_links(source: str, forbidden: str) -> None:
    """Raw HTML in an approval body is shown as text and script URLs are not linked."""
    html = str(_render.markdown(f"**Hello**\n\n{source}"))
    assert "<strong>Hello</strong>" in html
    assert forbidden not in html


def test_detail_page_escapes_every_field(tmp_path: Path) -> None:
    """Subject, payload, approvers and comment are escaped; only the Markdown renderer's
    own tags appear in the body."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.migrate()
    evil = "<script>x()</script>"
    approval, _ = approvals.request(
        ledger,
        run_id="w__v1/r",
        step_key="s",
        dag_id="w__v1",
        task_id="s",
        workflow="w",
        version=1,
        subject=evil,
        body=f"# Title\n{evil}",
        payload={"k": evil},
        approvers={"users": [evil], "roles": []},
        deadline=datetime.now(timezone.utc) + timedelta(hours=1),
        at_deadline="reject",
    )
    approval = approvals.decide(ledger, approval.id, decision="rejected", by=evil, comment=evil)
    html = _render.page(
        "detail",
        title=approval.subject,
        root="/ledgerflow",
        caller=SimpleNamespace(name=evil, roles=frozenset({evil})),
        a=approval,
        body_html=_render.markdown(approval.body),
        payload_json=_render.pretty_json(approval.payload),
        may_decide=False,
        csrf="t",
        message_code="conflict",
    )
    assert "<script" not in html
    assert "<h1>Title</h1>" in html
    assert html.count("&lt;script&gt;") >= 6
    assert "already decided" in html


def test_roles_of_simple_fab_and_plain_users() -> None:
    """Roles come from SimpleAuthManager's ``role``, FAB's ``roles`` (objects with a name)
    or plain strings; a user with none has none."""
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    assert roles_of(SimpleAuthManagerUser(username="m", role="op")) == {"op"}
    assert roles_of(SimpleAuthManagerUser(username="m", role=None)) == set()
    fab = SimpleNamespace(roles=[SimpleNamespace(name="Admin"), SimpleNamespace(name="Ops")])
    assert roles_of(fab) == {"Admin", "Ops"}
    assert roles_of(SimpleNamespace(roles=["a", "b"])) == {"a", "b"}
    assert roles_of(object()) == set()


def test_csrf_token_is_bound_to_user_approval_and_secret() -> None:
    """A form token is valid only for the user, the approval and the secret it was made for."""
    token = csrf_token(b"k1", "manager", 7)
    assert csrf_ok(b"k1", "manager", 7, token)
    assert not csrf_ok(b"k1", "other", 7, token)
    assert not csrf_ok(b"k1", "manager", 8, token)
    assert not csrf_ok(b"k2", "manager", 7, token)
    assert not csrf_ok(b"k1", "manager", 7, "")


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql+psycopg://u:p@db:5432/ledger",
        "postgresql://u:p@db:5432/ledger",
        "postgres://u:p@db:5432/ledger",
    ],
)
def test_any_postgres_driver_becomes_psycopg2(monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    """The ledger speaks psycopg2 whatever driver the Airflow connection's URI names."""
    monkeypatch.setenv("AIRFLOW_CONN_LF_URL_PROBE", uri)
    assert resolve_url("lf_url_probe") == "postgresql+psycopg2://u:p@db:5432/ledger"


def _pending(tmp_path: Path, run_id: str) -> tuple[Ledger, approvals.Approval]:
    """A ledger with one pending approval of step ``s`` of ``run_id`` (workflow w v1)."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.migrate()
    approval, _ = approvals.request(
        ledger,
        run_id=run_id,
        step_key="s",
        dag_id="w__v1",
        task_id="s",
        workflow="w",
        version=1,
        subject="Approve?",
        body="",
        payload={},
        approvers={"users": ["m"], "roles": []},
        deadline=datetime.now(timezone.utc) + timedelta(hours=1),
        at_deadline="reject",
    )
    return ledger, approval


def test_an_abandoned_approval_says_so_and_offers_no_decision(tmp_path: Path) -> None:
    """An approval whose run ended while it waited shows `abandoned`, says why, and offers
    no decision form."""
    ledger, approval = _pending(tmp_path, "w__v1/gone")
    approvals.abandon_for_run(ledger, "w__v1/gone", "the run ended (failed)")
    approval = approvals.get(ledger, approval.id)
    html = _render.page(
        "detail",
        title=approval.subject,
        root="/ledgerflow",
        caller=SimpleNamespace(name="m", roles=frozenset()),
        a=approval,
        body_html="",
        payload_json="{}",
        may_decide=approval.pending,
        csrf="t",
        message_code=None,
    )
    assert 'class="status-abandoned"' in html and "can no longer resume" in html
    assert "<form" not in html


def test_approval_pages_link_the_run_to_its_run_page(tmp_path: Path) -> None:
    """The pending list, the decided list and an approval's page show its run id as a
    link to the run page (``/runs/<dag_id>/<run id>``), not as plain text."""
    _, approval = _pending(tmp_path, "w__v1/manual__2026-12-04T10:00:00+00:00")
    caller = SimpleNamespace(name="m", roles=frozenset())
    link = (
        '<a href="/ledgerflow/runs/w__v1/manual__2026-12-04T10%3A00%3A00%2B00%3A00">'
        "manual__2026-12-04T10:00:00+00:00</a>"
    )
    listed = dict(root="/ledgerflow", caller=caller, approvals=[approval], workflows=["w"])
    pages = {
        "pending": _render.page("pending", title="p", workflow=None, assignee=None, **listed),
        "decided": _render.page("decided", title="d", workflow=None, **listed),
        "detail": _render.page(
            "detail",
            title="a",
            root="/ledgerflow",
            caller=caller,
            a=approval,
            body_html="",
            payload_json="{}",
            may_decide=False,
            csrf="t",
            message_code=None,
        ),
    }
    for name, html in pages.items():
        assert link in html, name


def test_times_are_time_elements_in_utc_that_the_page_shows_in_the_users_zone() -> None:
    """A time is a ``<time>`` whose text is UTC (readable without JavaScript; naive values
    are UTC); the runs pages carry the script that shows it in the zone chosen in
    Airflow's UI (its ``timezone`` localStorage entry), else the browser's."""
    naive = datetime(2026, 12, 4, 10, 0, 3, 999)
    aware = datetime(2026, 12, 4, 11, 0, 3, tzinfo=timezone(timedelta(hours=1)))
    want = '<time class="ts" datetime="2026-12-04T10:00:03+00:00">2026-12-04 10:00:03 UTC</time>'
    assert str(_render.timestamp(naive)) == want
    assert str(_render.timestamp(aware)) == want
    assert str(_render.iso_timestamp("2026-12-04T10:00:03.000999")) == want
    assert str(_render.iso_timestamp("not a time <b>")) == "not a time &lt;b&gt;"
    from ledgerflow.api import _runs

    html = _runs._page(
        "runs",
        title="Runs",
        root="/ledgerflow",
        caller=SimpleNamespace(name="m", roles=frozenset()),
        runs=[],
        workflows=[],
        statuses=[],
        f=SimpleNamespace(workflow=None, version=None, status=None, since=None, until=None),
        filtered=False,
    )
    assert 'localStorage.getItem("timezone")' in html and "time.ts" in html


def test_form_tokens_expire_after_the_configured_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page's form token carries the time it was made: valid for ``[ledgerflow]
    form_token_ttl`` seconds, then refused (it never expired before)."""
    from ledgerflow.api._auth import form_token, form_token_ok

    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__FORM_TOKEN_TTL", "600")
    made = 1_800_000_000
    token = csrf_token(b"k1", "manager", 7, at=made)
    assert csrf_ok(b"k1", "manager", 7, token, now=made + 599)
    assert not csrf_ok(b"k1", "manager", 7, token, now=made + 601)
    assert not csrf_ok(b"k1", "manager", 7, token, now=made - 120)  # from the future
    retry = form_token(b"k1", "ann", "retry:r1", at=made)
    assert form_token_ok(b"k1", "ann", "retry:r1", retry, now=made + 10)
    assert not form_token_ok(b"k1", "ann", "retry:r1", retry, now=made + 700)
    # The time is signed: moving it forward breaks the token.
    forged = f"{made + 3600:010x}{token[10:]}"
    assert not csrf_ok(b"k1", "manager", 7, forged, now=made + 3600)
