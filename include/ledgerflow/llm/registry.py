"""Names a workflow file may use in an LLM step: output models and check functions.

Like tools, these are an allow-list filled by decorators, never import paths from YAML:

    @output_model("support.ticket")
    class Ticket(BaseModel): ...

    @check("support.summary_is_short")
    def short(output: dict) -> bool | str: ...   # False or a string: the check failed

The package's own (``ledgerflow.llm.builtin``) load first, then the modules of the
``ledgerflow.tools`` and ``ledgerflow.llm`` entry point groups.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ledgerflow.errors import LedgerflowError, UnknownLlmName

if TYPE_CHECKING:
    from pydantic import BaseModel

CheckFn = Callable[[Any], Any]
M = TypeVar("M", bound="type[BaseModel]")

_MODELS: dict[str, type[BaseModel]] = {}
_CHECKS: dict[str, CheckFn] = {}
_LOADED = False
_LOCK = threading.Lock()


def _same(a: Any, b: Any) -> bool:
    # A module imported twice (the DAG processor re-imports) registers the same thing again.
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def output_model(name: str) -> Callable[[M], M]:
    """Register a pydantic model as the output type ``name`` of LLM steps."""

    def register(cls: M) -> M:
        existing = _MODELS.get(name)
        if existing is not None and not _same(existing, cls):
            raise LedgerflowError(f"output model {name!r} is registered twice")
        _MODELS[name] = cls
        return cls

    return register


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register ``fn(output) -> bool | str | None`` as the check ``name``: ``False`` or a
    message means the check failed (the message is the recorded reason)."""

    def register(fn: CheckFn) -> CheckFn:
        existing = _CHECKS.get(name)
        if existing is not None and not _same(existing, fn):
            raise LedgerflowError(f"check {name!r} is registered twice")
        _CHECKS[name] = fn
        return fn

    return register


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    with _LOCK:
        if _LOADED:
            return
        from importlib.metadata import entry_points

        import ledgerflow.llm.builtin  # noqa: F401
        from ledgerflow.tools.registry import registry

        registry.names()  # tool modules may register output models and checks too
        for ep in entry_points(group="ledgerflow.llm"):
            ep.load()
        _LOADED = True


def get_output_model(name: str) -> type[BaseModel]:
    _load()
    try:
        return _MODELS[name]
    except KeyError:
        raise UnknownLlmName(
            f"unknown output model {name!r}; registered: {', '.join(sorted(_MODELS)) or 'none'}"
        ) from None


def get_check(name: str) -> CheckFn:
    _load()
    try:
        return _CHECKS[name]
    except KeyError:
        raise UnknownLlmName(
            f"unknown check {name!r}; registered: {', '.join(sorted(_CHECKS)) or 'none'}"
        ) from None
