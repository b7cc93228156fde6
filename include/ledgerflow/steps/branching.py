"""Branch points: a step that chooses which of the steps that need it run next.

An approval with ``on_reject``, an LLM step with ``on_invalid`` and a quality step with
``on_failure: {branch: ...}`` are branch points. On the normal outcome every direct
downstream task runs except the fallback; on the fallback outcome only the fallback
runs. The skipped tasks show as skipped in the grid, and Airflow's trigger rules carry
the skip further down (a join after both paths still runs).

A branching operator subclasses ``airflow.sdk.bases.skipmixin.SkipMixin`` and sets
``inherits_from_skipmixin = True`` (so the scheduler honours the "followed" XCom it
leaves, also when the task is ended by a trigger rather than on a worker).
"""

from __future__ import annotations

from typing import Any


def followed(operator: Any, *, fallback: str, take_fallback: bool) -> list[str]:
    """The direct downstream task ids that run after this outcome (teardowns always do)."""
    heads = {fallback, f"{fallback}__items"}  # a for_each fallback starts at its items task
    return [
        t.task_id
        for t in operator.get_direct_relatives(upstream=False)
        if getattr(t, "is_teardown", False)
        or ((t.task_id in heads) if take_fallback else (t.task_id not in heads))
    ]


def follow(operator: Any, context: Any, *, fallback: str | None, take_fallback: bool) -> None:
    """Skip the branch not taken. Call after the step's outcome is in the ledger: Airflow
    ends the task here (``DownstreamTasksSkipped``), so nothing after this call runs."""
    if fallback is None:
        return
    keep = followed(operator, fallback=fallback, take_fallback=take_fallback)
    downstream = {t.task_id for t in operator.get_direct_relatives(upstream=False)}
    if set(keep) == downstream:
        return
    operator.log.info(
        "branch: %s; skipping %s",
        "fallback" if take_fallback else "main",
        sorted(downstream - set(keep)),
    )
    operator.skip_all_except(context["ti"], keep)


def branch_skips(
    operator: Any, context: Any, *, fallback: str | None, take_fallback: bool
) -> list[str]:
    """What ``follow`` skips, without ending the task (its "followed" XCom is pushed):
    the caller ends the task with one skip list (``steps.saga.end_forward_task``)."""
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    try:
        follow(operator, context, fallback=fallback, take_fallback=take_fallback)
    except DownstreamTasksSkipped as skip:
        tasks = skip.tasks if isinstance(skip.tasks, list) else [skip.tasks]
        return [t if isinstance(t, str) else t[0] for t in tasks]
    return []
