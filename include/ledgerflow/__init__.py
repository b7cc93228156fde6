"""Ledgerflow: durable workflows on Apache Airflow 3.

The public surface is small and cheap to import (DAG files import it at parse time):
``tool`` and ``ToolContext`` to register tools, ``dag_for_spec_file`` for the per-version
DAG files, and the errors users catch (every error is in ``ledgerflow.errors``; a
standard-library-only module, so importing them here costs nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ledgerflow.errors import (
    ApprovalConflict,
    ApprovalNotFound,
    HttpClientError,
    HttpStatusError,
    IllegalTransition,
    InvalidParams,
    LedgerError,
    LedgerflowError,
    LlmCallFailed,
    LlmOutputRejected,
    NonRetryableError,
    PublishedVersionChanged,
    QualityCheckFailed,
    RetryRefused,
    SettingError,
    SpecError,
    SpecErrors,
    TemplateRenderError,
    ToolError,
    TriggerRefused,
    UnknownToolError,
)

if TYPE_CHECKING:
    from ledgerflow.factory import dag_for_spec_file
    from ledgerflow.tools.context import ToolContext
    from ledgerflow.tools.registry import tool

    __version__: str  # pyproject.toml's version, from the installed metadata (_version)

_LAZY = {
    "dag_for_spec_file": "ledgerflow.factory",
    "ToolContext": "ledgerflow.tools.context",
    "tool": "ledgerflow.tools.registry",
}

__all__ = [
    "ApprovalConflict",
    "ApprovalNotFound",
    "HttpClientError",
    "HttpStatusError",
    "IllegalTransition",
    "InvalidParams",
    "LedgerError",
    "LedgerflowError",
    "LlmCallFailed",
    "LlmOutputRejected",
    "NonRetryableError",
    "PublishedVersionChanged",
    "QualityCheckFailed",
    "RetryRefused",
    "SettingError",
    "SpecError",
    "SpecErrors",
    "TemplateRenderError",
    "ToolContext",
    "ToolError",
    "TriggerRefused",
    "UnknownToolError",
    "__version__",
    "dag_for_spec_file",
    "tool",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return _version()
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ledgerflow' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's, through the package metadata),
    read when asked: finding the metadata costs more than a DAG file should pay on import."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ledgerflow")
    except PackageNotFoundError:  # the sources on sys.path without an install
        return "0+unknown"
