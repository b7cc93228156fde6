"""Read a workflow file: safe YAML with line numbers, then the pydantic models.

Only ``yaml.SafeLoader`` is used: ``!!python/object`` and every other non-standard tag
is refused. The document is composed into nodes first so that every field path can be
mapped back to its line; a pydantic error on ``steps.2.needs`` becomes
``file:line: steps[2].needs: message``.

Hostile files are refused before they cost anything (the dag-processor loads the same
way): a file over ``MAX_FILE_BYTES``; nesting deeper than ``MAX_DEPTH`` (counted on the
parser's event stream, which does not recurse); aliases that refer to the node holding
them, or that expand the document past ``MAX_VALUES`` values (each node is counted once
with its expanded size, so a "billion laughs" file is refused in milliseconds). Each
refusal is a ``SpecError`` with the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ledgerflow.errors import SpecError, SpecErrors
from ledgerflow.spec.models import WorkflowSpec

LineMap = dict[tuple[Any, ...], int]

# A workflow file is a page or two of YAML; these bounds are far above any real one.
MAX_FILE_BYTES = 512 * 1024
MAX_DEPTH = 64  # nested mappings and lists
MAX_VALUES = 100_000  # values in the document once every alias is expanded


def field_name(loc: tuple[Any, ...]) -> str:
    """``("steps", 2, "needs")`` -> ``steps[2].needs``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _line_map(
    node: yaml.Node,
    path: tuple[Any, ...] = (),
    lines: LineMap | None = None,
    seen: set[int] | None = None,
) -> LineMap:
    lines = {} if lines is None else lines
    seen = set() if seen is None else seen
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return lines  # an alias: a problem inside it is reported where the alias is used
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = _key(key_node)
            lines[(*path, key)] = key_node.start_mark.line + 1
            if key is True and str(key_node.value).lower() == "on":
                # YAML 1.1 reads an unquoted ``on:`` as true; ``notify`` reads it as "on".
                lines[(*path, "on")] = key_node.start_mark.line + 1
                for index, item in enumerate(getattr(value_node, "value", None) or ()):
                    if isinstance(item, yaml.Node):
                        lines[(*path, "on", index)] = item.start_mark.line + 1
            _line_map(value_node, (*path, key), lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _line_map(item, (*path, index), lines, seen)
    return lines


def _check_depth(text: str, file: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` before any node is built."""
    depth = 0
    for event in yaml.parse(text, Loader=_BaseLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(
                    f"nested more than {MAX_DEPTH} levels deep (a workflow file needs a few)",
                    file=file,
                    line=event.start_mark.line + 1 if event.start_mark else None,
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_aliases(root: yaml.Node, file: str) -> None:
    """Refuse an alias inside the node it names, and a document that aliases expand past
    ``MAX_VALUES`` values. Each node is visited once (its expanded size is remembered), and
    the recursion is no deeper than the file's nesting (bounded by ``_check_depth``)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise SpecError(
                "an alias refers to the node that contains it (a recursive alias)",
                file=file,
                line=node.start_mark.line + 1,
            )
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(item) for item in node.value)
        open_nodes.discard(key)
        if total > MAX_VALUES:
            raise SpecError(
                f"more than {MAX_VALUES:,} values once aliases are expanded (anchors "
                "and aliases are for sharing a block, not for multiplying one)",
                file=file,
                line=node.start_mark.line + 1,
            )
        sizes[key] = total
        return total

    size(root)


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


_COLLECTION_TAGS = frozenset(
    f"tag:yaml.org,2002:{kind}" for kind in ("map", "seq", "set", "omap", "pairs")
)


def _construct_line(root: yaml.Node) -> int:
    """The line of the value the constructor could not build (PyYAML keeps no mark for
    it): the first node whose tag is for the other kind of node (``!!set`` on a scalar,
    ``!!int`` on a list), else the document's first line."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        scalar = isinstance(node, yaml.ScalarNode)
        if scalar == (node.tag in _COLLECTION_TAGS):
            return int(node.start_mark.line) + 1
        if isinstance(node, yaml.MappingNode):
            stack.extend(v for pair in reversed(node.value) for v in reversed(pair))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
    return int(root.start_mark.line) + 1


def load_yaml(text: str, file: str) -> tuple[Any, LineMap]:
    """Parse YAML safely; returns the data and a map from field path to line."""
    size = len(text.encode("utf-8"))
    if size > MAX_FILE_BYTES:
        raise SpecError(
            f"the file is {size:,} bytes; a workflow file may have at most {MAX_FILE_BYTES:,}",
            file=file,
        )
    try:
        _check_depth(text, file)
        loader = _UniqueKeyLoader(text)
        loader._lf_file = file  # type: ignore[attr-defined]
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError("the file is empty", file=file, line=1)
            _check_aliases(node, file)
            try:
                data = loader.construct_document(node)
            except (ValueError, TypeError) as exc:  # a tag on a value it cannot build
                at = _construct_line(node)
                raise SpecError(f"not valid YAML: {exc}", file=file, line=at) from None
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
    # into locations; they are not fields of the file. A step's kind tag follows its
    # index directly (a field after it, such as ``tool``, is a field).
    out: list[Any] = []
    previous: Any = None
    for part in loc:
        tag = isinstance(previous, int) and isinstance(part, str)
        previous = part
        if isinstance(part, str) and (
            (part in {"tool", "approval", "llm", "quality", "event", "wait"} and tag)
            or part.startswith(("literal[", "function-"))
            or part in {"KeyedIdempotency", "QualityBranch", "EventBranch"}
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
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:  # refused before it is read
            raise SpecError(
                f"the file is {size:,} bytes; a workflow file may have at most {MAX_FILE_BYTES:,}",
                file=file,
            )
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", file=file) from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SpecError("the file is not UTF-8 text", file=file, line=line) from None
    spec, lines = parse_spec(text, file)
    return spec, lines, text
