"""The expectations a quality step may declare, and suite files.

Pure Python (no Great Expectations import): the workflow loader checks every
expectation against this catalog when the file is loaded, so an unknown expectation or a
missing column is a spec error naming the line, not a task failure at 2 a.m.

An expectation is one single-key mapping in YAML::

    - not_null: order_id                       # the short form: the column
    - between: {column: amount, min: 0, max: 10000, mostly: 0.99}
    - in_set: {column: status, values: [captured, refunded]}
    - row_count_between: {min: 1}

A suite is a file ``<name>.yaml`` in the suites folder (``include/ledgerflow_suites/``
beside the package, or ``[ledgerflow] suites_dir``) holding ``expectations:`` in the same
form. Steps name a suite; they never give a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUITE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Kind:
    """One catalog entry: the GX class and the arguments it takes in YAML."""

    gx_class: str
    column: bool
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    doc: str = ""


CATALOG: dict[str, Kind] = {
    "not_null": Kind("ExpectColumnValuesToNotBeNull", True, (), ("mostly",), "no nulls"),
    "unique": Kind("ExpectColumnValuesToBeUnique", True, (), ("mostly",), "no duplicates"),
    "between": Kind(
        "ExpectColumnValuesToBeBetween",
        True,
        (),
        ("min", "max", "strict_min", "strict_max", "mostly"),
        "min <= value <= max",
    ),
    "in_set": Kind("ExpectColumnValuesToBeInSet", True, ("values",), ("mostly",), "value in a set"),
    "row_count_between": Kind(
        "ExpectTableRowCountToBeBetween", False, (), ("min", "max"), "min <= rows <= max"
    ),
    "match_regex": Kind(
        "ExpectColumnValuesToMatchRegex", True, ("regex",), ("mostly",), "value matches a regex"
    ),
}
# YAML names -> GX keyword arguments.
_GX_ARGS = {"min": "min_value", "max": "max_value", "values": "value_set"}


@dataclass(frozen=True)
class Expectation:
    """One checked expectation: its catalog name and its YAML arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``not_null(order_id)``, ``between(amount, min=0, max=100)``: how reports name it."""
        rest = [f"{k}={v!r}" for k, v in self.args.items() if k != "column"]
        parts = ([str(self.args["column"])] if "column" in self.args else []) + rest
        return f"{self.name}({', '.join(parts)})"

    def gx_kwargs(self) -> dict[str, Any]:
        return {_GX_ARGS.get(k, k): v for k, v in self.args.items()}

    def to_gx(self) -> Any:
        import great_expectations as gx

        return getattr(gx.expectations, CATALOG[self.name].gx_class)(**self.gx_kwargs())


Problem = tuple[tuple[Any, ...], str]
"""(path below the expectation item, message)."""


def parse_expectation(item: Any) -> tuple[Expectation | None, list[Problem]]:
    """One YAML item -> an expectation, or the problems that prevent it."""
    if not isinstance(item, dict) or len(item) != 1:
        return None, [
            ((), "an expectation is one mapping like `not_null: order_id` or "
             "`between: {column: amount, min: 0}`")
        ]  # fmt: skip
    name, value = next(iter(item.items()))
    kind = CATALOG.get(name)
    if kind is None:
        return None, [
            ((name,), f"unknown expectation {name!r}; known: {', '.join(sorted(CATALOG))}")
        ]
    if value is None:
        args: dict[str, Any] = {}
    elif isinstance(value, str) and kind.column:
        args = {"column": value}
    elif isinstance(value, dict):
        args = dict(value)
    else:
        form = "a column name or a mapping" if kind.column else "a mapping"
        return None, [((name,), f"{name} takes {form}, got {type(value).__name__}")]
    problems = _check_args(name, kind, args)
    return (None if problems else Expectation(name, args)), problems


def _check_args(name: str, kind: Kind, args: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    allowed = {*kind.required, *kind.optional, *(("column",) if kind.column else ())}
    for arg in args:
        if arg not in allowed:
            problems.append(
                (
                    (name, arg),
                    f"{name} has no argument {arg!r} (it takes: {', '.join(sorted(allowed))})",
                )
            )
    if kind.column and not (isinstance(args.get("column"), str) and args["column"].strip()):
        problems.append(((name,), f"{name} needs a column (`{name}: <column>` or `column: ...`)"))
    for arg in kind.required:
        if arg not in args:
            problems.append(((name,), f"{name} needs argument {arg!r}"))
    if "mostly" in args and not (_number(args["mostly"]) and 0 < float(args["mostly"]) <= 1):
        problems.append(((name, "mostly"), "mostly is a fraction in (0, 1]"))
    if name in ("between", "row_count_between"):
        if args.get("min") is None and args.get("max") is None:
            problems.append(((name,), f"{name} needs min, max or both"))
        for bound in ("min", "max"):
            value = args.get(bound)
            ok = (
                _number(value)
                if name == "row_count_between"
                else _number(value) or isinstance(value, str)
            )
            if value is not None and not ok:
                problems.append(((name, bound), f"{bound} must be a number, got {value!r}"))
        low: Any = args.get("min")
        high: Any = args.get("max")
        if _number(low) and _number(high) and low > high:
            problems.append(((name,), f"min {low} is greater than max {high}"))
    if name == "in_set" and "values" in args:
        values = args["values"]
        if not isinstance(values, list) or not values:
            problems.append(((name, "values"), "values is a non-empty list"))
    if name == "match_regex" and "regex" in args:
        try:
            re.compile(str(args["regex"]))
        except re.error as exc:
            problems.append(((name, "regex"), f"not a regular expression: {exc}"))
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- suites --------------------------------------------------------------------------


def suites_dir() -> Path:
    """``[ledgerflow] suites_dir`` (or ``$LEDGERFLOW_SUITES_DIR``), else
    ``include/ledgerflow_suites`` beside the package."""
    from ledgerflow import settings

    configured = settings.get("suites_dir")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parents[2] / "ledgerflow_suites"


def known_suites() -> list[str]:
    folder = suites_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def suite_path(name: str) -> Path | None:
    if not SUITE_NAME.match(name):
        return None
    path = suites_dir() / f"{name}.yaml"
    return path if path.is_file() else None


def read_suite(name: str) -> list[Any]:
    """The raw expectation items of suite ``name``; ``SpecErrors`` naming the suite file
    and line for a missing or invalid suite."""
    from ledgerflow.errors import SpecError, SpecErrors
    from ledgerflow.spec.loader import field_name, line_for, load_yaml

    path = suite_path(name)
    if path is None:
        raise SpecError(
            f"unknown suite {name!r}; suites in {suites_dir()}: {', '.join(known_suites()) or 'none'}"
        )
    file = str(path)
    data, lines = load_yaml(path.read_text(encoding="utf-8"), file)
    errors: list[SpecError] = []
    for key in sorted(set(data) - {"expectations", "description"}):
        errors.append(
            SpecError(
                "unknown field (a suite has description and expectations)",
                file=file,
                line=line_for(lines, (key,)),
                field=key,
            )
        )
    items = data.get("expectations")
    if not isinstance(items, list) or not items:
        errors.append(
            SpecError(
                "a suite holds `expectations:`, a non-empty list",
                file=file,
                line=line_for(lines, ("expectations",)),
                field="expectations",
            )
        )
        items = []
    for index, item in enumerate(items):
        for sub, message in parse_expectation(item)[1]:
            loc = ("expectations", index, *sub)
            errors.append(
                SpecError(message, file=file, line=line_for(lines, loc), field=field_name(loc))
            )
    if errors:
        raise SpecErrors(errors)
    return list(items)


def resolve(step_expectations: tuple[dict[str, Any], ...], suite: str | None) -> list[Expectation]:
    """The expectations a step checks: its suite's, then its own (already validated)."""
    from ledgerflow.errors import SpecError

    raw = read_suite(suite) if suite else []
    out: list[Expectation] = []
    for item in [*raw, *step_expectations]:
        expectation, problems = parse_expectation(item)
        if expectation is None:
            raise SpecError(problems[0][1], field="expectations")
        out.append(expectation)
    return out
