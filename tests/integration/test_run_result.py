"""What a run answers a caller who waited for it (``api._wait``), read from the ledger the
step kernel wrote (SQLite and Postgres): the declared ``result`` rendered from the run's
checkpoints and params, the failed step and its error."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledgerflow.api._wait import failure, outcome, render_result
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def workflow(tmp_path: Path) -> tuple[WorkflowSpec, Path]:
    """Three steps (the last fails while a flag file exists) and a result over them."""
    flag = tmp_path / "broken"
    path = tmp_path / "workflows" / "answer" / "v1.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(
        "name: answer\nversion: 1\n"
        "params:\n  order_id: {type: string, required: true}\n"
        "  qty: {type: integer, default: 2}\n"
        "steps:\n"
        "  - id: charge\n    tool: demo.noop\n"
        "    args: {value: {paid: '{{ params.qty }}', order: '{{ params.order_id }}'}}\n"
        "    idempotency: natural\n"
        "  - id: express\n    needs: [charge]\n    when: 'false'\n    tool: demo.noop\n"
        "    idempotency: natural\n"
        "  - id: ship\n    needs: [charge]\n    tool: demo.fail_while\n"
        f"    args: {{flag: '{flag}', value: 'parcel-{{{{ params.order_id }}}}'}}\n"
        "    idempotency: natural\n"
        "result:\n"
        "  paid: '{{ steps.charge.output.value.paid }}'\n"
        "  summary: '{{ params.order_id }}: {{ steps.ship.output.value }}'\n"
        "  express: '{{ steps.express.output.value }}'\n"
        "  run: '{{ run.workflow }} v{{ run.version }}'\n"
    )
    return load_workflow(path), flag


def test_the_result_is_rendered_from_the_runs_checkpoints(ledger: Ledger, tmp_path: Path) -> None:
    """A succeeded run answers its declared result: native types kept (``qty`` stays an
    integer), params with their defaults, outputs of any step; an entry naming a step that
    was skipped is left out and its reason given, the others still answer."""
    spec, _flag = workflow(tmp_path)
    ref = RunRef(run_id="answer__v1/ok", dag_id="answer__v1")
    params = {"order_id": "o-7", "qty": 2}
    for step in ("charge", "ship"):
        execute_step(ledger, spec, spec.tool_step(step), ref, params=params)
    ledger.mark_step(
        run_id=ref.run_id, step_key="express", step_id="express", map_index=-1, status="skipped"
    )
    rendered, problems = render_result(ledger, spec, ref.run_id)
    assert rendered == {"paid": 2, "summary": "o-7: parcel-o-7", "run": "answer v1"}
    assert list(problems) == ["express"] and "UndefinedError" in problems["express"]
    answer = outcome(ledger, spec, ref.run_id, "success", results=True)
    assert answer == {"results": rendered, "result_errors": problems}
    assert outcome(ledger, spec, ref.run_id, "success", results=False) == {}


def test_a_failed_run_answers_its_failed_step_and_error(ledger: Ledger, tmp_path: Path) -> None:
    """A failed run answers the step that failed it, the error's type and text (the step's
    ``step_failed`` event), and no results."""
    spec, flag = workflow(tmp_path)
    flag.write_text("x")
    ref = RunRef(run_id="answer__v1/bad", dag_id="answer__v1")
    params = {"order_id": "o-8", "qty": 1}
    execute_step(ledger, spec, spec.tool_step("charge"), ref, params=params)
    with pytest.raises(Exception, match="blocked while"):
        execute_step(ledger, spec, spec.tool_step("ship"), ref, params=params)
    answer = outcome(ledger, spec, ref.run_id, "failed", results=True)
    assert answer["failed_step"] == "ship"
    assert answer["error_type"] == "ledgerflow.errors.BlockedByFlag"
    assert answer["error"] is not None and f"blocked while {flag} exists" in answer["error"]
    assert "results" not in answer


def test_params_rejected_by_the_first_task_are_the_failure(ledger: Ledger) -> None:
    """A run whose first task refused its params (Airflow's own trigger) answers that task
    and each bad field."""
    run_id = "answer__v1/typo"
    ledger.ensure_run(
        run_id=run_id,
        dag_id="answer__v1",
        workflow="answer",
        version=1,
        params={"order_id": "o", "qtty": 3},
        trigger_kind="manual",
    )
    ledger.record_event(
        run_id,
        "charge",
        "params_rejected",
        {"problems": [{"field": "qtty", "message": "unknown param (declared: order_id, qty)"}]},
    )
    assert failure(ledger, run_id) == {
        "failed_step": "charge",
        "error_type": "ledgerflow.errors.InvalidParams",
        "error": "qtty: unknown param (declared: order_id, qty)",
        "saga": None,
    }
