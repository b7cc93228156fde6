"""The run page's Retry button on the real api-server: a form post starts the retry."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
from test_retry_runs_e2e import DAG, emails, failed_run, finished, row

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e


def page_client(stack: AirflowStack, user: str = "admin") -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.token(user)}"},
        timeout=60,
    )


def retry_form(client: httpx.Client, run_id: str) -> str:
    page = client.get(f"/ledgerflow/runs/{quote(run_id, safe='/')}")
    assert page.status_code == 200, page.text[:500]
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert match and 'id="retry-button"' in page.text
    return match.group(1)


def test_the_retry_button_starts_a_linked_run(
    stack: AirflowStack, ledger: Ledger, tmp_path: Path
) -> None:
    """A failed run's page has a Retry form; posting it with the page's token starts a
    retry run (303 to its page, which says so) that reuses s1-s3 and succeeds; a post
    with a made-up or tampered token changes nothing (403)."""
    ref = f"btn-{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "s4-broken"
    original = failed_run(stack, ledger, flag, ref)
    flag.unlink()
    with page_client(stack) as client:
        token = retry_form(client, original)
        path = f"/ledgerflow/runs/{quote(original, safe='/')}/retry"
        assert client.post(path, data={"csrf_token": "0" * 64}).status_code == 403
        tampered = token[:-1] + ("0" if token[-1] != "0" else "1")
        assert client.post(path, data={"csrf_token": tampered}).status_code == 403
        assert ledger.retries_of(original) == []

        done = client.post(path, data={"csrf_token": token, "from_step": ""})
        assert done.status_code == 303, done.text[:500]
        location = done.headers["location"]
        assert location.endswith("?msg=retried")
        retry = unquote(location.split("/ledgerflow/runs/", 1)[1].split("?", 1)[0])
        shown = client.get(location)
        assert shown.status_code == 200 and "this run retries the one it links to" in shown.text
    assert retry.startswith(f"{DAG}/retry__")
    assert finished(stack, ledger, retry) == "success"
    assert row(ledger, retry)["retry_of"] == original
    assert emails(ledger, ref) == ["s1", "s2", "s3", "s5", "s6"]


def test_the_button_of_a_succeeded_run_needs_a_step(stack: AirflowStack, ledger: Ledger) -> None:
    """Retrying a succeeded run without naming a step is refused on the page itself
    (409, the reason shown) and starts nothing."""
    ref = f"btn-ok-{uuid.uuid4().hex[:8]}"
    run_id = stack.trigger(DAG, {"ref": ref})
    ledger_run = f"{DAG}/{run_id}"
    assert finished(stack, ledger, ledger_run) == "success"
    with page_client(stack) as client:
        token = retry_form(client, ledger_run)
        refused = client.post(
            f"/ledgerflow/runs/{quote(ledger_run, safe='/')}/retry",
            data={"csrf_token": token},
        )
    assert refused.status_code == 409
    assert "Not retried:" in refused.text
    assert ledger.retries_of(ledger_run) == []
