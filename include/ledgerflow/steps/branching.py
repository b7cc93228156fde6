"""Branch points: a step that chooses which of the steps that need it run next.

An approval with ``on_reject``, an LLM step with ``on_invalid`` and a quality step with
``on_failure: {branch: ...}`` are branch points. On the normal outcome every direct
downstream task runs except the fallback; on the fallback outcome only the fallback
runs. The skipped tasks show as skipped in the grid, and Airflow's trigger rules carry
the skip further down (a join after both paths still runs).
"""

from __future__ import annotations

from typing import Any


def follow(operator: Any, context: Any, *, fallback: str | None, take_fallback: bool) -> None:
    """Skip the branch not taken. Call after the step's outcome is in the ledger: Airflow
    ends the task here (``DownstreamTasksSkipped``), so nothing after this call runs."""
    if fallback is None:
        return
    ti = context["ti"]
    downstream = operator.get_direct_relatives(upstream=False)
    heads = {fallback, f"{fallback}__items"}  # a for_each fallback starts at its items task
    skip = {
        t.task_id
        for t in downstream
        if not getattr(t, "is_teardown", False)
        and ((t.task_id not in heads) if take_fallback else (t.task_id in heads))
    }
    if not skip:
        return
    keep = [t.task_id for t in downstream if t.task_id not in skip]
    operator.log.info(
        "branch: %s; skipping %s", "fallback" if take_fallback else "main", sorted(skip)
    )
    operator.skip_all_except(ti, keep)
