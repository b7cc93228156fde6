"""``queue``, ``concurrency`` and ``rate`` (spec.limits, workflow.limits): validated with the
file, line and field; the factory gives each task its queue and pool; segments agree on
both; the pools a deployment must create."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import LedgerflowError, SpecError
from ledgerflow.factory import build_dag
from ledgerflow.spec.limits import parse_rate
from ledgerflow.tools.registry import tool
from ledgerflow.workflow.limits import pools, rates_of
from ledgerflow.workflow.segments import segments
from ledgerflow.workflow.validate import load_workflow


@tool("test.limited_api", behaviour="natural", concurrency=3, rate="120/m")
def limited_api(ctx: Any, value: Any = None) -> dict[str, Any]:
    return {"value": value}


@tool("test.limited_undo", behaviour="natural", concurrency=1)
def limited_undo(ctx: Any, value: Any = None) -> dict[str, Any]:
    return {"value": value}


HEAD = """\
name: lim
version: {version}
execution: {execution}
steps:
"""
NOOP = "tool: demo.noop\n    idempotency: natural"


def _write(tmp_path: Path, steps: str, execution: str = "tasks", version: int = 1) -> Path:
    path = tmp_path / "lim" / f"v{version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = HEAD.format(execution=execution, version=version) + textwrap.dedent(steps)
    path.write_text(body, encoding="utf-8")
    return path


def _load(tmp_path: Path, steps: str, execution: str = "tasks", version: int = 1) -> Any:
    return load_workflow(_write(tmp_path, steps, execution, version))


def _refused(tmp_path: Path, steps: str, execution: str = "tasks") -> str:
    with pytest.raises(SpecError) as info:
        _load(tmp_path, steps, execution)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("10/s", 10.0), ("600/m", 10.0), ("5 / h", 5 / 3600), ("0.5/s", 0.5), ("3/minute", 0.05)],
)
def test_a_rate_is_calls_per_unit(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("text", ["10", "10 per s", "0/s", "-1/s", "10/d", "", "1e9/s"])
def test_a_bad_rate_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("queue", '""', "queue"),
        ("queue", '"two words"', "queue"),
        ("concurrency", "0", "concurrency"),
        ("rate", '"ten a second"', "is not a rate"),
    ],
)
def test_bad_fields_name_file_line_and_field(
    tmp_path: Path, field: str, value: str, says: str
) -> None:
    message = _refused(
        tmp_path,
        f"""\
  - id: a
    {NOOP}
  - id: b
    needs: [a]
    {NOOP}
    {field}: {value}
""",
    )
    assert "lim/v1.yaml:" in message and f"steps[1].{field}" in message, message
    assert says in message


def test_limits_are_for_steps_that_make_calls(tmp_path: Path) -> None:
    message = _refused(
        tmp_path,
        """\
  - id: ok
    subject: Ship it?
    approvers: {users: [admin]}
    kind: approval
    concurrency: 2
""",
    )
    assert "steps[0].concurrency" in message and "approval step makes none" in message


def test_a_step_cannot_add_a_second_limit_to_a_limited_tool(tmp_path: Path) -> None:
    message = _refused(
        tmp_path,
        """\
  - id: a
    tool: test.limited_api
    idempotency: natural
    concurrency: 2
""",
    )
    assert "steps[0].concurrency" in message
    assert (
        "already limits its calls to 3" in message and "ledgerflow.tool.test.limited_api" in message
    )


def test_the_factory_gives_each_task_its_queue_and_pool(tmp_path: Path) -> None:
    spec = _load(
        tmp_path,
        """\
  - id: plain
    tool: demo.noop
    idempotency: natural
  - id: pay
    needs: [plain]
    queue: payments
    concurrency: 2
    tool: demo.noop
    idempotency: natural
    compensate: {tool: test.limited_undo}
  - id: tool_limited
    needs: [pay]
    tool: test.limited_api
    idempotency: natural
  - id: each
    needs: [tool_limited]
    for_each: "[1, 2]"
    queue: bulk
    concurrency: 1
    tool: demo.noop
    args: {value: "{{ item }}"}
    idempotency: natural
  - id: ok
    needs: [each]
    kind: approval
    subject: Done?
    approvers: {users: [admin]}
    queue: approvals
""",
    )
    dag = build_dag(spec)
    placed = {t.task_id: (t.queue, t.pool) for t in dag.tasks}
    assert placed["plain"] == ("default", "default_pool")
    assert placed["pay"] == ("payments", "ledgerflow.step.lim.pay")
    assert placed["tool_limited"] == ("default", "ledgerflow.tool.test.limited_api")
    mapped = dag.get_task("each")
    assert (mapped.partial_kwargs["queue"], mapped.partial_kwargs["pool"]) == (
        "bulk",
        "ledgerflow.step.lim.each",
    )
    assert placed["ok"][0] == "approvals"
    # The compensation runs where its step runs, in its undo tool's pool.
    assert placed["compensate__pay"] == ("payments", "ledgerflow.tool.test.limited_undo")
    assert rates_of(spec, spec.step("tool_limited")) == [("tool:test.limited_api", 2.0)]
    assert pools([spec]) == {
        "ledgerflow.step.lim.pay": (
            2,
            "Ledgerflow: at most 2 calls of step pay of workflow lim at once",
        ),
        "ledgerflow.tool.test.limited_api": (
            3,
            "Ledgerflow: at most 3 calls of tool test.limited_api at once",
        ),
        "ledgerflow.step.lim.each": (
            1,
            "Ledgerflow: at most 1 calls of step each of workflow lim at once",
        ),
    }


def test_a_named_segment_mixing_queues_is_refused_with_its_line(tmp_path: Path) -> None:
    message = _refused(
        tmp_path,
        f"""\
  - id: a
    segment: s
    {NOOP}
  - id: b
    needs: [a]
    segment: s
    queue: payments
    {NOOP}
""",
    )
    assert "lim/v1.yaml:12: steps[1].queue" in message, message
    assert "mixes queues" in message and "'payments'" in message


def test_a_named_segment_with_two_limits_is_refused(tmp_path: Path) -> None:
    message = _refused(
        tmp_path,
        f"""\
  - id: a
    segment: s
    concurrency: 2
    {NOOP}
  - id: b
    needs: [a]
    segment: s
    tool: test.limited_api
    idempotency: natural
""",
    )
    assert "steps[1].concurrency" in message and "two concurrency limits" in message


def test_a_segment_takes_its_steps_queue_and_its_one_pool(tmp_path: Path) -> None:
    spec = _load(
        tmp_path,
        f"""\
  - id: a
    segment: s
    queue: payments
    concurrency: 2
    {NOOP}
  - id: b
    needs: [a]
    segment: s
    queue: payments
    {NOOP}
""",
    )
    task = build_dag(spec).get_task("s")
    assert (task.queue, task.pool) == ("payments", "ledgerflow.step.lim.a")


def test_fused_execution_ends_a_chain_where_the_queue_or_pool_changes(tmp_path: Path) -> None:
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
    queue: payments
    {NOOP}
  - id: d
    needs: [c]
    queue: payments
    {NOOP}
  - id: e
    needs: [d]
    queue: payments
    concurrency: 1
    {NOOP}
""",
        execution="fused",
    )
    assert [s.steps for s in segments(spec)] == [("a", "b"), ("c", "d")]
    placed = {t.task_id: (t.queue, t.pool) for t in build_dag(spec).tasks}
    assert placed["fused__c__d"] == ("payments", "default_pool")
    assert placed["e"] == ("payments", "ledgerflow.step.lim.e")


def test_the_newest_version_sizes_a_step_pool(tmp_path: Path) -> None:
    old = _load(tmp_path, f"  - id: a\n    concurrency: 2\n    {NOOP}\n", version=1)
    new = _load(tmp_path, f"  - id: a\n    concurrency: 5\n    {NOOP}\n", version=2)
    assert pools([new, old])["ledgerflow.step.lim.a"][0] == 5


def test_a_tool_declares_sane_limits() -> None:
    with pytest.raises(LedgerflowError, match=r"concurrency must be 1\.\.10000"):
        tool("test.bad_concurrency", concurrency=0)
    with pytest.raises(LedgerflowError, match="is not a rate"):
        tool("test.bad_rate", rate="fast")


def test_ledgerflow_pools_lists_the_pools_of_valid_files_and_fails_on_invalid_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ledgerflow.cli import main

    _write(tmp_path, f"  - id: a\n    concurrency: 3\n    {NOOP}\n")
    assert main(["pools", "--dry-run", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ["would set pool ledgerflow.step.lim.a: 3 slots"]
    bad = tmp_path / "bad" / "v1.yaml"
    bad.parent.mkdir()
    bad.write_text("name: bad\nversion: 1\nsteps:\n  - id: a\n    tool: demo.noop\n    queue: ''\n")
    assert main(["pools", "--dry-run", str(tmp_path)]) == 1
    assert "bad/v1.yaml:6: steps[0].queue" in capsys.readouterr().err
