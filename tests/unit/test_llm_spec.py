"""The llm step kind: its spec, its validation errors, the rules model, the path decision."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import SpecError
from ledgerflow.spec.models import LlmStep, WorkflowSpec
from ledgerflow.workflow.validate import load_workflow, template_fields

ROOT = Path(__file__).resolve().parents[2]
TRIAGE = ROOT / "dags" / "workflows" / "ticket_triage" / "v1.yaml"

SCHEMA = """\
    output_schema:
      type: object
      properties:
        label: {type: string, enum: [spam, ham]}
        confidence: {type: number, minimum: 0, maximum: 1}
      required: [label, confidence]
"""


def workflow(llm_fields: str, *, extra_steps: str = "") -> str:
    """A workflow with one llm step ``ask`` (fields indented under it) and a ``fallback``."""
    steps = textwrap.dedent(
        """\
        name: wf
        version: 1
        params:
          text: {type: string, default: hello}
        steps:
          - id: ask
            kind: llm
            prompt: "Is this spam? {{ params.text }}"
        """
    )
    steps += textwrap.indent(textwrap.dedent(llm_fields), "    ")
    steps += "  - id: fallback\n    needs: [ask]\n    tool: demo.noop\n    idempotency: natural\n"
    return steps + textwrap.dedent(extra_steps)


def load(tmp_path: Path, text: str) -> WorkflowSpec:
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    return load_workflow(path)


def problem(tmp_path: Path, text: str, needle: str, fragment: str) -> str:
    """Load ``text``, expect a SpecError reported at the line containing ``needle``."""
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    line = next(n for n, row in enumerate(text.splitlines(), 1) if needle in row)
    report = str(info.value)
    hits = [r for r in report.splitlines() if f"{path}:{line}:" in r and fragment in r]
    assert hits, f"no {fragment!r} at line {line}; got:\n{report}"
    return hits[0]


def test_triage_example_loads_with_its_llm_step() -> None:
    """The shipped triage workflow is valid; its llm step branches to the rules classifier."""
    spec = load_workflow(TRIAGE)
    step = spec.step("classify")
    assert isinstance(step, LlmStep)
    assert step.on_invalid == "classify_rules" and step.branch_target == "classify_rules"
    assert step.repair_attempts == 1 and step.conn_id == "ledgerflow_llm"
    assert step.model_settings.temperature == 0 and step.model_settings.max_tokens == 300
    assert [c.function for c in step.checks if c.function] == ["demo.summary_is_not_the_ticket"]


def test_llm_defaults_and_templated_fields(tmp_path: Path) -> None:
    """repair_attempts defaults to 1; prompt, system prompt, key and check expressions are
    the step's templated fields (checks see ``output``)."""
    spec = load(
        tmp_path,
        workflow(
            SCHEMA
            + """\
    system_prompt: "Be brief, {{ params.text }}"
    idempotency: {key: "{{ params.text }}"}
    checks: ["output.confidence > 0.5"]
    on_invalid: fallback
"""
        ),
    )
    step = spec.step("ask")
    assert isinstance(step, LlmStep) and step.repair_attempts == 1
    paths = {path: expr for path, _source, expr in template_fields(step)}
    assert paths == {
        ("system_prompt",): False,
        ("prompt",): False,
        ("idempotency", "key"): False,
        ("checks", 0, "expr"): True,
    }


def test_both_schema_forms_is_an_error_at_the_line(tmp_path: Path) -> None:
    """output_schema and output_model together are refused, at the schema's line."""
    text = workflow(SCHEMA + "    output_model: demo.ticket_triage\n")
    problem(tmp_path, text, "output_schema:", "not both")


def test_no_schema_form_is_an_error(tmp_path: Path) -> None:
    """An llm step without an output schema or model is refused, naming both options."""
    text = workflow("    on_invalid: fallback\n")
    path = tmp_path / "wf.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="exactly one of output_schema") as info:
        load_workflow(path)
    assert str(info.value).startswith(f"{path}:")


def test_invalid_json_schema_is_an_error_at_the_line(tmp_path: Path) -> None:
    """A schema that is not JSON Schema (an unknown type) is refused where it is written."""
    text = workflow(
        """\
    output_schema:
      type: object
      properties:
        label: {type: strng}
"""
    )
    problem(tmp_path, text, "label: {type: strng}", "not a valid JSON Schema")


def test_schema_must_describe_an_object(tmp_path: Path) -> None:
    """The output is a JSON object: a schema of another type is refused."""
    text = workflow("    output_schema: {type: array, items: {type: string}}\n")
    problem(tmp_path, text, "output_schema:", "must describe an object")


def test_unknown_output_model_lists_the_registered_ones(tmp_path: Path) -> None:
    """A model name that is not registered is refused with the registered names (never an
    import path)."""
    text = workflow("    output_model: mypackage.models.Ticket\n")
    line = problem(tmp_path, text, "output_model:", "unknown output model")
    assert "demo.ticket_triage" in line


def test_unknown_check_function_is_an_error(tmp_path: Path) -> None:
    """A check naming an unregistered function is refused at its line."""
    text = workflow(SCHEMA + "    checks:\n      - {function: nope.check}\n")
    problem(tmp_path, text, "nope.check", "unknown check")


def test_check_is_expression_or_function_not_both(tmp_path: Path) -> None:
    """A check with both an expression and a function is refused."""
    text = workflow(
        SCHEMA
        + "    checks:\n      - {expr: 'output.label', function: demo.summary_is_not_the_ticket}\n"
    )
    problem(tmp_path, text, "function: demo.summary", "either an expression")


def test_output_is_a_name_only_in_checks(tmp_path: Path) -> None:
    """``output`` is known in a check, not in the prompt (it does not exist yet)."""
    load(tmp_path, workflow(SCHEMA + "    checks: ['output.label == \"ham\"']\n"))
    text = workflow(SCHEMA).replace("{{ params.text }}", "{{ output.label }}")
    problem(tmp_path, text, "prompt:", "unknown name 'output'")


def test_on_invalid_must_be_a_dependant(tmp_path: Path) -> None:
    """on_invalid must name a step that needs the llm step."""
    text = workflow(SCHEMA + "    on_invalid: elsewhere\n")
    problem(tmp_path, text, "on_invalid:", "unknown step 'elsewhere'")


def test_bad_model_settings_are_refused(tmp_path: Path) -> None:
    """A temperature out of range and a negative repair count are errors at their lines."""
    text = workflow(SCHEMA + "    model_settings: {temperature: 7}\n    repair_attempts: -1\n")
    problem(tmp_path, text, "temperature: 7", "temperature")


# ------------------------------------------------------------------- the rules model


def test_rules_model_answers_fit_the_triage_schema() -> None:
    """The offline rule-based model is deterministic and its answers fit the schema."""
    from jsonschema import Draft202012Validator

    from ledgerflow.rules_model import classify

    step = load_workflow(TRIAGE).step("classify")
    assert isinstance(step, LlmStep) and step.output_schema is not None
    schema = dict(step.output_schema)
    billing = classify("Ticket 1.\n\nI was charged twice, please refund me.", schema)
    assert billing == classify("Ticket 1.\n\nI was charged twice, please refund me.", schema)
    assert billing["category"] == "billing" and billing["priority"] == "high"
    assert billing["confidence"] >= 0.7
    vague = classify("Ticket 2.\n\nHello there.", schema)
    assert vague["category"] == "other" and vague["confidence"] < 0.7
    for answer in (billing, vague):
        assert not list(Draft202012Validator(schema).iter_errors(answer))


def test_rules_model_runs_through_pydantic_ai(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``pydanticai`` connection whose model is ``ledgerflow:rules`` answers offline through
    common.ai's hook and pydantic-ai, with valid output and token counts."""
    from ledgerflow.llm.call import build_agent, call_model
    from ledgerflow.llm.local import LedgerflowAIHook

    monkeypatch.setenv(
        "AIRFLOW_CONN_UNIT_RULES",
        json.dumps({"conn_type": "pydanticai", "extra": {"model": "ledgerflow:rules"}}),
    )
    step = load_workflow(TRIAGE).step("classify")
    assert isinstance(step, LlmStep)
    hook = LedgerflowAIHook(llm_conn_id="unit_rules")
    outcome = call_model(
        build_agent(hook, step, "triage"), "Ticket 3.\n\nThe app shows an error and crashes."
    )
    assert outcome.valid and outcome.output["category"] == "technical"
    assert outcome.requests == 1 and outcome.input_tokens > 0 and outcome.output_tokens > 0
    assert json.loads(outcome.responses[0]) == outcome.output


# ------------------------------------------------------------------- path decision


def _step(tmp_path: Path, checks: str) -> LlmStep:
    spec = load(tmp_path, workflow(SCHEMA + checks + "    on_invalid: fallback\n"))
    step = spec.step("ask")
    assert isinstance(step, LlmStep)
    return step


def test_decide_main_when_valid_and_checks_pass(tmp_path: Path) -> None:
    """Valid output that passes every check takes the main path and is the step output."""
    from ledgerflow.steps.llm import decide

    step = _step(tmp_path, "    checks: ['output.confidence >= 0.7']\n")
    output: dict[str, Any] = {"label": "ham", "confidence": 0.9}
    assert decide(step, "valid", output, [], {}) == ("main", None, output)


def test_decide_fallback_on_failed_check_records_reason(tmp_path: Path) -> None:
    """A failed check takes the fallback with the check's message as the reason."""
    from ledgerflow.steps.llm import decide

    step = _step(
        tmp_path,
        "    checks:\n      - {expr: 'output.confidence >= 0.7', message: too unsure}\n"
        "      - \"output.label in ['spam', 'ham']\"\n",
    )
    path, reason, info = decide(step, "valid", {"label": "ham", "confidence": 0.2}, [], {})
    assert path == "fallback" and reason == "check failed: too unsure"
    assert info["fallback"] is True and info["output"]["confidence"] == 0.2


def test_decide_fallback_on_invalid_output_keeps_errors(tmp_path: Path) -> None:
    """Output still invalid after the repairs takes the fallback with every error kept."""
    from ledgerflow.steps.llm import decide

    step = _step(tmp_path, "")
    path, reason, info = decide(step, "invalid", None, ["bad json", "missing label"], {})
    assert path == "fallback" and reason is not None and "missing label" in reason
    assert info["errors"] == ["bad json", "missing label"] and info["output"] is None


def test_check_function_message_and_error_count_as_failures(tmp_path: Path) -> None:
    """A check function returning a message, or a check raising, fails with a reason."""
    from ledgerflow.steps.llm import failed_checks

    step = _step(
        tmp_path,
        "    checks:\n      - {function: demo.summary_is_not_the_ticket}\n"
        "      - 'output.missing.deeper > 1'\n",
    )
    failed = failed_checks(step, {"summary": "x" * 250, "label": "ham"}, {})
    assert len(failed) == 2
    assert "summary too long (250 characters)" in failed[0]
    assert failed[1].startswith("output.missing.deeper > 1 (")


def test_parsing_the_triage_dag_does_not_load_pydantic_ai() -> None:
    """DAG-file parse time: building a workflow with an llm step imports neither
    pydantic-ai nor the OpenAI SDK (they load only when the step runs)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ledgerflow.factory import dag_for_spec_file\n"
        f"dag = dag_for_spec_file({str(TRIAGE.with_suffix('.py'))!r})\n"
        "assert dag.task_ids == ['classify', 'route', 'classify_rules', 'close'], dag.task_ids\n"
        "print(sorted(m for m in ('pydantic_ai', 'openai', 'httpx2') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
