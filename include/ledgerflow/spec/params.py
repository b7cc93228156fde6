"""Run params checked against a workflow's ``params`` schema, naming each bad field.

One checker for every way a run starts: Ledgerflow's trigger endpoint and webhook (422
before any run exists) and the first task of any run, however it was started (Airflow's
UI, its REST API, the CLI, a schedule): Airflow validates the types of declared params
when it creates a run, but lets undeclared keys through, so a typo such as ``ammount``
would otherwise run with the default silently.

Keys starting with ``ledgerflow_`` belong to the engine (``ledgerflow_retry_of`` of a
retry run): the first task accepts them; a trigger request may not set them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ledgerflow.errors import InvalidParams
from ledgerflow.spec.models import ParamSpec, _json_type_ok

ENGINE_PREFIX = "ledgerflow_"


@dataclass(frozen=True)
class ParamProblem:
    """One field that does not fit: ``field`` is the param's name."""

    field: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "message": self.message}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def param_problems(
    specs: Mapping[str, ParamSpec],
    given: Mapping[str, Any],
    *,
    engine_keys: bool = False,
) -> list[ParamProblem]:
    """Every problem of ``given`` against ``specs``, in a stable order (empty: it fits).

    ``engine_keys``: ``ledgerflow_*`` keys are the engine's and pass unchecked (a task's
    params); otherwise they are refused (a trigger request may not set them).
    """
    problems: list[ParamProblem] = []
    for name in sorted(given, key=str):
        value = given[name]
        if not isinstance(name, str):
            problems.append(ParamProblem(str(name), "a param name must be a string"))
            continue
        if name.startswith(ENGINE_PREFIX):
            if not engine_keys:
                problems.append(ParamProblem(name, f"{ENGINE_PREFIX}* params are reserved"))
            continue
        spec = specs.get(name)
        if spec is None:
            declared = ", ".join(sorted(specs)) or "none"
            problems.append(ParamProblem(name, f"unknown param (declared: {declared})"))
            continue
        if value is None:
            if spec.required:
                problems.append(ParamProblem(name, "is required and may not be null"))
            continue
        if not _json_type_ok(spec.type, value):
            problems.append(ParamProblem(name, f"expected {spec.type}, got {_kind_of(value)}"))
            continue
        if spec.enum is not None and value not in spec.enum:
            allowed = ", ".join(repr(v) for v in spec.enum)
            problems.append(ParamProblem(name, f"{value!r} is not one of {allowed}"))
    for name, spec in specs.items():
        if spec.required and spec.default is None and name not in given:
            problems.append(ParamProblem(name, "is required"))
    return problems


def effective_params(specs: Mapping[str, ParamSpec], given: Mapping[str, Any]) -> dict[str, Any]:
    """The params a run's steps see: an empty (``null``) optional field means its declared
    default, as a field left out does. Airflow's Trigger form sends ``null`` for a
    cleared optional field, which both Airflow's param schema and ``check_params``
    accept; without this, the step would get ``None`` where its tool wants a number."""
    out = dict(given)
    for name, spec in specs.items():
        if out.get(name, ...) is None and spec.default is not None:
            out[name] = spec.default
    return out


def resolved_params(specs: Mapping[str, ParamSpec], given: Mapping[str, Any]) -> dict[str, Any]:
    """The params a run sees: each declared param's default, overridden by ``given``."""
    return {**{name: spec.default for name, spec in specs.items()}, **given}


def check_params(
    workflow: str,
    version: int,
    specs: Mapping[str, ParamSpec],
    given: Mapping[str, Any],
    *,
    engine_keys: bool = False,
) -> None:
    """Raise :class:`InvalidParams` naming every field that does not fit."""
    problems = param_problems(specs, effective_params(specs, given), engine_keys=engine_keys)
    if problems:
        raise InvalidParams(workflow, version, problems)
