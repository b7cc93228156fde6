"""Fused segments: chains of steps that run in one Airflow task.

A task hop costs what Airflow's scheduling costs (0.3 s tuned, seconds under load); a
step's own checkpoint costs milliseconds. A *segment* runs a chain of steps one after
the other inside ONE Airflow task, each step still going through the kernel with its own
checkpoint, attempts, idempotency key, retry policy, dead letter and compensation.

Which steps a segment may hold, and why:

* **tool and LLM steps** only. An approval or an event step or a wait (timer) parks in the triggerer and a quality step
  runs Great Expectations in its own task; a ``for_each`` step is one mapped task per
  item. Each of those ends a segment and runs as its own task.
* **a chain**: each step of a segment after the first needs exactly the step before it,
  and that step is needed by nothing else. A fan-out (two steps need one) or a fan-in
  (one step needs two) ends the segment there, so the branches stay parallel tasks and
  Airflow's trigger rules decide the join as they do without fusing.
* **a branch point** (an LLM step with ``on_invalid``) may only be a segment's last
  step: the segment task then follows the branch as the step's own task would.

A step whose ``when`` is false is skipped, and so is every step after it in the segment
(what Airflow's trigger rule does to a chain); when the last one is skipped the segment
task ends skipped, so the skip carries on downstream as it would without fusing.

``execution: fused`` fuses every such chain of a workflow (each at least two steps);
``segment: <name>`` on steps fuses just those, and says why when it cannot.

A segment's task runs on one queue and in at most one pool (``workflow.limits``): its
steps must name the same ``queue``, and at most one concurrency limit among them (the
segment takes that pool). ``execution: fused`` ends a chain where either changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from ledgerflow.spec.models import AnyStep, LlmStep, ToolStep, WorkflowSpec
from ledgerflow.workflow.limits import placement

FUSABLE = (ToolStep, LlmStep)
AUTO_PREFIX = "fused__"


@dataclass(frozen=True)
class Segment:
    task_id: str
    steps: tuple[str, ...]
    name: str | None = None  # ``segment: <name>`` in the file; None: ``execution: fused``

    @property
    def label(self) -> str:
        """What the grid shows for the segment's task: its steps in order."""
        shown = self.steps if len(self.steps) <= 4 else (self.steps[0], "…", self.steps[-1])
        text = " → ".join(shown)
        if len(self.steps) > 4:
            text += f" ({len(self.steps)} steps)"
        return f"{self.name}: {text}" if self.name else text


def refusal(step: AnyStep) -> str | None:
    """Why ``step`` cannot be in a segment (None: it can)."""
    if not isinstance(step, FUSABLE):
        reason = {
            "approval": "an approval parks in the triggerer until someone decides",
            "event": "an event step parks in the triggerer until its event arrives",
            "quality": "a quality step runs its checks in a task of its own",
            "wait": "a wait parks in the triggerer until its time",
        }.get(step.kind, f"a {step.kind} step runs in a task of its own")
        return f"{reason}, so it cannot be fused"
    if step.for_each is not None:
        return "a for_each step runs as one mapped task per item, so it cannot be fused"
    return None


def _dependants(spec: WorkflowSpec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {s.id: [] for s in spec.steps}
    for step in spec.steps:
        for need in step.needs:
            out.setdefault(need, []).append(step.id)
    return out


def _link_problem(
    spec: WorkflowSpec, dependants: dict[str, list[str]], a: str, b: str
) -> str | None:
    """Why ``b`` cannot follow ``a`` in one segment (None: it can)."""
    step_a, step_b = spec.step(a), spec.step(b)
    if step_b.needs != (a,):
        needs = ", ".join(step_b.needs) or "nothing"
        return (
            f"step {b!r} needs {needs}; a step of a segment needs exactly the step "
            f"before it ({a!r})"
        )
    if dependants.get(a) != [b]:
        return (
            f"step {a!r} is needed by {', '.join(dependants.get(a, []))}; a fan-out ends "
            "a segment (only the last step of a segment may be needed by several steps)"
        )
    if getattr(step_a, "branch_target", None) is not None:
        return f"step {a!r} is a branch point; it can only be the last step of a segment"
    return None


def plan(spec: WorkflowSpec) -> tuple[list[Segment], list[tuple[tuple[Any, ...], str]]]:
    """The workflow's segments, and the problems of its ``segment:`` fields (each as the
    field's location in the file and a message)."""
    from ledgerflow.workflow.loaded import topological_order

    order = topological_order(spec)
    position = {s.id: i for i, s in enumerate(spec.steps)}
    dependants = _dependants(spec)
    problems: list[tuple[tuple[Any, ...], str]] = []
    segments: list[Segment] = []
    step_ids = set(position)

    named: dict[str, list[str]] = {}
    for step_id in order:
        step = spec.step(step_id)
        if step.segment is None:
            continue
        loc = ("steps", position[step_id], "segment")
        why = refusal(step)
        if why is not None:
            problems.append((loc, why))
            continue
        if step.segment in step_ids:
            problems.append((loc, f"segment {step.segment!r} has the name of a step"))
            continue
        named.setdefault(step.segment, []).append(step_id)
    for name, members in named.items():
        bad = False
        for a, b in pairwise(members):
            why = _link_problem(spec, dependants, a, b)
            mixed = _placement_problem(spec, members, b)
            if why is None and mixed is not None:
                problems.append((("steps", position[b], mixed[0]), f"segment {name!r}: {mixed[1]}"))
                bad = True
                break
            if why is not None:
                problems.append(
                    (("steps", position[b], "segment"), f"segment {name!r} must be a chain: {why}")
                )
                bad = True
                break
        if not bad and len(members) > 1:
            segments.append(Segment(task_id=name, steps=tuple(members), name=name))

    if spec.execution == "fused":
        placed: set[str] = set()
        for step_id in order:
            step = spec.step(step_id)
            if step_id in placed or step.segment is not None or refusal(step) is not None:
                continue
            chain = [step_id]
            placed.add(step_id)
            while True:
                following = dependants.get(chain[-1], [])
                if len(following) != 1:
                    break
                nxt = spec.step(following[0])
                if (
                    nxt.segment is not None
                    or refusal(nxt) is not None
                    or placement(spec, nxt) != placement(spec, spec.step(chain[-1]))
                    or _link_problem(spec, dependants, chain[-1], nxt.id) is not None
                ):
                    break
                chain.append(nxt.id)
                placed.add(nxt.id)
            if len(chain) > 1:
                task_id = f"{AUTO_PREFIX}{chain[0]}__{chain[-1]}"
                if task_id in step_ids:
                    problems.append(
                        (
                            ("steps", position[task_id], "id"),
                            f"step id {task_id!r} is the task id of the fused segment "
                            f"{chain[0]} .. {chain[-1]}; rename the step",
                        )
                    )
                    continue
                segments.append(Segment(task_id=task_id, steps=tuple(chain)))
    segments.sort(key=lambda s: order.index(s.steps[0]))
    return segments, problems


def _placement_problem(spec: WorkflowSpec, members: list[str], b: str) -> tuple[str, str] | None:
    """Why ``b`` cannot join the steps before it in ``members`` (field, message): another
    queue, or a second concurrency limit (None: it can)."""
    before = members[: members.index(b)]
    step_b = spec.step(b)
    queue_b, pool_b = placement(spec, step_b)
    for a in before:
        queue_a, pool_a = placement(spec, spec.step(a))
        if queue_a != queue_b:
            shown = [f"{q!r}" if q else "the default queue" for q in (queue_a, queue_b)]
            return "queue", (
                f"mixes queues: step {a!r} runs on {shown[0]} and step {b!r} on {shown[1]}; "
                "a segment is one task on one queue"
            )
        if pool_a is not None and pool_b is not None and pool_a != pool_b:
            return "concurrency", (
                f"holds two concurrency limits (pools {pool_a} of step {a!r} and {pool_b} of "
                f"step {b!r}); a segment's task has one pool: put one of them in its own task"
            )
    return None


def queue_and_pool(spec: WorkflowSpec, steps: tuple[str, ...]) -> tuple[str | None, str | None]:
    """The queue and the pool of a segment's task (its steps agree on the queue and hold
    at most one pool, as ``plan`` checked)."""
    queue: str | None = None
    pool: str | None = None
    for step_id in steps:
        step_queue, step_pool = placement(spec, spec.step(step_id))
        queue = queue or step_queue
        pool = pool or step_pool
    return queue, pool


_PLANS: dict[int, tuple[WorkflowSpec, list[Segment]]] = {}


def segments(spec: WorkflowSpec) -> list[Segment]:
    """The segments of a (validated) workflow, computed once per spec object."""
    cached = _PLANS.get(id(spec))
    if cached is None or cached[0] is not spec:
        cached = (spec, plan(spec)[0])
        _PLANS[id(spec)] = cached
    return cached[1]


def task_of(spec: WorkflowSpec, step_id: str) -> str:
    """The Airflow task that runs ``step_id``: its segment's, or its own."""
    for segment in segments(spec):
        if step_id in segment.steps:
            return segment.task_id
    return step_id


def steps_of(spec: WorkflowSpec, task_id: str) -> tuple[str, ...]:
    """The steps an Airflow task of the workflow runs (a step's own task: that step)."""
    for segment in segments(spec):
        if segment.task_id == task_id:
            return segment.steps
    return (task_id,)
