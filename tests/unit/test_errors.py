"""Every error Ledgerflow defines: one module (``ledgerflow.errors``), one root
(``LedgerflowError``), a stable code of its own, and a pickle round trip that keeps its
type, its attributes and its message (errors cross processes: multiprocessing, Airflow's
task runner and triggerer)."""

from __future__ import annotations

import ast
import builtins
import copy
import importlib
import pickle
import pkgutil
import re
import subprocess
import sys
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import ledgerflow

PACKAGE = Path(ledgerflow.__file__).resolve().parent
README = Path(__file__).resolve().parents[2] / "README.md"

# Run by Alembic inside its migration context, not imported (the AST scan still reads them).
ALEMBIC_SCRIPTS = "ledgerflow.ledger.migrations."
# Exceptions that are not LedgerflowErrors on purpose, and why.
NOT_UNDER_ROOT = {
    "ledgerflow.errors.InjectedFault": "a BaseException so that tool code cannot swallow it",
}
# Exceptions defined outside errors.py on purpose, and why.
OUTSIDE_ERRORS = {
    "ledgerflow.api._limits._TooLarge": (
        "a Starlette HTTPException (FastAPI answers it 413); errors.py imports no web framework"
    ),
}

# What users catch: exported from ``ledgerflow`` and listed in the README.
EXPORTED = {
    "LedgerflowError",
    "SpecError",
    "SpecErrors",
    "SettingError",
    "UnknownToolError",
    "ToolError",
    "NonRetryableError",
    "HttpStatusError",
    "HttpClientError",
    "TemplateRenderError",
    "LlmCallFailed",
    "LlmOutputRejected",
    "QualityCheckFailed",
    "InvalidParams",
    "TriggerRefused",
    "RetryRefused",
    "ApprovalNotFound",
    "ApprovalConflict",
    "PublishedVersionChanged",
    "IllegalTransition",
    "LedgerError",
}


def _samples() -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Representative constructor arguments of every error whose constructor takes more
    than a message (by class name); an error with a message-only constructor is built
    with a message."""
    from ledgerflow.errors import SpecError
    from ledgerflow.spec.params import ParamProblem

    return {
        "SpecError": (("not a duration",), {"file": "wf.yaml", "line": 3, "field": "timeout"}),
        "SpecErrors": (
            ([SpecError("a", file="wf.yaml", line=1), SpecError("b", line=2, field="x")],),
            {},
        ),
        "UnknownToolError": (("nope", ["http", "sql"]), {"hint": "demo tools are off"}),
        "InvalidParams": (("checkout", 2, [ParamProblem("amount", "required")]), {}),
        "TriggerRefused": (("checkout__v1 is paused",), {"status": 409}),
        "RetryRefused": (("continued by y",), {"reason": "continued", "run_id": "d/y"}),
        "CancelRefused": (("run d/r succeeded",), {"reason": "ended"}),
        "PublishedVersionChanged": (
            (Path("dags/workflows/w/v2.yaml"), "a" * 64, "b" * 64, "w/v2.yaml"),
            {},
        ),
        "BreakerOpen": (("payments", datetime(2026, 1, 2, 3, 4, tzinfo=UTC)), {}),
        "IllegalTransition": (("saga", None, "done", "run d/r"), {}),
        "HttpStatusError": ((503, "busy"), {}),
        "HttpClientError": ((404, "no such order"), {}),
        "HttpConnectionError": (("billing_api", "headers", "not a JSON object"), {}),
        "QualityCheckFailed": (
            ("check", "orders", [{"expectation": "expect_x", "unexpected_count": 2}]),
            {},
        ),
        "_TooLarge": ((1_000,), {}),
    }


@cache
def _all_errors() -> tuple[type[BaseException], ...]:
    """Every exception class defined in the package, after importing all its modules."""
    for module in pkgutil.walk_packages([str(PACKAGE)], "ledgerflow."):
        if not module.name.startswith(ALEMBIC_SCRIPTS):
            importlib.import_module(module.name)
    found: dict[str, type[BaseException]] = {}
    todo: list[type[BaseException]] = [BaseException]
    while todo:
        for sub in todo.pop().__subclasses__():
            name = f"{sub.__module__}.{sub.__qualname__}"
            if name not in found:
                todo.append(sub)
                if sub.__module__ == "ledgerflow" or sub.__module__.startswith("ledgerflow."):
                    found[name] = sub
    return tuple(found[name] for name in sorted(found))


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _message_only(cls: type[BaseException]) -> bool:
    owner = next(c for c in cls.__mro__ if "__init__" in vars(c))
    return owner.__module__ == "builtins"


def _make(cls: type[BaseException]) -> BaseException:
    samples = _samples()
    if cls.__name__ in samples:
        args, kwargs = samples[cls.__name__]
        return cls(*args, **kwargs)
    assert _message_only(cls), (
        f"{_name(cls)} takes more than a message: add its arguments to _samples()"
    )
    return cls("something went wrong")


def _kept(error: Any) -> Any:
    """What a round trip must keep: type, args, message, repr and every attribute
    (errors nested in attributes compared the same way, not by identity)."""
    if isinstance(error, BaseException):
        return (type(error), _kept(error.args), str(error), repr(error), _kept(vars(error)))
    if isinstance(error, dict):
        return {key: _kept(value) for key, value in error.items()}
    if isinstance(error, list | tuple):
        return [_kept(value) for value in error]
    return error


def test_every_error_survives_a_pickle_round_trip() -> None:
    """Each exception class of the package, built with representative arguments (keyword-
    only ones included), comes back from pickle (every protocol) and copy with the same
    type, args, str(), repr() and attributes. A new error that cannot cross a process
    boundary fails here."""
    broken = []
    for cls in _all_errors():
        error = _make(cls)
        for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
            try:
                back = pickle.loads(pickle.dumps(error, protocol))
            except Exception as exc:
                broken.append(f"{_name(cls)} (protocol {protocol}): {type(exc).__name__}: {exc}")
                break
            if _kept(back) != _kept(error):
                broken.append(f"{_name(cls)} (protocol {protocol}): {_kept(back)!r}")
                break
        else:
            assert _kept(copy.copy(error)) == _kept(error), _name(cls)
            assert _kept(copy.deepcopy(error)) == _kept(error), _name(cls)
    assert broken == []


def test_every_error_is_a_ledgerflow_error_from_the_errors_module() -> None:
    """One root and one module: every exception class of the package inherits
    LedgerflowError and is defined in ledgerflow.errors, but for the listed exceptions."""
    from ledgerflow.errors import LedgerflowError

    classes = _all_errors()
    assert len(classes) > 20  # the walk found the package's errors
    outside_root = {_name(c) for c in classes if not issubclass(c, LedgerflowError)}
    assert outside_root == set(NOT_UNDER_ROOT)
    elsewhere = {_name(c) for c in classes if c.__module__ != "ledgerflow.errors"}
    assert elsewhere == set(OUTSIDE_ERRORS)


def test_no_module_but_errors_defines_an_exception() -> None:
    """Read without importing (so a module that fails to import is checked too): no class
    outside errors.py has a builtin exception or a Ledgerflow error as a base."""
    from ledgerflow import errors

    exceptions = {n for n, v in vars(builtins).items() if isinstance(v, type)}
    exceptions = {n for n in exceptions if issubclass(getattr(builtins, n), BaseException)}
    exceptions |= {
        n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, BaseException)
    }
    allowed = {name.rsplit(".", 1)[1] for name in OUTSIDE_ERRORS}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef) or node.name in allowed:
                continue
            bases = {
                b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases
            }
            if bases & exceptions:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.name}")
    assert found == []


def test_every_error_has_a_code_of_its_own() -> None:
    """``code`` is stable and unique: each class sets its own (an inherited code would
    make two errors indistinguishable), in snake_case."""
    codes: dict[str, str] = {}
    for cls in _all_errors():
        code = vars(cls).get("code")
        assert isinstance(code, str) and re.fullmatch(r"[a-z][a-z0-9_]*", code), _name(cls)
        assert code not in codes, f"{_name(cls)} reuses {code!r} of {codes.get(code)}"
        codes[code] = _name(cls)


def test_the_errors_users_catch_are_exported_and_import_ledgerflow_stays_cheap() -> None:
    """``from ledgerflow import InvalidParams`` works for each error users catch, and
    ``import ledgerflow`` loads no ledgerflow module but ``errors``."""
    from ledgerflow import errors

    assert set(ledgerflow.__all__) >= EXPORTED
    assert {n: getattr(ledgerflow, n) for n in EXPORTED} == {n: vars(errors)[n] for n in EXPORTED}
    code = (
        "import sys, ledgerflow\n"
        "print(sorted(m for m in sys.modules if m.startswith('ledgerflow')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["['ledgerflow',", "'ledgerflow.errors']"]


def test_readme_lists_the_exported_errors_and_their_codes() -> None:
    """The README's Errors table names each exported error with its code, and nothing
    else, so the page cannot drift from the code."""
    from ledgerflow import errors

    section = README.read_text().split("\n## Errors\n", 1)[1].split("\n## ", 1)[0]
    rows = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \|", section, re.M))
    assert rows == {(name, vars(vars(errors)[name])["code"]) for name in EXPORTED}
