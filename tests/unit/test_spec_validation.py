"""Hostile and broken workflow files: every problem is a SpecError naming file, line and field.

``load_workflow`` is the single entry point of ``ledgerflow validate`` and of the DAG factory, so
whatever it lets through reaches Airflow, and whatever other exception type it raises escapes the
"one bad file is one import error naming file:line: field" contract.
"""

from __future__ import annotations

import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledgerflow.errors import SpecError, SpecErrors
from ledgerflow.spec.models import KeyedIdempotency, WorkflowSpec
from ledgerflow.workflow.validate import load_workflow

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = ROOT / "dags" / "workflows" / "checkout" / "v1.yaml"
NO_IDEMPOTENCY = "refuses to run a step that has not declared how it handles retry"


def _text(source: str) -> str:
    return textwrap.dedent(source).lstrip("\n")


def _write(tmp_path: Path, source: str, name: str = "wf.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_text(source), encoding="utf-8")
    return path


@dataclass
class Failure:
    path: Path
    text: str
    error: SpecError

    def line(self, needle: str, nth: int = 1) -> int:
        """1-based line of the ``nth`` line of the file containing ``needle``."""
        found = [n for n, line in enumerate(self.text.splitlines(), start=1) if needle in line]
        assert len(found) >= nth, f"{needle!r} is not {nth} times in the test's own YAML"
        return found[nth - 1]

    def expect(self, needle: str, field: str | None, fragment: str, nth: int = 1) -> str:
        """Assert one reported problem is at ``needle``'s line, on ``field``, saying ``fragment``."""
        line = self.line(needle, nth)
        prefix = f"{self.path}:{line}: " + (f"{field}: " if field else "")
        report = str(self.error)
        hits = [entry for entry in report.splitlines() if prefix in entry]
        assert hits, f"no problem reported at {prefix!r}; got:\n{report}"
        assert any(fragment in hit for hit in hits), f"{fragment!r} not in {hits}"
        return next(hit for hit in hits if fragment in hit)


def fail(tmp_path: Path, source: str, name: str = "wf.yaml") -> Failure:
    """Write ``source``, load it, and return the SpecError (any other exception fails the test)."""
    path = _write(tmp_path, source, name)
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    return Failure(path, _text(source), info.value)


def ok(tmp_path: Path, source: str, name: str = "wf.yaml") -> WorkflowSpec:
    return load_workflow(_write(tmp_path, source, name))


# --------------------------------------------------------------------------- unsafe / bad YAML


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/module:os",
    ],
)
def test_unsafe_python_tags_are_refused_and_never_executed(tmp_path: Path, tag: str) -> None:
    """A ``!!python/...`` tag is refused as unsafe at its line, and the named code never runs."""
    marker = tmp_path / "pwned"
    failure = fail(
        tmp_path,
        f"""
        name: wf
        version: 1
        payload: {tag.format(marker=marker)}
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
    )
    failure.expect("payload:", None, "unsafe or unknown YAML tag refused")
    assert not marker.exists()


def test_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    """A YAML syntax error is a SpecError at the line the parser stopped on."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        description: a: b
        steps: []
        """,
    )
    failure.expect("description:", None, "mapping values are not allowed")


@pytest.mark.parametrize("source", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, source: str) -> None:
    """An empty (or comment-only) file is a SpecError 'the file is empty' at line 1."""
    path = tmp_path / "wf.yaml"
    path.write_text(source, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    assert str(info.value) == f"{path}:1: the file is empty"


@pytest.mark.parametrize("source", ["- name: wf\n- version: 1\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, source: str) -> None:
    """A file whose top level is a list or a scalar is refused at line 1."""
    path = tmp_path / "wf.yaml"
    path.write_text(source, encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    assert str(info.value).startswith(f"{path}:1: ")
    assert "must be a mapping" in str(info.value)


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    """A repeated mapping key is refused (not silently last-wins) at the second key's line."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        version: 2
        """,
    )
    failure.expect("version: 2", "version", "duplicate key 'version'")


def test_duplicate_key_inside_a_step(tmp_path: Path) -> None:
    """A repeated key inside a step is refused at the line of the repetition."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
            tool: http
        """,
    )
    failure.expect("tool: http", "tool", "duplicate key 'tool'")


# --------------------------------------------------------------------------- model-level problems

MODEL_CASES = [
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        retires: 3
        """,
        "retires:",
        "retires",
        "unknown field",
        id="unknown-top-level-field",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            tool: demo.noop
            idempotency: natural
            retires: 3
        """,
        "retires:",
        "steps[1].retires",
        "unknown field",
        id="unknown-step-field",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            tool: demo.noop
            idempotency: natural
            timeout: 5 parsecs
        """,
        "timeout:",
        "steps[1].timeout",
        "'5 parsecs' is not a duration",
        id="bad-duration",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        defaults:
          timeout: soon
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        "timeout:",
        "defaults.timeout",
        "'soon' is not a duration",
        id="bad-default-duration",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        params:
          size:
            type: string
            default: huge
            enum: [small, large]
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        "size:",
        "params.size",
        "default 'huge' is not one of enum",
        id="param-default-not-in-enum",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            tool: demo.noop
            idempotency: sometimes
        """,
        "idempotency: sometimes",
        "steps[1].idempotency",
        "'natural' or 'none'",
        id="bad-idempotency-word",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            tool: demo.noop
            idempotency: natural
            retry: {max_attempts: 0}
        """,
        "retry:",
        "steps[1].retry.max_attempts",
        "greater than or equal to 1",
        id="retry-max-attempts-zero",
    ),
    pytest.param(
        """
        name: Not A Name
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        "name:",
        "name",
        "should match pattern",
        id="bad-workflow-name",
    ),
]


@pytest.mark.parametrize(("source", "needle", "field", "fragment"), MODEL_CASES)
def test_model_problem_is_reported_at_its_line_and_field(
    tmp_path: Path, source: str, needle: str, field: str, fragment: str
) -> None:
    """A field-level problem is a SpecError on ``file:line: field`` with a readable message."""
    failure = fail(tmp_path, source)
    assert isinstance(failure.error, SpecErrors)
    failure.expect(needle, field, fragment)


def test_unknown_step_kind(tmp_path: Path) -> None:
    """A step with an unknown ``kind`` is refused on that step, listing the known kinds."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            kind: robot
            tool: demo.noop
            idempotency: natural
        """,
    )
    report = str(failure.error)
    assert f"{failure.path}:{failure.line('- id: a')}: steps[0]" in report or (
        f"{failure.path}:{failure.line('kind:')}: steps[0].kind" in report
    )
    assert "unknown step kind" in report
    assert "known kinds: " in report and "tool" in report and "approval" in report


def test_unknown_step_kind_message_names_the_kind(tmp_path: Path) -> None:
    """The unknown-kind message quotes the kind itself: ``unknown step kind 'robot'``."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            kind: robot
            tool: demo.noop
            idempotency: natural
        """,
    )
    assert "unknown step kind 'robot'" in str(failure.error)


def test_a_single_bad_step_is_reported_once(tmp_path: Path) -> None:
    """A one-step file with one typo reports exactly one problem (no false 'no steps' error)."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
            retires: 3
        """,
    )
    assert isinstance(failure.error, SpecErrors)
    assert [e.field for e in failure.error.errors] == ["steps[0].retires"], str(failure.error)


# --------------------------------------------------------------------------- graph

GRAPH_CASES = [
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        "- id: a",
        "steps[1].id",
        "duplicate step id 'a' (first used by steps[0])",
        id="duplicate-step-id",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            needs: [a, ghost]
            tool: demo.noop
            idempotency: natural
        """,
        "needs: [a, ghost]",
        "steps[1].needs[1]",
        "unknown step 'ghost' in needs",
        id="unknown-needs",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            needs: a
            tool: demo.noop
            idempotency: natural
        """,
        "needs: a",
        "steps[0].needs[0]",
        "a step cannot need itself",
        id="needs-itself",
    ),
]


@pytest.mark.parametrize(("source", "needle", "field", "fragment"), GRAPH_CASES)
def test_graph_problem(tmp_path: Path, source: str, needle: str, field: str, fragment: str) -> None:
    """Step-graph problems are SpecErrors naming the offending step field and its line."""
    # The duplicate id is reported at the second ``- id: a``, every other problem at the first.
    nth = 2 if field == "steps[1].id" else 1
    fail(tmp_path, source).expect(needle, field, fragment, nth=nth)


def test_three_step_cycle(tmp_path: Path) -> None:
    """A cycle a -> b -> c -> a is refused, naming every step of the cycle."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            needs: [c]
            tool: demo.noop
            idempotency: natural
          - id: b
            needs: [a]
            tool: demo.noop
            idempotency: natural
          - id: c
            needs: [b]
            tool: demo.noop
            idempotency: natural
        """,
    )
    hit = failure.expect("needs: [c]", "steps[0].needs", "dependency cycle: ")
    cycle = hit.split("dependency cycle: ", 1)[1].split(" -> ")
    assert cycle[0] == cycle[-1]
    assert sorted(cycle[:-1]) == ["a", "b", "c"]


# --------------------------------------------------------------------------- tools

TOOL_CASES = [
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: no.such.tool
            idempotency: natural
        """,
        "tool: no.such.tool",
        "steps[0].tool",
        "unknown tool 'no.such.tool'; registered tools: ",
        id="unknown-tool",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            args:
              value: 1
              valeu: 2
            idempotency: natural
        """,
        "valeu:",
        "steps[0].args.valeu",
        "tool 'demo.noop' has no argument 'valeu' (it takes: value)",
        id="unknown-tool-argument",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.send_email
            args:
              to: someone@example.com
              body: hello
            idempotency: natural
        """,
        "args:",
        "steps[0].args",
        "tool 'demo.send_email' needs argument 'subject'",
        id="missing-tool-argument",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.send_email
            args: {to: someone@example.com, subject: hi, body: hello}
        """,
        "- id: a",
        "steps[0]",
        "the engine " + NO_IDEMPOTENCY,
        id="side-effect-without-idempotency",
    ),
    pytest.param(
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
            compensate:
              tool: demo.undo_everything
        """,
        "tool: demo.undo_everything",
        "steps[0].compensate.tool",
        "unknown tool 'demo.undo_everything'",
        id="compensate-unknown-tool",
    ),
]


@pytest.mark.parametrize(("source", "needle", "field", "fragment"), TOOL_CASES)
def test_tool_problem(tmp_path: Path, source: str, needle: str, field: str, fragment: str) -> None:
    """Tool problems (unknown tool or argument, missing argument, no idempotency) name the field."""
    fail(tmp_path, source).expect(needle, field, fragment)


def test_unknown_tool_lists_the_registered_tools(tmp_path: Path) -> None:
    """The unknown-tool message lists the registry, so a typo is one glance from its fix."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: htp
            idempotency: natural
        """,
    )
    hit = failure.expect("tool: htp", "steps[0].tool", "registered tools: ")
    listed = hit.split("registered tools: ", 1)[1].split(", ")
    assert {"http", "sql", "demo.noop"} <= set(listed)


@pytest.mark.parametrize(
    "idempotency",
    ["none", "natural", '{key: "{{ params.order_id }}-{{ run.id }}"}'],
)
def test_declared_idempotency_forms_are_accepted(tmp_path: Path, idempotency: str) -> None:
    """A side-effecting step declaring ``none``, ``natural`` or ``{key: ...}`` is valid."""
    spec = ok(
        tmp_path,
        f"""
        name: wf
        version: 1
        params:
          order_id: {{type: string, required: true}}
        steps:
          - id: a
            tool: demo.send_email
            args: {{to: x@example.com, subject: "order {{{{ params.order_id }}}}", body: hi}}
            idempotency: {idempotency}
        """,
    )
    declared = spec.step("a").idempotency
    if idempotency.startswith("{"):
        assert isinstance(declared, KeyedIdempotency)
        assert declared.key == "{{ params.order_id }}-{{ run.id }}"
    else:
        assert declared == idempotency


def test_read_only_tool_needs_no_idempotency(tmp_path: Path) -> None:
    """A step on a read-only tool (no side effect) is valid without ``idempotency``."""
    spec = ok(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: totals
            tool: demo.sales_totals
        """,
    )
    assert spec.step("totals").idempotency is None


def test_compensate_may_read_the_steps_own_output(tmp_path: Path) -> None:
    """A compensation runs after its step, so ``steps.<self>.output.x`` in its args is valid."""
    spec = ok(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: reserve
            tool: demo.reserve_inventory
            args: {order_id: o-1, sku: sku-book}
            idempotency: {key: o-1}
            compensate:
              tool: demo.release_inventory
              args: {reservation_id: "{{ steps.reserve.output.reservation_id }}"}
        """,
    )
    assert spec.step("reserve").compensate is not None


def test_step_args_may_not_read_the_steps_own_output(tmp_path: Path) -> None:
    """Outside ``compensate``, a step reading its own output is 'not upstream' (it has none yet)."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            args: {value: "{{ steps.a.output }}"}
            idempotency: natural
        """,
    )
    failure.expect("args:", "steps[0].args.value", "step 'a', which is not upstream")


# --------------------------------------------------------------------------- templates

TEMPLATE_CASES = [
    pytest.param(
        'args: {value: "{{ params.colour }}"}',
        "steps[1].args.value",
        "template refers to unknown param 'colour'; declared params: size",
        id="unknown-param",
    ),
    pytest.param(
        "args: {value: \"{{ params['colour'] }}\"}",
        "steps[1].args.value",
        "unknown param 'colour'",
        id="unknown-param-subscript",
    ),
    pytest.param(
        'args: {value: "{{ steps.ghost.output.x }}"}',
        "steps[1].args.value",
        "template refers to unknown step 'ghost'",
        id="unknown-step",
    ),
    pytest.param(
        'args: {value: "{{ steps.later.output.x }}"}',
        "steps[1].args.value",
        "template refers to step 'later', which is not upstream: add it to needs",
        id="step-not-upstream",
    ),
    pytest.param(
        'args: {value: "{{ cycler.__init__ }}"}',
        "steps[1].args.value",
        "template uses unknown name 'cycler'; known: params, run, steps",
        id="unknown-top-level-name",
    ),
    pytest.param(
        'args: {value: "{{ item }}"}',
        "steps[1].args.value",
        "unknown name 'item'; known: params, run, steps (item/index exist only in a for_each step)",
        id="item-outside-for-each",
    ),
    pytest.param(
        'args: {value: "{{ params.size + }}"}',
        "steps[1].args.value",
        "template syntax error: ",
        id="jinja-syntax-error",
    ),
    pytest.param(
        'args: {value: "{% if params.size %}x"}',
        "steps[1].args.value",
        "template syntax error: ",
        id="jinja-unclosed-block",
    ),
    pytest.param(
        'when: "params.size =="',
        "steps[1].when",
        "template syntax error: ",
        id="bad-when-syntax",
    ),
    pytest.param(
        'when: "size == 1"',
        "steps[1].when",
        "template uses unknown name 'size'",
        id="when-unknown-name",
    ),
    pytest.param(
        'when: "steps.later.output.ok"',
        "steps[1].when",
        "step 'later', which is not upstream",
        id="when-not-upstream",
    ),
    pytest.param(
        'idempotency: {key: "{{ params.colour }}"}',
        "steps[1].idempotency.key",
        "unknown param 'colour'",
        id="idempotency-key-unknown-param",
    ),
    # Refused by the sandbox only at run time before; now at validation.
    pytest.param(
        "args: {value: \"{{ ''.__class__.__mro__ }}\"}",
        "steps[1].args.value",
        "template refused: attribute '__class__' is not allowed",
        id="dunder-attribute",
    ),
    pytest.param(
        'when: "params.size.__class__"',
        "steps[1].when",
        "template refused: attribute '__class__' is not allowed",
        id="dunder-in-when",
    ),
    pytest.param(
        "args: {value: \"{{ params['__class__'] }}\"}",
        "steps[1].args.value",
        "template refused: item '__class__' is not allowed",
        id="dunder-item",
    ),
    pytest.param(
        "args: {value: \"{{ 'x' * 200000000 }}\"}",
        "steps[1].args.value",
        "template refused: repeating a text or list 200000000 times",
        id="huge-repeat-of-a-literal",
    ),
    pytest.param(
        'args: {value: "{{ params.size ** 100000 }}"}',
        "steps[1].args.value",
        "template refused: a power of 100000 is refused",
        id="huge-power",
    ),
]


@pytest.mark.parametrize(("line", "field", "fragment"), TEMPLATE_CASES)
def test_template_problem(tmp_path: Path, line: str, field: str, fragment: str) -> None:
    """Templates are analysed at load time: bad names, params, steps and syntax name the field."""
    extra = "" if line.startswith("idempotency") else "\n    idempotency: natural"
    source = (
        "name: wf\nversion: 1\nparams:\n  size: {type: integer, default: 1}\nsteps:\n"
        "  - id: first\n    tool: demo.noop\n    idempotency: natural\n"
        f"  - id: second\n    needs: [first]\n    tool: demo.noop\n    {line}{extra}\n"
        "  - id: later\n    needs: [second]\n    tool: demo.noop\n    idempotency: natural\n"
    )
    fail(tmp_path, source).expect(line, field, fragment)


def test_repeating_a_text_param_a_huge_number_of_times_is_refused_a_number_is_not(
    tmp_path: Path,
) -> None:
    """``params.x * 200000000`` built a 200 MB string at run time: refused at validation
    when ``x`` is text; a number times a big constant (a unit conversion) stays valid."""
    source = """
        name: wf
        version: 1
        params:
          x: {type: string, default: "ab"}
          amount: {type: number, default: 2.5}
        steps:
          - id: a
            tool: demo.noop
            args: {value: "{{ params.x * 200000000 }}"}
            idempotency: natural
        """
    fail(tmp_path, source).expect(
        "args:", "steps[0].args.value", "template refused: repeating params.x 200000000 times"
    )
    spec = ok(tmp_path, source.replace("params.x * 200000000", "params.amount * 1000000"))
    assert spec.step("a").args == {"value": "{{ params.amount * 1000000 }}"}


def test_templated_sql_text_is_refused_and_bound_parameters_are_the_way(tmp_path: Path) -> None:
    """``{{ params.x }}`` pasted into the ``sql`` tool's statement is an injection: refused
    at validation with the way to write it; the same value as a bound parameter is valid."""
    source = """
        name: wf
        version: 1
        params:
          customer: {type: string, default: "o'brien"}
        steps:
          - id: a
            tool: sql
            args:
              statement: "DELETE FROM carts WHERE customer = '{{ params.customer }}'"
            idempotency: natural
        """
    failure = fail(tmp_path, source)
    failure.expect("statement:", "steps[0].args.statement", "SQL text may not be a template")
    fixed = source.replace(
        "'{{ params.customer }}'\"",
        ':customer"\n              parameters: {customer: "{{ params.customer }}"}',
    )
    assert ok(tmp_path, fixed).step("a").args["parameters"] == {"customer": "{{ params.customer }}"}


def test_templates_on_upstream_steps_params_and_run_are_valid(tmp_path: Path) -> None:
    """References to declared params, transitive upstream steps and ``run`` all validate."""
    spec = ok(
        tmp_path,
        """
        name: wf
        version: 1
        params:
          size: {type: integer, default: 1}
          items: {type: array, default: [1, 2]}
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            needs: a
            tool: demo.noop
            idempotency: natural
          - id: c
            needs: [b]
            when: "params.size > 0 and steps.a.output.value is none"
            tool: demo.noop
            args: {value: "{{ steps.a.output }} {{ params['size'] }} {{ run.id }} {{ run.date }}"}
            idempotency: {key: "{{ run.workflow }}-{{ steps.b.output.value }}"}
          - id: d
            needs: [c]
            for_each: "params.items"
            tool: demo.noop
            args: {value: "{{ item }}#{{ index }}"}
            idempotency: natural
        """,
    )
    assert [s.id for s in spec.steps] == ["a", "b", "c", "d"]
    assert spec.step("b").needs == ("a",)


def test_when_that_cannot_compile_at_run_time_is_refused(tmp_path: Path) -> None:
    """A ``when`` expression that the runtime cannot compile is refused at load time."""
    from jinja2 import TemplateSyntaxError

    from ledgerflow.spec.templates import evaluate

    with pytest.raises(TemplateSyntaxError):  # the run-time half of the invariant holds
        evaluate("true) + (1", {})
    fail(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - id: a
            tool: demo.noop
            when: "true) + (1"
            idempotency: natural
        """,
    )


# --------------------------------------------------------------------------- schedule

SCHEDULE_CASES = [
    pytest.param("timezone: Mars/Olympus_Mons", "timezone", "unknown time zone", id="bad-tz"),
    pytest.param("schedule: '61 * * * *'", "schedule", "is not a valid cron", id="bad-cron"),
    pytest.param("schedule: 'every day'", "schedule", "is not a valid cron", id="words-cron"),
    pytest.param("schedule: '@fortnightly'", "schedule", "unknown preset", id="bad-preset"),
    pytest.param("start_date: '2026-13-45'", "start_date", "is not a date", id="bad-start"),
]


@pytest.mark.parametrize(("line", "field", "fragment"), SCHEDULE_CASES)
def test_schedule_problem(tmp_path: Path, line: str, field: str, fragment: str) -> None:
    """Time zone, cron, preset and start date are checked at load time, at their line."""
    source = (
        f"name: wf\nversion: 1\n{line}\n"
        "steps:\n  - id: a\n    tool: demo.noop\n    idempotency: natural\n"
    )
    fail(tmp_path, source).expect(line, field, fragment)


@pytest.mark.parametrize("schedule", ["'@daily'", "'@once'", "'30 2 * * *'", "'*/5 * * * 1-5'"])
def test_valid_schedules(tmp_path: Path, schedule: str) -> None:
    """Known presets and five-field cron expressions validate."""
    spec = ok(
        tmp_path,
        f"""
        name: wf
        version: 1
        schedule: {schedule}
        timezone: Europe/Amsterdam
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
    )
    assert spec.schedule == schedule.strip("'")


def test_a_schedule_typo_does_not_invent_template_errors(tmp_path: Path) -> None:
    """A bad time zone is reported alone: valid references to upstream steps stay valid."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        timezone: Europe/Amsterdamm
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
          - id: b
            needs: [a]
            tool: demo.noop
            args: {value: "{{ steps.a.output.value }}"}
            idempotency: natural
        """,
    )
    failure.expect("timezone:", "timezone", "unknown time zone")
    assert "not upstream" not in str(failure.error), str(failure.error)


# --------------------------------------------------------------------------- identity, collection


def test_path_identity_mismatch(tmp_path: Path) -> None:
    """``workflows/x/v2.yaml`` declaring version 1 is refused: the path is the identity."""
    failure = fail(
        tmp_path,
        """
        name: x
        version: 1
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        name="workflows/x/v2.yaml",
    )
    failure.expect("name: x", "name", "the file says 'x' v1, but its path says 'x' v2")


def test_path_identity_name_mismatch(tmp_path: Path) -> None:
    """``workflows/y/v1.yaml`` declaring name x is refused."""
    failure = fail(
        tmp_path,
        """
        version: 1
        name: x
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        name="workflows/y/v1.yaml",
    )
    failure.expect("name: x", "name", "its path says 'y' v1")


def test_path_identity_match_loads(tmp_path: Path) -> None:
    """A file whose path matches its name and version loads."""
    spec = ok(
        tmp_path,
        """
        name: x
        version: 3
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
        name="workflows/x/v3.yaml",
    )
    assert spec.dag_id == "x__v3"


def test_spec_errors_collects_every_problem(tmp_path: Path) -> None:
    """One file with several problems is one SpecErrors listing each with its own line."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        timezone: Atlantis/Capital
        schedule: '@sometimes'
        steps:
          - id: a
            tool: demo.nope
            idempotency: natural
          - id: b
            needs: [a]
            tool: demo.noop
            args: {value: "{{ params.missing }}"}
            idempotency: natural
        """,
    )
    error = failure.error
    assert isinstance(error, SpecErrors)
    assert len(error.errors) == 4, str(error)
    report = str(error)
    assert report.startswith("4 problems:\n")
    failure.expect("timezone:", "timezone", "unknown time zone 'Atlantis/Capital'")
    failure.expect("schedule:", "schedule", "unknown preset '@sometimes'")
    failure.expect("tool: demo.nope", "steps[0].tool", "unknown tool 'demo.nope'")
    failure.expect("args:", "steps[1].args.value", "unknown param 'missing'")
    assert all(e.file == str(failure.path) and e.line for e in error.errors)
    assert len(report.splitlines()) == 5


def test_the_repo_checkout_workflow_is_valid() -> None:
    """The shipped checkout workflow validates (the fuzz test below starts from it)."""
    spec = load_workflow(CHECKOUT)
    assert spec.dag_id == "checkout__v1"


# --------------------------------------------------------------------------- crash-type bugs


def test_non_utf8_file_is_a_spec_error(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a SpecError naming the file, not a UnicodeDecodeError."""
    path = tmp_path / "wf.yaml"
    path.write_bytes(b"name: caf\xe9\nversion: 1\n")
    with pytest.raises(SpecError):
        load_workflow(path)


def test_unhashable_mapping_key_is_a_spec_error(tmp_path: Path) -> None:
    """A complex (sequence) mapping key is a SpecError, not a TypeError."""
    path = tmp_path / "wf.yaml"
    path.write_text("name: wf\nversion: 1\n? [a, b]\n: 1\nsteps: []\n", encoding="utf-8")
    with pytest.raises(SpecError):
        load_workflow(path)


@pytest.mark.parametrize("duration", [".inf", "99999999999999999d"])
def test_overflowing_duration_is_a_spec_error(tmp_path: Path, duration: str) -> None:
    """A duration too large for a timedelta is a SpecError, not an OverflowError."""
    path = tmp_path / "wf.yaml"
    path.write_text(
        "name: wf\nversion: 1\nsteps:\n  - id: a\n    tool: demo.noop\n"
        f"    idempotency: natural\n    timeout: {duration}\n",
        encoding="utf-8",
    )
    with pytest.raises(SpecError):
        load_workflow(path)


def test_non_string_key_is_reported_at_its_line(tmp_path: Path) -> None:
    """A non-string top-level key is reported at its own line, not at line 1."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        1: one
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
    )
    assert f"{failure.path}:3:" in str(failure.error)


def test_yaml_anchors_and_merge_keys_load(tmp_path: Path) -> None:
    """Anchors and ``<<`` merge keys (standard YAML that SafeLoader accepts) work in steps."""
    spec = ok(
        tmp_path,
        """
        name: wf
        version: 1
        steps:
          - &base
            id: a
            tool: demo.noop
            idempotency: natural
          - <<: *base
            id: b
        """,
    )
    assert [s.id for s in spec.steps] == ["a", "b"]


# --------------------------------------------------------------------------- fuzz


def _mutate(lines: list[str], rng: random.Random) -> list[str]:
    lines = list(lines)
    operation = rng.choice(("delete", "duplicate", "swap"))
    i = rng.randrange(len(lines))
    if operation == "delete":
        del lines[i]
    elif operation == "duplicate":
        lines.insert(i, lines[i])
    else:
        j = rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    return lines


def test_mutated_checkout_files_only_ever_raise_spec_errors(tmp_path: Path) -> None:
    """200 line-level mutations of checkout v1.yaml each load or raise a SpecError, nothing else."""
    original = CHECKOUT.read_text(encoding="utf-8").splitlines(keepends=True)
    outcomes = {"valid": 0, "invalid": 0}
    for seed in range(200):
        rng = random.Random(seed)
        path = tmp_path / f"m{seed}.yaml"
        path.write_text("".join(_mutate(original, rng)), encoding="utf-8")
        try:
            load_workflow(path)
        except SpecError as exc:
            assert f"{path}:" in str(exc), f"seed {seed}: {exc}"
            outcomes["invalid"] += 1
        except Exception as exc:  # the invariant under test
            pytest.fail(f"seed {seed}: {type(exc).__name__}: {exc}\n{path.read_text()}")
        else:
            outcomes["valid"] += 1
    # Both branches are exercised, so the test is not vacuous.
    assert outcomes["valid"] > 0
    assert outcomes["invalid"] > 0


def test_scheduled_workflow_needs_defaults_for_required_params(tmp_path: Path) -> None:
    """A scheduled workflow with a required param that has no default is refused at that
    param's line (Airflow would refuse to import the DAG with a less direct message)."""
    failure = fail(
        tmp_path,
        """
        name: wf
        version: 1
        schedule: "@daily"
        params:
          order_id: {type: string, required: true}
        steps:
          - id: a
            tool: demo.noop
            idempotency: natural
        """,
    )
    report = str(failure.error)
    assert "params.order_id.required" in report
    assert "scheduled runs get the params' defaults" in report
