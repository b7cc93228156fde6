"""Workflow files -> Airflow DAGs, parsed by Airflow's own DagBag (no Airflow processes).

One DAG file per workflow version: a bad workflow file is exactly one import error naming
``workflows/<name>/v<N>.yaml:<line>`` and its field, and every other workflow still loads.
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.cli import SHIM, main
from ledgerflow.factory import build_dag
from ledgerflow.spec.models import ToolStep, WorkflowSpec
from ledgerflow.steps.retry import StepRetryPolicy
from ledgerflow.workflow.segments import segments, task_of
from ledgerflow.workflow.validate import CRON_PRESETS, load_workflow

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
WORKFLOW_FILES = sorted(DAGS.glob("workflows/*/v*.yaml"))
REPO_DAG_IDS = {"checkout__v1", "nightly_report__v1"}
# dags/ledgerflow_maintenance.py: not workflows (SLO alerts, notifications, the retention
# prune, the doctor).
MAINTENANCE_DAG_IDS = {
    "ledgerflow_slo_alerts",
    "ledgerflow_notifications",
    "ledgerflow_prune",
    "ledgerflow_doctor",
}


def dagbag(folder: Path) -> Any:
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(folder), bundle_path=folder, bundle_name="dags-folder")


@pytest.fixture(scope="module")
def repo_bag() -> Any:
    return dagbag(DAGS)


def _rel(path: Path) -> str:
    return str(path.relative_to(DAGS))


def test_the_repo_has_workflow_files() -> None:
    """The repo ships workflow files (the parametrized tests below are not vacuous)."""
    assert {_rel(p) for p in WORKFLOW_FILES} >= {
        "workflows/checkout/v1.yaml",
        "workflows/nightly_report/v1.yaml",
    }


@pytest.mark.parametrize("yaml_path", WORKFLOW_FILES, ids=_rel)
def test_every_workflow_file_has_its_dag_shim(yaml_path: Path) -> None:
    """Beside each ``vN.yaml`` is a ``vN.py`` whose content is exactly ``ledgerflow.cli.SHIM``."""
    shim = yaml_path.with_suffix(".py")
    assert shim.is_file(), f"{shim} missing: run `ledgerflow sync dags/workflows`"
    assert shim.read_text(encoding="utf-8") == SHIM


def test_cli_validates_the_repo_workflows(capsys: pytest.CaptureFixture[str]) -> None:
    """``ledgerflow validate dags/workflows`` exits 0 and reports every file ok."""
    assert main(["validate", str(DAGS / "workflows")]) == 0
    out = capsys.readouterr()
    assert out.out.count("ok   ") == len(WORKFLOW_FILES)
    assert f"{len(WORKFLOW_FILES)} valid, 0 invalid" in out.err


def test_repo_dags_import_without_errors(repo_bag: Any) -> None:
    """Airflow's DagBag imports dags/ with zero import errors and one DAG per workflow file."""
    assert dict(repo_bag.import_errors) == {}
    expected = {load_workflow(p).dag_id for p in WORKFLOW_FILES}
    assert expected >= REPO_DAG_IDS
    assert set(repo_bag.dag_ids) == expected | MAINTENANCE_DAG_IDS


@pytest.mark.parametrize("yaml_path", WORKFLOW_FILES, ids=_rel)
def test_dag_matches_its_spec(repo_bag: Any, yaml_path: Path) -> None:
    """Each DAG has the ledgerflow tags and a doc_md; each task's retries, timeout and retry
    policy are what the spec says (``idempotency: none`` -> no automatic retry)."""
    spec: WorkflowSpec = load_workflow(yaml_path)
    dag = repo_bag.dags[spec.dag_id]
    assert dag is not None
    assert {"ledgerflow", f"workflow:{spec.name}", *spec.tags} <= set(dag.tags)
    assert dag.doc_md and f"## {spec.name} v{spec.version}" in dag.doc_md
    assert _rel(yaml_path) in dag.doc_md
    forward = {t for t in dag.task_dict if not dag.task_dict[t].is_teardown}
    fused = {step for segment in segments(spec) for step in segment.steps}
    assert forward == {task_of(spec, s.id) for s in spec.steps}
    undoable = [s.id for s in spec.steps if getattr(s, "compensate", None) is not None]
    teardowns = [t for t in dag.task_dict if dag.task_dict[t].is_teardown]
    if undoable:
        # Compensations in reverse step order, then the saga's outcome: all teardowns.
        assert teardowns == [f"compensate__{i}" for i in reversed(undoable)] + ["saga__finish"]
        first = dag.get_task(teardowns[0])
        assert set(first.upstream_task_ids) == forward
    else:
        assert teardowns == []
    for segment in segments(spec):
        _check_segment(spec, dag.get_task(segment.task_id), segment.steps)
    for step in spec.steps:
        if step.id in fused:
            continue
        task = dag.get_task(step.id)
        assert set(task.upstream_task_ids) == set(step.needs), step.id
        if step.kind == "approval":
            # The deadline is the trigger's: no execution timeout may cut a wait of days.
            assert task.execution_timeout is None, step.id
        if not isinstance(step, ToolStep):
            continue
        policy = spec.retry_for(step)
        expected_retries = 0 if step.idempotency == "none" else policy.max_attempts - 1
        assert task.retries == expected_retries, step.id
        assert task.execution_timeout == spec.timeout_for(step), step.id
        assert isinstance(task.retry_policy, StepRetryPolicy), step.id
        assert task.retry_policy.spec == policy, step.id
        assert set(task.upstream_task_ids) == set(step.needs), step.id


def _check_segment(spec: WorkflowSpec, task: Any, steps: tuple[str, ...]) -> None:
    """A fused segment's task: its steps in order, after what its first step needs, a
    timeout of all its steps' timeouts, Airflow retries for a killed try."""
    first = spec.step(steps[0])
    assert task.step_ids == list(steps)
    assert set(task.upstream_task_ids) == {task_of(spec, n) for n in first.needs}
    assert task.execution_timeout == sum(
        (spec.timeout_for(spec.step(i)) for i in steps), timedelta()
    )
    assert task.retries == max(spec.retry_for(spec.step(i)).max_attempts for i in steps) - 1
    assert all(name in task.doc_md for name in steps)


def test_checkout_v2_runs_fused_in_one_task(repo_bag: Any) -> None:
    """The shipped checkout's latest version fuses its four steps: one forward task whose
    grid label names them in order; the saga's compensations stay one task per step."""
    dag = repo_bag.dags["checkout__v2"]
    forward = [t for t in dag.tasks if not t.is_teardown]
    assert [t.task_id for t in forward] == ["fused__reserve_inventory__send_confirmation"]
    assert forward[0].task_display_name == (
        "reserve_inventory → charge_payment → create_shipment → send_confirmation"
    )
    teardowns = [t.task_id for t in dag.tasks if t.is_teardown]
    assert teardowns == [
        "compensate__create_shipment",
        "compensate__charge_payment",
        "compensate__reserve_inventory",
        "saga__finish",
    ]


def test_checkout_charge_payment_retries(repo_bag: Any) -> None:
    """checkout charge_payment (max_attempts 4) has 3 retries; the others keep the default 2."""
    dag = repo_bag.dags["checkout__v1"]
    assert dag.get_task("charge_payment").retries == 3
    assert dag.get_task("reserve_inventory").retries == 2
    assert dag.get_task("charge_payment").retry_policy.spec.non_retryable == ("PaymentDeclined",)


def test_every_dag_serializes(repo_bag: Any) -> None:
    """Every DAG survives Airflow's DAG serialization (what the scheduler and UI read)."""
    from airflow.serialization.serialized_objects import DagSerialization

    for dag_id in repo_bag.dag_ids:
        data = DagSerialization.to_dict(repo_bag.dags[dag_id])
        assert data["dag"]["dag_id"] == dag_id


def test_nightly_report_timetable(repo_bag: Any) -> None:
    """nightly_report is a CronTriggerTimetable at 02:30 in Europe/Amsterdam."""
    from airflow.timetables.trigger import CronTriggerTimetable

    timetable = repo_bag.dags["nightly_report__v1"].timetable
    assert isinstance(timetable, CronTriggerTimetable)
    assert timetable.serialize()["timezone"] == "Europe/Amsterdam"
    assert timetable.serialize()["expression"] == "30 2 * * *"


def test_checkout_is_manual_only(repo_bag: Any) -> None:
    """A workflow without ``schedule`` is only triggered by hand or REST."""
    dag = repo_bag.dags["checkout__v1"]
    assert type(dag.timetable).__name__ == "NullTimetable"
    assert not dag.timetable.can_be_scheduled


BROKEN = """\
name: broken
version: 1
steps:
  - id: first
    tool: demo.noop
    idempotency: natural
    args:
      value: "{{ params.not_declared }}"
"""


def test_one_broken_workflow_is_one_import_error(tmp_path: Path) -> None:
    """A broken workflow beside good ones is exactly one import error, keyed by its own DAG file
    and naming ``workflows/broken/v1.yaml:<line>`` and the field; every other DAG still loads."""
    folder = tmp_path / "dags"
    shutil.copytree(DAGS, folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    broken = folder / "workflows" / "broken"
    broken.mkdir()
    (broken / "v1.yaml").write_text(BROKEN, encoding="utf-8")
    (broken / "v1.py").write_text(SHIM, encoding="utf-8")

    bag = dagbag(folder)

    assert len(bag.import_errors) == 1, bag.import_errors
    (key, text), *_ = bag.import_errors.items()
    assert str(key).replace("\\", "/").endswith("workflows/broken/v1.py")
    assert "workflows/broken/v1.yaml:8" in text
    assert "steps[0].args.value" in text
    assert "unknown param 'not_declared'" in text
    assert set(bag.dag_ids) >= REPO_DAG_IDS
    assert not any(d.startswith("broken") for d in bag.dag_ids)


FAN = """\
name: fan
version: 1
params:
  orders: {type: array, default: [a, b, c]}
  go: {type: boolean, default: true}
steps:
  - id: start
    tool: demo.noop
    idempotency: none
  - id: each
    needs: [start]
    when: "params.go"
    for_each: "params.orders"
    tool: demo.noop
    args: {value: "{{ item }}-{{ index }}"}
    idempotency: natural
  - id: after
    needs: [each]
    tool: demo.noop
    idempotency: natural
"""


def test_for_each_step_builds_an_items_task_and_a_mapped_task(tmp_path: Path) -> None:
    """A ``for_each`` step becomes ``<step>__items`` feeding a mapped task; its ``needs`` point at
    the items task and its dependants hang off the mapped task."""
    from airflow.sdk.definitions.mappedoperator import MappedOperator
    from airflow.serialization.serialized_objects import DagSerialization

    from ledgerflow.steps.operator import ForEachItemsOperator

    folder = tmp_path / "dags" / "workflows" / "fan"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(FAN, encoding="utf-8")
    (folder / "v1.py").write_text(SHIM, encoding="utf-8")

    bag = dagbag(tmp_path / "dags")

    assert dict(bag.import_errors) == {}
    dag = bag.dags["fan__v1"]
    assert set(dag.task_dict) == {"start", "each__items", "each", "after"}
    items = dag.get_task("each__items")
    mapped = dag.get_task("each")
    assert isinstance(items, ForEachItemsOperator)
    assert isinstance(mapped, MappedOperator)
    assert not isinstance(dag.get_task("after"), MappedOperator)
    assert items.upstream_task_ids == {"start"}
    assert mapped.upstream_task_ids == {"each__items"}
    assert dag.get_task("after").upstream_task_ids == {"each"}
    assert dag.get_task("start").retries == 0  # idempotency: none -> never retried
    DagSerialization.to_dict(dag)


@pytest.mark.parametrize("schedule", [*sorted(CRON_PRESETS), "30 2 * * *", "*/15 8-18 * * 1-5"])
def test_every_schedule_that_validates_builds_a_dag(schedule: str) -> None:
    """Whatever schedule validation accepts, the factory turns into a serializable DAG."""
    from airflow.serialization.serialized_objects import DagSerialization

    spec = WorkflowSpec.model_validate(
        {
            "name": "sched",
            "version": 1,
            "schedule": schedule,
            "timezone": "Europe/Amsterdam",
            "steps": [{"id": "a", "tool": "demo.noop", "idempotency": "natural"}],
        }
    )
    dag = build_dag(spec)
    assert dag.timetable is not None
    assert DagSerialization.to_dict(dag)["dag"]["dag_id"] == "sched__v1"


def test_step_references_recorded_at_validation_match_the_templates() -> None:
    """The outputs a running step loads are exactly the steps its own templates name
    (args, key, when, for_each); a compensation's templates do not count."""
    from ledgerflow.workflow.validate import _REFERENCES, load_workflow, referenced_steps

    spec = load_workflow(DAGS / "workflows" / "checkout" / "v1.yaml")
    recorded = {s.id: referenced_steps(spec, s) for s in spec.steps}
    for step in spec.steps:
        del _REFERENCES[(id(spec), step.id)]
    recomputed = {s.id: referenced_steps(spec, s) for s in spec.steps}
    assert (
        recorded
        == recomputed
        == {
            "reserve_inventory": frozenset(),
            "charge_payment": frozenset(),
            "create_shipment": frozenset(),
            "send_confirmation": frozenset({"charge_payment", "create_shipment"}),
        }
    )


def test_parsing_a_dag_of_tool_steps_does_not_load_the_ledger_or_the_kernel() -> None:
    """DAG-file parse time (every task process and the dag-processor pay it): building
    the checkout's DAG (tool steps and their saga) imports neither the ledger's store
    (its tables, the lifecycle machines) nor the step kernel; they load when a step runs.
    (The llm, quality and approval operators still live beside their kinds, which
    subclass the kernel's StepKind: their workflows load the kernel at parse time.)"""
    import subprocess
    import sys

    shims = [str(DAGS / "workflows" / "checkout" / "v1.py")]
    heavy = ("ledgerflow.ledger.store", "ledgerflow.ledger.schema", "ledgerflow.lifecycle",
             "ledgerflow.steps.kernel", "ledgerflow.steps.run")  # fmt: skip
    code = (
        "import sys\n"
        "from ledgerflow.factory import dag_for_spec_file\n"
        f"dags = [dag_for_spec_file(p) for p in {shims!r}]\n"
        "assert all(d.task_ids for d in dags)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=_rel)
def test_shipped_workflows_describe_every_param(path: Path) -> None:
    """Airflow's Trigger form shows a param's description under its field: every param
    of a shipped workflow has one."""
    spec = load_workflow(path)
    assert [name for name, p in spec.params.items() if not p.description] == []


def test_a_param_without_a_description_gets_none_invented() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "name": "bare",
            "version": 1,
            "params": {"n": {"type": "integer", "default": 1}, "m": {"type": "string"}},
            "steps": [{"id": "a", "tool": "demo.noop", "idempotency": "natural"}],
        }
    )
    dag = build_dag(spec)
    assert dag.params.get_param("n").description is None
    assert dag.params.get_param("m").description is None
