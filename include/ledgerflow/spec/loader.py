"""Read a workflow file: safe YAML with line numbers, then the pydantic models.

Only ``yaml.SafeLoader`` is used: ``!!python/object`` and every other non-standard tag
is refused. The document is composed into nodes first so that every field path can be
mapped back to its line; a pydantic error on ``steps.2.needs`` becomes
``file:line: steps[2].needs: message``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ledgerflow.errors import SpecError, SpecErrors
from ledgerflow.spec.models import WorkflowSpec

LineMap = dict[tuple[Any, ...], int]


def field_name(loc: tuple[Any, ...]) -> str:
    """``("steps", 2, "needs")`` -> ``steps[2].needs``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_map(node: yaml.Node, path: tuple[Any, ...] = (), lines: LineMap | None = None) -> LineMap:
    lines = {} if lines is None else lines
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _key(key_node)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _line_map(item, (*path, index), lines)
    return lines


def _key(node: yaml.Node) -> Any:
    """A mapping key as the loaded document (and so pydantic's error locations) has it:
    ``1`` is the int 1, ``true`` the bool True; a quoted or plain word stays text."""
    if isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:str":
        try:
            value = yaml.safe_load(node.value)
        except yaml.YAMLError:
            return node.value
        try:
            hash(value)
        except TypeError:
            return node.value
        return value
    return node.value


def line_for(lines: LineMap, loc: tuple[Any, ...]) -> int | None:
    """The line of the deepest prefix of ``loc`` that the file has."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


# The C parser (libyaml) when PyYAML has it: same nodes and marks, ~5x faster to parse.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[misc]
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        own_keys = [k for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        seen: set[Any] = set()
        for key_node in own_keys:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:
                raise SpecError(
                    "a mapping key must be a plain value, not a list or mapping",
                    file=getattr(self, "_lf_file", None),
                    line=key_node.start_mark.line + 1,
                ) from None
            if key in seen:
                raise SpecError(
                    f"duplicate key {key!r}",
                    file=getattr(self, "_lf_file", None),
                    line=key_node.start_mark.line + 1,
                    field=str(key),
                )
            seen.add(key)
        # Keys merged in with ``<<: *anchor`` may be overridden by the mapping's own keys.
        self.flatten_mapping(node)  # type: ignore[no-untyped-call]
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, file: str) -> tuple[Any, LineMap]:
    """Parse YAML safely; returns the data and a map from field path to line."""
    try:
        loader = _UniqueKeyLoader(text)
        loader._lf_file = file  # type: ignore[attr-defined]
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError("the file is empty", file=file, line=1)
            data = loader.construct_document(node)
        finally:
            loader.dispose()  # type: ignore[no-untyped-call]
    except SpecError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or str(exc)
        if "could not determine a constructor" in problem:
            problem = f"unsafe or unknown YAML tag refused ({problem.split('tag ')[-1].strip()})"
        raise SpecError(problem, file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {exc}", file=file) from None
    if not isinstance(data, dict):
        raise SpecError(
            "a workflow file must be a mapping (name, version, steps, ...)", file=file, line=1
        )
    return data, _line_map(node)


def parse_spec(text: str, file: str) -> tuple[WorkflowSpec, LineMap]:
    """YAML text -> a validated model (field-level checks only; see ``validate``)."""
    data, lines = load_yaml(text, file)
    try:
        return WorkflowSpec.model_validate(data), lines
    except ValidationError as exc:
        errors = []
        raw = exc.errors()
        step_errors = any(len(e["loc"]) > 1 and e["loc"][0] == "steps" for e in raw)
        for err in raw:
            loc = _clean_loc(tuple(err["loc"]))
            message = err["msg"]
            if err["type"] == "too_short" and loc == ("steps",) and step_errors:
                continue  # the steps are there, they are invalid: that is said per step
            if err["type"] == "extra_forbidden":
                message = "unknown field (not part of the workflow format)"
            elif err["type"] == "union_tag_invalid":
                ctx = err.get("ctx") or {}
                message = f"unknown step kind {ctx.get('tag')!r}; known kinds: " + str(
                    ctx.get("expected_tags", "")
                ).replace("'", "")
                loc = (*loc, "kind")
            errors.append(
                SpecError(message, file=file, line=line_for(lines, loc), field=field_name(loc))
            )
        raise SpecErrors(errors) from None


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic inserts union member names ("tool", "KeyedIdempotency", "literal[...]")
    # into locations; they are not fields of the file.
    out: list[Any] = []
    for part in loc:
        if isinstance(part, str) and (
            (part in {"tool", "approval", "llm", "quality"} and out and isinstance(out[-1], int))
            or part.startswith(("literal[", "function-"))
            or part in {"KeyedIdempotency", "QualityBranch"}
        ):
            continue
        out.append(part)
    return tuple(out)


def read_spec_file(
    path: str | Path, display_path: str | None = None
) -> tuple[WorkflowSpec, LineMap, str]:
    path = Path(path)
    file = display_path or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", file=file) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SpecError("the file is not UTF-8 text", file=file, line=line) from None
    spec, lines = parse_spec(text, file)
    return spec, lines, text
