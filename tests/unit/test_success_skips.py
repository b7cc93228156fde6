"""``steps.saga.success_skips``: when a forward task's success lets it skip the saga.

The DAG is the factory's own (no Airflow processes); Airflow's answer to
``ti.get_task_states`` is a table of task instance states, filtered as the execution API
filters it (by task id; a mapped instance's key is ``<task_id>_<map_index>``). The same
decision on real Airflow: ``tests/e2e/test_saga_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ledgerflow.factory import build_dag
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.saga import end_forward_task, success_skips

SAGA = ["compensate__a", "saga__finish"]


def _dag(*, compensate: bool = True) -> Any:
    """a (undoable) -> b -> c -> d, and a -> e (for_each, two items): leaves d and e."""
    a: dict[str, Any] = {"id": "a", "tool": "demo.noop", "idempotency": "natural"}
    if compensate:
        a["compensate"] = {"tool": "demo.noop", "args": {"value": "undo"}}
    steps = [
        a,
        {"id": "b", "needs": ["a"], "tool": "demo.noop", "idempotency": "natural"},
        {"id": "c", "needs": ["b"], "tool": "demo.noop", "idempotency": "natural"},
        {"id": "d", "needs": ["c"], "tool": "demo.noop", "idempotency": "natural"},
        {
            "id": "e",
            "needs": ["a"],
            "for_each": "{{ [1, 2] }}",
            "tool": "demo.noop",
            "idempotency": "natural",
        },
    ]
    name = "saga_skips" if compensate else "no_saga"
    return build_dag(WorkflowSpec.model_validate({"name": name, "version": 1, "steps": steps}))


class _TaskInstance:
    """The running task instance: Airflow's answer to ``get_task_states`` from ``table``."""

    def __init__(self, task_id: str, map_index: int, table: dict[str, str | None]) -> None:
        self.task_id = task_id
        self.map_index = map_index
        self.table = table
        self.asked: list[list[str]] = []

    def get_task_states(
        self, *, dag_id: str, run_ids: list[str], task_ids: list[str]
    ) -> dict[str, Any]:
        self.asked.append(task_ids)
        rows = {
            k: v for k, v in self.table.items() if k.rsplit("_", 1)[0] in task_ids or k in task_ids
        }
        return {run_ids[0]: rows}


DONE = {
    "a": "success",
    "b": "success",
    "c": "success",
    "d": "running",
    "e__items": "success",
    "e_0": "success",
    "e_1": "success",
}


def _skips(dag: Any, task_id: str, table: dict[str, str | None], **kw: Any) -> tuple[Any, Any]:
    map_index = int(task_id.rsplit("_", 1)[1]) if task_id.startswith("e_") else -1
    name = "e" if map_index >= 0 else task_id
    ti = _TaskInstance(name, map_index, table)
    context = {"ti": ti, "dag_run": SimpleNamespace(dag_id=dag.dag_id, run_id="r1")}
    return success_skips(dag.get_task(name), context, **kw), ti


def test_the_last_forward_task_skips_the_whole_saga() -> None:
    """Every other forward task succeeded or was skipped: the run cannot fail, so the last
    one skips every compensation task and saga__finish."""
    dag = _dag()
    skips, _ = _skips(dag, "d", DONE)
    assert skips == SAGA
    skips, _ = _skips(dag, "d", {**DONE, "b": "skipped", "c": "skipped"})
    assert skips == SAGA


@pytest.mark.parametrize("state", ["running", "up_for_retry", "queued", "deferred", None])
def test_a_task_still_to_end_keeps_the_saga(state: str | None) -> None:
    """Another forward task (here one item of a mapped leaf) has not ended: it may still
    fail the run, so nothing is skipped."""
    skips, _ = _skips(_dag(), "d", {**DONE, "e_1": state})
    assert skips == []


@pytest.mark.parametrize("state", ["failed", "upstream_failed"])
def test_a_failed_run_keeps_its_saga(state: str) -> None:
    skips, _ = _skips(_dag(), "d", {**DONE, "b": state})
    assert skips == []


def test_a_task_with_a_forward_task_after_it_does_not_ask_airflow() -> None:
    """Only a forward leaf can end last: any other task returns at no cost."""
    skips, ti = _skips(_dag(), "b", {**DONE, "b": "running", "c": None, "d": None})
    assert skips == [] and ti.asked == []


def test_a_mapped_item_ending_last_skips_the_saga() -> None:
    """One item of a for_each leaf: the other items count as other forward tasks."""
    table = {**DONE, "d": "success", "e_0": "running"}
    skips, ti = _skips(_dag(), "e_0", table)
    assert skips == SAGA
    assert "e" in ti.asked[0] and "d" in ti.asked[0]
    skips, _ = _skips(_dag(), "e_0", {**table, "e_1": "running"})
    assert skips == []


def test_a_branch_that_skips_the_rest_composes_into_one_skip_list() -> None:
    """A branch point whose only forward successor is skipped now (``skipping``) is the
    last task: one list holds the branch not taken, what Airflow would skip after it
    (``d``), and the saga."""
    table = {**DONE, "b": "running", "c": None, "d": None}
    skips, ti = _skips(_dag(), "b", table, skipping=["c"])
    assert skips == ["c", "d", *SAGA]
    assert "c" not in ti.asked[0] and "d" not in ti.asked[0]
    # The branch alone when the run can still fail (an item still running).
    skips, _ = _skips(_dag(), "b", {**table, "e_1": "running"}, skipping=["c"])
    assert skips == ["c"]


def test_no_saga_no_question(monkeypatch: pytest.MonkeyPatch) -> None:
    """A workflow without compensations, or the setting off: ``skipping`` only, and
    Airflow is not asked."""
    skips, ti = _skips(_dag(compensate=False), "d", DONE)
    assert skips == [] and ti.asked == []
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__SKIP_SAGA_ON_SUCCESS", "false")
    skips, ti = _skips(_dag(), "d", DONE, skipping=["x"])
    assert skips == ["x"] and ti.asked == []


class _Recording(_TaskInstance):
    def __init__(self, *args: Any, fail: bool = False) -> None:
        super().__init__(*args)
        self.fail = fail
        self.xcoms: dict[str, Any] = {}

    def get_task_states(self, **kw: Any) -> dict[str, Any]:
        if self.fail:
            raise ConnectionError("the execution API is away")
        return super().get_task_states(**kw)

    def xcom_push(self, *, key: str, value: Any) -> None:
        self.xcoms[key] = value


def test_the_last_task_ends_by_skipping_with_its_output_and_an_event(tmp_path: Path) -> None:
    """``end_forward_task``: the output goes to XCom, the ledger records
    ``saga_not_needed`` (who decided, what it skipped), and one exception skips it all."""
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    from ledgerflow.ledger.store import Ledger

    dag = _dag()
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    ti = _Recording("d", -1, DONE)
    dag_run = SimpleNamespace(
        dag_id=dag.dag_id, run_id="r1", logical_date=None, run_after=None, run_type="manual"
    )
    with pytest.raises(DownstreamTasksSkipped) as ended:
        end_forward_task(dag.get_task("d"), {"ti": ti, "dag_run": dag_run}, {"v": 1}, ledger=ledger)
    assert ended.value.tasks == SAGA
    assert ti.xcoms == {"return_value": {"v": 1}}
    [event] = [e for e in ledger.events(f"{dag.dag_id}/r1") if e["kind"] == "saga_not_needed"]
    assert event["data"] == {"task_id": "d", "map_index": -1, "skipped": SAGA}


def test_a_step_that_succeeded_never_fails_on_the_shortcut() -> None:
    """Airflow cannot answer: the task ends as it would without the shortcut (its
    output returned, the branch not taken still skipped), never failed."""
    from airflow.sdk.exceptions import DownstreamTasksSkipped

    dag = _dag()
    context = {
        "ti": _Recording("d", -1, DONE, fail=True),
        "dag_run": SimpleNamespace(dag_id=dag.dag_id, run_id="r1"),
    }
    assert end_forward_task(dag.get_task("d"), context, {"v": 1}) == {"v": 1}
    table = {**DONE, "b": "running", "c": None, "d": None}
    context["ti"] = _Recording("b", -1, table, fail=True)
    with pytest.raises(DownstreamTasksSkipped) as ended:
        end_forward_task(dag.get_task("b"), context, {"v": 2}, skipping=["c"])
    assert ended.value.tasks == ["c"]
