"""LLM steps against a real loopback OpenAI chat-completions server and a real ledger.

The server (``ledgerflow.testing.openai_peer``) is reached through a ``pydanticai``
connection, common.ai's hook and pydantic-ai's OpenAI model: nothing is mocked. Requests
are counted at the server.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.errors import InjectedFault, NonRetryableError
from ledgerflow.ledger import llm as calls
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import LlmStep, WorkflowSpec
from ledgerflow.steps.llm import LlmResult, execute_llm_step
from ledgerflow.steps.protocol import RunRef
from ledgerflow.testing.openai_peer import OpenAIPeer
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRIAGE = ROOT / "dags" / "workflows" / "ticket_triage" / "v1.yaml"
SECRET = "sk-loopback-test"

GOOD = json.dumps(
    {"category": "billing", "priority": "high", "summary": "Charged twice.", "confidence": 0.95}
)
UNSURE = json.dumps(
    {"category": "billing", "priority": "low", "summary": "Maybe billing.", "confidence": 0.3}
)


@pytest.fixture
def peer() -> Iterator[OpenAIPeer]:
    with OpenAIPeer() as peer:
        yield peer


@pytest.fixture
def triage(peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch) -> WorkflowSpec:
    monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_LLM", peer.connection_uri())
    return load_workflow(TRIAGE)


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def classify(
    ledger: Ledger,
    spec: WorkflowSpec,
    ticket_id: str,
    *,
    run: str | None = None,
    try_number: int = 1,
    retry_of: str | None = None,
    step_id: str = "classify",
) -> LlmResult:
    step = spec.step(step_id)
    assert isinstance(step, LlmStep)
    return execute_llm_step(
        ledger,
        spec,
        step,
        RunRef(
            run_id=f"ticket_triage__v1/{run or ticket_id}",
            dag_id="ticket_triage__v1",
            retry_of=retry_of,
        ),
        params={"ticket_id": ticket_id, "ticket": "I was charged twice for order 1001."},
        try_number=try_number,
        max_attempts=3,
    )


def only_call(ledger: Ledger, ticket_id: str) -> calls.LlmCall:
    found = calls.calls(ledger, f"ticket_triage__v1/{ticket_id}")
    assert len(found) == 1
    return found[0]


def test_valid_json_takes_the_main_path(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """One valid answer: main path, the validated output is the checkpoint, one request,
    and the ledger has the rendered prompt, model, raw response, tokens and path."""
    peer.script("T-valid", GOOD)
    result = classify(ledger, triage, "T-valid")
    assert (result.path, result.reason) == ("main", None)
    assert result.output == json.loads(GOOD)
    assert peer.calls("T-valid") == 1
    assert ledger.outputs("ticket_triage__v1/T-valid")["classify"] == {
        "status": "completed",
        "output": json.loads(GOOD),
    }
    row = only_call(ledger, "T-valid")
    assert row.status == "valid" and row.path == "main" and row.errors == []
    assert row.responses == [GOOD] and row.output == json.loads(GOOD)
    assert row.prompt.startswith("Classify support ticket T-valid.")
    assert row.model == "openai:gpt-4o-mini"
    assert row.requests == 1 and row.input_tokens > 0 and row.output_tokens > 0


def test_malformed_json_is_repaired(ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer) -> None:
    """Malformed JSON is sent back with the parse error once; the valid second answer takes
    the main path; both raw answers and the repaired error are recorded."""
    peer.script("T-repair", "Sure! {category: billing", GOOD)
    result = classify(ledger, triage, "T-repair")
    assert result.path == "main" and result.output == json.loads(GOOD)
    assert peer.calls("T-repair") == 2
    row = only_call(ledger, "T-repair")
    assert row.responses == ["Sure! {category: billing", GOOD]
    assert len(row.errors) == 1 and "Invalid JSON" in row.errors[0]
    # The repair request carried the validation error back to the model.
    repair = [b for b in peer.bodies if "T-repair" in json.dumps(b)][-1]
    assert "Invalid JSON" in json.dumps(repair["messages"])


def test_still_malformed_takes_the_fallback_with_errors(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """Invalid after the one repair: fallback path, the errors of both answers in the
    ledger, and the checkpoint holds the fallback info for the branch to read."""
    peer.script("T-bad", "{not json", '{"category": "weird"}')
    result = classify(ledger, triage, "T-bad")
    assert result.path == "fallback"
    assert peer.calls("T-bad") == 2
    row = only_call(ledger, "T-bad")
    assert row.status == "invalid" and row.path == "fallback" and row.output is None
    assert len(row.errors) == 2
    assert "Invalid JSON" in row.errors[0]
    assert (
        "'weird' is not one of" in row.errors[1] and "'confidence' is a required" in row.errors[1]
    )
    assert result.output["fallback"] is True and result.output["errors"] == row.errors
    assert result.reason is not None and "after 1 repair attempt(s)" in result.reason


def test_failed_check_takes_the_fallback_with_the_reason(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """A valid answer with confidence 0.3 fails the confidence check: fallback, with the
    check's message as the recorded reason and the answer kept."""
    peer.script("T-unsure", UNSURE)
    result = classify(ledger, triage, "T-unsure")
    assert result.path == "fallback"
    assert result.reason == "check failed: confidence below 0.7"
    assert result.output["output"] == json.loads(UNSURE)
    row = only_call(ledger, "T-unsure")
    assert row.status == "valid" and row.path == "fallback" and row.reason == result.reason
    assert peer.calls("T-unsure") == 1


def test_task_retry_after_the_commit_makes_no_second_request(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task dies right after the answer and the checkpoint committed (before Airflow
    heard of it); its retry reuses them: zero extra requests at the server, same output."""
    peer.script("T-crash", GOOD)
    monkeypatch.setenv("LEDGERFLOW_FAULT", "after_commit@classify:raise")
    with pytest.raises(InjectedFault):
        classify(ledger, triage, "T-crash")
    assert peer.calls("T-crash") == 1
    monkeypatch.delenv("LEDGERFLOW_FAULT")
    result = classify(ledger, triage, "T-crash", try_number=2)
    assert result.call_reused and result.path == "main" and result.output == json.loads(GOOD)
    assert peer.calls("T-crash") == 1
    assert len(calls.calls(ledger, "ticket_triage__v1/T-crash")) == 1


def test_crash_before_the_commit_leaves_nothing_half_recorded(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between the answer and its commit records neither the answer nor the
    checkpoint; the retry asks once more and records exactly one call."""
    peer.script("T-early", GOOD)
    monkeypatch.setenv("LEDGERFLOW_FAULT", "before_commit@classify:raise")
    with pytest.raises(InjectedFault):
        classify(ledger, triage, "T-early")
    assert calls.calls(ledger, "ticket_triage__v1/T-early") == []
    assert ledger.outputs("ticket_triage__v1/T-early")["classify"]["status"] == "running"
    monkeypatch.delenv("LEDGERFLOW_FAULT")
    result = classify(ledger, triage, "T-early", try_number=2)
    assert result.path == "main" and peer.calls("T-early") == 2
    assert len(calls.calls(ledger, "ticket_triage__v1/T-early")) == 1
    statuses = [a["status"] for a in ledger.attempts("ticket_triage__v1/T-early", "classify")]
    assert statuses == ["lost", "completed"]


def test_completed_step_retried_is_reused(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """A completed step run again (a cleared task) reuses its checkpoint and its path."""
    peer.script("T-again", UNSURE)
    first = classify(ledger, triage, "T-again")
    again = classify(ledger, triage, "T-again", try_number=2)
    assert again.status == "reused" and again.path == first.path == "fallback"
    assert again.output == first.output and again.reason == first.reason
    assert peer.calls("T-again") == 1


def test_retry_run_reuses_the_answer_of_the_run_it_retries(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """A retry run (retry_of) reuses the completed answer of the run it retries (its
    retry chain's checkpoint): no request is made, the output is the same."""
    peer.script("T-lineage", GOOD)
    classify(ledger, triage, "T-lineage")
    retry = classify(
        ledger, triage, "T-lineage", run="T-lineage-retry", retry_of="ticket_triage__v1/T-lineage"
    )
    assert retry.call_reused and retry.path == "main"
    assert peer.calls("T-lineage") == 1
    assert ledger.outputs("ticket_triage__v1/T-lineage-retry")["classify"]["output"] == json.loads(
        GOOD
    )


def test_transport_error_is_not_cached_and_the_retry_calls_again(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """An HTTP error from the provider fails the attempt (retryable; the key it echoed is
    masked) and records no answer; the next try asks again and succeeds."""
    from ledgerflow.steps.llm import LlmCallFailed

    peer.script(
        "T-down", (400, {"error": {"message": f"overloaded, key {SECRET}", "type": "x"}}), GOOD
    )
    with pytest.raises(LlmCallFailed, match="overloaded") as info:
        classify(ledger, triage, "T-down")
    assert SECRET not in str(info.value)
    (attempt,) = ledger.attempts("ticket_triage__v1/T-down", "classify")
    assert "overloaded, key ***" in attempt["error"] and SECRET not in attempt["error"]
    assert calls.calls(ledger, "ticket_triage__v1/T-down") == []
    assert ledger.outputs("ticket_triage__v1/T-down")["classify"]["status"] == "retrying"
    result = classify(ledger, triage, "T-down", try_number=2)
    assert result.path == "main" and peer.calls("T-down") == 2


def test_custom_key_shares_one_answer_across_runs(
    ledger: Ledger, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two runs whose idempotency key renders the same make one request; without
    on_invalid an invalid answer fails the step, non-retryable, with a dead letter."""
    monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_LLM", peer.connection_uri())
    source = TRIAGE.read_text().replace(
        "    on_invalid: classify_rules\n", '    idempotency: {key: "{{ params.ticket_id }}"}\n'
    )
    path = tmp_path / "ticket_triage" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(source)
    spec = load_workflow(path)
    peer.script("T-shared", UNSURE)
    with pytest.raises(NonRetryableError, match=r"confidence below 0\.7"):
        classify(ledger, spec, "T-shared", run="shared-a")
    with pytest.raises(NonRetryableError):
        classify(ledger, spec, "T-shared", run="shared-b")
    assert peer.calls("T-shared") == 1
    letters = [d for d in ledger.dead_letters() if d["run_id"].endswith("/shared-b")]
    assert len(letters) == 1 and "confidence below 0.7" in letters[0]["error"]


def test_no_secret_reaches_the_ledger(
    ledger: Ledger, triage: WorkflowSpec, peer: OpenAIPeer
) -> None:
    """The connection's API key appears in no ledger row (it did reach the server)."""
    peer.script("T-secret", "nope", GOOD)
    classify(ledger, triage, "T-secret")
    rows: list[Any] = []
    with ledger.engine.connect() as conn:
        for table in ("lf_llm_calls", "lf_steps", "lf_attempts", "lf_events", "lf_runs"):
            rows += [str(tuple(r)) for r in conn.execute(text(f"SELECT * FROM {table}"))]
    assert rows and not [r for r in rows if SECRET in r]


def test_provider_failover_from_common_ai(
    ledger: Ledger, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A connection with ``fallback_conn_ids`` (common.ai) fails over to the next provider
    when the first answers an API error; the step takes the main path with the backup's
    answer and records one call."""
    with OpenAIPeer() as backup:
        primary = json.loads(peer.connection_uri())
        primary["extra"]["fallback_conn_ids"] = ["lf_it_backup"]
        monkeypatch.setenv("AIRFLOW_CONN_LF_IT_PRIMARY", json.dumps(primary))
        monkeypatch.setenv("AIRFLOW_CONN_LF_IT_BACKUP", backup.connection_uri())
        path = tmp_path / "ticket_triage" / "v1.yaml"
        path.parent.mkdir()
        path.write_text(
            TRIAGE.read_text().replace("conn_id: ledgerflow_llm", "conn_id: lf_it_primary")
        )
        spec = load_workflow(path)
        peer.script("T-failover", (400, {"error": {"message": "quota", "type": "x"}}))
        backup.script("T-failover", GOOD)
        result = classify(ledger, spec, "T-failover")
        assert result.path == "main" and result.output == json.loads(GOOD)
        assert (peer.calls("T-failover"), backup.calls("T-failover")) == (1, 1)
        assert only_call(ledger, "T-failover").requests == 1


def test_cli_show_lists_the_llm_calls(
    ledger: Ledger,
    triage: WorkflowSpec,
    peer: OpenAIPeer,
    ledger_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ledgerflow show RUN --json`` includes the run's LLM calls with their errors and path."""
    from ledgerflow.cli import main

    peer.script("T-show", "{nope", GOOD)
    classify(ledger, triage, "T-show")
    capsys.readouterr()
    assert main(["show", "ticket_triage__v1/T-show", "--url", ledger_url, "--json"]) == 0
    (call,) = json.loads(capsys.readouterr().out)["llm_calls"]
    assert call["path"] == "main" and call["requests"] == 2 and len(call["errors"]) == 1


def _variant(tmp_path: Path, old: str, new: str) -> WorkflowSpec:
    source = TRIAGE.read_text()
    assert old in source
    path = tmp_path / "ticket_triage" / "v1.yaml"
    path.parent.mkdir()
    path.write_text(source.replace(old, new))
    return load_workflow(path)


SCHEMA_BLOCK = TRIAGE.read_text().split("    output_schema:\n")[1].split("    model_settings:")[0]


def test_registered_output_model_validates_and_repairs(
    ledger: Ledger, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With ``output_model: demo.ticket_triage`` the registered pydantic model validates the
    answer: an out-of-range confidence is sent back with pydantic's error, then fits."""
    monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_LLM", peer.connection_uri())
    spec = _variant(
        tmp_path,
        "    output_schema:\n" + SCHEMA_BLOCK,
        "    output_model: demo.ticket_triage\n",
    )
    too_sure = json.dumps({**json.loads(GOOD), "confidence": 7})
    peer.script("T-model", too_sure, GOOD)
    result = classify(ledger, spec, "T-model")
    assert result.path == "main" and result.output == json.loads(GOOD)
    row = only_call(ledger, "T-model")
    assert row.responses == [too_sure, GOOD]
    assert len(row.errors) == 1 and "confidence" in row.errors[0]


def test_native_output_mode_asks_for_the_json_schema(
    ledger: Ledger, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``output_mode: native`` sends the schema as the provider's structured-output
    response format; the answer is validated the same way."""
    monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_LLM", peer.connection_uri())
    spec = _variant(tmp_path, "    repair_attempts: 1\n", "    output_mode: native\n")
    peer.script("T-native", GOOD)
    assert classify(ledger, spec, "T-native").path == "main"
    (body,) = [b for b in peer.bodies if "T-native" in json.dumps(b)]
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["category", "priority", "summary", "confidence"]
