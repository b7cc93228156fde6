"""Templates: native types for lone expressions, strict names, a sandbox, static analysis."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError

from ledgerflow.spec.templates import (
    analyse_expression,
    analyse_template,
    evaluate,
    is_template,
    iter_strings,
    render_value,
)


def ctx() -> dict[str, Any]:
    return {
        "params": {"n": 3, "name": "ada", "xs": [1, 2, 3], "flag": False, "obj": {"k": "v"}},
        "steps": {"a": {"output": {"b": 7, "rows": [{"id": 1}]}}},
        "run": {"id": "wf__v1/manual__1", "date": "2026-01-02"},
    }


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ params.n }}", 3),
        ("{{ params.xs }}", [1, 2, 3]),
        ("{{ params.flag }}", False),
        ("{{ params.obj }}", {"k": "v"}),
        ("{{ steps.a.output.b + 1 }}", 8),
        ("{{ steps.a.output.rows[0].id }}", 1),
        ("{{ none }}", None),
        ("  {{ params.n }}  ", 3),
    ],
)
def test_lone_expression_keeps_its_native_type(template: str, expected: Any) -> None:
    """A string that is exactly one ``{{ expr }}`` renders to the expression's Python value."""
    value = render_value(template, ctx())
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("n={{ params.n }}", "n=3"),
        ("{{ params.n }}{{ params.n }}", "33"),
        ("{{ params.name }}-{{ run.id }}", "ada-wf__v1/manual__1"),
        ("{% if params.flag %}yes{% else %}no{% endif %}", "no"),
    ],
)
def test_mixed_text_renders_to_str(template: str, expected: str) -> None:
    """Text around or between expressions (or any ``{% %}``) renders to a ``str``."""
    value = render_value(template, ctx())
    assert isinstance(value, str)
    assert value == expected


def test_tojson_filter_in_text() -> None:
    """``tojson`` renders JSON with sorted keys inside text."""
    assert render_value("x={{ params.obj | tojson }}", ctx()) == 'x={"k": "v"}'


def test_nested_structures_are_rendered_throughout() -> None:
    """Every string in nested dicts and lists is rendered; other values pass through unchanged."""
    value = {
        "a": ["{{ params.n }}", {"b": "id-{{ steps.a.output.b }}"}],
        "c": 5,
        "d": None,
        "e": "plain text",
        "f": ("{{ params.xs }}",),
    }
    assert render_value(value, ctx()) == {
        "a": [3, {"b": "id-7"}],
        "c": 5,
        "d": None,
        "e": "plain text",
        "f": [[1, 2, 3]],
    }


def test_non_templates_are_returned_as_is() -> None:
    """Strings without ``{{``/``{%`` and non-strings come back identical (no Jinja involved)."""
    for value in ["no braces", "{ single }", "}}", 4, 2.5, True, None]:
        assert render_value(value, {}) == value


@pytest.mark.parametrize(
    "template",
    [
        "{{ missing }}",
        "text {{ missing }}",
        "{{ params.missing }}",
        "{{ steps.zz.output }}",
        "{{ params.missing.deeper }}",
    ],
)
def test_strict_undefined_raises(template: str) -> None:
    """A name or attribute that is not in the context raises UndefinedError (never renders '')."""
    with pytest.raises(UndefinedError):
        render_value(template, ctx())


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "x {{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ params.__class__ }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
        "{{ params.xs.__init__.__globals__ }}",
        "{{ run.id.__class__.__mro__ }}",
    ],
)
def test_sandbox_refuses_attribute_escapes(template: str) -> None:
    """Dunder attribute chains (the classic Jinja escape to ``object``) are refused."""
    with pytest.raises((SecurityError, UndefinedError)):
        render_value(template, ctx())


@pytest.mark.parametrize(
    "template", ["{{ params.xs.append(4) }}", "x{{ params.obj.update({'k': 1}) }}"]
)
def test_sandbox_is_immutable(template: str) -> None:
    """A template cannot mutate the context it is rendered with."""
    context = ctx()
    with pytest.raises(SecurityError):
        render_value(template, context)
    assert context == ctx()


def test_evaluate_bare_expression() -> None:
    """``evaluate`` (used for ``when``/``for_each``) returns Python values and is strict too."""
    assert evaluate("params.n > 2 and not params.flag", ctx()) is True
    assert evaluate("params.xs", ctx()) == [1, 2, 3]
    with pytest.raises(UndefinedError):
        evaluate("nope", ctx())


def test_analyse_template_finds_params_and_steps() -> None:
    """Attribute and constant-subscript references to params and steps are all found."""
    refs = analyse_template(
        "{{ params.x }} {{ params['y'] }} {{ steps.a.output.b }} {{ steps['c'].output }} {{ run.id }}"
    )
    assert refs.params == {"x", "y"}
    assert refs.steps == {"a", "c"}
    assert refs.names == {"params", "steps", "run"}


def test_analyse_template_ignores_local_loop_variables() -> None:
    """Names bound inside the template (loop variables, set) are not reported as free names."""
    refs = analyse_template(
        "{% set sep = ',' %}{% for row in steps.a.output.rows %}{{ row.id }}{{ sep }}{% endfor %}"
    )
    assert refs.names == {"steps"}
    assert refs.steps == {"a"}
    assert refs.params == frozenset()


def test_analyse_template_reports_unknown_names() -> None:
    """A free name that is not a template global is reported in ``names``."""
    assert analyse_template("{{ item }} {{ os.environ }}").names == {"item", "os"}


def test_analyse_expression() -> None:
    """Bare ``when``/``for_each`` expressions are analysed like a ``{{ }}`` template."""
    refs = analyse_expression("params.x > 1 and steps.a.output.ok or params['z']")
    assert refs.params == {"x", "z"}
    assert refs.steps == {"a"}
    assert refs.names == {"params", "steps"}


@pytest.mark.parametrize("source", ["{{ params. }}", "{% if x %}", "{{ a b }}"])
def test_analyse_template_syntax_error(source: str) -> None:
    """A template that Jinja cannot parse raises TemplateSyntaxError at analysis time."""
    with pytest.raises(TemplateSyntaxError):
        analyse_template(source)


def test_analyse_expression_syntax_error() -> None:
    """An expression Jinja cannot parse raises TemplateSyntaxError at analysis time."""
    with pytest.raises(TemplateSyntaxError):
        analyse_expression("params.x ==")


def test_is_template_and_iter_strings() -> None:
    """``is_template`` spots ``{{``/``{%``; ``iter_strings`` yields every string with its path."""
    assert is_template("a {{ b }}")
    assert is_template("{% if a %}{% endif %}")
    assert not is_template("{ a }")
    found = dict(iter_strings({"a": ["x", {"b": "y"}], "c": 1, "d": ("z",)}, ("args",)))
    assert found == {
        ("args", "a", 0): "x",
        ("args", "a", 1, "b"): "y",
        ("args", "d", 0): "z",
    }


def test_render_agrees_with_load_time_analysis() -> None:
    """A string that validates as a template renders as Jinja renders it (here: ``'1 }}'``)."""
    source = "{{ x }} }}"
    assert analyse_template(source).names == {"x"}  # load-time validation accepts it
    assert render_value(source, {"x": 1}) == "1 }}"


@pytest.mark.parametrize("name", ["items", "values", "keys", "get"])
def test_param_named_like_a_dict_method_resolves_to_the_param(name: str) -> None:
    """``params.<name>`` is the declared param's value for every valid param name."""
    assert evaluate(f"params.{name}", {"params": {name: [1, 2]}}) == [1, 2]


@pytest.mark.parametrize(
    "expression",
    [
        "params.order_id",
        "params.items",
        "params.nested.deep",
        "steps.a.output.value",
        "steps.a.output",
        "steps.a.status",
        "params.missing",
        "steps.zzz.output",
        "steps.a.output.value.real",
        "steps.a.output.__class__",
        "params.nested.keys",
    ],
)
def test_path_fast_path_agrees_with_the_sandbox(expression: str) -> None:
    """A plain dotted path is resolved without compiling a template; its value, or the
    error it raises, is the sandbox's own."""
    from jinja2.exceptions import SecurityError, UndefinedError

    from ledgerflow.spec.templates import evaluate, evaluate_compiled

    context = {
        "params": {"order_id": "o-1", "items": [1, 2], "nested": {"deep": 3}},
        "steps": {"a": {"status": "completed", "output": {"value": 7}}},
    }

    def outcome(fn: Any) -> Any:
        try:
            value = fn(expression, context)
        except (UndefinedError, SecurityError) as exc:
            return ("error", type(exc).__name__ == "UndefinedError")
        return ("value", value if not callable(value) else "callable")

    assert outcome(evaluate) == outcome(evaluate_compiled)


@pytest.mark.parametrize(
    "source",
    [
        "{{ params.order_id }}-{{ steps.a.output.value }}",
        "Order {{ params.order_id }} is on its way",
        "a {{ params.nested.deep }} b {{ params.items }} c",
        "{{ params.order_id }}\n",
        "line one\n{{ params.order_id }}\nline three\n",
        "{{ params.order_id }} and {{ params.missing }}",
        "{{ params.order_id }} }} tail",
        "{{ params.order_id | upper }}-x",
        "x {{ unknown_name }}",
        "{{ steps.a.status }}/{{ steps.a.output }}",
        "{{ params.none_value }} {{ params.flag }}",
    ],
)
def test_plain_interpolation_renders_exactly_like_jinja(source: str) -> None:
    """Text with plain ``{{ a.b }}`` segments is rendered without compiling a template; the
    result, or the error, is exactly Jinja's."""
    from jinja2.exceptions import TemplateError

    from ledgerflow.spec.templates import _template, render_value

    context = {
        "params": {
            "order_id": "o-1",
            "items": [1, 2],
            "nested": {"deep": 3},
            "none_value": None,
            "flag": True,
        },
        "steps": {"a": {"status": "completed", "output": {"value": 7}}},
    }

    def outcome(fn: Any) -> Any:
        try:
            return ("value", fn(source, context))
        except TemplateError as exc:
            return ("error", type(exc).__name__)

    assert outcome(render_value) == outcome(lambda s, c: _template(s).render(c))


def test_a_huge_repetition_or_power_is_refused_before_it_is_computed() -> None:
    """What validation cannot see (the number comes from a param) the sandbox checks
    before computing: no 200 MB string, no million-digit number; numbers still multiply."""
    context = {"params": {"s": "ab", "n": 200_000_000, "e": 10**6, "amount": 2.5}}
    with pytest.raises(SecurityError, match="repeating a value of length 2 200000000 times"):
        render_value("{{ params.s * params.n }}", context)
    with pytest.raises(SecurityError, match="repeating"):
        render_value("id-{{ [params.s] * params.n }}", context)
    with pytest.raises(SecurityError, match="a power of 1000000 is refused"):
        render_value("{{ 2 ** params.e }}", context)
    assert render_value("{{ params.amount * params.n }}", context) == 500_000_000.0
    assert render_value("{{ params.s * 3 }}", context) == "ababab"
