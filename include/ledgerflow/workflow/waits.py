"""Wait steps (durable timers): the checks a workflow file gets, and reading ``until``.

A wait step declares exactly one of ``for`` (a duration, counted from the moment the
step first parks in its run) and ``until`` (a moment; a template rendered when the step
runs). A moment without an offset is read in the workflow's time zone (``timezone:``,
as schedules are); one with an offset or ``Z`` keeps it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from ledgerflow.spec.models import WaitStep, WorkflowSpec
from ledgerflow.spec.templates import is_template


class _Errors(Protocol):
    def add(self, loc: tuple[Any, ...], message: str) -> None: ...


UNTIL_HELP = (
    "a date and time such as '2026-12-24T09:00' (read in the workflow's time zone) or "
    "'2026-12-24T09:00:00+01:00'"
)


def parse_until(text: str, timezone: str) -> datetime:
    """``until`` as rendered -> an aware moment; ``ValueError`` naming what it got."""
    import pendulum

    value = str(text).strip()
    try:
        parsed = pendulum.parse(value, tz=pendulum.timezone(timezone), strict=False)
    except Exception as exc:  # pendulum raises its own ParserError, and ValueError
        raise ValueError(f"{value!r} is not {UNTIL_HELP}: {exc}") from None
    if not isinstance(parsed, datetime):  # a duration or a bare time of day
        raise ValueError(f"{value!r} is not {UNTIL_HELP}")
    return parsed


def check_wait(spec: WorkflowSpec, step: WaitStep, loc: tuple[Any, ...], errors: _Errors) -> None:
    """Exactly one of ``for``/``until``; a literal ``until`` must read as a moment; a wait
    is one timer (no ``for_each``) and calls nothing (no ``breaker``)."""
    if step.for_ is None and step.until is None:
        errors.add(
            (*loc, "kind"),
            "a wait step needs `for: <duration>` (e.g. 3d) or `until: <date and time>`",
        )
    elif step.for_ is not None and step.until is not None:
        errors.add((*loc, "until"), "a wait step takes `for` or `until`, not both")
    if step.until is not None and not is_template(step.until):
        try:
            parse_until(step.until, spec.timezone)
        except ValueError as exc:
            errors.add((*loc, "until"), str(exc))
    if step.for_each is not None:
        errors.add((*loc, "for_each"), "for_each is not supported on a wait step")
    if step.breaker is not None:
        errors.add((*loc, "breaker"), "a wait step calls nothing, so it has no breaker")
