"""Re-running a dead-lettered step by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ledgerflow.errors import LedgerflowError
from ledgerflow.ledger.store import Ledger


def retry_dead_letter(ledger: Ledger, letter_id: int, dags_folder: Path | None = None) -> Any:
    """Run the step of dead letter ``letter_id`` once more, here, under the same
    idempotency key (an effect that did happen is not repeated); on success the letter
    is resolved. Returns the step's result; raises the step's error otherwise."""
    from ledgerflow.settings import workflow_file
    from ledgerflow.steps.protocol import RunRef, execute_step
    from ledgerflow.steps.saga import compensation_step
    from ledgerflow.workflow.validate import load_workflow

    letter = ledger.dead_letter_by_id(letter_id)
    if letter is None:
        raise LedgerflowError(f"no dead letter {letter_id}")
    if letter["status"] != "open":
        raise LedgerflowError(f"dead letter {letter_id} is {letter['status']}, not open")
    run = ledger.run(letter["run_id"])
    if run is None:
        raise LedgerflowError(
            f"dead letter {letter_id}: run {letter['run_id']} is not in the ledger"
        )
    spec = load_workflow(workflow_file(letter["workflow"], letter["version"], dags_folder))
    step_key: str = letter["step_key"]
    if "[" in step_key:
        raise LedgerflowError(
            f"{step_key}: re-running one item of a for_each step is not supported yet"
        )
    if step_key.startswith("compensate__"):
        original = spec.tool_step(step_key.removeprefix("compensate__"))
        checkpoint = ledger.checkpoint(letter["run_id"], original.id)
        step = compensation_step(spec, original, checkpoint.idempotency_key if checkpoint else None)
    else:
        step = spec.tool_step(step_key)
    attempts = int(letter["attempts"]) + 1
    result = execute_step(
        ledger,
        spec,
        step,
        RunRef(run_id=run["run_id"], dag_id=run["dag_id"], trigger_kind=run["trigger_kind"]),
        params=run["params"],
        try_number=attempts,
        max_attempts=attempts,
        is_final_attempt=lambda _error: False,  # already dead-lettered: do not add another
    )
    ledger.resolve_dead_letter(letter_id, "re-run from the CLI")
    return result
