"""A step that parks (here a wait) whose arguments do not render at run time ends like
any step whose render fails: one failed attempt, the step failed, a dead letter with the
error; nothing parked (no ``timer_parked``). The kernel's ``parked_step_unrendered`` does
it for the approval, event and wait kinds alike; on SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledgerflow.errors import NonRetryableError
from ledgerflow.ledger.store import Ledger
from ledgerflow.steps.kernel import RunRef
from ledgerflow.steps.wait import park
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

WORKFLOW = """
name: timed_bad
version: 1
timezone: Europe/Paris
params:
  at: {type: string, required: true}
steps:
  - id: pause
    kind: wait
    until: "{{ params.at }}"
"""


def test_an_until_that_reads_as_no_moment_fails_the_step_with_a_dead_letter(
    tmp_path: Path, ledger_url: str
) -> None:
    path = tmp_path / "v1.yaml"
    path.write_text(WORKFLOW)
    spec = load_workflow(path)
    ledger = Ledger(ledger_url)
    ledger.migrate()
    run = RunRef(run_id=f"timed_bad__v1/{tmp_path.name}", dag_id="timed_bad__v1")
    with pytest.raises(NonRetryableError, match="until"):
        park(ledger, spec, spec.steps[0], run, params={"at": "next tuesday-ish"})
    attempts = ledger.attempts(run.run_id, "pause")
    assert [a["status"] for a in attempts] == ["failed"]
    letters = [d for d in ledger.dead_letters() if d["run_id"] == run.run_id]
    assert len(letters) == 1 and "until" in str(letters[0]["error"])
    assert not [e for e in ledger.events(run.run_id) if e["kind"] == "timer_parked"]
