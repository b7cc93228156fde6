"""Queues, pools and rate buckets of a workflow's steps (the fields of ``spec.limits``).

Concurrency is Airflow's own: each limit is an Airflow pool, and the scheduler never runs
more of a pool's tasks at once than it has slots, whichever worker takes them:

* a tool's ``concurrency`` -> the pool ``ledgerflow.tool.<tool>`` (shared by every
  workflow calling the tool);
* a step's ``concurrency`` -> the pool ``ledgerflow.step.<workflow>.<step>`` (shared by the
  workflow's versions). A step calling a tool that declares its own limit may not add a
  second one (an Airflow task has one pool).

A fused segment's task counts as one call of each of its steps: it takes the pool of its
limited step (so the whole segment runs at most N at once, a stricter limit than the
step's own); a segment may hold at most one limited step's pool (``execution: fused``
ends a chain where the pool or the queue changes; a named segment that mixes them is
refused). ``ledgerflow pools`` creates and sizes the pools in Airflow's database; a task
whose pool does not exist is never scheduled.

Rates are the kernel's (``ledger.rates``): before each call the step takes its turn from
the token bucket of its tool (``tool:<tool>``) and of itself (``step:<workflow>.<step>``).
"""

from __future__ import annotations

from typing import Any

from ledgerflow.spec.limits import parse_rate
from ledgerflow.spec.models import AnyStep, LlmStep, ToolStep, WorkflowSpec

POOL_PREFIX = "ledgerflow."
LIMITED_KINDS = (ToolStep, LlmStep)


def _tool(step: AnyStep) -> Any:
    if not isinstance(step, ToolStep):
        return None
    from ledgerflow.errors import UnknownToolError
    from ledgerflow.tools.registry import get_tool

    try:
        return get_tool(step.tool)
    except UnknownToolError:
        return None  # reported by the tool step's own check


def tool_pool(tool: str) -> str:
    return f"{POOL_PREFIX}tool.{tool}"


def step_pool(spec: WorkflowSpec, step_id: str) -> str:
    return f"{POOL_PREFIX}step.{spec.name}.{step_id}"


def pool_of(spec: WorkflowSpec, step: AnyStep) -> tuple[str, int] | None:
    """The step's Airflow pool and its slots (None: the default pool, no limit)."""
    tool = _tool(step)
    if tool is not None and tool.concurrency is not None:
        return tool_pool(tool.name), int(tool.concurrency)
    if step.concurrency is not None:
        return step_pool(spec, step.id), step.concurrency
    return None


def pool_for_tool(tool_name: str) -> str | None:
    """The pool of a tool's own limit (for the compensation tasks calling it)."""
    from ledgerflow.tools.registry import get_tool

    tool = get_tool(tool_name)
    return tool_pool(tool.name) if tool.concurrency is not None else None


def rates_of(spec: WorkflowSpec, step: AnyStep) -> list[tuple[str, float]]:
    """The token buckets a call of ``step`` takes a turn from: (name, calls per second)."""
    out: list[tuple[str, float]] = []
    tool = _tool(step)
    if tool is not None and tool.rate is not None:
        out.append((f"tool:{tool.name}", parse_rate(tool.rate)))
    if step.rate is not None:
        out.append((f"step:{spec.name}.{step.id}", parse_rate(step.rate)))
    return out


def placement(spec: WorkflowSpec, step: AnyStep) -> tuple[str | None, str | None]:
    """(queue, pool) of a step: steps fused into one task must agree on both."""
    pool = pool_of(spec, step)
    return step.queue, pool[0] if pool else None


def problems(spec: WorkflowSpec) -> list[tuple[tuple[Any, ...], str]]:
    """The problems of the steps' ``concurrency`` and ``rate`` fields (location, message)."""
    found: list[tuple[tuple[Any, ...], str]] = []
    for position, step in enumerate(spec.steps):
        for field in ("concurrency", "rate"):
            if getattr(step, field) is not None and not isinstance(step, LIMITED_KINDS):
                found.append(
                    (
                        ("steps", position, field),
                        f"{field} limits the calls of tool and llm steps; a {step.kind} step "
                        "makes none",
                    )
                )
        tool = _tool(step)
        if step.concurrency is not None and tool is not None and tool.concurrency is not None:
            found.append(
                (
                    ("steps", position, "concurrency"),
                    f"tool {tool.name!r} already limits its calls to {tool.concurrency} at once "
                    f"(pool {tool_pool(tool.name)}); a step's task has one pool, so it "
                    "cannot add a limit of its own",
                )
            )
    return found


def pools(specs: list[WorkflowSpec]) -> dict[str, tuple[int, str]]:
    """Every pool the workflows use: name -> (slots, description). For a step's pool the
    newest version's size wins."""
    out: dict[str, tuple[int, str]] = {}
    for spec in sorted(specs, key=lambda s: (s.name, s.version)):
        for step in spec.steps:
            pool = pool_of(spec, step)
            if pool is None:
                continue
            name, slots = pool
            what = (
                f"tool {name.removeprefix(POOL_PREFIX + 'tool.')}"
                if name.startswith(POOL_PREFIX + "tool.")
                else f"step {step.id} of workflow {spec.name}"
            )
            out[name] = (slots, f"Ledgerflow: at most {slots} calls of {what} at once")
    return out
