"""``ledgerflow validate`` and ``ledgerflow sync``: check workflow files, and publish
them (the two-line DAG file beside each, the hash of each version in ``v<N>.lock``).

The two agree: ``sync`` publishes only what ``validate`` accepts, and ``validate``
fails a published file that no longer matches its lock, naming the commands that
publish the change as the next version. Every hint names files as the user did."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

SHIM = '''"""Airflow DAG of the Ledgerflow workflow file beside this one (written by `ledgerflow sync`)."""

from ledgerflow import dag_for_spec_file

dag = dag_for_spec_file(__file__)
'''


def _workflow_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.y*ml") if p.suffix in (".yaml", ".yml")))
        else:
            files.append(path)
    return files


def _missing(paths: Sequence[str]) -> list[str]:
    return [raw for raw in paths if not Path(raw).exists()]


def _no_such(missing: list[str]) -> int:
    for raw in missing:
        print(f"FAIL {raw}: no such file or folder (relative to {Path.cwd()})", file=sys.stderr)
    return 2


def _published_changed(file: Path) -> str | None:
    """Why a published file may not be used as it is (it no longer matches its lock,
    ``v<N>.lock``), with the commands that publish the change as v<N+1>; None if fine."""
    from ledgerflow import versions

    number = versions.version_of(file)
    if number is None:
        return None
    try:
        versions.check_published(file)  # the loader's own check: the lock, if any
    except versions.PublishedVersionChanged:
        pass
    else:
        return None
    newer = file.with_name(f"v{number + 1}{file.suffix}")
    return (
        f"{file}: published version changed (v{number} is locked in "
        f"{versions.lock_path(file).name}); publish the change as v{number + 1}: "
        f"`git checkout -- {file}` (or restore it), put the new text in {newer} with "
        f"`version: {number + 1}`, then `ledgerflow sync {newer}` "
        "(or, for a version that never ran, `ledgerflow sync --rehash " + str(file) + "`)"
    )


def cmd_validate(args: argparse.Namespace) -> int:
    from ledgerflow.errors import SpecError
    from ledgerflow.workflow.validate import load_workflow

    files = _workflow_files(args.paths)
    if not files:
        print("no workflow files found", file=sys.stderr)
        return 2
    bad = 0
    for file in files:
        try:
            spec = load_workflow(file, display_path=str(file))
        except SpecError as exc:
            bad += 1
            print(f"FAIL {exc}", file=sys.stderr)
            continue
        changed = _published_changed(file)
        if changed is not None:
            bad += 1
            print(f"FAIL {changed}", file=sys.stderr)
            continue
        shim = file.with_suffix(".py")
        # The hint names the file as the user named it: it works from where they are.
        note = "" if shim.exists() else f"  (no DAG file: run `ledgerflow sync {file}`)"
        print(f"ok   {file}: {spec.dag_id}, {len(spec.steps)} steps{note}")
    print(f"{len(files) - bad} valid, {bad} invalid", file=sys.stderr)
    return 1 if bad else 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Publish: write the two-line DAG file beside each workflow file that has none, and
    record each file's hash in ``v<N>.lock`` (a published version is immutable). An
    invalid file is refused: nothing is written for it."""
    from ledgerflow import versions
    from ledgerflow.errors import SpecError
    from ledgerflow.workflow.validate import load_workflow

    missing = _missing(args.paths)
    if missing:
        return _no_such(missing)
    written = changed = invalid = 0
    for file in _workflow_files(args.paths):
        try:
            load_workflow(file, display_path=str(file))
        except SpecError as exc:
            invalid += 1
            print(f"FAIL {exc} (not published: nothing written)", file=sys.stderr)
            continue
        shim = file.with_suffix(".py")
        if shim.exists() and shim.read_text() == SHIM:
            pass
        elif shim.exists() and not args.force:
            print(f"skip {shim}: exists with other content (use --force)", file=sys.stderr)
        else:
            shim.write_text(SHIM)
            written += 1
            print(f"wrote {shim}")
        if versions.version_of(file) is None:
            continue
        recorded = versions.recorded_hash(file)
        if recorded is None or (args.rehash and recorded != versions.content_hash(file)):
            digest = versions.write_lock(file)
            print(f"published {file} (sha256 {digest[:12]} in {versions.lock_path(file).name})")
        elif recorded != versions.content_hash(file):
            changed += 1
            number = versions.version_of(file) or 0
            print(
                f"FAIL {file}: published version changed; publish a new version "
                f"v{number + 1} (or, for a version that never ran, --rehash)",
                file=sys.stderr,
            )
    print(f"{written} DAG file(s) written", file=sys.stderr)
    return 1 if changed or invalid else 0
