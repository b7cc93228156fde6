"""The run page in a real browser: headless Chromium (Debian's package) via Playwright.

A checkout run with ``fail_shipment`` fails at create_shipment and its saga undoes the
payment and the reservation; the run is then retried through
``POST /ledgerflow/api/runs/{run_id}/retry``. The browser signs into Airflow's UI, opens
Browse -> Runs (the plugin's menu entry), finds the run, opens its page, and also opens
the "Ledgerflow" tab of Airflow's own page of that DAG run. A screenshot of the run page
is saved under the test's tmp path and copied to test-output/ when that folder exists.
Then the Runs list in Airflow's UI at 1280 px: every column fits, each time is one line,
in the time zone chosen in Airflow's UI (else the browser's), with UTC in its tooltip.
And Browse -> Ledgerflow dashboard over runs written through the ledger's API: the SLO's
status and the charts, in the light and the dark theme, with screenshots.
"""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import pytest

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack, StackError
from ledgerflow.testing.browser import TIMEOUT_MS, keep, log_in, submit_in_frame

pytestmark = pytest.mark.e2e

KEEP = Path(__file__).resolve().parents[2] / "test-output"  # scripts/test.sh makes it

DAG_ID = "checkout__v1"
W = "dashboard_probe"  # tests/e2e/workflows/dashboard_probe.yaml: its slo:, never run


def ledger_finished(ledger: Ledger, run_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """The run's ledger row once the scheduler or the DAG callback recorded its end and the saga its outcome."""
    deadline = time.monotonic() + timeout
    while True:
        row = ledger.run(run_id)
        if row is not None and row["status"] != "running" and row["saga"] != "compensating":
            return row
        if time.monotonic() > deadline:
            raise TimeoutError(f"{run_id} not finished in the ledger: {row}")
        time.sleep(0.5)


def test_run_page_of_a_compensated_run_with_its_retry(
    stack: AirflowStack, ledger: Ledger, browser: Any, tmp_path: Path
) -> None:
    """The run page of a failed, compensated checkout run that was retried shows every step
    with its attempts (create_shipment's failed tries with their error), the compensations
    and the saga's outcome, the dead letter, a link to the retry and task-log links into
    Airflow's UI; it is reachable from the plugin's Runs menu and from the
    Ledgerflow tab of Airflow's own page of the run."""
    order = f"web-{secrets.token_hex(4)}"
    stack.unpause(DAG_ID)
    airflow_run = stack.trigger(DAG_ID, {"order_id": order, "fail_shipment": True})
    assert stack.wait_for_run(DAG_ID, airflow_run, timeout=300) == "failed"
    run_id = f"{DAG_ID}/{airflow_run}"
    assert ledger_finished(ledger, run_id)["saga"] == "compensated"

    retry = stack.api("POST", f"/ledgerflow/api/runs/{run_id}/retry", json={})
    assert retry["retry_of"] == run_id
    retry_id = retry["run_id"]
    stack.wait_for_run(DAG_ID, retry["dag_run_id"], timeout=300)
    ledger_finished(ledger, retry_id)

    # Without a login: a browser gets a 401 page linking to Airflow's login, not the run.
    with httpx.Client(base_url=stack.base_url, timeout=30) as anon:
        denied = anon.get(f"/ledgerflow/runs/{run_id}", headers={"Accept": "text/html"})
    assert denied.status_code == 401 and "/auth/login" in denied.text
    assert order not in denied.text

    # The JSON API answers the same document the page renders.
    doc = stack.api("GET", f"/ledgerflow/api/runs/{run_id}")
    assert [r["run_id"] for r in doc["retry_chain"]["retried_by"]] == [retry_id]
    listed = stack.api(
        "GET", "/ledgerflow/api/runs", params={"workflow": "checkout", "status": "compensated"}
    )
    assert run_id in [r["run_id"] for r in listed["runs"]]
    # A far-away ``since`` is the caller's mistake (422 naming it), not a server error (500).
    with pytest.raises(StackError, match=r"-> 422: .*before the year 1"):
        stack.api("GET", "/ledgerflow/api/runs", params={"since": "999999999d"})

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, stack, "admin")

    # Browse -> Runs: the runs list inside Airflow's UI, filtered to compensated checkouts.
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Runs").click()
    page.wait_for_url("**/plugin/ledgerflow-runs**")
    frame = page.frame_locator("iframe[title=Runs]")
    frame.get_by_role("heading", name="Runs").wait_for()
    frame.locator("select#workflow").select_option("checkout")
    frame.locator("select#status").select_option("compensated")
    submit_in_frame(page, "Runs", "Filter", "**status=compensated**")
    # The run's own row (its retry's row links back to it in the "Retry of" column).
    frame.locator("#runs tbody td:first-child").get_by_role(
        "link", name=airflow_run, exact=True
    ).click()

    frame.locator("#saga-outcome").wait_for()  # near the end: the page is all there
    assert frame.locator("#run-id").inner_text() == run_id
    assert frame.locator("#run-status").inner_text() == "failed"
    assert "compensated" in frame.locator("#saga").inner_text()
    retry_link = frame.locator("#retry-chain").get_by_role("link", name=retry_id, exact=True)
    retry_link.wait_for()
    assert retry_link.count() == 1
    ship = frame.locator("#steps tr.detail").filter(has_text="ShipmentUnavailable")
    ship.wait_for()
    assert ship.count() == 1
    assert "carrier refused the shipment" in ship.inner_text()
    compensations = frame.locator("#compensations").inner_text()
    assert "charge_payment" in compensations and "reserve_inventory" in compensations
    assert "create_shipment" in frame.locator("#dead-letters").inner_text()
    log_link = frame.get_by_role("link", name="task log").first.get_attribute("href")
    assert log_link is not None
    assert log_link.startswith(f"/dags/{DAG_ID}/runs/{quote(airflow_run, safe='')}/tasks/")
    assert "customer@example.com" in frame.locator("body").inner_text()  # params shown

    shot = tmp_path / "run-page-compensated-retried.png"
    page.screenshot(path=str(shot), full_page=True)
    # The whole page (the frame scrolls inside Airflow's UI): the same URL at top level,
    # signed in by the same cookie.
    full = context.new_page()
    full.goto(f"{stack.base_url}/ledgerflow/runs/{quote(run_id, safe='/')}")
    full.locator("#compensations").wait_for()
    frame_shot = tmp_path / "run-page-compensated-retried-full.png"
    full.screenshot(path=str(frame_shot), full_page=True)
    assert shot.stat().st_size > 0 and frame_shot.stat().st_size > 0
    keep(shot, frame_shot, folder=KEEP)

    # Airflow's own page of the run has a Ledgerflow tab showing this run page.
    page.goto(
        f"{stack.base_url}/dags/{DAG_ID}/runs/{quote(airflow_run, safe='')}/plugin/ledgerflow-run"
    )
    tab = page.frame_locator("iframe[title=Ledgerflow]")
    tab.locator("#run-id").wait_for()
    assert tab.locator("#run-id").inner_text() == run_id
    context.close()

    runs_list_at_1280_px_in_the_users_time_zone(stack, ledger, browser, run_id, tmp_path)


def runs_list_at_1280_px_in_the_users_time_zone(
    stack: AirflowStack, ledger: Ledger, browser: Any, run_id: str, tmp_path: Path
) -> None:
    started = ledger.run(run_id)["created_at"]  # naive UTC or aware, as the dialect stores
    expected = {
        zone: started.replace(tzinfo=started.tzinfo or ZoneInfo("UTC"))
        .astimezone(ZoneInfo(zone))
        .strftime("%Y-%m-%d %H:%M:%S")
        for zone in ("America/New_York", "Asia/Kolkata")
    }
    context = browser.new_context(
        viewport={"width": 1280, "height": 900}, timezone_id="America/New_York"
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, stack, "admin")

    def started_cell() -> Any:
        page.goto(f"{stack.base_url}/plugin/ledgerflow-runs")
        frame = page.frame_locator("iframe[title=Runs]")
        frame.locator("select#workflow").select_option("checkout")
        submit_in_frame(page, "Runs", "Filter", "**workflow=checkout**")
        # The run's own row (its retry's row links to it too, under "Retry of").
        own = frame.locator("td:first-child").get_by_role(
            "link", name=run_id.split("/", 1)[1], exact=True
        )
        row = frame.locator("#runs tbody tr").filter(has=own)
        cell = row.locator("time.ts").first
        cell.wait_for()
        return frame, cell

    # No zone chosen in Airflow's UI: the browser's own.
    frame, cell = started_cell()
    assert cell.inner_text().startswith(expected["America/New_York"]), cell.inner_text()
    assert (cell.get_attribute("title") or "").endswith(" UTC")
    # A zone chosen in Airflow's UI (its localStorage entry, same origin) wins.
    page.evaluate("localStorage.setItem('timezone', JSON.stringify('Asia/Kolkata'))")
    frame, cell = started_cell()
    assert cell.inner_text().startswith(expected["Asia/Kolkata"]), cell.inner_text()

    table = frame.locator("#runs")
    fits = table.evaluate(
        "t => t.getBoundingClientRect().right <= document.documentElement.clientWidth"
        " && document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    one_line = table.evaluate(
        "t => Array.from(t.querySelectorAll('time.ts')).every(e => e.getClientRects().length == 1)"
    )
    shot = tmp_path / "runs-list-1280px.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot, folder=KEEP)
    assert fits, "the runs table is wider than its frame at 1280 px"
    assert one_line, "a time wraps onto more than one line"
    context.close()


def test_dashboard_charts_the_ledger_in_light_and_dark(
    stack: AirflowStack, ledger: Ledger, browser: Any, tmp_path: Path
) -> None:
    """Browse -> Ledgerflow dashboard shows, for a workflow whose runs were written through
    the ledger's API (6 succeeded, one after waiting 3,700 s for a person; 2 failed and
    compensated; 1 running), its SLO's status (success rate breached, human wait breached, completion
    ok), the indicators, and server-drawn SVG charts that fit the frame at 1280 px, whose
    bars say their counts, in the light and the dark theme (the colours differ)."""
    from ledgerflow.testing.ledger_runs import Step, ledger_clock, record_run

    tag = secrets.token_hex(3)
    start = datetime.now(timezone.utc) - timedelta(hours=3)
    with ledger_clock(start) as clock:
        for n in range(6):
            wait = [Step("sign", approval_wait=3700)] if n == 0 else []
            steps = [Step("reserve", seconds=2), *wait, Step("ship", seconds=3)]
            record_run(ledger, clock, workflow=W, run=f"ok_{tag}_{n}", steps=steps)
        for n in range(2):
            failing = [Step("reserve"), Step("ship", tries=("fail", "fail"))]
            record_run(
                ledger, clock, workflow=W, run=f"bad_{tag}_{n}", steps=failing, compensate=True
            )
        record_run(ledger, clock, workflow=W, run=f"run_{tag}", steps=[Step("reserve")], end=None)

    shots = []
    fills = {}
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme=scheme)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        log_in(page, stack, "admin")
        page.get_by_role("button", name="Browse").click()
        page.get_by_role("menuitem", name="Ledgerflow dashboard").click()
        page.wait_for_url("**/plugin/ledgerflow-dashboard**")
        frame = page.frame_locator("iframe[title='Ledgerflow dashboard']")
        frame.locator("select#workflow").select_option(W)
        submit_in_frame(page, "Ledgerflow dashboard", "Show", f"**workflow={W}**")
        section = frame.locator(f"#wf-{W}")
        section.locator("svg.chart").first.wait_for()
        states = {
            row.locator("td").nth(1).inner_text(): row.locator("td").last.inner_text()
            for row in frame.locator("#objectives tbody tr").all()
        }
        assert states == {
            "completion_p95": "ok",
            "human_wait_p95": "breached",
            "success_rate": "breached",
        }, states
        assert "9\nruns started" in section.locator(".tiles").inner_text()
        assert section.locator("svg.chart").count() == 8
        tips = section.locator(f"#{W}-outcomes rect title").all_text_contents()
        assert any(t.endswith("succeeded: 6") for t in tips), tips
        assert any(t.endswith("compensated: 2") for t in tips), tips
        chart = section.locator(f"#{W}-outcomes")
        fits = chart.evaluate(
            "s => s.getBoundingClientRect().width > 300"
            " && document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
        fills[scheme] = chart.locator("rect.s-succeeded").first.evaluate(
            "r => getComputedStyle(r).fill"
        )
        shot = tmp_path / f"dashboard-{scheme}-1280px.png"
        page.screenshot(path=str(shot), full_page=True)
        full = context.new_page()  # the whole page (the frame scrolls inside Airflow's UI)
        full.goto(f"{stack.base_url}/ledgerflow/dashboard?workflow={W}")
        full.locator(f"#wf-{W} svg.chart").first.wait_for()
        whole = tmp_path / f"dashboard-{scheme}-full.png"
        full.screenshot(path=str(whole), full_page=True)
        shots += [shot, whole]
        context.close()
        assert fits, f"the dashboard's charts do not fit the frame at 1280 px ({scheme})"
    keep(*shots, folder=KEEP)
    assert fills["light"] != fills["dark"], fills
