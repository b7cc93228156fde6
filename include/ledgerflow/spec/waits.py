"""The timer step (``kind: wait``): its model, beside the other step kinds' modules."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from ledgerflow.spec.base import Duration, _StepBase, parse_duration


class WaitStep(_StepBase):
    """A durable timer: waits ``for`` a duration, or ``until`` a moment (a template,
    rendered when the step runs, read in the workflow's time zone), parked in the
    triggerer (no worker slot). Exactly one of the two (``workflow.waits`` checks it)."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, str_strip_whitespace=True, populate_by_name=True
    )

    kind: Literal["wait"]
    for_: Duration | None = Field(None, alias="for")
    until: str | None = None

    _parse_for = field_validator("for_", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )
