"""Quality steps in workflow files: what loads, and every mistake named by file, line, field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ledgerflow.errors import SpecError
from ledgerflow.quality.catalog import CATALOG, parse_expectation
from ledgerflow.quality.runner import DatasetError, to_frame
from ledgerflow.spec.models import QualityStep
from ledgerflow.workflow.validate import load_workflow, referenced_steps, template_fields

HEAD = """
name: wf
version: 1
params:
  region: {type: string, default: eu, enum: [eu, us]}
steps:
  - id: load
    tool: demo.noop
    args: {value: [{id: 1}]}
"""


def _text(steps: str) -> str:
    return textwrap.dedent(HEAD).lstrip() + textwrap.indent(textwrap.dedent(steps), "  ")


def _load(tmp_path: Path, steps: str) -> QualityStep:
    path = tmp_path / "wf.yaml"
    path.write_text(_text(steps))
    step = load_workflow(path).step("check")
    assert isinstance(step, QualityStep)
    return step


def _errors(tmp_path: Path, steps: str) -> tuple[str, list[str]]:
    path = tmp_path / "wf.yaml"
    text = _text(steps)
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_workflow(path)
    return text, str(info.value).splitlines()


def _line(text: str, needle: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if needle in line)


def _has(report: list[str], where: str, fragment: str) -> None:
    hits = [entry for entry in report if where in entry and fragment in entry]
    assert hits, f"no {where!r} with {fragment!r} in:\n" + "\n".join(report)


def test_a_quality_step_with_every_expectation_kind_loads(tmp_path: Path) -> None:
    """All six catalog expectations (short and long forms), a query with a templated
    parameter and the branch form load; the parameter is a template field and on_failure
    names the branch target."""
    step = _load(
        tmp_path,
        """
          - id: check
            kind: quality
            needs: [load]
            dataset:
              conn_id: warehouse
              query: "SELECT * FROM orders WHERE region = :region"
              parameters: {region: "{{ params.region }}"}
            expectations:
              - not_null: id
              - unique: {column: id, mostly: 0.99}
              - between: {column: amount, min: 0, max: 100}
              - in_set: {column: status, values: [ok, late]}
              - row_count_between: {min: 1}
              - match_regex: {column: email, regex: "^[^@]+@[^@]+$"}
            on_failure: {branch: quarantine}
          - id: quarantine
            needs: [check]
            tool: demo.noop
        """,
    )
    assert {parse_expectation(e)[0].name for e in step.expectations} == set(CATALOG)  # type: ignore[union-attr]
    assert step.branch_target == "quarantine"
    assert (("dataset", "parameters", "region"), "{{ params.region }}", False) in template_fields(
        step
    )


def test_a_step_output_dataset_counts_as_a_reference_to_that_step(tmp_path: Path) -> None:
    """``dataset: {step: load}`` makes the step's output part of what the running step loads."""
    path = tmp_path / "wf.yaml"
    path.write_text(
        _text(
            """
            - id: check
              kind: quality
              needs: [load]
              dataset: {step: load}
              expectations: [{not_null: id}]
              on_failure: warn
            """
        )
    )
    spec = load_workflow(path)
    assert referenced_steps(spec, spec.step("check")) == {"load"}


def test_unknown_expectation_is_named_at_its_line(tmp_path: Path) -> None:
    """A misspelled expectation is an error at its own line naming the known ones."""
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
            expectations:
              - not_null: id
              - not_nul: email
        """,
    )
    _has(
        report,
        f"wf.yaml:{_line(text, 'not_nul: email')}: steps[1].expectations[1].not_nul",
        "unknown expectation 'not_nul'; known: between, in_set",
    )


@pytest.mark.parametrize(
    ("item", "needle", "fragment"),
    [
        ("between: {min: 0, max: 5}", "between:", "between needs a column"),
        ("in_set: {column: status}", "in_set:", "in_set needs argument 'values'"),
        ("match_regex: email", "match_regex:", "match_regex needs argument 'regex'"),
        ("between: {column: a, low: 0}", "between:", "between has no argument 'low'"),
        ("between: {column: a}", "between:", "between needs min, max or both"),
        ("between: {column: a, min: 5, max: 1}", "between:", "min 5 is greater than max 1"),
        ("not_null: {column: a, mostly: 2}", "not_null:", "mostly is a fraction"),
        ("row_count_between: id", "row_count_between:", "takes a mapping"),
        ("match_regex: {column: a, regex: '(['}", "match_regex:", "not a regular expression"),
        ("in_set: {column: a, values: []}", "in_set:", "values is a non-empty list"),
    ],
)
def test_bad_expectation_arguments_are_named(
    tmp_path: Path, item: str, needle: str, fragment: str
) -> None:
    """Missing columns, missing or unknown arguments and impossible bounds are spec errors
    at the expectation's line."""
    text, report = _errors(
        tmp_path,
        f"""
          - id: check
            kind: quality
            dataset: {{table: orders}}
            expectations:
              - {item}
        """,
    )
    _has(report, f"wf.yaml:{_line(text, needle)}: steps[1].expectations[0]", fragment)


def test_unknown_suite_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A suite name with no file in the suites folder is an error on the step's suite field."""
    monkeypatch.setenv("LEDGERFLOW_SUITES_DIR", str(tmp_path / "suites"))
    (tmp_path / "suites").mkdir()
    (tmp_path / "suites" / "orders.yaml").write_text("expectations: [{not_null: id}]\n")
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
            suite: payments
        """,
    )
    _has(
        report,
        f"wf.yaml:{_line(text, 'suite:')}: steps[1].suite",
        "unknown suite 'payments'; suites in",
    )
    _has(report, "steps[1].suite", "orders")


def test_a_suite_is_a_name_never_a_path(tmp_path: Path) -> None:
    """``suite: ../../etc/passwd`` is refused by the name pattern before any file is opened."""
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
            suite: ../secrets
        """,
    )
    _has(report, f"wf.yaml:{_line(text, 'suite:')}: steps[1].suite", "should match pattern")


def test_a_bad_suite_file_is_named_at_its_own_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid expectation inside a suite file is reported at the suite file's line."""
    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "orders.yaml").write_text(
        "expectations:\n  - not_null: id\n  - between: {column: amount, lo: 1}\n"
    )
    monkeypatch.setenv("LEDGERFLOW_SUITES_DIR", str(suites))
    _text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
            suite: orders
        """,
    )
    _has(report, f"{suites / 'orders.yaml'}:3: expectations[1].between.lo", "no argument 'lo'")


def test_the_shipped_suite_loads(tmp_path: Path) -> None:
    """include/ledgerflow_suites/demo_payments.yaml (the nightly report's suite) is valid."""
    step = _load(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: demo_payments}
            suite: demo_payments
        """,
    )
    assert step.suite == "demo_payments"


def test_branch_target_must_need_the_quality_step(tmp_path: Path) -> None:
    """``on_failure: {branch: x}`` where x does not list the step in needs is an error on
    on_failure; an unknown target likewise."""
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
            expectations: [{not_null: id}]
            on_failure: {branch: load}
          - id: other
            kind: quality
            dataset: {table: orders}
            expectations: [{not_null: id}]
            on_failure: {branch: nowhere}
        """,
    )
    first = _line(text, "branch: load")
    _has(report, f"wf.yaml:{first}: steps[1].on_failure", "must list 'check' in its needs")
    _has(report, "steps[2].on_failure", "unknown step 'nowhere'")


@pytest.mark.parametrize(
    ("dataset", "fragment"),
    [
        ("{table: orders, query: 'SELECT 1'}", "exactly one of table, query, step or expression"),
        ("{conn_id: warehouse}", "exactly one of table, query, step or expression"),
        ("{table: 'orders; DROP TABLE x'}", "should match pattern"),
    ],
)
def test_a_dataset_has_exactly_one_source(tmp_path: Path, dataset: str, fragment: str) -> None:
    """Two sources, none, or a table name that is not an identifier are errors on dataset."""
    text, report = _errors(
        tmp_path,
        f"""
          - id: check
            kind: quality
            dataset: {dataset}
            expectations: [{{not_null: id}}]
        """,
    )
    _has(report, f"wf.yaml:{_line(text, 'dataset:')}: steps[1].dataset", fragment)


def test_templates_of_a_quality_step_are_checked(tmp_path: Path) -> None:
    """A query parameter naming an unknown param and a step dataset that is not upstream
    are errors at their lines."""
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset:
              query: "SELECT * FROM t WHERE r = :r"
              parameters: {r: "{{ params.regoin }}"}
            expectations: [{not_null: id}]
          - id: check2
            kind: quality
            dataset:
              step: load
            expectations: [{not_null: id}]
        """,
    )
    _has(
        report,
        f"wf.yaml:{_line(text, 'params.regoin')}: steps[1].dataset.parameters.r",
        "unknown param 'regoin'",
    )
    _has(report, f"wf.yaml:{_line(text, 'step: load')}: steps[2].dataset.step", "not upstream")


def test_nothing_to_check_is_an_error(tmp_path: Path) -> None:
    """A quality step with neither expectations nor a suite is refused."""
    _text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
        """,
    )
    _has(report, "steps[1]", "declare expectations, a suite, or both")


def test_on_failure_only_takes_fail_warn_or_a_branch(tmp_path: Path) -> None:
    """``on_failure: ignore`` is an error on on_failure."""
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset: {table: orders}
            expectations: [{not_null: id}]
            on_failure: ignore
        """,
    )
    _has(report, f"wf.yaml:{_line(text, 'on_failure:')}: steps[1]", "on_failure")


def test_expectation_labels_name_column_and_arguments() -> None:
    """Reports name an expectation the way the YAML wrote it."""
    between, problems = parse_expectation({"between": {"column": "amount", "min": 0, "max": 9}})
    assert problems == [] and between is not None
    assert between.label == "between(amount, min=0, max=9)"
    assert between.gx_kwargs() == {"column": "amount", "min_value": 0, "max_value": 9}
    short, _ = parse_expectation({"not_null": "email"})
    assert short is not None and short.label == "not_null(email)"


def test_step_outputs_become_frames_or_a_dataset_error() -> None:
    """Records, columns and one record become DataFrames; a string does not."""
    assert to_frame([{"a": 1}, {"a": 2}]).shape == (2, 1)
    assert to_frame({"a": [1, 2, 3], "b": [4, 5, 6]}).shape == (3, 2)
    assert to_frame({"a": 1}).shape == (1, 1)
    with pytest.raises(DatasetError):
        to_frame("rows")
    with pytest.raises(DatasetError):
        to_frame({"a": [1], "b": [1, 2]})


def test_a_templated_query_is_refused_and_placeholders_match_parameters(tmp_path: Path) -> None:
    """``'{{ params.x }}'`` pasted into a query is an injection: refused with the way to
    write it; every ``:name`` needs a value and every value a ``:name``."""
    text, report = _errors(
        tmp_path,
        """
          - id: check
            kind: quality
            dataset:
              query: "SELECT * FROM t WHERE r = '{{ params.region }}'"
            expectations: [{not_null: id}]
          - id: check2
            kind: quality
            dataset:
              query: "SELECT a::int FROM t WHERE r = :region AND s = :status"
              parameters: {region: "{{ params.region }}", colour: red}
            expectations: [{not_null: id}]
        """,
    )
    pasted = _line(text, "r = '{{")
    _has(
        report,
        f"wf.yaml:{pasted}: steps[1].dataset.query",
        "SQL text may not be a template",
    )
    _has(
        report,
        f"wf.yaml:{_line(text, ':status')}: steps[2].dataset.query",
        "the query's :status has no value in dataset.parameters",
    )
    _has(
        report,
        f"wf.yaml:{_line(text, 'colour: red')}: steps[2].dataset.parameters.colour",
        "the query has no :colour placeholder",
    )
