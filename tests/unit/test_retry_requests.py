"""How a retry request is read (``ledgerflow retry --param``, the REST body, the run
page's form), how a refusal travels (pickled, exit 2), and what the run page offers
depending on where the run stands in its retry chain. SQLite ledger, no Airflow."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from ledgerflow.api import _runs
from ledgerflow.api._auth import Caller
from ledgerflow.api._retry import RetryBody
from ledgerflow.cli import main, parse_param
from ledgerflow.errors import LedgerflowError
from ledgerflow.ledger import runview
from ledgerflow.ledger.store import Ledger
from ledgerflow.retries import RetryRefused, Standing, standing

ROOT = Path(__file__).resolve().parents[2]
SIX = (ROOT / "tests" / "e2e" / "workflows" / "retry_six.yaml").read_text()
DAG = "retry_six__v1"


@pytest.fixture()
def dags(tmp_path: Path) -> Path:
    folder = tmp_path / "dags" / "workflows" / "retry_six"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(SIX, encoding="utf-8")
    return tmp_path / "dags"


@pytest.fixture()
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture()
def ledger(url: str) -> Ledger:
    ledger = Ledger(url)
    ledger.migrate()
    return ledger


def add_run(ledger: Ledger, name: str, status: str, retry_of: str | None = None) -> str:
    run_id = f"{DAG}/{name}"
    ledger.ensure_run(
        run_id=run_id,
        dag_id=DAG,
        workflow="retry_six",
        version=1,
        params={"ref": "r", "flag": "", "ledgerflow_retry_of": retry_of or "", "token": "t0p"},
        trigger_kind="retry" if retry_of else "manual",
        retry_of=retry_of,
    )
    if status != "running":
        ledger.finish_run(run_id, status)
    return run_id


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amount=20", ("amount", 20)),
        ("ref=Bob", ("ref", "Bob")),
        ('ref="5"', ("ref", "5")),
        ("ok=true", ("ok", True)),
        ("items=[1, 2]", ("items", [1, 2])),
        ("note=a=b", ("note", "a=b")),
        ("empty=", ("empty", "")),
        ("gone=null", ("gone", None)),
    ],
)
def test_param_values_are_json_when_they_parse_else_text(
    text: str, expected: tuple[str, Any]
) -> None:
    """``--param KEY=VALUE`` splits at the first ``=``; the value is JSON when it parses
    (a number, a boolean, a list, a quoted string), else the text as typed."""
    assert parse_param(text) == expected


@pytest.mark.parametrize("text", ["novalue", "=5", " =5"])
def test_a_param_without_a_key_is_a_usage_error(text: str) -> None:
    """A ``--param`` that is not ``KEY=VALUE`` is refused by the parser (usage, exit 2)."""
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        parse_param(text)
    with pytest.raises(SystemExit) as exit_:
        main(["retry", f"{DAG}/x", "--param", text])
    assert exit_.value.code == 2


def test_cli_refuses_params_that_do_not_fit_and_a_continued_chain(
    ledger: Ledger, url: str, dags: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ledgerflow retry --param`` checks the merged params against the workflow's
    schema (exit 2 naming each field, before touching Airflow); retrying a run whose
    retry succeeded exits 2 naming that retry."""
    a = add_run(ledger, "a", "failed")
    base = ["--url", url, "--dags-folder", str(dags)]
    capsys.readouterr()
    assert main(["retry", a, "--param", "ref=5", "--param", "colour=red", *base]) == 2
    err = capsys.readouterr().err
    assert "cannot retry: params of retry_six v1" in err
    assert "ref: expected string, got integer" in err and "colour: unknown param" in err
    b = add_run(ledger, "b", "succeeded", retry_of=a)
    assert main(["retry", a, *base]) == 2
    err = capsys.readouterr().err
    assert f"cannot retry: run {a} is already continued by {b} (succeeded)" in err


def test_the_rest_body_takes_from_and_params_and_nothing_else() -> None:
    """The REST body is ``{"from": ..., "params": {...}}``; params default to none; an
    unknown key or a params value that is not an object is a 422 (validation error)."""
    body = RetryBody.model_validate({"from": "s2", "params": {"ref": "x", "n": 1}})
    assert (body.from_step, body.params) == ("s2", {"ref": "x", "n": 1})
    assert RetryBody.model_validate({}).params == {}
    with pytest.raises(ValidationError):
        RetryBody.model_validate({"param": {"ref": "x"}})
    with pytest.raises(ValidationError):
        RetryBody.model_validate({"params": ["ref", "x"]})


def test_the_form_overrides_only_the_values_changed() -> None:
    """The page's params box is prefilled with the run's params (as shown, secrets
    masked): only a value that differs from what was shown is an override; a key left
    out keeps its value; text that is not a JSON object is refused."""
    shown = {"ref": "r", "flag": "", "token": "***"}
    changed = _runs.form_overrides('{"ref": "r2", "flag": "", "token": "***"}', shown)
    assert changed == {"ref": "r2"}
    assert _runs.form_overrides('{"flag": "/tmp/x"}', shown) == {"flag": "/tmp/x"}
    assert _runs.form_overrides("  ", shown) == {}
    with pytest.raises(ValueError, match="not JSON"):
        _runs.form_overrides("{ref: 1}", shown)
    with pytest.raises(ValueError, match="JSON object"):
        _runs.form_overrides("[1]", shown)


def test_retry_refused_keeps_its_reason_and_run_through_pickle() -> None:
    """A refusal is a LedgerflowError with its reason, HTTP status and the run it names,
    and survives pickling (Airflow and multiprocessing pickle errors)."""
    error = RetryRefused("run x is already continued by y", reason="continued", run_id="d/y")
    again = pickle.loads(pickle.dumps(error))
    assert isinstance(again, RetryRefused) and isinstance(again, LedgerflowError)
    assert (again.reason, again.run_id, again.http_status, str(again)) == (
        "continued",
        "d/y",
        409,
        "run x is already continued by y",
    )
    assert RetryRefused("m", reason="not_newest").http_status == 409


def page(ledger: Ledger, run_id: str, retry: Standing | None) -> str:
    doc = runview.run_document(ledger, run_id)
    return _runs._page(
        "run",
        title="t",
        root="/ledgerflow",
        caller=Caller("admin", frozenset()),
        d=doc,
        csrf="f" * 64,
        retry=retry,
    )


def test_the_run_page_offers_retry_only_on_the_newest_failed_run(ledger: Ledger) -> None:
    """A failed, its retry B failed, B's retry C running: A's page offers no Retry and
    links the run that continues it (C); once C failed, A's page links C as the run to
    retry, and C's page has the form, its params box prefilled without engine keys and
    with secrets masked."""
    a = add_run(ledger, "a", "failed")
    b = add_run(ledger, "b", "failed", retry_of=a)
    c = add_run(ledger, "c", "running", retry_of=b)
    html = page(ledger, a, standing(ledger, a))
    assert 'id="retry-form"' not in html
    assert f'Continued by <a href="/ledgerflow/runs/{c}">{c}</a>' in notice(html)

    ledger.finish_run(c, "failed")
    html = page(ledger, a, standing(ledger, a))
    assert 'id="retry-form"' not in html
    assert f'retry <a href="/ledgerflow/runs/{c}">{c}</a> instead' in notice(html)
    html = page(ledger, c, standing(ledger, c))
    assert 'id="retry-form"' in html and 'id="retry-continued"' not in html
    box = html.split('id="retry-params"', 1)[1].split("</textarea>", 1)[0]
    assert "&#34;ref&#34;: &#34;r&#34;" in box and "ledgerflow_retry_of" not in box
    assert "t0p" not in html


def notice(html: str) -> str:
    assert 'id="retry-continued"' in html
    return html.split('id="retry-continued"', 1)[1].split("</p>", 1)[0]


def test_the_run_page_shows_the_params_a_retry_overrode(ledger: Ledger) -> None:
    """A retry run's page says which params it overrode (from its run_started event)."""
    a = add_run(ledger, "a", "failed")
    b = add_run(ledger, "b", "running", retry_of=a)
    ledger.record_event(b, None, "run_started", {"trigger": "retry", "params": {"ref": "new"}})
    html = page(ledger, b, None)
    assert 'id="params-overridden"' in html and "&#34;ref&#34;: &#34;new&#34;" in html
