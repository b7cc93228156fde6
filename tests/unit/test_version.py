"""One version: pyproject.toml's, which ``ledgerflow.__version__`` and ``ledgerflow --version``
report and CHANGELOG.md's top section agrees with.

The rule (README, "Dependencies and versions"): between releases the version is the next one
as a development release (``0.2.0.dev0``) and CHANGELOG.md's first section is
``## [Unreleased]``, above every released version; a release sets the version to ``X.Y.Z``
and renames that section ``## [X.Y.Z] - YYYY-MM-DD``. Released sections go newest first.
"""

from __future__ import annotations

import importlib.metadata as md
import itertools
import re
from datetime import date
from pathlib import Path

import pytest
from packaging.version import InvalidVersion, Version

import ledgerflow

# pyproject.toml is read with tomllib (Python 3.11+, as the locks)
tomllib = pytest.importorskip("tomllib")
ROOT = Path(__file__).resolve().parents[2]
CHANGELOG = ROOT / "CHANGELOG.md"
KINDS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}  # Keep a Changelog's
HEADING = re.compile(r"^## \[(?P<name>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?\s*$")


def pyproject_version() -> Version:
    return Version(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def changelog_problems(text: str, version: Version) -> list[str]:
    """What keeps ``text`` (a changelog) from agreeing with ``version``; empty when it does."""
    problems: list[str] = []
    sections: list[tuple[str, str | None, list[str]]] = []  # name, date, lines
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("## "):
            m = HEADING.match(line)
            if not m:
                problems.append(f"line {number}: {line!r} is not '## [X.Y.Z] - YYYY-MM-DD'")
                continue
            sections.append((m["name"], m["date"], []))
        elif sections:
            sections[-1][2].append(line)
    if not sections:
        return [*problems, "no '## [...]' section"]
    released: list[tuple[Version, date]] = []
    for index, (name, day, lines) in enumerate(sections):
        kinds = {line[4:].strip() for line in lines if line.startswith("### ")}
        if kinds - KINDS:
            problems.append(f"[{name}]: {sorted(kinds - KINDS)} are not among {sorted(KINDS)}")
        if not any(line.startswith("- ") for line in lines):
            problems.append(f"[{name}] has no entry")
        if name == "Unreleased":
            if index != 0 or day:
                problems.append("[Unreleased] is the first section and has no date")
            continue
        try:
            released.append((Version(name), date.fromisoformat(day or "")))
        except (InvalidVersion, ValueError):
            problems.append(f"[{name}] needs a version and ' - YYYY-MM-DD'")
    if any(a[0] <= b[0] or a[1] < b[1] for a, b in itertools.pairwise(released)):
        problems.append("released sections are not newest first")
    top = sections[0][0]
    if version.is_devrelease or version.is_prerelease:
        if top != "Unreleased":
            problems.append(f"{version} is not released: the first section must be [Unreleased]")
        if released and Version(version.base_version) <= released[0][0]:
            problems.append(f"{version} is not above the released {released[0][0]}")
    elif top == "Unreleased" or not released or released[0][0] != version:
        problems.append(f"{version} is released: its section must be the first one")
    return problems


def test_the_package_reports_pyproject_version() -> None:
    """``ledgerflow.__version__`` is the installed metadata's version, which is pyproject's
    (a stale install after a version bump: run ./scripts/bootstrap.sh)."""
    assert Version(ledgerflow.__version__) == Version(md.version("ledgerflow"))
    assert Version(md.version("ledgerflow")) == pyproject_version()


def test_the_changelog_agrees_with_the_version() -> None:
    """CHANGELOG.md follows the rule for pyproject's version."""
    assert changelog_problems(CHANGELOG.read_text(encoding="utf-8"), pyproject_version()) == []


RELEASED = "## [0.2.0] - 2026-12-20\n### Added\n- a\n\n## [0.1.0] - 2026-11-21\n### Fixed\n- b\n"


@pytest.mark.parametrize(
    ("text", "version", "problem"),
    [
        ("## [Unreleased]\n### Added\n- a\n" + RELEASED, "0.3.0.dev0", None),
        (RELEASED, "0.2.0", None),
        ("## [Unreleased]\n### Added\n- c\n" + RELEASED, "0.2.0", "must be the first one"),
        (RELEASED, "0.3.0.dev0", "must be [Unreleased]"),
        ("## [Unreleased]\n### Added\n- a\n" + RELEASED, "0.2.0.dev0", "not above"),
        (RELEASED, "0.2.1", "must be the first one"),
        ("## [Unreleased]\n### Added\n- a\n" + RELEASED, "0.3.0", "must be the first one"),
        (RELEASED.replace("0.1.0", "0.3.0"), "0.2.0", "newest first"),
        ("## [Unreleased]\n### Improved\n- a\n", "0.1.0.dev0", "not among"),
        ("## [Unreleased]\n### Added\n", "0.1.0.dev0", "has no entry"),
        ("## 0.2.0\n### Added\n- a\n" + RELEASED, "0.2.0", "is not '## [X.Y.Z]"),
        ("## [0.2.0]\n### Added\n- a\n", "0.2.0", "needs a version and"),
    ],
)
def test_the_rule_catches_what_it_names(text: str, version: str, problem: str | None) -> None:
    """The rule accepts an Unreleased section above the releases for a dev version and a
    release on top for a released one, and names each way to break it."""
    problems = changelog_problems(text, Version(version))
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems
