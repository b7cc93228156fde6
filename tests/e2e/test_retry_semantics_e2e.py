"""Retry semantics of issue 10 through Airflow's own trigger path (real processes).

``retry_six``: s4 fails while the file named by the ``flag`` param exists. A retry that
overrides ``flag`` with a path that does not exist fixes the run without touching the
file: the param was the bug. The chain then has a live continuation that succeeded, so
the original is not retried again (finding 1, over REST and the CLI).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_retry_runs_e2e import attempted, cli, emails, failed_run, finished, reused_from, row

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e


def test_a_retry_with_new_params_fixes_the_run_and_ends_its_chain(
    stack: AirflowStack, ledger: Ledger, tmp_path: Path
) -> None:
    """Finding 6 and finding 1 on real Airflow: a run failed at s4 because its ``flag``
    param names an existing file. ``POST .../retry {"params": {"flag": ...}}`` starts a
    retry whose steps see the new param (s4 passes) and which reuses s1-s3 (they do not
    read it); the override is in the retry's ledger row and events. Retrying the
    original again is then refused with 409 (REST) and exit 2 (CLI) naming the retry,
    and nothing starts. Params that do not fit the schema are a 422 naming the field."""
    ref = f"sem-{uuid.uuid4().hex[:8]}"
    original = failed_run(stack, ledger, tmp_path / "s4-broken", ref)
    url = f"{stack.base_url}/ledgerflow/api/runs/{original}/retry"
    admin = {"Authorization": f"Bearer {stack.token()}"}
    fixed = str(tmp_path / "no-such-file")
    with httpx.Client(timeout=120) as http:
        bad = http.post(url, headers=admin, json={"params": {"flag": 5, "colour": "red"}})
        assert bad.status_code == 422, bad.text
        assert {d["field"] for d in bad.json()["detail"]} == {"flag", "colour"}
        assert ledger.retries_of(original) == []

        started = http.post(url, headers=admin, json={"params": {"flag": fixed}})
        assert started.status_code == 201, started.text
        body: dict[str, Any] = started.json()
    retry = body["run_id"]
    assert body["params"] == {"flag": fixed} and body["reused"] == {
        "s1": original,
        "s2": original,
        "s3": original,
    }
    assert finished(stack, ledger, retry) == "success"
    assert row(ledger, retry)["params"]["flag"] == fixed
    assert row(ledger, retry)["retry_of"] == original
    started_event = [e for e in ledger.events(retry) if e["kind"] == "run_started"]
    assert started_event[0]["data"]["params"] == {"flag": fixed}
    assert reused_from(ledger, retry) == {"s1": original, "s2": original, "s3": original}
    assert attempted(ledger, retry) == ["s4", "s5", "s6"]
    assert emails(ledger, ref) == ["s1", "s2", "s3", "s5", "s6"]

    with httpx.Client(timeout=120) as http:
        again = http.post(url, headers=admin)
    assert again.status_code == 409, again.text
    assert f"already continued by {retry} (succeeded)" in again.json()["detail"]
    refused = cli(stack, "retry", original)
    assert refused.returncode == 2 and f"already continued by {retry}" in refused.stderr
    assert [r["run_id"] for r in ledger.retries_of(original)] == [retry]
    assert emails(ledger, ref) == ["s1", "s2", "s3", "s5", "s6"]
