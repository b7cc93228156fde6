"""Canary: a connection's credentials, echoed back by the peer, are found nowhere that
Ledgerflow or Airflow keeps or shows them (real Airflow processes, Postgres ledger)."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import inspect, text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import COMPONENTS, AirflowStack
from ledgerflow.testing.echo_peer import (
    CANARY_API_KEY,
    CANARY_LOGIN,
    CANARY_PASSWORD,
    EchoPeer,
)

pytestmark = pytest.mark.e2e

DAG = "canary_http__v1"
BASIC = base64.b64encode(f"{CANARY_LOGIN}:{CANARY_PASSWORD}".encode()).decode()
CANARIES = {"password": CANARY_PASSWORD, "api key": CANARY_API_KEY, "basic value": BASIC}


def ledger_tables(ledger: Ledger) -> dict[str, str]:
    """Every column of every row of every table in the ledger's database, as text."""
    out = {}
    with ledger.engine.connect() as conn:
        for name in inspect(conn).get_table_names():
            rows = conn.execute(text(f'SELECT t::text FROM "{name}" t')).scalars()
            out[f"ledger table {name}"] = "\n".join(rows)
    return out


def pages_and_api(stack: AirflowStack, runs: list[str]) -> dict[str, str]:
    """The run pages, the runs list page, Ledgerflow's JSON API and the steps' XCom."""
    out = {}
    headers = {"Authorization": f"Bearer {stack.token()}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:

        def get(what: str, path: str, **kw: object) -> None:
            resp = client.get(path, **kw)  # type: ignore[arg-type]
            assert resp.status_code == 200, f"{path}: {resp.status_code} {resp.text[:300]}"
            out[what] = resp.text

        get("runs page", "/ledgerflow/runs", params={"workflow": "canary_http"})
        get("runs API", "/ledgerflow/api/runs", params={"workflow": "canary_http"})
        for run in runs:
            ledger_run = f"{DAG}/{run}"
            get(f"run page {run}", f"/ledgerflow/runs/{quote(ledger_run, safe='/')}")
            get(f"run API {run}", f"/ledgerflow/api/runs/{ledger_run}")
            for task in ("call", "after"):
                resp = client.get(
                    f"/api/v2/dags/{DAG}/dagRuns/{quote(run)}/taskInstances/{task}"
                    "/xcomEntries/return_value"
                )
                out[f"xcom {task} {run}"] = resp.text if resp.status_code == 200 else ""
    return out


def logs(stack: AirflowStack) -> dict[str, str]:
    """The task logs of the canary DAG and the logs of every Airflow component."""
    out = {
        f"task log {path.relative_to(stack.logs_dir)}": path.read_text(errors="replace")
        for path in stack.logs_dir.rglob("*")
        if path.is_file() and DAG in str(path)
    }
    for name in COMPONENTS:
        path: Path = stack.log_path(name)
        if path.exists():
            out[f"{name} log"] = path.read_text(errors="replace")
    return out


def test_echoed_credentials_are_found_nowhere(
    stack: AirflowStack, ledger: Ledger, echo_peer: EchoPeer
) -> None:
    """A run whose peer answers 500 with the request's headers (failed, dead-lettered) and
    one whose peer answers 200 with them in its body (succeeded, its output used by the
    next step): the password, the API key and the encoded Basic value occur 0 times in the
    ledger (every table, every column), the run pages, the JSON API, XCom and the logs,
    although the peer received them on every call."""
    failed = stack.trigger(DAG, {"path": "fail"})
    succeeded = stack.trigger(DAG, {"path": "ok"})
    assert stack.wait_for_run(DAG, failed, timeout=240) == "failed"
    assert stack.wait_for_run(DAG, succeeded, timeout=240) == "success"
    assert echo_peer.seen and all(
        h["authorization"] == f"Basic {BASIC}" and h["x-api-key"] == CANARY_API_KEY
        for h in echo_peer.seen
    )
    letters = [d for d in ledger.dead_letters() if d["run_id"] == f"{DAG}/{failed}"]
    assert len(letters) == 1 and "HTTP 500" in letters[0]["error"]
    places = {**ledger_tables(ledger), **pages_and_api(stack, [failed, succeeded]), **logs(stack)}
    assert any(name.startswith("task log") for name in places)
    found = sorted(
        f"{what} in {place} ({body.count(value)}x)"
        for place, body in places.items()
        for what, value in CANARIES.items()
        if value in body
    )
    assert found == [], "found:\n" + "\n".join(found)
    # What was masked is visible as masked, not dropped: the error still tells the story.
    assert "***" in letters[0]["error"] and "x-api-key" in letters[0]["error"]
