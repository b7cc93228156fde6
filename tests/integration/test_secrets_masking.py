"""Connection secrets never reach the ledger: real SQLite and Postgres, a real HTTP peer
that echoes the request's credentials, Airflow's own secrets masker."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from ledgerflow import secrets
from ledgerflow.errors import ToolError
from ledgerflow.ledger.store import Ledger
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.testing.echo_peer import EchoPeer
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

LOGIN = "canary-user"
PASSWORD = "canary-pw-7f3a9c41"
API_KEY = "canary-key-51d0e2b8"
BASIC = base64.b64encode(f"{LOGIN}:{PASSWORD}".encode()).decode()
CANARIES = {"password": PASSWORD, "api key": API_KEY, "basic value": BASIC}

WORKFLOW = """
name: canary
version: 1
params:
  path: {type: string, default: ok}
steps:
  - id: call
    tool: http
    args: {url: "/{{ params.path }}", conn_id: canary_http, json: {n: 1}}
    idempotency: {key: "{{ params.path }}-{{ run.id }}"}
"""


def maskers() -> list[Any]:
    from airflow._shared.secrets_masker import _secrets_masker as core
    from airflow.sdk._shared.secrets_masker import _secrets_masker as sdk

    return [sdk(), core()]


@pytest.fixture(params=["headers", "top-level"])
def echo(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[EchoPeer]:
    """The connection's headers as ``extra.headers``, or as top-level extras (HttpHook's
    form): masked either way."""
    headers = {"X-Api-Key": API_KEY, "Content-Type": "application/json"}
    extra = {"headers": headers} if request.param == "headers" else headers
    with EchoPeer() as peer:
        port = peer.url.rsplit(":", 1)[1]
        conn = {
            "conn_type": "http",
            "host": "127.0.0.1",
            "port": int(port),
            "login": LOGIN,
            "password": PASSWORD,
            "extra": extra,
        }
        monkeypatch.setenv("AIRFLOW_CONN_CANARY_HTTP", json.dumps(conn))
        yield peer


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def stored_text(ledger: Ledger) -> dict[str, str]:
    """Every row of every table of the ledger's database, as text, by table."""
    out: dict[str, str] = {}
    with ledger.engine.connect() as conn:
        for name in inspect(conn).get_table_names():
            rows = conn.execute(text(f'SELECT * FROM "{name}"')).all()
            out[name] = "\n".join(repr(tuple(r)) for r in rows)
    return out


def leaks(ledger: Ledger) -> list[tuple[str, str]]:
    return [
        (what, table)
        for table, body in stored_text(ledger).items()
        for what, value in CANARIES.items()
        if value in body
    ]


def test_an_echoing_peer_leaves_no_credential_in_any_table(
    ledger: Ledger, echo: EchoPeer, masker: None, tmp_path: Path
) -> None:
    """A peer that echoes the request's headers, in a 500 (the error, the attempt, the
    dead letter, the events) and in a 200 (the output): the ledger holds none of the
    password, the API key or the encoded Basic value, while the peer did receive them."""
    path = tmp_path / "wf.yaml"
    path.write_text(WORKFLOW)
    spec = load_workflow(path)
    step = spec.steps[0]
    with pytest.raises(ToolError, match="HTTP 500"):
        execute_step(
            ledger, spec, step, RunRef("canary__v1/f", "canary__v1"), params={"path": "fail"}
        )
    ok = execute_step(
        ledger, spec, step, RunRef("canary__v1/o", "canary__v1"), params={"path": "ok"}
    )
    assert ok.status == "completed"
    assert {h["authorization"] for h in echo.seen} == {f"Basic {BASIC}"}
    assert {h["x-api-key"] for h in echo.seen} == {API_KEY}
    letters = [d for d in ledger.dead_letters() if d["run_id"] == "canary__v1/f"]
    assert len(letters) == 1 and "***" in letters[0]["error"]
    assert leaks(ledger) == []
    # What is not a secret is kept as it was (the 200's echo, in the step's output).
    assert ok.output["body"]["echo"]["content-type"] == "application/json"
    assert '"content-type":"application/json"' in "".join(stored_text(ledger).values())


def test_every_writer_passes_the_masker(ledger: Ledger, masker: None) -> None:
    """A secret registered with Airflow's masker is masked in whatever is written, by any
    method (an event written directly here), in JSON and in plain text columns alike."""
    from airflow.sdk.log import mask_secret

    mask_secret(PASSWORD)
    ledger.record_event("r/1", "s", "note", {"said": f"the password is {PASSWORD}!"})
    (event,) = ledger.events("r/1")
    assert event["data"] == {"said": "the password is ***!"}
    assert leaks(ledger) == []


def test_with_nothing_registered_values_pass_unchanged(ledger: Ledger, masker: None) -> None:
    """An empty masker changes nothing (the statement's parameters are the very objects
    given), and a string that only looks secret by its key is kept."""
    for mask in maskers():
        mask.reset_masker()
    params = {"a": "password=hunter22", "b": [1, "x"]}
    assert secrets._scrub_parameters(None, None, "SELECT 1", params, None, False)[1] is params
    ledger.record_event("r/2", "s", "note", {"password": "hunter22"})
    assert ledger.events("r/2")[0]["data"] == {"password": "hunter22"}


def test_the_http_tool_registers_what_it_sends(echo: EchoPeer, masker: None) -> None:
    """Reading a connection for an HTTP call registers the password, the header values and
    the encoded Basic value; public headers (Content-Type) stay readable."""
    from airflow.sdk._shared.secrets_masker import redact

    from ledgerflow.tools.builtin import http
    from ledgerflow.tools.context import ToolContext

    ctx = ToolContext("r/3", "s", "w", 1, 1, "key-3")
    answer = http(ctx, "/ok", conn_id="canary_http")
    assert answer["status"] == 200
    shown = redact(json.dumps(answer["body"]))
    for value in CANARIES.values():
        assert value not in shown
    assert "application/json" in shown and "key-3" in shown


def test_a_json_escaped_secret_is_masked_as_stored(ledger: Ledger, masker: None) -> None:
    """A registered value with characters JSON escapes (a quote, a backslash) is masked in
    the stored JSON too."""
    secrets.mask_http_credentials(login=None, password=None, headers={"X-Token": 'ab"c\\def'})
    ledger.record_event("r/4", "s", "note", {"v": 'ab"c\\def'})
    with ledger.engine.connect() as conn:
        from ledgerflow.ledger import schema as t

        stored = conn.execute(select(t.events.c.data).where(t.events.c.run_id == "r/4")).scalar()
    assert 'ab\\"c\\\\def' not in stored and "***" in stored


def test_an_error_and_its_cause_are_scrubbed(masker: None) -> None:
    """The message of an error leaving a step, and of its cause and context, loses every
    registered secret; its type and its other words stay."""
    from airflow.sdk.log import mask_secret

    mask_secret(API_KEY)
    try:
        try:
            raise ValueError(f"key {API_KEY} refused")
        except ValueError as inner:
            raise ToolError(f"HTTP 500: {API_KEY}") from inner
    except ToolError as error:
        assert secrets.scrub_exception(error) is error
        assert str(error) == "HTTP 500: ***"
        assert isinstance(error.__cause__, ValueError)
        assert str(error.__cause__) == "key *** refused"


def test_a_secret_known_to_either_masker_alone_is_masked(ledger: Ledger, masker: None) -> None:
    """Each of Airflow's two maskers (the Task SDK's, core's) may know secrets the other
    does not: a value holding one of each loses both, a statement holding neither is
    passed on as it was given, and a secret registered after earlier writes is masked in
    the writes that follow (the one-pattern screen follows the maskers)."""
    sdk, core = maskers()
    for mask in (sdk, core):
        mask.reset_masker()
    only_sdk, only_core, later = "sdk-only-5b1e9a", "core-only-c07d42", "later-secret-e9a3"
    sdk.add_mask(only_sdk)
    core.add_mask(only_core)
    ledger.record_event("r/5", "s", "note", {"both": f"{only_sdk} and {only_core}"})
    clean = {"a": "nothing secret here", "b": 3}
    assert secrets._scrub_parameters(None, None, "SELECT 1", clean, None, False)[1] is clean
    core.add_mask(later)
    ledger.record_event("r/5", "s", "note", {"later": f"x{later}x", "key": only_sdk})
    data = [e["data"] for e in ledger.events("r/5")]
    assert data == [{"both": "*** and ***"}, {"later": "x***x", "key": "***"}]
    stored = "".join(stored_text(ledger).values())
    assert [v for v in (only_sdk, only_core, later) if v in stored] == []
