"""Fused segments: which steps share one Airflow task, and why a ``segment:`` is refused
(with the file, the line and the field)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from ledgerflow.errors import SpecError
from ledgerflow.factory import build_dag
from ledgerflow.workflow.segments import Segment, segments, steps_of, task_of
from ledgerflow.workflow.validate import load_workflow

HEAD = """\
name: fz
version: 1
execution: {execution}
steps:
"""


def _load(tmp_path: Path, steps: str, execution: str = "fused") -> object:
    path = tmp_path / "fz" / "v1.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD.format(execution=execution) + textwrap.dedent(steps), encoding="utf-8")
    return load_workflow(path)


def _refused(tmp_path: Path, steps: str, execution: str = "tasks") -> str:
    with pytest.raises(SpecError) as info:
        _load(tmp_path, steps, execution)
    return str(info.value)


NOOP = "tool: demo.noop\n    idempotency: natural"


def test_a_chain_is_one_segment_named_by_its_first_and_last_step(tmp_path: Path) -> None:
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: b
    needs: [a]
    {NOOP}
  - id: c
    needs: [b]
    {NOOP}
""",
    )
    assert segments(spec) == [Segment("fused__a__c", ("a", "b", "c"))]  # type: ignore[arg-type]
    assert task_of(spec, "b") == "fused__a__c"  # type: ignore[arg-type]
    assert steps_of(spec, "fused__a__c") == ("a", "b", "c")  # type: ignore[arg-type]
    assert segments(spec)[0].label == "a → b → c"  # type: ignore[arg-type]


def test_fan_out_fan_in_waits_and_for_each_end_a_segment(tmp_path: Path) -> None:
    """a -> b -> c, then c fans out to d and e; d -> f; f and e join in g (fan-in);
    g -> h is an approval; i is a for_each; j -> k after it."""
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: b
    needs: [a]
    {NOOP}
  - id: c
    needs: [b]
    {NOOP}
  - id: d
    needs: [c]
    {NOOP}
  - id: e
    needs: [c]
    {NOOP}
  - id: f
    needs: [d]
    {NOOP}
  - id: g
    needs: [f, e]
    {NOOP}
  - id: h
    kind: approval
    needs: [g]
    approvers: {{users: [admin]}}
    subject: ok?
  - id: i
    needs: [h]
    for_each: "[1, 2]"
    {NOOP}
  - id: j
    needs: [i]
    {NOOP}
  - id: k
    needs: [j]
    {NOOP}
""",
    )
    assert [s.steps for s in segments(spec)] == [  # type: ignore[arg-type]
        ("a", "b", "c"),
        ("d", "f"),
        ("j", "k"),
    ]
    for alone in ("e", "g", "h", "i"):
        assert task_of(spec, alone) == alone  # type: ignore[arg-type]
    dag = build_dag(spec)  # type: ignore[arg-type]
    assert set(dag.get_task("fused__d__f").upstream_task_ids) == {"fused__a__c"}
    assert set(dag.get_task("g").upstream_task_ids) == {"fused__d__f", "e"}
    assert set(dag.get_task("fused__j__k").upstream_task_ids) == {"i"}


def test_a_branch_point_ends_its_segment(tmp_path: Path) -> None:
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: ask
    kind: llm
    needs: [a]
    prompt: hi
    output_schema: {{type: object}}
    on_invalid: manual
  - id: main
    needs: [ask]
    {NOOP}
  - id: manual
    needs: [ask]
    {NOOP}
""",
    )
    assert [s.steps for s in segments(spec)] == [("a", "ask")]  # type: ignore[arg-type]


def test_tasks_execution_fuses_nothing_but_named_segments(tmp_path: Path) -> None:
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: b
    needs: [a]
    segment: pay
    {NOOP}
  - id: c
    needs: [b]
    segment: pay
    {NOOP}
  - id: d
    needs: [c]
    {NOOP}
""",
        execution="tasks",
    )
    assert segments(spec) == [Segment("pay", ("b", "c"), "pay")]  # type: ignore[arg-type]
    assert segments(spec)[0].label == "pay: b → c"  # type: ignore[arg-type]
    assert task_of(spec, "a") == "a" and task_of(spec, "d") == "d"  # type: ignore[arg-type]


def test_an_approval_in_a_segment_is_refused_with_its_line(tmp_path: Path) -> None:
    report = _refused(
        tmp_path,
        f"""\
  - id: a
    segment: s
    {NOOP}
  - id: wait
    kind: approval
    needs: [a]
    segment: s
    approvers: {{users: [admin]}}
    subject: ok?
""",
    )
    assert "fz/v1.yaml:12: steps[1].segment:" in report
    assert "an approval parks in the triggerer" in report and "cannot be fused" in report


def test_a_segment_that_is_not_a_chain_says_why(tmp_path: Path) -> None:
    report = _refused(
        tmp_path,
        f"""\
  - id: a
    segment: s
    {NOOP}
  - id: b
    segment: s
    {NOOP}
  - id: c
    needs: [a, b]
    segment: s
    {NOOP}
""",
    )
    assert "steps[1].segment: segment 's' must be a chain: step 'b' needs nothing" in report


def test_a_fan_out_inside_a_segment_is_refused(tmp_path: Path) -> None:
    report = _refused(
        tmp_path,
        f"""\
  - id: a
    segment: s
    {NOOP}
  - id: b
    needs: [a]
    segment: s
    {NOOP}
  - id: side
    needs: [a]
    {NOOP}
""",
    )
    assert "step 'a' is needed by b, side; a fan-out ends a segment" in report


def test_for_each_and_step_named_segments_are_refused(tmp_path: Path) -> None:
    report = _refused(
        tmp_path,
        f"""\
  - id: a
    segment: b
    for_each: "[1]"
    {NOOP}
  - id: b
    needs: [a]
    segment: a
    {NOOP}
""",
    )
    assert "steps[0].segment: a for_each step runs as one mapped task per item" in report
    assert "steps[1].segment: segment 'a' has the name of a step" in report


def test_execution_must_be_tasks_or_fused(tmp_path: Path) -> None:
    report = _refused(tmp_path, f"  - id: a\n    {NOOP}\n", execution="fast")
    assert "fz/v1.yaml:3: execution:" in report


def test_an_event_step_ends_a_segment_like_an_approval(tmp_path: Path) -> None:
    """a -> b, then an event step, then c -> d: two segments around the event step's own
    (deferrable) task; naming the event step in a segment is refused with its line."""
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: b
    needs: [a]
    {NOOP}
  - id: settled
    kind: event
    needs: [b]
    event: payment.settled
    key: "{{{{ steps.b.output.value }}}}"
  - id: c
    needs: [settled]
    {NOOP}
  - id: d
    needs: [c]
    {NOOP}
""",
    )
    assert [s.steps for s in segments(spec)] == [("a", "b"), ("c", "d")]  # type: ignore[arg-type]
    assert task_of(spec, "settled") == "settled"  # type: ignore[arg-type]
    dag = build_dag(spec)  # type: ignore[arg-type]
    assert type(dag.get_task("settled")).__name__ == "EventOperator"
    assert set(dag.get_task("fused__c__d").upstream_task_ids) == {"settled"}
    report = _refused(
        tmp_path / "refused",
        f"""\
  - id: a
    segment: s
    {NOOP}
  - id: settled
    kind: event
    needs: [a]
    segment: s
    event: payment.settled
    key: k
""",
    )
    assert "steps[1].segment:" in report
    assert "an event step parks in the triggerer" in report and "cannot be fused" in report
