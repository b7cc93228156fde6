"""The run view (page, JSON API and ``ledgerflow show``) over a SQLite ledger written
through the ledger's own API."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_retry_requests import page  # the run page of a run, as the app renders it

from ledgerflow.cli import main
from ledgerflow.ledger import runview
from ledgerflow.ledger.store import Ledger

DAG = "checkout__v1"
RUN = f"{DAG}/manual__2026-01-31T12:00:00.123456+00:00"
RETRY = f"{DAG}/ledgerflow_retry__2026-01-31T12:05:00+00:00"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    params = {"order_id": "o-1", "api_key": "sk-live-123"}
    ledger.ensure_run(
        run_id=RUN, dag_id=DAG, workflow="checkout", version=1, params=params, trigger_kind="manual"
    )
    first = ledger.begin_attempt(
        run_id=RUN,
        step_key="charge",
        step_id="charge",
        map_index=-1,
        try_number=1,
        args={"order_id": "o-1", "headers": {"Authorization": "Bearer abc"}, "password": "pw"},
        idempotency_key="checkout:charge:o-1",
        first=True,
    )
    ledger.fail_attempt(
        run_id=RUN, step_key="charge", attempt_id=first, error=TimeoutError("slow"), final=False
    )
    second = ledger.begin_attempt(
        run_id=RUN,
        step_key="charge",
        step_id="charge",
        map_index=-1,
        try_number=2,
        args={"order_id": "o-1", "headers": {"Authorization": "Bearer abc"}, "password": "pw"},
        idempotency_key="checkout:charge:o-1",
    )
    with ledger.begin() as conn:
        ledger.insert_effect(
            conn,
            key="checkout:charge:o-1",
            tool="demo.charge_payment",
            run_id=RUN,
            step_key="charge",
            result={"payment_id": 7},
        )
        ledger.complete_step(
            conn,
            run_id=RUN,
            step_key="charge",
            attempt_id=second,
            output={"payment_id": 7, "token": "tok-secret", "blob": "x" * 5000},
            reused=False,
        )
    ship = ledger.begin_attempt(
        run_id=RUN,
        step_key="ship",
        step_id="ship",
        map_index=-1,
        try_number=1,
        args={},
        idempotency_key="checkout:ship:o-1",
        first=True,
    )
    ledger.fail_attempt(
        run_id=RUN, step_key="ship", attempt_id=ship, error=RuntimeError("refused"), final=True
    )
    ledger.dead_letter(
        workflow="checkout",
        version=1,
        run_id=RUN,
        step_key="ship",
        attempts=1,
        error=RuntimeError("refused"),
        args={},
        idempotency_key="checkout:ship:o-1",
    )
    ledger.start_saga(RUN, "ship")
    ledger.record_compensation(RUN, "charge", "completed", tool="demo.refund_payment")
    ledger.finish_saga(RUN)
    ledger.finish_run(RUN, "failed")
    ledger.ensure_run(
        run_id=RETRY,
        dag_id=DAG,
        workflow="checkout",
        version=1,
        params=params,
        trigger_kind="manual",
        retry_of=RUN,
    )
    return ledger


def test_run_document_masks_secrets_caps_outputs_and_links_the_chain(ledger: Ledger) -> None:
    """Secrets are masked at any depth (params, inputs, outputs), an output over 2 KB is a
    preview with its full size, attempts keep their order and errors, and the retry chain
    is read both ways."""
    doc = runview.run_document(ledger, RUN)
    assert doc is not None
    text = json.dumps(doc)
    for secret in ("sk-live-123", "Bearer abc", "tok-secret", '"pw"'):
        assert secret not in text
    assert doc["run"]["params"] == {"order_id": "o-1", "api_key": "***"}
    charge = next(s for s in doc["steps"] if s["step_key"] == "charge")
    assert charge["args"]["headers"] == {"Authorization": "***"}
    assert charge["output_truncated"] is True
    assert charge["output_bytes"] > runview.VALUE_CAP
    assert len(charge["output"].encode()) <= runview.VALUE_CAP + 3
    assert [(a["try_number"], a["status"]) for a in charge["attempts"]] == [
        (1, "failed"),
        (2, "completed"),
    ]
    assert charge["attempts"][0]["error"] == "slow"
    assert [e["tool"] for e in charge["effects"]] == ["demo.charge_payment"]
    assert charge["task_log"] == (
        "/dags/checkout__v1/runs/manual__2026-01-31T12%3A00%3A00.123456%2B00%3A00/tasks/charge"
    )
    assert doc["saga"] == {"outcome": "compensated", "failed_step": "ship"}
    assert [d["step_key"] for d in doc["dead_letters"]] == ["ship"]
    assert [r["run_id"] for r in doc["retry_chain"]["retried_by"]] == [RETRY]
    retry = runview.run_document(ledger, RETRY)
    assert retry is not None
    assert [r["run_id"] for r in retry["retry_chain"]["retries"]] == [RUN]
    assert runview.run_document(ledger, f"{DAG}/nope") is None


def test_list_filters_by_workflow_version_status_and_time(ledger: Ledger) -> None:
    """The runs list filters on workflow, version, the run's or the saga's status, and a
    time window; a run retried counts its retries."""
    ids = lambda **kw: [r["run_id"] for r in runview.list_runs(ledger, **kw)]  # noqa: E731
    assert set(ids()) == {RUN, RETRY}
    assert ids(status="compensated") == [RUN]
    assert ids(status="running") == [RETRY]
    assert ids(workflow="other") == []
    assert ids(version=2) == []
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert ids(since=future) == []
    assert set(ids(since=runview.parse_since("1h"))) == {RUN, RETRY}
    (row,) = [r for r in runview.list_runs(ledger) if r["run_id"] == RUN]
    assert row["retries"] == 1


def test_parse_since_reads_durations_and_iso_times() -> None:
    """``--since`` takes 30m/2h/7d (ago) or an ISO time; anything else is an error."""
    now = datetime(2026, 1, 31, 12, tzinfo=timezone.utc)
    assert runview.parse_since("2h", now) == now - timedelta(hours=2)
    assert runview.parse_since("2026-01-30") == datetime(2026, 1, 30, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="not a time"):
        runview.parse_since("yesterday")
    # Was an OverflowError: a 500 from GET /api/runs?since=999999999d.
    for far in ("999999999d", "9999999999w", "3000000000000000s"):
        with pytest.raises(ValueError, match="before the year 1"):
            runview.parse_since(far, now)


def test_run_page_escapes_and_shows_no_secret(ledger: Ledger) -> None:
    """The rendered run page carries the steps, attempts, compensations and chain, escapes
    what it shows, and contains no secret value."""
    ledger.record_event(RUN, "charge", "note", {"html": "<script>alert(1)</script>"})
    html = page(ledger, RUN, None)
    assert "<script>alert(1)" not in html
    assert 'id="retry-form"' in html and 'value="' + "f" * 64 + '"' in html
    assert "sk-live-123" not in html and "tok-secret" not in html
    assert 'id="retry-chain"' in html and "ledgerflow_retry__" in html
    assert "demo.refund_payment" in html and "compensated" in html
    assert 'target="_top" href="/dags/checkout__v1/runs/' in html


def test_cli_runs_and_show(ledger: Ledger, capsys: pytest.CaptureFixture[str]) -> None:
    """``ledgerflow runs`` filters like the page and ``show --json`` prints the run view."""
    url = str(ledger.engine.url)
    assert main(["runs", "--url", url, "--status", "compensated"]) == 0
    out = capsys.readouterr().out
    assert RUN in out and RETRY not in out
    assert main(["show", "--url", url, "--json", RUN]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["saga"]["outcome"] == "compensated"
    assert "sk-live-123" not in json.dumps(doc)
    assert main(["show", "--url", url, RUN]) == 0
    out = capsys.readouterr().out
    assert "try 1" in out and "TimeoutError" in out and "sk-live-123" not in out
    assert main(["runs", "--url", url, "--since", "yesterday"]) == 2


def test_a_step_that_reused_a_checkpoint_or_an_effect_links_the_run_that_made_it(
    ledger: Ledger,
) -> None:
    """The run view names the run a step's output came from: a checkpoint copied from the
    retry chain (``reused_from``) or an effect made by another run under the same key
    (``effect_from``); the run page links both to their run pages."""
    with ledger.begin() as conn:
        for step, key in (("charge", "checkout:charge:o-1"), ("pack", "checkout:pack:o-1")):
            attempt = ledger.begin_attempt(
                run_id=RETRY,
                step_key=step,
                step_id=step,
                map_index=-1,
                try_number=1,
                args={},
                idempotency_key=key,
                first=True,
                conn=conn,
            )
            ledger.complete_step(
                conn, run_id=RETRY, step_key=step, attempt_id=attempt, output={}, reused=True
            )
    ledger.record_event(RETRY, "pack", "checkpoint_reused_from", {"run_id": RUN})
    doc = runview.run_document(ledger, RETRY)
    assert doc is not None
    steps = {s["step_key"]: s for s in doc["steps"]}
    assert (steps["charge"]["effect_from"], steps["charge"]["reused_from"]) == (RUN, None)
    assert (steps["pack"]["reused_from"], steps["pack"]["effect_from"]) == (RUN, None)
    original = runview.run_document(ledger, RUN)
    assert original is not None
    assert all(s["effect_from"] is None for s in original["steps"])  # its own effect
    html = page(ledger, RETRY, None)
    link = (
        '<a href="/ledgerflow/runs/checkout__v1/manual__2026-01-31T12%3A00%3A00.123456%2B00%3A00">'
    )
    assert f"effect of {link}" in html
    assert f"reused from {link}" in html
