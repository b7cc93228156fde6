"""Checks that need the whole workflow: the step graph, tools, templates, idempotency.

``load_workflow(path)`` is what both ``ledgerflow validate`` and the DAG factory call;
every problem becomes a ``SpecError`` naming the file, the line and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ledgerflow.errors import SpecError, SpecErrors, UnknownToolError
from ledgerflow.spec.events import EventStep
from ledgerflow.spec.loader import LineMap, field_name, line_for, read_spec_file
from ledgerflow.spec.models import (
    AnyStep,
    ApprovalStep,
    LlmStep,
    QualityStep,
    ToolCall,
    ToolStep,
    WaitStep,
    WorkflowSpec,
)
from ledgerflow.spec.templates import (
    GLOBAL_NAMES,
    MAX_REPEAT_ITEMS,
    TemplateSyntaxError,
    analyse_expression,
    analyse_template,
    is_template,
    iter_strings,
)
from ledgerflow.workflow.event_checks import event_problems
from ledgerflow.workflow.graph import ancestors, find_cycle
from ledgerflow.workflow.waits import check_wait

CRON_PRESETS = frozenset(
    {"@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
)
# SQL text is never a template: a value pasted into it is an injection.
SQL_TEMPLATE = (
    "SQL text may not be a template (a value pasted into SQL is an injection): write :name "
    'in it and give the value in {where}, e.g. {{name: "{{{{ params.name }}}}"}}'
)
# ``:name`` as SQLAlchemy's text() finds it (not a ``::type`` cast, not an escaped ``\:``).
SQL_PLACEHOLDER = re.compile(r"(?<![:\w\\]):(\w+)(?!:)")
NO_IDEMPOTENCY = (
    "the engine refuses to run a step that has not declared how it handles retry: "
    "tool {tool!r} has side effects, so declare `idempotency: {{key: <template>}}`, "
    "`idempotency: natural` or `idempotency: none`"
)


class _Collector:
    def __init__(self, file: str, lines: LineMap) -> None:
        self.file = file
        self.lines = lines
        self.errors: list[SpecError] = []
        self.step_refs: dict[int, set[str]] = {}

    def add(self, loc: tuple[Any, ...], message: str) -> None:
        self.errors.append(
            SpecError(
                message, file=self.file, line=line_for(self.lines, loc), field=field_name(loc)
            )
        )


def validate_spec(spec: WorkflowSpec, lines: LineMap, file: str) -> None:
    """Raise ``SpecErrors`` listing every problem found; return if there are none."""
    errors = _Collector(file, lines)
    index = _check_graph(spec, errors)
    graph_ok = not errors.errors
    _check_schedule(spec, errors)
    upstream = ancestors(spec) if graph_ok else {s.id: set() for s in spec.steps}
    for position, step in enumerate(spec.steps):
        loc: tuple[Any, ...] = ("steps", position)
        if isinstance(step, ToolStep):
            _check_tool_step(spec, step, loc, upstream.get(step.id, set()), errors)
        else:
            _check_templates(spec, step, loc, upstream.get(step.id, set()), errors)
        if isinstance(step, ApprovalStep):
            from ledgerflow.workflow.quorum_checks import check_quorum

            check_quorum(step, loc, errors.add)
        if isinstance(step, ApprovalStep) and step.for_each is not None:
            errors.add(
                (*loc, "for_each"),
                "for_each is not supported on an approval step: approve the whole list once",
            )
        if isinstance(step, QualityStep):
            _check_quality(step, loc, errors)
        if isinstance(step, LlmStep):
            _check_llm(step, loc, errors)
        if isinstance(step, EventStep):
            for sub, message in event_problems(step):
                errors.add((*loc, *sub), message)
        if isinstance(step, WaitStep):
            check_wait(spec, step, loc, errors)
        _check_branch(spec, step, loc, errors)
    if graph_ok:
        from ledgerflow.workflow.limits import problems
        from ledgerflow.workflow.segments import plan

        for where, message in [*problems(spec), *plan(spec)[1]]:
            errors.add(where, message)
    _check_result(spec, errors)
    del index
    if errors.errors:
        raise SpecErrors(errors.errors)
    for position, step in enumerate(spec.steps):
        _REFERENCES[(id(spec), step.id)] = (spec, frozenset(errors.step_refs.get(position, ())))


_REFERENCES: dict[tuple[int, str], tuple[WorkflowSpec, frozenset[str]]] = {}


def referenced_steps(spec: WorkflowSpec, step: AnyStep) -> frozenset[str]:
    """The steps whose outputs a step's own templates read (args, key, when, for_each).

    Recorded while the spec is validated, so a running step loads only those outputs
    without analysing its templates again; computed here for a spec never validated.
    """
    cached = _REFERENCES.get((id(spec), step.id))
    if cached is not None and cached[0] is spec:
        return cached[1]
    refs: set[str] = set()
    for _path, source, expr in template_fields(step):
        if expr:
            refs |= analyse_expression(source).steps
        elif is_template(source):
            refs |= analyse_template(source).steps
    _REFERENCES[(id(spec), step.id)] = (spec, frozenset(refs))
    return frozenset(refs)


def template_fields(step: AnyStep) -> list[tuple[tuple[Any, ...], str, bool]]:
    """Every templated string of a step: (path within the step, source, is_expression).

    ``compensate`` is left out: it renders after the step, with the step's own output.
    """
    fields: list[tuple[tuple[Any, ...], str, bool]] = []
    if isinstance(step, ToolStep):
        fields += [(path, value, False) for path, value in iter_strings(step.args, ("args",))]
        key = getattr(step.idempotency, "key", None)
        if key is not None:
            fields.append((("idempotency", "key"), key, False))
    elif isinstance(step, ApprovalStep):
        fields += [(("subject",), step.subject, False), (("body",), step.body, False)]
        fields += [(path, value, False) for path, value in iter_strings(step.payload, ("payload",))]
    elif isinstance(step, EventStep):
        fields.append((("key",), step.key, False))
    elif isinstance(step, QualityStep):
        data = step.dataset
        fields += [
            (path, value, False)
            for path, value in iter_strings(data.parameters, ("dataset", "parameters"))
        ]
        if data.expression is not None:
            fields.append((("dataset", "expression"), data.expression, True))
        if data.step is not None:  # checked and loaded like a template naming that output
            fields.append((("dataset", "step"), f"steps.{data.step}.output", True))
    elif isinstance(step, LlmStep):
        fields += [
            (("system_prompt",), step.system_prompt, False),
            (("prompt",), step.prompt, False),
        ]
        if step.idempotency is not None:
            fields.append((("idempotency", "key"), step.idempotency.key, False))
        # Checks also see ``output``, the validated answer.
        fields += [
            (("checks", n, "expr"), c.expr, True) for n, c in enumerate(step.checks) if c.expr
        ]
    elif isinstance(step, WaitStep) and step.until is not None:
        fields.append((("until",), step.until, False))
    for name in ("when", "for_each"):
        expression = getattr(step, name)
        if expression is not None:
            fields.append(((name,), expression, True))
    return fields


def _check_templates(
    spec: WorkflowSpec,
    step: AnyStep,
    loc: tuple[Any, ...],
    upstream: set[str],
    errors: _Collector,
) -> None:
    """The template checks of a step kind that calls no tool (approval, llm, quality)."""
    allowed = set(GLOBAL_NAMES) - ({"item", "index"} if step.for_each is None else set())
    for path, source, expr in template_fields(step):
        names = allowed - {"item", "index"} if path[0] in ("when", "for_each") else allowed
        if path[0] == "checks":
            names = names | {"output"}
        _check_refs(spec, source, (*loc, *path), upstream, names, errors, expr=expr)


RESULT_NAMES = frozenset({"params", "steps", "run"})
"""What a workflow's ``result`` templates may use (no ``item``: they render once per run)."""


def _check_result(spec: WorkflowSpec, errors: _Collector) -> None:
    """``result``: templates over params, run and the outputs of steps that exist (any
    step: the result renders after the run succeeded)."""
    if spec.result is None:
        return
    every_step = {s.id for s in spec.steps}
    for path, value in iter_strings(spec.result, ("result",)):
        _check_refs(spec, value, path, every_step, set(RESULT_NAMES), errors)


def result_steps(spec: WorkflowSpec) -> frozenset[str]:
    """The steps whose outputs the workflow's ``result`` reads."""
    refs: set[str] = set()
    for _path, value in iter_strings(spec.result or {}):
        if is_template(value):
            refs |= analyse_template(value).steps
    return frozenset(refs)


def _check_quality(step: QualityStep, loc: tuple[Any, ...], errors: _Collector) -> None:
    """Each expectation against the catalog; the suite exists and is itself valid."""
    from ledgerflow.quality.catalog import parse_expectation, read_suite

    for n, item in enumerate(step.expectations):
        for sub, message in parse_expectation(item)[1]:
            errors.add((*loc, "expectations", n, *sub), message)
    if step.suite is not None:
        try:
            read_suite(step.suite)
        except SpecErrors as exc:
            errors.errors.extend(exc.errors)
        except SpecError as exc:  # the suite file's own YAML, or no such suite
            if exc.file is not None:
                errors.errors.append(exc)
            else:
                errors.add((*loc, "suite"), exc.message)
    if step.for_each is not None:
        errors.add(
            (*loc, "for_each"), "for_each is not supported on a quality step: validate the list"
        )
    query = step.dataset.query
    if query is None:
        return
    given = step.dataset.parameters
    if is_template(query):
        errors.add((*loc, "dataset", "query"), SQL_TEMPLATE.format(where="dataset.parameters"))
        return
    placeholders = set(SQL_PLACEHOLDER.findall(query))
    for name in sorted(placeholders - set(given)):
        errors.add(
            (*loc, "dataset", "query"), f"the query's :{name} has no value in dataset.parameters"
        )
    for name in sorted(set(given) - placeholders):
        errors.add((*loc, "dataset", "parameters", name), f"the query has no :{name} placeholder")


def _check_llm(step: LlmStep, loc: tuple[Any, ...], errors: _Collector) -> None:
    """One output form, a usable JSON Schema, registered model and check names."""
    from ledgerflow.errors import UnknownLlmName
    from ledgerflow.llm.registry import get_check, get_output_model

    if (step.output_schema is None) == (step.output_model is None):
        errors.add(
            (*loc, "output_schema" if step.output_schema is not None else "prompt"),
            "give exactly one of output_schema (an inline JSON Schema) or output_model "
            "(the name of a registered pydantic model)"
            + (", not both" if step.output_schema is not None else ""),
        )
    if step.output_schema is not None:
        for sub, message in schema_problems(step.output_schema):
            errors.add((*loc, "output_schema", *sub), message)
    if step.output_model is not None:
        try:
            get_output_model(step.output_model)
        except UnknownLlmName as exc:
            errors.add((*loc, "output_model"), str(exc))
    for n, item in enumerate(step.checks):
        if item.function is not None:
            try:
                get_check(item.function)
            except UnknownLlmName as exc:
                errors.add((*loc, "checks", n, "function"), str(exc))
    if step.for_each is not None:
        errors.add((*loc, "for_each"), "for_each is not supported on an llm step yet")


def schema_problems(schema: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Why an inline output schema cannot be used: not JSON Schema, or not an object."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        return [(tuple(exc.path), f"not a valid JSON Schema: {exc.message}")]
    if schema.get("type") != "object":
        return [(("type",), "the output schema must describe an object (type: object)")]
    return []


def _check_branch(
    spec: WorkflowSpec, step: AnyStep, loc: tuple[Any, ...], errors: _Collector
) -> None:
    """A branch target (on_reject, on_invalid...) must be a step that needs this one."""
    target = getattr(step, "branch_target", None)
    if target is None:
        return
    field = getattr(step, "branch_field", "on_reject")
    dependants = [s.id for s in spec.steps if step.id in s.needs]
    if target not in {s.id for s in spec.steps}:
        errors.add((*loc, field), f"unknown step {target!r}")
    elif target not in dependants:
        errors.add(
            (*loc, field),
            f"step {target!r} must list {step.id!r} in its needs to be its branch "
            f"(steps that need {step.id!r}: {', '.join(dependants) or 'none'})",
        )
    elif step.for_each is not None:
        errors.add((*loc, field), "a for_each step cannot branch")


def _check_graph(spec: WorkflowSpec, errors: _Collector) -> dict[str, int]:
    index: dict[str, int] = {}
    for position, step in enumerate(spec.steps):
        if step.id in index:
            errors.add(
                ("steps", position, "id"),
                f"duplicate step id {step.id!r} (first used by steps[{index[step.id]}])",
            )
        else:
            index[step.id] = position
    for position, step in enumerate(spec.steps):
        for n, need in enumerate(step.needs):
            if need not in index:
                errors.add(("steps", position, "needs", n), f"unknown step {need!r} in needs")
            elif need == step.id:
                errors.add(("steps", position, "needs", n), "a step cannot need itself")
    if not errors.errors:
        cycle = find_cycle(spec)
        if cycle:
            first = index[cycle[0]]
            errors.add(("steps", first, "needs"), "dependency cycle: " + " -> ".join(cycle))
    return index


def _check_schedule(spec: WorkflowSpec, errors: _Collector) -> None:
    import pendulum

    try:
        pendulum.timezone(spec.timezone)
    except Exception:
        errors.add(
            ("timezone",),
            f"unknown time zone {spec.timezone!r} (use an IANA name like Europe/Paris)",
        )
    try:
        pendulum.parse(spec.start_date)
    except Exception:
        errors.add(("start_date",), f"{spec.start_date!r} is not a date (YYYY-MM-DD)")
    if spec.schedule is None:
        return
    # Airflow refuses to import a scheduled DAG whose required params have no default.
    for name, param in spec.params.items():
        if param.required and param.default is None:
            errors.add(
                ("params", name, "required"),
                f"param {name!r} is required without a default, but scheduled runs get the "
                "params' defaults: give it a default or drop the schedule",
            )
    if spec.schedule.startswith("@"):
        if spec.schedule not in CRON_PRESETS:
            errors.add(
                ("schedule",),
                f"unknown preset {spec.schedule!r}; use one of {sorted(CRON_PRESETS)}",
            )
        return
    from croniter import croniter

    if not croniter.is_valid(spec.schedule):
        errors.add(("schedule",), f"{spec.schedule!r} is not a valid cron expression")


def _check_tool_step(
    spec: WorkflowSpec,
    step: ToolStep,
    loc: tuple[Any, ...],
    upstream: set[str],
    errors: _Collector,
) -> None:
    allowed = set(GLOBAL_NAMES) - ({"item", "index"} if step.for_each is None else set())
    _check_call(spec, step.tool, step.args, step.idempotency, loc, upstream, allowed, errors)
    for name in ("when", "for_each"):
        source = getattr(step, name)
        if source is not None:
            _check_refs(
                spec, source, (*loc, name), upstream, allowed - {"item", "index"}, errors, expr=True
            )
    if step.compensate is not None:
        if step.for_each is not None:
            errors.add(
                (*loc, "compensate"),
                "compensate is not supported on a for_each step yet: compensate a step that "
                "handles the whole list, or drop for_each",
            )
        _check_compensate(spec, step, step.compensate, (*loc, "compensate"), upstream, errors)


def _check_call(
    spec: WorkflowSpec,
    tool_name: str,
    args: dict[str, Any],
    idempotency: Any,
    loc: tuple[Any, ...],
    upstream: set[str],
    allowed: set[str],
    errors: _Collector,
) -> None:
    from ledgerflow.tools.registry import get_tool

    try:
        tool = get_tool(tool_name)
    except UnknownToolError as exc:
        errors.add((*loc, "tool"), str(exc))
        tool = None
    if tool is not None:
        for arg in args:
            if arg not in tool.params and not tool.accepts_any:
                errors.add(
                    (*loc, "args", arg),
                    f"tool {tool_name!r} has no argument {arg!r} (it takes: {', '.join(tool.params) or 'none'})",
                )
        for arg in tool.required:
            if arg not in args:
                errors.add((*loc, "args"), f"tool {tool_name!r} needs argument {arg!r}")
        if tool.behaviour == "effect" and idempotency is None:
            errors.add(loc, NO_IDEMPOTENCY.format(tool=tool_name))
    statement = args.get("statement") if tool_name == "sql" else None
    if isinstance(statement, str) and is_template(statement):
        errors.add((*loc, "args", "statement"), SQL_TEMPLATE.format(where="args.parameters"))
    for path, value in iter_strings(args, (*loc, "args")):
        _check_refs(spec, value, path, upstream, allowed, errors)
    key = getattr(idempotency, "key", None)
    if key is not None:
        _check_refs(spec, key, (*loc, "idempotency", "key"), upstream, allowed, errors)


def _check_compensate(
    spec: WorkflowSpec,
    step: ToolStep,
    call: ToolCall,
    loc: tuple[Any, ...],
    upstream: set[str],
    errors: _Collector,
) -> None:
    # A compensation runs after the step completed: it may read the step's own output.
    allowed = set(GLOBAL_NAMES) - ({"item", "index"} if step.for_each is None else set())
    _check_call(
        spec,
        call.tool,
        call.args,
        call.idempotency or "natural",
        loc,
        upstream | {step.id},
        allowed,
        errors,
    )


def _check_refs(
    spec: WorkflowSpec,
    source: str,
    loc: tuple[Any, ...],
    upstream: set[str],
    allowed: set[str],
    errors: _Collector,
    *,
    expr: bool = False,
) -> None:
    if not expr and not is_template(source):
        return
    try:
        refs = analyse_expression(source) if expr else analyse_template(source)
    except TemplateSyntaxError as exc:
        errors.add(loc, f"template syntax error: {exc.message}")
        return
    for reason in refs.refused:
        errors.add(loc, f"template refused: {reason}")
    for what, times in refs.repeats:
        declared = spec.params.get(what) if what else None
        if what == "" or (declared is not None and declared.type in ("string", "array")):
            errors.add(
                loc,
                f"template refused: repeating {'params.' + what if what else 'a text or list'} "
                f"{times} times (a repetition may have at most {MAX_REPEAT_ITEMS:,} characters "
                "or items)",
            )
    for name in sorted(refs.names - allowed):
        hint = " (item/index exist only in a for_each step)" if name in {"item", "index"} else ""
        errors.add(
            loc, f"template uses unknown name {name!r}; known: {', '.join(sorted(allowed))}{hint}"
        )
    for param in sorted(refs.params - set(spec.params)):
        errors.add(
            loc,
            f"template refers to unknown param {param!r}; declared params: {', '.join(spec.params) or 'none'}",
        )
    step_ids = {s.id for s in spec.steps}
    if len(loc) > 2 and loc[0] == "steps" and loc[2] != "compensate":
        errors.step_refs.setdefault(loc[1], set()).update(refs.steps)
    for ref in sorted(refs.steps):
        if ref not in step_ids:
            errors.add(loc, f"template refers to unknown step {ref!r}")
        elif ref not in upstream:
            errors.add(
                loc, f"template refers to step {ref!r}, which is not upstream: add it to needs"
            )


def load_workflow(path: str | Path, *, display_path: str | None = None) -> WorkflowSpec:
    """Read, parse and fully validate one workflow file."""
    file = display_path or str(path)
    spec, lines, _text = read_spec_file(path, file)
    validate_spec(spec, lines, file)
    expected = _expected_identity(Path(path))
    if expected is not None:
        name, version = expected
        if spec.name != name or spec.version != version:
            raise SpecError(
                f"the file says {spec.name!r} v{spec.version}, but its path says {name!r} v{version} "
                "(workflows live at workflows/<name>/v<version>.yaml)",
                file=file,
                line=line_for(lines, ("name",)),
                field="name",
            )
    return spec


def _expected_identity(path: Path) -> tuple[str, int] | None:
    stem = path.stem
    if path.parent.parent.name == "workflows" and stem.startswith("v") and stem[1:].isdigit():
        return path.parent.name, int(stem[1:])
    return None
