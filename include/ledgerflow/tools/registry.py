"""The tool registry: the allow-list of callables a workflow file may name.

A tool is a Python function registered with ``@tool``. YAML names tools, never import
paths. Modules that register tools are found through the ``ledgerflow.tools`` entry
point group and loaded once per process, on first use, after the package's built-in
tools (``http``, ``sql``). The demo's tools (``demo.*``, ``ledgerflow.tools.demo``) are on
the list only where the demo asks for them: ``LEDGERFLOW_DEMO_TOOLS=1`` (set by
``scripts/demo.sh``, the compose file and the test suite), or a module that imports them.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ledgerflow.errors import LedgerflowError, UnknownToolError

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ledgerflow.spec.models import BreakerSpec
    from ledgerflow.tools.context import ToolContext

IdempotencyBehaviour = Literal["effect", "natural", "read_only"]

DEMO_TOOLS_ENV = "LEDGERFLOW_DEMO_TOOLS"
"""The older switch; ``[ledgerflow] demo_tools`` (``AIRFLOW__LEDGERFLOW__DEMO_TOOLS``) is it."""


def demo_tools_enabled() -> bool:
    """Whether this process puts the demo's tools on the allow-list (``[ledgerflow]
    demo_tools``, or ``LEDGERFLOW_DEMO_TOOLS``)."""
    from ledgerflow import settings

    return bool(settings.get("demo_tools"))


@dataclass(frozen=True)
class Tool:
    """A registered tool.

    ``behaviour``:
      * ``effect``    - changes the world; a step must declare how it handles retry.
      * ``natural``   - changes the world but calling it twice is harmless (PUT-like).
      * ``read_only`` - no side effect at all.
    ``transactional``: the tool writes only through ``ctx.db`` (the ledger's own
    database), so its effect commits in the same transaction as the checkpoint.
    """

    name: str
    fn: Callable[..., Any]
    behaviour: IdempotencyBehaviour = "effect"
    transactional: bool | Callable[[dict[str, Any]], bool] = False
    compensate: str | None = None
    non_retryable: tuple[type[BaseException], ...] = ()
    breaker: BreakerSpec | None = None
    description: str = ""
    params: tuple[str, ...] = field(default=())
    required: tuple[str, ...] = field(default=())
    accepts_any: bool = False
    concurrency: int | None = None
    """At most this many calls in flight across all workers (an Airflow pool, ``spec.limits``)."""
    rate: str | None = None
    """At most this many calls per unit of time across all workers (``"10/s"``)."""

    def is_transactional(self, args: dict[str, Any]) -> bool:
        return self.transactional(args) if callable(self.transactional) else self.transactional

    @property
    def side_effects(self) -> bool:
        return self.behaviour != "read_only"

    def args_model(self) -> type[BaseModel]:
        return _args_model(self)

    def call(self, ctx: ToolContext, args: dict[str, Any]) -> Any:
        from pydantic import ValidationError

        from ledgerflow.errors import NonRetryableError

        try:
            validated = self.args_model().model_validate(args)
        except ValidationError as exc:
            raise NonRetryableError(f"tool {self.name!r}: invalid arguments: {exc}") from None
        kwargs = {
            info.alias or name: getattr(validated, name)
            for name, info in type(validated).model_fields.items()
        }
        if self.accepts_any:
            kwargs.update({k: v for k, v in args.items() if k not in kwargs})
        return self.fn(ctx, **kwargs)


_MODELS: dict[str, type[BaseModel]] = {}


def _args_model(tool: Tool) -> type[BaseModel]:
    model = _MODELS.get(tool.name)
    if model is None:
        from pydantic import BaseModel, ConfigDict, Field, create_model

        fields: dict[str, Any] = {}
        # Only the arguments' annotations are evaluated: the ToolContext one may be an
        # import under TYPE_CHECKING.
        hints = inspect.get_annotations(tool.fn)
        for name, param in list(inspect.signature(tool.fn).parameters.items())[1:]:
            if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            annotation = hints.get(name, Any)
            if isinstance(annotation, str):
                annotation = eval(annotation, tool.fn.__globals__)
            default = ... if param.default is param.empty else param.default
            if hasattr(BaseModel, name):  # e.g. ``json``: keep the argument name as an alias
                fields[f"{name}_"] = (annotation, Field(default, alias=name))
            else:
                fields[name] = (annotation, default)
        config = ConfigDict(extra="allow" if tool.accepts_any else "forbid", populate_by_name=True)
        model = create_model(f"{tool.name}_args", __config__=config, **fields)
        _MODELS[tool.name] = model
    return model


class _Registry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._loaded = False
        self._lock = threading.Lock()

    def add(self, item: Tool) -> None:
        existing = self._tools.get(item.name)
        # The same function registered again (a module re-imported by the DAG processor)
        # is fine; a different function under a taken name is not.
        if existing is not None and (existing.fn.__module__, existing.fn.__qualname__) != (
            item.fn.__module__,
            item.fn.__qualname__,
        ):
            raise LedgerflowError(f"tool {item.name!r} is registered twice")
        self._tools[item.name] = item

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            # The package's own tools first, so that they are there even when the
            # package is used from a source tree without installed metadata.
            import ledgerflow.tools.builtin

            if demo_tools_enabled():
                import ledgerflow.tools.demo  # noqa: F401

            for ep in _tool_entry_points():
                ep.load()
            self._loaded = True

    def get(self, name: str) -> Tool:
        self._load_entry_points()
        try:
            return self._tools[name]
        except KeyError:
            hint = None
            if name.startswith("demo.") and not demo_tools_enabled():
                hint = (
                    "the demo's tools are off here: set [ledgerflow] demo_tools = true "
                    f"(AIRFLOW__LEDGERFLOW__DEMO_TOOLS=true, or {DEMO_TOOLS_ENV}=1) to use them"
                )
            raise UnknownToolError(name, sorted(self._tools), hint) from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._tools)


def _tool_entry_points() -> list[Any]:
    """The ``ledgerflow.tools`` entry points of the installed packages.

    Reading every installed distribution's metadata takes ~20 ms, in every task process
    (each one parses its DAG file). An Airflow process has done that scan already, for
    its providers and plugins, and keeps it: read that one when it is there (Airflow
    3.3's ``_shared.module_loading``, the scan behind ``entry_points_with_dist``), else
    scan as ``importlib.metadata`` does. The same entry point found twice (one package
    on two ``sys.path`` entries) is loaded once."""
    try:
        from airflow.sdk._shared.module_loading import entry_points_with_dist
    except ImportError:  # another Airflow, or none here
        from importlib.metadata import entry_points

        return list(entry_points(group="ledgerflow.tools"))
    found: dict[tuple[str, str], Any] = {}
    for ep, _dist in entry_points_with_dist("ledgerflow.tools"):
        found.setdefault((ep.name, ep.value), ep)
    return list(found.values())


registry = _Registry()


def tool(
    name: str,
    *,
    behaviour: IdempotencyBehaviour = "effect",
    transactional: bool | Callable[[dict[str, Any]], bool] = False,
    compensate: str | None = None,
    non_retryable: tuple[type[BaseException], ...] = (),
    breaker: BreakerSpec | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(ctx, **args)`` as the tool ``name``.

    ``concurrency``: at most that many calls in flight across all workers; ``rate``
    (``"10/s"``, ``"600/m"``): at most that many calls per unit of time (``spec.limits``).

    The argument schema is taken from the function's signature and type hints (after
    the first parameter, the ``ToolContext``); unknown or missing arguments are
    rejected when the workflow is validated, wrong types when the step runs.
    """

    if concurrency is not None and not 1 <= concurrency <= 10_000:
        raise LedgerflowError(f"tool {name!r}: concurrency must be 1..10000, not {concurrency}")
    if rate is not None:
        from ledgerflow.spec.limits import parse_rate

        try:
            parse_rate(rate)
        except ValueError as exc:
            raise LedgerflowError(f"tool {name!r}: {exc}") from None

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise LedgerflowError(f"tool {name!r}: the first parameter must be the ToolContext")
        named = [p for p in params[1:] if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        registry.add(
            Tool(
                name=name,
                fn=fn,
                behaviour=behaviour,
                transactional=transactional,
                compensate=compensate,
                non_retryable=non_retryable,
                breaker=breaker,
                description=(inspect.getdoc(fn) or "").split("\n\n")[0],
                params=tuple(p.name for p in named),
                required=tuple(p.name for p in named if p.default is p.empty),
                accepts_any=any(p.kind == p.VAR_KEYWORD for p in params[1:]),
                concurrency=concurrency,
                rate=rate,
            )
        )
        return fn

    return register


def get_tool(name: str) -> Tool:
    return registry.get(name)
