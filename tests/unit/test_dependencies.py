"""The package declares what it imports, and the locks keep the runtime apart from the tools.

Every third-party module that include/ imports (read from the source with ``ast``, mapped to its
distribution through the installed packages' metadata) is named in pyproject.toml's
``[project.dependencies]``; requirements/lock.txt pins exactly what those dependencies need
(nothing of the dev extra: the Docker image installs it) and requirements/dev-lock.txt pins the
same versions plus the dev tools.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# pyproject.toml is read with tomllib (Python 3.11+, as the locks)
tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "include"
FIRST_PARTY = {p.name for p in SOURCES.iterdir() if (p / "__init__.py").exists()}
LOCK = ROOT / "requirements" / "lock.txt"
DEV_LOCK = ROOT / "requirements" / "dev-lock.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# Helpers for tests (ledgerflow.testing) may import what only the dev extra brings, inside a
# function (importing the module does not need it): the browser helper's playwright.
OPTIONAL_UNDER = ("ledgerflow/testing/",)
# What must never reach the runtime lock (and so the Airflow image).
DEV_TOOLS = ("pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "ruff", "mypy", "playwright")


@dataclass(frozen=True)
class Import:
    module: str  # dotted name as written (for `from a.b import c`: a.b.c, then a.b)
    where: str  # path under include/ and line
    lazy: bool  # inside a function body


def _imports() -> list[Import]:
    found = []
    for path in sorted(SOURCES.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(SOURCES).as_posix()
        lazy_nodes = {
            id(inner)
            for fn in ast.walk(tree)
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for inner in ast.walk(fn)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [f"{node.module}.{a.name}" for a in node.names if a.name != "*"]
                modules = modules or [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY:
                    continue
                found.append(Import(module, f"{rel}:{node.lineno}", id(node) in lazy_nodes))
    return found


@functools.cache
def _top_level_owners() -> dict[str, list[str]]:
    return md.packages_distributions()


@functools.cache
def _record(dist: str) -> frozenset[str]:
    return frozenset(str(f) for f in md.distribution(dist).files or ())


def _distribution(module: str) -> str | None:
    """The distribution that installs ``module``: by its top-level name, or, for a namespace
    shared by several (airflow.*, opentelemetry.*), by the one whose RECORD holds the file of
    the longest importable prefix of the dotted name."""
    owners = sorted(set(_top_level_owners().get(module.split(".")[0], ())))
    if len(owners) <= 1:
        return canonicalize_name(owners[0]) if owners else None
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        stem = "/".join(parts[:n])
        holders = [d for d in owners if {f"{stem}.py", f"{stem}/__init__.py"} & _record(d)]
        if len(holders) == 1:
            return canonicalize_name(holders[0])
    return None


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in requirements}


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", line)
        if m:
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _lock_environment(lock: Path) -> dict[str, str]:
    """Marker environment of the lock: this machine, with the Python version the lock was
    compiled for (its `uv pip compile --python-version` header)."""
    env: dict[str, str] = dict(default_environment())
    py = re.search(r"--python-version[ =](\d+\.\d+)", lock.read_text(encoding="utf-8"))
    if py:
        env["python_version"] = py[1]
        env["python_full_version"] = f"{py[1]}.0"
    return env


def _closure(requirements: list[str], env: dict[str, str]) -> set[str]:
    """Every distribution that ``requirements`` need, through the installed packages' metadata
    (extras followed, markers evaluated for ``env``)."""
    seen: dict[str, set[str]] = {}  # distribution -> extras already followed
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker and not req.marker.evaluate({**env, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        extras = {canonicalize_name(e) for e in req.extras}
        if name in seen and extras <= seen[name]:
            continue
        seen.setdefault(name, set()).update(extras)
        for text in md.requires(name) or ():
            sub = Requirement(text)
            if sub.marker is None or any(
                sub.marker.evaluate({**env, "extra": extra}) for extra in {"", *extras}
            ):
                sub.marker = None
                todo.append(sub)
    return set(seen)


def test_the_import_scan_sees_known_imports() -> None:
    """The scan finds imports at module level and in functions, and maps namespaces: a guard
    that the test below checks something (fastapi at module level in the app, pydantic_ai in a
    function, airflow.sdk to the Task SDK, airflow.models to Airflow core)."""
    found = {(i.module, i.lazy) for i in _imports()}
    assert ("fastapi.APIRouter", False) in found
    assert any(m.startswith("pydantic_ai") and lazy for m, lazy in found)
    assert _distribution("airflow.sdk.DAG") == "apache-airflow-task-sdk"
    assert _distribution("airflow.models.dagrun.DagRun") == "apache-airflow-core"
    assert _distribution("opentelemetry.trace") == "opentelemetry-api"
    assert _distribution("airflow.providers.common.ai.hooks.pydantic_ai") == (
        "apache-airflow-providers-common-ai"
    )


def test_every_imported_distribution_is_declared() -> None:
    """Each third-party distribution that include/ imports is in [project.dependencies]; a
    test helper's import inside a function may come from an optional extra instead."""
    declared = _names(PYPROJECT["project"]["dependencies"])
    optional = set().union(*map(_names, PYPROJECT["project"]["optional-dependencies"].values()))
    missing: dict[str, list[str]] = {}
    unknown = []
    for imp in _imports():
        dist = _distribution(imp.module)
        if dist is None:
            unknown.append(f"{imp.module} ({imp.where})")
            continue
        guarded = imp.lazy and imp.where.startswith(OPTIONAL_UNDER)
        if dist in declared or (guarded and dist in optional):
            continue
        if imp.where not in missing.setdefault(dist, []):
            missing[dist].append(imp.where)
    assert not unknown, f"imports of no installed distribution: {unknown}"
    report = "; ".join(f"{d} ({', '.join(w[:3])})" for d, w in sorted(missing.items()))
    assert not missing, f"imported but not declared in pyproject.toml's dependencies: {report}"


def test_declared_ranges_admit_the_locked_versions() -> None:
    """Every declared requirement is pinned by its lock at a version its range admits: the
    runtime dependencies by lock.txt, the dev extra by dev-lock.txt."""
    pins, dev_pins = _pins(LOCK), _pins(DEV_LOCK)
    checks = [(r, pins, LOCK) for r in PYPROJECT["project"]["dependencies"]]
    checks += [
        (r, dev_pins, DEV_LOCK) for r in PYPROJECT["project"]["optional-dependencies"]["dev"]
    ]
    wrong = []
    for text, lock_pins, lock in checks:
        req = Requirement(text)
        version = lock_pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            wrong.append(f"{text!r}: {lock.name} has {version}")
    assert not wrong, wrong


def test_runtime_lock_pins_exactly_what_the_dependencies_need() -> None:
    """requirements/lock.txt is the closure of [project.dependencies] (installed metadata,
    markers for the lock's Python): no dev tool, nothing left over, nothing missing."""
    need = _closure(PYPROJECT["project"]["dependencies"], _lock_environment(LOCK))
    pins = set(_pins(LOCK))
    assert not pins - need, f"lock.txt pins what no runtime dependency needs: {sorted(pins - need)}"
    assert not need - pins, f"lock.txt lacks runtime dependencies: {sorted(need - pins)}"
    assert not pins & set(DEV_TOOLS), sorted(pins & set(DEV_TOOLS))


def test_dev_lock_is_the_runtime_lock_plus_the_dev_extra() -> None:
    """dev-lock.txt pins every runtime package at lock.txt's version, the dev tools, and the
    closure of the runtime and dev requirements together: nothing else."""
    pins, dev_pins = _pins(LOCK), _pins(DEV_LOCK)
    moved = {n: (v, dev_pins.get(n)) for n, v in pins.items() if dev_pins.get(n) != v}
    assert not moved, f"dev-lock.txt differs from lock.txt: {moved}"
    assert set(DEV_TOOLS) <= set(dev_pins), sorted(set(DEV_TOOLS) - set(dev_pins))
    project = PYPROJECT["project"]
    need = _closure(
        project["dependencies"] + project["optional-dependencies"]["dev"],
        _lock_environment(DEV_LOCK),
    )
    assert set(dev_pins) == need, (sorted(set(dev_pins) - need), sorted(need - set(dev_pins)))


@pytest.mark.parametrize(
    "path", ["Dockerfile", *sorted(p.name for p in (ROOT / "docker").iterdir())]
)
def test_the_image_installs_the_runtime_lock_only(path: str) -> None:
    """The Docker build never installs the dev lock (the image carries no pytest, ruff, mypy or
    playwright); the Dockerfile installs requirements/lock.txt."""
    file = ROOT / path if path == "Dockerfile" else ROOT / "docker" / path
    lines = file.read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith(("#", "--")))
    assert "dev-lock" not in text
    assert "--extra dev" not in text and "[dev]" not in text
    if path == "Dockerfile":
        assert "-r requirements/lock.txt" in text


def test_bootstrap_installs_both_locks_and_hashes_them() -> None:
    """scripts/bootstrap.sh installs the runtime and dev locks (the tests need the tools) and
    reinstalls when either changes (both are in its stamp's hash)."""
    text = (ROOT / "scripts" / "bootstrap.sh").read_text(encoding="utf-8").replace("\\\n", " ")
    want = next(line for line in text.splitlines() if line.startswith("WANT="))
    assert "requirements/lock.txt" in want and "requirements/dev-lock.txt" in want
    install = next(line for line in text.splitlines() if "--compile-bytecode" in line)
    assert "-r requirements/lock.txt" in install and "-r requirements/dev-lock.txt" in install
