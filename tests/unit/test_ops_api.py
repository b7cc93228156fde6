"""The operating routes (``/dashboard``, ``/api/slo``, ``/api/export``) and the ``slo:``
field of workflow files.

The app's own routes over ASGI on a SQLite ledger, with Airflow's authentication replaced
by a fixed caller where a caller is needed (who may read which DAG is Airflow's rule,
exercised on a real deployment by ``tests/e2e/test_provider_e2e.py``'s route matrix):
each route shows only the DAGs the caller may read. Anonymous requests and refused forms
are counted as authorization failures in the ledger.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledgerflow.api import create_app
from ledgerflow.api._auth import Caller, current_user
from ledgerflow.errors import SpecErrors
from ledgerflow.ledger.indicators import measure
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.loader import parse_spec
from ledgerflow.testing.ledger_runs import Step, ledger_clock, record_run

SHOP = """name: shop
version: 1
slo: {completion_p95: 1m, success_rate: 99%}
steps:
  - id: a
    tool: demo.noop
    idempotency: natural
"""


@pytest.fixture(scope="module")
def dags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dags")
    (folder / "workflows" / "shop").mkdir(parents=True)
    (folder / "workflows" / "shop" / "v1.yaml").write_text(SHOP)
    return folder


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('ops') / 'ledger.db'}")
    ledger.migrate()
    start = datetime.now(timezone.utc) - timedelta(hours=2)
    with ledger_clock(start) as clock:
        for n in range(3):
            record_run(ledger, clock, workflow="shop", run=f"s{n}", steps=[Step("a", seconds=5)])
        record_run(ledger, clock, workflow="payroll", run="p1", steps=[Step("pay")])
    return ledger


def call(
    ledger: Ledger,
    caller: Caller | None,
    method: str,
    path: str,
    dags: Path | None = None,
    **kw: Any,
) -> tuple[httpx.Response, Any]:
    app = create_app(ledger)
    if caller is not None:
        app.dependency_overrides[current_user] = lambda: caller

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(go()), app


SHOP_ONLY = Caller("ann", frozenset(), dags=frozenset({"shop__v1"}))


@pytest.fixture(autouse=True)
def dags_folder(monkeypatch: pytest.MonkeyPatch, dags: Path) -> None:
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(dags))


def test_the_export_route_streams_only_the_events_of_readable_dags(ledger: Ledger) -> None:
    """``/api/export`` answers the events of runs of DAGs the caller may read, in JSON
    lines or CSV (a download), and nothing of the others."""
    resp, _ = call(ledger, SHOP_ONLY, "GET", "/api/export", params={"since": "1d"})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    assert "attachment" in resp.headers["content-disposition"]
    rows = [json.loads(x) for x in resp.text.splitlines()]
    assert {r["dag_id"] for r in rows} == {"shop__v1"} and len(rows) == 3 * 3
    resp, _ = call(ledger, SHOP_ONLY, "GET", "/api/export", params={"since": "1d", "format": "csv"})
    table = list(csv.DictReader(io.StringIO(resp.text)))
    assert [int(r["id"]) for r in table] == [r["id"] for r in rows]
    nobody = Caller("eve", frozenset(), dags=frozenset())
    resp, _ = call(ledger, nobody, "GET", "/api/export", params={"since": "1d", "format": "csv"})
    assert resp.text.splitlines() == ["id,at,run_id,dag_id,workflow,step_key,kind,who,data"]
    resp, _ = call(ledger, SHOP_ONLY, "GET", "/api/export", params={"since": "soon"})
    assert resp.status_code == 422 and "since" in resp.text


def test_the_slo_route_and_the_dashboard_show_only_readable_workflows(ledger: Ledger) -> None:
    """``/api/slo`` and ``/dashboard`` hold the workflows of readable DAGs, with the SLO of
    the workflow file judged; the dashboard draws its charts as inline SVG, no script
    from elsewhere."""
    resp, _ = call(ledger, SHOP_ONLY, "GET", "/api/slo", params={"since": "1d"})
    body = resp.json()
    assert list(body["workflows"]) == ["shop"]
    shop = body["workflows"]["shop"]
    assert shop["runs"] == 3 and shop["success_rate"] == 1.0
    assert {o["objective"]: o["state"] for o in shop["objectives"]} == {
        "completion_p95": "ok",
        "success_rate": "ok",
    }
    resp, _ = call(ledger, SHOP_ONLY, "GET", "/dashboard")
    assert resp.status_code == 200
    html = resp.text
    assert 'id="wf-shop"' in html and "payroll" not in html
    assert 'id="shop-outcomes"' in html and html.count('<svg class="chart"') == 8
    assert "<script src" not in html and "http://" not in html.replace("http://www.w3", "")
    everyone = Caller("root", frozenset(), dags=None)
    resp, _ = call(ledger, everyone, "GET", "/dashboard", params={"window": "1d"})
    assert 'id="wf-payroll"' in resp.text and 'id="wf-shop"' in resp.text
    resp, _ = call(ledger, everyone, "GET", "/dashboard", params={"window": "2y"})
    assert resp.status_code == 422


def test_refused_requests_are_counted_in_the_ledger(ledger: Ledger) -> None:
    """An anonymous request (401) and a refused form (403) are counted per minute and
    status: in memory, then written to the ledger in one batch."""
    resp, app = call(ledger, None, "GET", "/api/slo")
    assert resp.status_code == 401
    assert app.state.auth_failures.flush() == 1
    resp, app = call(
        ledger, SHOP_ONLY, "POST", "/approvals/1/decide",
        data={"decision": "approve", "csrf_token": "forged"},
    )  # fmt: skip
    assert resp.status_code == 403
    assert app.state.auth_failures.flush() == 1
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    assert measure(ledger, since=since).auth_failures == {401: 1, 403: 1}


@pytest.mark.parametrize(
    ("slo", "line", "field", "message"),
    [
        ("{success_rate: 0.995}", 3, "slo.success_rate", "write a rate as a percentage"),
        ("{success_rate: 150%}", 3, "slo.success_rate", "at most 100%"),
        ("{completion_p95: soon}", 3, "slo.completion_p95", "is not a duration"),
        ("{completion_p95: 0s}", 3, "slo.completion_p95", "more than 0"),
        ("\n  completion_p99: 1m", 4, "slo.completion_p99", "unknown field"),
        ("{window: 7d}", 3, "slo", "needs at least one objective"),
    ],
)
def test_a_bad_slo_names_the_file_line_and_field(
    slo: str, line: int, field: str, message: str
) -> None:
    """Every ``slo:`` mistake is a SpecError naming the file, the line and the field."""
    text = SHOP.replace("slo: {completion_p95: 1m, success_rate: 99%}", f"slo: {slo}")
    with pytest.raises(SpecErrors) as caught:
        parse_spec(text, "workflows/shop/v1.yaml")
    (error,) = caught.value.errors
    assert (error.file, error.line, error.field) == ("workflows/shop/v1.yaml", line, field)
    assert message in error.message


def test_a_good_slo_parses_to_seconds_and_rates() -> None:
    """Durations and percentages of an ``slo:`` parse to their values; ``window`` is 7d
    unless set."""
    spec, _ = parse_spec(
        SHOP.replace(
            "completion_p95: 1m, success_rate: 99%", "human_wait_p95: 2d, success_rate: 99.5%"
        ),
        "v1.yaml",
    )
    assert spec.slo is not None
    assert spec.slo.objectives() == {
        "human_wait_p95": timedelta(days=2),
        "success_rate": pytest.approx(0.995),
    }
    assert spec.slo.window == timedelta(days=7)


def test_the_commands_refuse_a_bad_time_or_duration(
    ledger: Ledger, capsys: pytest.CaptureFixture[str]
) -> None:
    """``slo --since``, ``export --until`` and ``prune --older-than`` that do not parse exit
    2 with one line naming the option."""
    from ledgerflow.cli import main

    for argv, option in (
        (["slo", "--since", "soon"], "--since"),
        (["export", "--since", "1d", "--until", "later"], "--until"),
        (["prune", "--older-than", "ninety days"], "--older-than"),
    ):
        with pytest.raises(SystemExit) as ended:
            main([*argv, "--url", ledger.url])
        assert ended.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{option}: ") and "Traceback" not in err, err
