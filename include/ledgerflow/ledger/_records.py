"""The ledger's records as values, and the helpers that build them from rows."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ledgerflow.ledger._engine import loads


@dataclass(frozen=True)
class Checkpoint:
    run_id: str
    step_key: str
    step_id: str
    map_index: int
    status: str
    attempts: int
    idempotency_key: str | None
    output: Any
    error: str | None
    # A checkpoint copied from an earlier run of the retry chain: that run's id
    reused_from: str | None = None


@dataclass(frozen=True)
class Effect:
    idempotency_key: str
    tool: str
    status: str
    result: Any
    run_id: str
    step_key: str


def _outputs(checkpoints: Iterable[Checkpoint]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for cp in checkpoints:
        if cp.map_index < 0:
            result[cp.step_id] = {"status": cp.status, "output": cp.output}
        else:
            entry = result.setdefault(cp.step_id, {"status": "completed", "output": []})
            entry["output"].append(cp.output)
            if cp.status != "completed":
                entry["status"] = cp.status
    return result


class RunRow(NamedTuple):
    """What a step needs of its run's row: whether it ended, its retry chain, its saga."""

    status: str
    retry_of: str | None
    retry_from: str | None
    saga: str | None


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(
        run_id=row["run_id"],
        step_key=row["step_key"],
        step_id=row["step_id"],
        map_index=row["map_index"],
        status=row["status"],
        attempts=row["attempts"],
        idempotency_key=row["idempotency_key"],
        output=loads(row["output"]),
        error=row["error"],
    )


def _error_type(error: BaseException) -> str:
    kind = type(error)
    return (
        kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    )


def _error_text(error: BaseException) -> str:
    return (str(error) or type(error).__name__)[:4000]
