"""The ``slo:`` field of a workflow file: the objectives its runs are held to.

```yaml
slo: {completion_p95: 10m, success_rate: 99.5%, human_wait_p95: 2d, first_step_p95: 30s}
```

A ``*_p95`` (or ``*_p50``) objective says that at most 5% (50%) of the window's runs may
take longer; ``success_rate`` that at least that share of its finished runs succeed. Time
to completion excludes the time the run waited for people (approvals), which is
``human_wait``, measured apart. ``window`` (default ``7d``) is the span the objectives are
judged over (``ledgerflow slo``, the dashboard and the alerts).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")

# objective -> (indicator, the share of runs allowed beyond the target)
LATENCY_OBJECTIVES: dict[str, tuple[str, float]] = {
    "completion_p50": ("completion", 0.50),
    "completion_p95": ("completion", 0.05),
    "human_wait_p95": ("human_wait", 0.05),
    "first_step_p95": ("first_step", 0.05),
}


def parse_percent(value: Any) -> float:
    """``"99.5%"`` or ``99.5`` -> 0.995 (a number is a percentage, 1 to 100)."""
    if isinstance(value, bool):
        raise ValueError("a rate is a percentage such as '99.5%'")
    if isinstance(value, int | float):
        number = float(value)
        if number < 1:
            raise ValueError(f"{value!r}: write a rate as a percentage, e.g. '99.5%'")
    else:
        match = _PERCENT.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a percentage (write e.g. '99.5%')")
        number = float(match.group(1))
    if not 0 < number <= 100:
        raise ValueError(f"{value!r}: a rate is more than 0% and at most 100%")
    return number / 100


class SloSpec(BaseModel):
    """Service level objectives of one workflow (every field optional, at least one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    completion_p50: timedelta | None = Field(None, description="e.g. '2m'")
    completion_p95: timedelta | None = Field(None, description="e.g. '10m'")
    human_wait_p95: timedelta | None = Field(None, description="e.g. '2d'")
    first_step_p95: timedelta | None = Field(None, description="e.g. '30s'")
    success_rate: Annotated[
        float | None,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*%\s*$"},
                    {"type": "number", "minimum": 1, "maximum": 100},
                    {"type": "null"},
                ],
                "description": "a percentage of the finished runs, e.g. '99.5%'",
            }
        ),
    ] = None
    window: timedelta = Field(timedelta(days=7), description="judged over, e.g. '7d'")

    @field_validator(*LATENCY_OBJECTIVES, "window", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        from ledgerflow.spec.models import parse_duration

        if value is None:
            return None
        duration = parse_duration(value)
        if duration <= timedelta(0):
            raise ValueError("an objective's duration must be more than 0")
        return duration

    @field_validator("success_rate", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> Any:
        return None if value is None else parse_percent(value)

    @model_validator(mode="after")
    def _some_objective(self) -> SloSpec:
        if not self.objectives():
            raise ValueError(
                "an slo needs at least one objective: "
                f"{', '.join([*LATENCY_OBJECTIVES, 'success_rate'])}"
            )
        return self

    def objectives(self) -> dict[str, Any]:
        """The objectives set, by name (``window`` is not one)."""
        names = [*LATENCY_OBJECTIVES, "success_rate"]
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}
