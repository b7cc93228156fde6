"""The ``kind: event`` step: wait for a named external event with a correlation key.

    - id: settled
      kind: event
      needs: [charge]
      event: payment.settled
      key: "{{ steps.charge.output.payment_id }}"
      schema: {type: object, required: [amount], properties: {amount: {type: number}}}
      deadline: 2h
      on_deadline: fail            # or: continue (with default:), or {branch: <step>}

The step's output is the delivered payload (``steps.settled.output.amount``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from ledgerflow.spec.base import _ID, Duration, _Model, _StepBase, parse_duration

# An event name: dotted words, as providers name them (``payment.settled``).
EVENT_NAME = r"^[A-Za-z][A-Za-z0-9_.:-]{0,127}$"


class EventBranch(_Model):
    """At the deadline, take this step (one that needs the event step); others are skipped."""

    branch: str = Field(pattern=_ID)


class EventStep(_StepBase):
    """Waits (deferred, no worker slot) for ``event`` delivered with the rendered ``key``."""

    kind: Literal["event"]
    event: str = Field(pattern=EVENT_NAME)
    key: str = Field(min_length=1)
    """Templated like args: the correlation key a delivery must carry."""
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    """A JSON Schema the payload must fit (a delivery that does not gets 422)."""
    deadline: Duration = timedelta(days=3)
    on_deadline: Literal["fail", "continue"] | EventBranch = "fail"
    """``fail``: the step fails (the saga compensates); ``continue``: the step completes
    with ``default`` as its output; ``{branch: step}``: that step runs, others skip."""
    default: Any = None
    """The output when the deadline passes and ``on_deadline`` is ``continue``."""

    branch_field: ClassVar[str] = "on_deadline"

    _parse_deadline = field_validator("deadline", mode="before")(parse_duration)

    @property
    def branch_target(self) -> str | None:
        return self.on_deadline.branch if isinstance(self.on_deadline, EventBranch) else None

    @property
    def payload_schema(self) -> dict[str, Any] | None:
        return self.schema_

    @model_validator(mode="after")
    def _default_needs_continue(self) -> EventStep:
        if self.default is not None and self.on_deadline != "continue":
            raise ValueError("default is the output of `on_deadline: continue`; set that too")
        if self.deadline.total_seconds() <= 0:
            raise ValueError("deadline must be longer than zero")
        return self


def payload_error(schema: dict[str, Any] | None, payload: Any) -> str | None:
    """Why ``payload`` does not fit ``schema``, naming the field (None: it fits)."""
    problem = payload_problem(schema, payload)
    return None if problem is None else f"{problem[0]}: {problem[1]}"


def payload_problem(schema: dict[str, Any] | None, payload: Any) -> tuple[str, str] | None:
    """(the field, e.g. ``payload.amount``, and the message) of the first way ``payload``
    does not fit ``schema``; None when it fits (or there is no schema)."""
    if schema is None:
        return None
    from jsonschema import Draft202012Validator

    errors = sorted(
        Draft202012Validator(schema).iter_errors(payload), key=lambda e: list(e.absolute_path)
    )
    if not errors:
        return None
    first = errors[0]
    where = "payload" + "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.absolute_path
    )
    if first.validator == "required" and isinstance(first.instance, dict):
        missing = [n for n in first.validator_value if n not in first.instance]
        if missing:
            where = f"{where}.{missing[0]}"
    return where, first.message
