"""A workflow's ``result``: what a caller waiting on a run gets back. Validated like every
templated field: names, params and steps checked when the file loads, each problem a
SpecError naming file, line and field; rendered from a ledger's outputs by
``api._wait.render_result``."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledgerflow.errors import SpecError
from ledgerflow.workflow.validate import load_workflow, result_steps

HEAD = """name: wf
version: 1
params:
  order_id: {type: string, default: o-1}
steps:
  - id: charge
    tool: demo.noop
    idempotency: natural
  - id: ship
    needs: [charge]
    tool: demo.noop
    idempotency: natural
"""


def _load(tmp_path: Path, result: str) -> object:
    path = tmp_path / "wf.yaml"
    path.write_text(HEAD + result, encoding="utf-8")
    return load_workflow(path)


def _error(tmp_path: Path, result: str) -> str:
    with pytest.raises(SpecError) as info:
        _load(tmp_path, result)
    return str(info.value)


def test_a_result_over_steps_params_and_run_loads_and_names_the_steps_it_reads(
    tmp_path: Path,
) -> None:
    """Templates over any step's output (not only upstream of one step: the result renders
    once the run succeeded), params and run are valid; a constant is too; the steps read
    are the ones the templates name."""
    spec = _load(
        tmp_path,
        "result:\n"
        '  payment: "{{ steps.charge.output.value }}"\n'
        '  order: "{{ params.order_id }} in {{ run.id }}"\n'
        "  nested: {list: ['{{ steps.ship.output }}', 3]}\n"
        "  kind: checkout\n",
    )
    assert spec.result is not None and set(spec.result) == {"payment", "order", "nested", "kind"}
    assert result_steps(spec) == {"charge", "ship"}


@pytest.mark.parametrize(
    ("result", "line", "field", "fragment"),
    [
        pytest.param(
            'result:\n  x: "{{ steps.refund.output }}"\n',
            14,
            "result.x",
            "template refers to unknown step 'refund'",
            id="unknown-step",
        ),
        pytest.param(
            'result:\n  x: {deep: "{{ params.colour }}"}\n',
            14,
            "result.x.deep",
            "template refers to unknown param 'colour'",
            id="unknown-param-nested",
        ),
        pytest.param(
            'result:\n  x: "{{ item }}"\n',
            14,
            "result.x",
            "template uses unknown name 'item'; known: params, run, steps",
            id="item-outside-for-each",
        ),
        pytest.param(
            'result:\n  x: "{{ steps.charge.output. }}"\n',
            14,
            "result.x",
            "template syntax error",
            id="syntax",
        ),
        pytest.param(
            'result:\n  x: "{{ steps.charge.__class__ }}"\n',
            14,
            "result.x",
            "attribute '__class__' is not allowed",
            id="dunder",
        ),
        pytest.param(
            'result:\n  "bad name": "{{ params.order_id }}"\n',
            13,
            "result",
            "result name 'bad name' must match",
            id="bad-name",
        ),
        pytest.param("result: {}\n", 13, "result", "name at least one result entry", id="empty"),
        pytest.param("result: [a, b]\n", 13, "result", "valid dictionary", id="not-a-mapping"),
    ],
)
def test_result_problems_name_file_line_and_field(
    tmp_path: Path, result: str, line: int, field: str, fragment: str
) -> None:
    """Each bad ``result`` is a SpecError at ``<file>:<line>: <field>:`` saying why."""
    report = _error(tmp_path, result)
    prefix = f"{tmp_path / 'wf.yaml'}:{line}: {field}: "
    hits = [entry for entry in report.splitlines() if prefix in entry]
    assert hits, f"no problem at {prefix!r}; got:\n{report}"
    assert any(fragment in hit for hit in hits), f"{fragment!r} not in {hits}"
