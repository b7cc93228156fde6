"""The parts every step model shares: durations, the strict base model, retry and
breaker policies, and ``_StepBase`` (what every kind of step has). Here rather than in
``spec.models`` so that a step kind in its own module (``spec.events``) can build on
them while ``spec.models`` lists it in the step union."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ledgerflow.spec.limits import Placement

_ID = r"^[a-z][a-z0-9_]{0,62}$"
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
_RESULT_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> timedelta:
    """``30``, ``"30s"``, ``"5m"``, ``"1.5h"``, ``"250ms"`` -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        elif str(value).startswith("P"):  # ISO 8601, as pydantic writes timedeltas
            from pydantic import TypeAdapter

            seconds = TypeAdapter(timedelta).validate_python(value).total_seconds()
        else:
            raise ValueError(
                f"{value!r} is not a duration (use a number of seconds or '250ms', '30s', '5m', '2h', '1d')"
            )
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds != seconds or seconds > 10 * 365 * 86400:
        raise ValueError(f"{value!r} is not a usable duration (at most 10 years)")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, Field(description="seconds, or '250ms', '30s', '5m', '2h', '1d'")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Backoff(_Model):
    """Exponential backoff: delay_n = min(max, initial * multiplier ** (n - 1))."""

    initial: Duration = timedelta(seconds=1)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = timedelta(minutes=5)

    _parse = field_validator("initial", "max", mode="before")(parse_duration)


class RetryPolicySpec(_Model):
    """How a step is retried inside one run."""

    max_attempts: int = Field(3, ge=1, le=100)
    backoff: Backoff = Backoff()
    jitter: Literal["full", "none"] = "full"
    non_retryable: tuple[str, ...] = ()
    """Exception class names (``ValueError`` or ``module.ValueError``) that fail at once."""

    @field_validator("non_retryable")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.match(r"^[A-Za-z_][\w.]*$", name):
                raise ValueError(f"{name!r} is not an exception class name")
        return value


class BreakerSpec(_Model):
    """A circuit breaker: after ``failures`` consecutive failed calls (across runs) it opens
    for ``cooldown``; steps meeting it wait (deferred, no worker slot); then one trial call
    is let through: success closes it, failure opens it again."""

    name: str | None = None
    """Calls sharing a name share a breaker (default: the tool's name)."""
    failures: int = Field(5, ge=1, le=1000)
    cooldown: Duration = timedelta(seconds=30)

    _parse = field_validator("cooldown", mode="before")(parse_duration)


class _StepBase(_Model, Placement):  # + queue, concurrency, rate (spec.limits)
    id: str = Field(pattern=_ID)
    description: str | None = None
    needs: tuple[str, ...] = ()
    when: str | None = None
    """A Jinja expression on ``params`` and ``steps``; false -> the step is skipped."""
    for_each: str | None = None
    """A Jinja expression giving a list; the step runs once per ``item`` (dynamic mapping)."""
    retry: RetryPolicySpec | None = None
    timeout: Duration | None = None
    breaker: BreakerSpec | None = None
    segment: str | None = Field(None, pattern=_ID)
    """Fuse this step with the other steps of the same segment (a chain of tool and LLM
    steps) into one Airflow task; see ``workflow.segments``."""

    _parse = field_validator("timeout", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )

    @field_validator("needs", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value
