"""Workflow versions on disk: which is the latest, and the content hash that makes a
published version immutable.

One folder per workflow (``workflows/<name>/``), one ``v<N>.yaml`` per version. Publishing
(``ledgerflow sync``) records each file's SHA-256 in ``v<N>.lock`` beside it, in
``sha256sum`` format (``sha256sum -c v1.lock`` checks it by hand). The DAG file of a
version refuses to load a YAML file that no longer matches its lock: a run that started
on v1 must finish on the v1 it started with, so a change is a new version, never an edit.

Everything here reads the version folder only (a directory listing and one small file
per check): it runs at DAG-file parse time, where a database round trip is not allowed.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ledgerflow.errors import PublishedVersionChanged

_VERSION_FILE = re.compile(r"^v([1-9][0-9]*)\.ya?ml$")

SUPERSEDED_TAG = "superseded"


def version_of(path: Path) -> int | None:
    """``v3.yaml`` -> 3; None for any other file name."""
    match = _VERSION_FILE.match(path.name)
    return int(match.group(1)) if match else None


def version_files(folder: Path) -> dict[int, Path]:
    """``{N: folder/v<N>.yaml}`` of one workflow's folder (one directory listing)."""
    found: dict[int, Path] = {}
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return found
    for name in names:
        match = _VERSION_FILE.match(name)
        if match:
            found[int(match.group(1))] = folder / name
    return found


def latest_version(folder: Path) -> int | None:
    """The highest published version number in a workflow's folder."""
    versions = version_files(folder)
    return max(versions) if versions else None


def is_superseded(yaml_path: Path) -> bool:
    """A newer version file of the same workflow exists beside this one."""
    mine = version_of(yaml_path)
    if mine is None:
        return False
    latest = latest_version(yaml_path.parent)
    return latest is not None and latest > mine


def content_hash(yaml_path: Path) -> str:
    return hashlib.sha256(yaml_path.read_bytes()).hexdigest()


def lock_path(yaml_path: Path) -> Path:
    return yaml_path.with_suffix(".lock")


def recorded_hash(yaml_path: Path) -> str | None:
    """The hash recorded at publication, or None for a version not published yet."""
    try:
        line = lock_path(yaml_path).read_text().strip()
    except FileNotFoundError:
        return None
    recorded = line.split()[0] if line else ""
    return recorded if re.fullmatch(r"[0-9a-f]{64}", recorded) else ""


def write_lock(yaml_path: Path) -> str:
    digest = content_hash(yaml_path)
    lock_path(yaml_path).write_text(f"{digest}  {yaml_path.name}\n")
    return digest


def check_published(yaml_path: Path, display: str | None = None) -> str:
    """The file's hash; raises PublishedVersionChanged when it differs from its lock."""
    actual = content_hash(yaml_path)
    recorded = recorded_hash(yaml_path)
    if recorded is not None and recorded != actual:
        raise PublishedVersionChanged(yaml_path, recorded, actual, display or str(yaml_path))
    return actual


@dataclass(frozen=True)
class VersionInfo:
    """One version of one workflow, as ``ledgerflow versions`` shows it."""

    workflow: str
    version: int
    path: Path
    latest: bool
    published: bool  # a lock file records its hash
    intact: bool  # the file still matches the lock (True when unpublished)
    unfinished_runs: int

    @property
    def dag_id(self) -> str:
        return f"{self.workflow}__v{self.version}"

    @property
    def retirable(self) -> bool:
        """Not the latest, and no run of it is unfinished: its files can be removed."""
        return not self.latest and self.unfinished_runs == 0

    @property
    def status(self) -> str:
        if self.latest:
            return "latest"
        return "retirable" if self.unfinished_runs == 0 else "live (unfinished runs)"


def workflow_versions(
    workflows_folder: Path, unfinished: dict[tuple[str, int], int], name: str | None = None
) -> list[VersionInfo]:
    """Every version under ``workflows_folder`` (or of workflow ``name``), oldest first.

    ``unfinished`` counts the unfinished runs per (workflow, version), from the ledger.
    """
    folders = (
        [workflows_folder / name]
        if name
        else sorted(p for p in workflows_folder.iterdir() if p.is_dir())
    )
    infos: list[VersionInfo] = []
    for folder in folders:
        versions = version_files(folder)
        if not versions:
            continue
        top = max(versions)
        for number in sorted(versions):
            path = versions[number]
            recorded = recorded_hash(path)
            infos.append(
                VersionInfo(
                    workflow=folder.name,
                    version=number,
                    path=path,
                    latest=number == top,
                    published=recorded is not None,
                    intact=recorded is None or recorded == content_hash(path),
                    unfinished_runs=unfinished.get((folder.name, number), 0),
                )
            )
    return infos
