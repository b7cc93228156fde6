"""What ``validate_spec`` checks on an event step (``spec.events.EventStep``)."""

from __future__ import annotations

from typing import Any

from ledgerflow.spec.events import EventStep, payload_error


def event_problems(step: EventStep) -> list[tuple[tuple[Any, ...], str]]:
    """(location within the step, message) for each problem of an event step."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    problems: list[tuple[tuple[Any, ...], str]] = []
    if step.for_each is not None:
        problems.append((("for_each",), "for_each is not supported on an event step"))
    schema = step.payload_schema
    if schema is not None:
        try:
            Draft202012Validator.check_schema(schema)
        except SchemaError as exc:
            problems.append((("schema", *exc.path), f"not a valid JSON Schema: {exc.message}"))
            return problems
        if step.default is not None:
            error = payload_error(schema, step.default)
            if error is not None:
                problems.append((("default",), f"does not fit the schema: {error}"))
    return problems
