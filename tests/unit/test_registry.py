"""The tool registry: the allow-list of callables a workflow file may name."""

from __future__ import annotations

import contextlib
import textwrap
import types
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from ledgerflow.errors import LedgerflowError, NonRetryableError, UnknownToolError
from ledgerflow.ledger.store import DEFAULT_CONN_ID
from ledgerflow.tools.builtin import HttpClientError
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import get_tool, registry, tool

DEMO_TOOLS = {
    "demo.reserve_inventory",
    "demo.release_inventory",
    "demo.charge_payment",
    "demo.refund_payment",
    "demo.create_shipment",
    "demo.cancel_shipment",
    "demo.send_email",
    "demo.sales_totals",
    "demo.store_report",
    "demo.noop",
}


def unique(prefix: str) -> str:
    """A tool name no other test (or earlier run in this process) has used."""
    return f"unit_test.{prefix}_{uuid.uuid4().hex[:12]}"


def context() -> ToolContext:
    return ToolContext(
        run_id="wf__v1/manual__1",
        step_key="step",
        workflow="wf",
        version=1,
        try_number=1,
        idempotency_key="wf:step:key",
    )


def test_builtin_and_demo_tools_are_registered() -> None:
    """``http``, ``sql`` and every demo tool are in the registry without any explicit import."""
    names = set(registry.names())
    assert {"http", "sql"} <= names
    assert names >= DEMO_TOOLS
    assert names == set(sorted(names))  # sanity: names() lists each once


def test_builtin_tool_metadata() -> None:
    """``http`` sends effects and fails at once on 4xx; ``sql`` is transactional on the ledger."""
    http = get_tool("http")
    assert http.side_effects
    assert HttpClientError in http.non_retryable
    assert http.required == ("url",)
    sql = get_tool("sql")
    assert sql.required == ("statement",)
    assert sql.is_transactional({"statement": "select 1"})
    assert sql.is_transactional({"statement": "select 1", "conn_id": DEFAULT_CONN_ID})
    assert not sql.is_transactional({"statement": "select 1", "conn_id": "warehouse"})


def test_demo_tool_behaviours() -> None:
    """Read-only tools have no side effects; every declared compensation is a registered tool."""
    assert not get_tool("demo.sales_totals").side_effects
    assert get_tool("demo.charge_payment").side_effects
    assert get_tool("demo.store_report").behaviour == "natural"
    for name in DEMO_TOOLS:
        compensation = get_tool(name).compensate
        if compensation is not None:
            assert get_tool(compensation).name == compensation


def test_unknown_tool_lists_known_tools() -> None:
    """``get_tool('nope')`` raises UnknownToolError naming the tool and listing the registry."""
    with pytest.raises(UnknownToolError) as info:
        get_tool("nope")
    error = info.value
    assert isinstance(error, LedgerflowError)
    assert error.name == "nope"
    assert {"http", "sql"} <= set(error.known)
    assert error.known == sorted(error.known)
    assert "unknown tool 'nope'" in str(error)
    assert "http" in str(error)
    assert "sql" in str(error)


def _register_typed() -> tuple[str, Callable[..., Any]]:
    name = unique("typed")

    def typed_add(ctx: ToolContext, a: int, b: int = 1, tags: list[str] | None = None) -> dict:
        return {"sum": a + b, "tags": tags, "key": ctx.idempotency_key}

    tool(name, behaviour="read_only")(typed_add)
    return name, typed_add


def test_tool_signature_becomes_its_argument_schema() -> None:
    """Parameters after ``ctx`` are the tool's arguments; those without default are required."""
    name, _ = _register_typed()
    registered = get_tool(name)
    assert registered.params == ("a", "b", "tags")
    assert registered.required == ("a",)
    assert not registered.accepts_any
    assert not registered.side_effects


def test_call_validates_and_passes_arguments() -> None:
    """A valid call gets typed arguments (strings from templates are coerced) and the ctx."""
    name, _ = _register_typed()
    registered = get_tool(name)
    assert registered.call(context(), {"a": 2}) == {"sum": 3, "tags": None, "key": "wf:step:key"}
    assert registered.call(context(), {"a": "40", "b": 2, "tags": ["x"]})["sum"] == 42


@pytest.mark.parametrize(
    "args",
    [
        {"a": "not a number"},
        {"a": 1, "b": [1, 2]},
        {"a": 1, "tags": "not-a-list"},
        {"a": {"nested": 1}},
        {},
        {"a": 1, "unexpected": True},
    ],
)
def test_call_rejects_bad_arguments_as_non_retryable(args: dict[str, Any]) -> None:
    """Wrong types, missing or unknown arguments fail the call with NonRetryableError."""
    name, _ = _register_typed()
    with pytest.raises(NonRetryableError) as info:
        get_tool(name).call(context(), args)
    assert f"tool {name!r}: invalid arguments" in str(info.value)


def test_var_keyword_tool_accepts_any_argument() -> None:
    """A tool with ``**kwargs`` accepts (and receives) arguments it does not name."""
    name = unique("anyargs")

    def passthrough(ctx: ToolContext, first: str, **rest: Any) -> dict:
        return {"first": first, **rest}

    tool(name, behaviour="natural")(passthrough)
    registered = get_tool(name)
    assert registered.accepts_any
    assert registered.call(context(), {"first": "x", "extra": 1}) == {"first": "x", "extra": 1}


def test_registering_the_same_function_twice_is_harmless() -> None:
    """Re-registering the very same function under its name (a re-import) is not an error."""
    name, fn = _register_typed()
    tool(name, behaviour="read_only")(fn)
    assert get_tool(name).fn is fn


def test_registering_a_different_function_under_a_taken_name_fails() -> None:
    """A second, different function under an existing tool name raises LedgerflowError."""
    name, original = _register_typed()

    def impostor(ctx: ToolContext, a: int) -> dict:
        return {"stolen": a}

    with pytest.raises(LedgerflowError, match="registered twice"):
        tool(name)(impostor)
    assert get_tool(name).fn is original


def test_a_builtin_name_cannot_be_taken_over() -> None:
    """Registering another function as ``http`` fails and leaves the built-in in place."""
    builtin = get_tool("http").fn

    def http_logger(ctx: ToolContext, url: str) -> dict:
        return {}

    with pytest.raises(LedgerflowError):
        tool("http")(http_logger)
    assert get_tool("http").fn is builtin


def test_a_tool_needs_a_context_parameter() -> None:
    """A function with no parameters cannot be a tool (the first one is the ToolContext)."""
    with pytest.raises(LedgerflowError, match="first parameter must be the ToolContext"):
        tool(unique("noctx"))(lambda: None)


def test_same_qualname_from_another_module_cannot_replace_a_tool() -> None:
    """A same-named function from another module under a taken tool name raises."""
    name, original = _register_typed()
    other = types.ModuleType("unit_test_other_module")
    exec(  # a real function object whose __module__ differs but __qualname__ matches
        textwrap.dedent(
            """
            def typed_add(ctx, a: int) -> dict:
                return {"stolen": a}
            """
        ),
        other.__dict__,
    )
    impostor = other.__dict__["typed_add"]
    original_qualname = original.__qualname__
    impostor.__qualname__ = original_qualname  # what a same-named top-level function has
    with contextlib.suppress(LedgerflowError):  # raising is the fixed behaviour
        tool(name)(impostor)
    assert get_tool(name).fn is original


def test_type_checking_only_context_annotation_works() -> None:
    """A tool whose ``ctx: ToolContext`` annotation is a TYPE_CHECKING-only import can be called."""
    name = unique("tc")
    module = types.ModuleType("unit_test_tc_module")
    source = f"""
        from __future__ import annotations
        from typing import TYPE_CHECKING
        from ledgerflow.tools.registry import tool
        if TYPE_CHECKING:
            from ledgerflow.tools.context import ToolContext

        @tool({name!r}, behaviour="read_only")
        def double(ctx: ToolContext, n: int) -> int:
            return n * 2
        """
    exec(textwrap.dedent(source), module.__dict__)
    assert get_tool(name).call(context(), {"n": 21}) == 42


def test_tool_entry_points_are_those_importlib_metadata_finds() -> None:
    """The registry reads Airflow's cached scan of entry points when there is one; it
    finds exactly what ``importlib.metadata`` finds (the example package's ``acme``)."""
    from importlib.metadata import entry_points

    from ledgerflow.tools.registry import _tool_entry_points

    expected = {(ep.name, ep.value) for ep in entry_points(group="ledgerflow.tools")}
    assert ("acme", "acme_tools.tools") in expected
    found = [(ep.name, ep.value) for ep in _tool_entry_points()]
    assert sorted(found) == sorted(expected)  # and each once


def test_demo_tools_are_off_unless_asked_for() -> None:
    """Without ``LEDGERFLOW_DEMO_TOOLS`` a fresh process has the built-in tools and the
    installed packages' tools, no ``demo.*``; asking for one says how to turn them on."""
    import os
    import subprocess
    import sys

    code = (
        "from ledgerflow.tools.registry import registry, get_tool\n"
        "names = registry.names()\n"
        "print(sorted(n for n in names if n.startswith(('demo.', 'acme.', 'http', 'sql'))))\n"
        "try:\n"
        "    get_tool('demo.noop')\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LEDGERFLOW_DEMO_TOOLS"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    listed, error = out.splitlines()[-2:]
    assert "demo." not in listed and "'http'" in listed and "'acme.book_courier'" in listed
    assert "unknown tool 'demo.noop'" in error
    assert "LEDGERFLOW_DEMO_TOOLS=1" in error
    env["LEDGERFLOW_DEMO_TOOLS"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "'demo.noop'" in out and "unknown tool" not in out
