"""Templates in workflow files: static analysis at load time, rendering at run time.

Templates are Jinja in a sandbox with strict undefined names. The names a template may
use are ``params``, ``steps`` (outputs of upstream steps: ``steps.<id>.output``),
``run`` (``run.id``, ``run.workflow``, ``run.version``, ``run.logical_date``) and, in
a ``for_each`` step, ``item`` and ``index``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

GLOBAL_NAMES = frozenset({"params", "steps", "run", "item", "index"})

# A template builds a value for a tool call, not a payload of its own: a repetition
# (``"x" * n``, ``[0] * n``) or a power past these is refused, at validation when the
# number is written in the template, when rendering otherwise.
MAX_REPEAT_ITEMS = 100_000
MAX_EXPONENT = 256


class _Environment(ImmutableSandboxedEnvironment):
    """Keys before attributes: ``params.items`` is the param called ``items``, not ``dict.items``.

    ``*`` and ``**`` are checked before they compute: a 200 MB string from one
    ``{{ params.x * 200000000 }}`` is refused instead of built."""

    intercepted_binops = frozenset({"*", "**"})

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, dict) and attribute in obj:
            return obj[attribute]
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > MAX_EXPONENT:
                raise SecurityError(f"a power of {right} is refused (at most {MAX_EXPONENT})")
            return left**right
        for seq, times in ((left, right), (right, left)):
            sized = isinstance(seq, str | list | tuple) and isinstance(times, int)
            if sized and len(seq) * times > MAX_REPEAT_ITEMS:
                raise SecurityError(
                    f"repeating a value of length {len(seq)} {times} times is refused "
                    f"(at most {MAX_REPEAT_ITEMS:,} characters or items)"
                )
        return left * right


@functools.lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = _Environment(undefined=StrictUndefined, autoescape=False)
    env.filters["tojson"] = lambda value: json.dumps(value, default=str, sort_keys=True)
    return env


@dataclass(frozen=True)
class References:
    """What a template refers to, and what in it is refused (``refused``: one reason each)."""

    names: frozenset[str]
    params: frozenset[str]
    steps: frozenset[str]
    refused: tuple[str, ...] = ()
    # ``x * N`` with N written in the template and over MAX_REPEAT_ITEMS: (what x is, N).
    # x is "" for a text or list literal (always refused), a param's name for
    # ``params.<name>`` (refused when the param is text or a list), None otherwise (the
    # render-time check applies: a number times N is just a number).
    repeats: tuple[tuple[str | None, int], ...] = ()


def is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def _walk(node: nodes.Node) -> Iterator[nodes.Node]:
    yield node
    for child in node.iter_child_nodes():
        yield from _walk(child)


def _refusal(node: nodes.Node) -> str | None:
    """Why the sandbox would refuse this node at run time, said at validation instead."""
    if isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
        return f"attribute {node.attr!r} is not allowed (names starting with _ are internal)"
    if isinstance(node, nodes.Getitem):
        key = _const(node.arg)
        if key is not None and key.startswith("__"):
            return f"item {key!r} is not allowed (names starting with __ are internal)"
    if isinstance(node, nodes.Pow):
        value = _int(node.right)
        if value is not None and abs(value) > MAX_EXPONENT:
            return f"a power of {value} is refused (at most {MAX_EXPONENT})"
    return None


def _repeat(node: nodes.Node) -> tuple[str | None, int] | None:
    if not isinstance(node, nodes.Mul):
        return None
    for times, other in ((node.left, node.right), (node.right, node.left)):
        value = _int(times)
        if value is None or abs(value) <= MAX_REPEAT_ITEMS:
            continue
        if isinstance(other, nodes.List | nodes.Tuple) or (
            isinstance(other, nodes.Const) and isinstance(other.value, str)
        ):
            return "", value
        if (
            isinstance(other, nodes.Getattr)
            and isinstance(other.node, nodes.Name)
            and other.node.name == "params"
        ):
            return other.attr, value
        return None, value
    return None


def _analyse(tree: nodes.Node) -> References:
    names: set[str] = set()
    params: set[str] = set()
    steps: set[str] = set()
    refused: list[str] = []
    repeats: list[tuple[str | None, int]] = []
    assigned = {
        n.name for n in _walk(tree) if isinstance(n, nodes.Name) and n.ctx in ("store", "param")
    }
    for node in _walk(tree):
        reason = _refusal(node)
        if reason is not None and reason not in refused:
            refused.append(reason)
        repeat = _repeat(node)
        if repeat is not None:
            repeats.append(repeat)
        if isinstance(node, nodes.Name) and node.ctx == "load" and node.name not in assigned:
            names.add(node.name)
        if isinstance(node, nodes.Getattr | nodes.Getitem) and isinstance(node.node, nodes.Name):
            attr = node.attr if isinstance(node, nodes.Getattr) else _const(node.arg)
            if attr is None:
                continue
            if node.node.name == "params":
                params.add(attr)
            elif node.node.name == "steps":
                steps.add(attr)
    return References(
        frozenset(names), frozenset(params), frozenset(steps), tuple(refused), tuple(repeats)
    )


def _int(node: nodes.Node) -> int | None:
    if not isinstance(node, nodes.Const):
        return None
    value = node.value
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _const(node: nodes.Node) -> str | None:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else None


def analyse_template(source: str) -> References:
    """Names used by a ``{{ ... }}`` template. Raises ``TemplateSyntaxError``."""
    return _analyse(environment().parse(source))


def analyse_expression(source: str) -> References:
    """Names used by a bare expression (``when``, ``for_each``). Raises ``TemplateSyntaxError``."""
    environment().compile_expression(source)
    return analyse_template("{{ (" + source + ") }}")


def iter_strings(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], str]]:
    """Every string in a nested args structure with its path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from iter_strings(item, (*path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from iter_strings(item, (*path, index))


def render_value(value: Any, context: dict[str, Any]) -> Any:
    """Render every template in a nested structure.

    A string that is exactly one ``{{ expression }}`` keeps the expression's native type
    (a number stays a number, a list stays a list); anything else renders to text.
    """
    if isinstance(value, str):
        if not is_template(value):
            return value
        stripped = value.strip()
        if (
            stripped.startswith("{{")
            and stripped.endswith("}}")
            and stripped.count("{{") == 1
            and stripped.count("}}") == 1
            and "{%" not in stripped
        ):
            return evaluate(stripped[2:-2], context)
        text = _interpolate(value, context)
        return text if text is not None else _template(value).render(context)
    if isinstance(value, dict):
        return {key: render_value(item, context) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [render_value(item, context) for item in value]
    return value


_SEGMENT = re.compile(r"\{\{\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\}\}")


def _interpolate(source: str, context: dict[str, Any]) -> str | None:
    """Text with only plain ``{{ a.b.c }}`` segments, rendered the way Jinja renders it
    (``str`` of each value, one trailing newline dropped) without compiling a template.
    None when the source needs Jinja (filters, expressions, blocks, other names)."""
    if "{%" in source or "{#" in source or "\r" in source:
        return None
    pieces: list[str] = []
    last = 0
    for match in _SEGMENT.finditer(source):
        if match.group(1).split(".")[0] not in context:
            return None
        pieces.append(source[last : match.start()])
        pieces.append(str(_lookup_path(match.group(1), context)))
        last = match.end()
    tail = source[last:]
    if "{{" in tail or "}}" in "".join(pieces[::2]) or "{{" in "".join(pieces[::2]):
        return None
    pieces.append(tail[:-1] if tail.endswith("\n") else tail)
    return "".join(pieces)


@functools.lru_cache(maxsize=512)
def _template(source: str) -> Any:
    return environment().from_string(source)


@functools.lru_cache(maxsize=512)
def _expression(source: str) -> Any:
    return environment().compile_expression(source, undefined_to_none=False)


_PATH = re.compile(r"^\s*([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*$")
_MISSING = object()


def _lookup_path(path: str, context: dict[str, Any]) -> Any:
    """``steps.a.output.b`` the way the sandbox resolves it (keys before attributes),
    without compiling a template: most templates are exactly such a path."""
    head, *rest = path.split(".")
    value = context[head]
    for name in rest:
        found = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
        if found is _MISSING:
            # Not a plain key: the sandbox decides (attributes, errors, refusals).
            return evaluate_compiled(path, context)
        value = found
    return value


def evaluate_compiled(expression: str, context: dict[str, Any]) -> Any:
    compiled = _expression(expression.strip())
    result = compiled(**context)
    if isinstance(result, StrictUndefined):
        str(result)  # raises UndefinedError naming the missing variable
    return result


def evaluate(expression: str, context: dict[str, Any]) -> Any:
    """Evaluate a bare Jinja expression to a Python value."""
    path = _PATH.match(expression)
    if path and path.group(1).split(".")[0] in context:
        return _lookup_path(path.group(1), context)
    return evaluate_compiled(expression, context)


__all__ = [
    "GLOBAL_NAMES",
    "References",
    "TemplateSyntaxError",
    "analyse_expression",
    "analyse_template",
    "evaluate",
    "is_template",
    "iter_strings",
    "render_value",
]
