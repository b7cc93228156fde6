"""The workflow specs this process has built DAGs from, by DAG id.

The factory records each spec (and its file's hash) as it builds a DAG; the operators
look theirs up here when a task runs. Kept apart from the factory so that the step
modules, which the factory imports, never import the factory back.
"""

from __future__ import annotations

from pathlib import Path

from ledgerflow.spec.models import WorkflowSpec

_SPECS: dict[str, WorkflowSpec] = {}
_SPEC_FILES: dict[str, Path] = {}
# The SHA-256 of each DAG's workflow file, recorded with every run it starts.
_SPEC_HASHES: dict[str, str] = {}


def remember(spec: WorkflowSpec, yaml_path: Path | None = None) -> None:
    _SPECS[spec.dag_id] = spec
    if yaml_path is not None:
        _SPEC_FILES[spec.dag_id] = yaml_path


def remember_hash(dag_id: str, digest: str) -> None:
    _SPEC_HASHES[dag_id] = digest


def spec_for_dag(dag_id: str) -> WorkflowSpec:
    """The spec a DAG was built from in this process."""
    try:
        return _SPECS[dag_id]
    except KeyError:
        from ledgerflow.errors import LedgerflowError

        raise LedgerflowError(f"no Ledgerflow workflow is loaded for DAG {dag_id!r}") from None


def spec_hash(dag_id: str) -> str | None:
    """The content hash of the workflow file a DAG was built from in this process."""
    return _SPEC_HASHES.get(dag_id)


def topological_order(spec: WorkflowSpec) -> list[str]:
    """Step ids, each after everything it needs (ties in file order)."""
    done: list[str] = []
    placed: set[str] = set()
    remaining = list(spec.steps)
    while remaining:
        for step in remaining:
            if set(step.needs) <= placed:
                done.append(step.id)
                placed.add(step.id)
                remaining.remove(step)
                break
    return done
