"""Workflow versions on real Airflow processes (Postgres metadata and ledger).

``versioned`` v1 (tests/e2e/workflows/versioned.yaml) is prepare -> ask (approval) ->
v1_finish, on a yearly cron. The test publishes v2 (another step list) into the stack's
dags folder with ``ledgerflow sync`` while a v1 run waits for its approval.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from ledgerflow import versions
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

CRON = "0 3 1 1 *"
V2 = f"""\
name: versioned
version: 2
description: v2 of the versioning test workflow, with another step list.
schedule: "{CRON}"
params:
  ref: {{type: string, default: scheduled}}
steps:
  - id: prepare
    tool: demo.noop
    args: {{value: "{{{{ params.ref }}}}"}}
    idempotency: natural
  - id: ask
    needs: [prepare]
    kind: approval
    subject: "Versioned v2 {{{{ params.ref }}}}"
    approvers: {{roles: [admin]}}
    deadline: 1d
  - id: v2_check
    needs: [ask]
    tool: demo.noop
    args: {{value: v2}}
    idempotency: natural
  - id: v2_finish
    needs: [v2_check]
    tool: demo.noop
    args: {{value: "{{{{ steps.v2_check.output.value }}}}"}}
    idempotency: natural
"""


def cli(stack: AirflowStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ledgerflow"), *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def finished(stack: AirflowStack, ledger: Ledger, ledger_run_id: str) -> str:
    """Airflow's final state, once the ledger also has the run's final status."""
    dag_id, run_id = ledger_run_id.split("/", 1)
    state = stack.wait_for_run(dag_id, run_id, timeout=300)
    wait_for(
        lambda: (ledger.run(ledger_run_id) or {}).get("status") not in (None, "running"),
        60,
        f"{ledger_run_id} final status in the ledger",
    )
    return state


def parked(stack: AirflowStack, ledger: Ledger, dag_id: str, run_id: str) -> approvals.Approval:
    def ready() -> approvals.Approval | None:
        states = {t["task_id"]: t["state"] for t in stack.task_instances(dag_id, run_id)}
        if states.get("ask") != "deferred":
            return None
        return approvals.for_step(ledger, f"{dag_id}/{run_id}", "ask")

    found: approvals.Approval = wait_for(ready, 180, f"{dag_id}/{run_id} parked on ask")
    return found


def approve(stack: AirflowStack, approval: approvals.Approval) -> None:
    stack.api(
        "POST",
        f"/ledgerflow/api/approvals/{approval.id}/decision",
        json={"decision": "approve", "comment": "versioning e2e"},
    )


def task_ids(stack: AirflowStack, dag_id: str, run_id: str) -> set[str]:
    return {t["task_id"] for t in stack.task_instances(dag_id, run_id)}


def dag(stack: AirflowStack, dag_id: str) -> dict[str, object]:
    found: dict[str, object] = stack.api("GET", f"/api/v2/dags/{dag_id}")
    return found


def tags(stack: AirflowStack, dag_id: str) -> set[str]:
    return {t["name"] for t in dag(stack, dag_id)["tags"]}  # type: ignore[attr-defined]


def airflow_unfinished(stack: AirflowStack, dag_id: str) -> list[str]:
    runs = stack.api("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100})["dag_runs"]
    return [r["dag_run_id"] for r in runs if r["state"] in ("queued", "running")]


def ledger_running(ledger: Ledger) -> int:
    return sum(
        1
        for r in ledger.runs("versioned", limit=1000)
        if r["version"] == 1 and r["status"] == "running"
    )


def version_rows(stack: AirflowStack) -> dict[str, dict[str, object]]:
    done = cli(stack, "versions", "versioned", "--json")
    assert done.returncode == 0, done.stderr
    return {r["version"]: r for r in json.loads(done.stdout)}


def test_a_parked_v1_run_finishes_on_v1_after_v2_is_published(
    stack: AirflowStack, ledger: Ledger
) -> None:
    """A v1 run parks on its approval (a retry of it is refused: still running). v2, with
    another step list, is published; v1's DAG loses its schedule and is tagged
    superseded, v2 carries the cron; ``ledgerflow versions`` shows v1 live (one
    unfinished run) and v2 latest. Approving the v1 run finishes it with v1's steps on
    the v1 DAG (its spec hash is v1's); a new run of the latest version runs v2's steps.
    Once no v1 run is unfinished, v1 is retirable."""
    folder: Path = stack.dags_folder / "workflows" / "versioned"
    ref = f"ver-{uuid.uuid4().hex[:8]}"
    assert cli(stack, "sync", str(folder)).returncode == 0
    v1_hash = versions.recorded_hash(folder / "v1.yaml")
    assert v1_hash is not None
    assert dag(stack, "versioned__v1")["timetable_summary"] == CRON

    old_run = stack.trigger("versioned__v1", {"ref": ref})
    approval = parked(stack, ledger, "versioned__v1", old_run)
    refused = cli(stack, "retry", f"versioned__v1/{old_run}")
    assert refused.returncode == 2 and "still running" in refused.stderr, refused.stderr

    (folder / "v2.yaml").write_text(V2, encoding="utf-8")
    published = cli(stack, "sync", str(folder))
    assert published.returncode == 0, published.stderr
    assert (folder / "v2.py").exists() and versions.recorded_hash(folder / "v2.yaml")
    stack.wait_for_dags(["versioned__v2"], timeout=120)
    wait_for(lambda: "superseded" in tags(stack, "versioned__v1"), 120, "v1 superseded")
    assert dag(stack, "versioned__v1")["timetable_summary"] in (None, "None")
    assert dag(stack, "versioned__v2")["timetable_summary"] == CRON
    assert "superseded" not in tags(stack, "versioned__v2")
    # The yearly cron also started a scheduled v1 run when v1 was first parsed (it parks on
    # the approval too): count what Airflow says is unfinished.
    unfinished = wait_for(
        lambda: (
            (n := len(airflow_unfinished(stack, "versioned__v1"))) == ledger_running(ledger) and n
        ),
        60,
        "the ledger knows every unfinished v1 run",
    )
    rows = version_rows(stack)
    assert rows["v1"]["latest"] == "no" and rows["v1"]["retirable"] == "no"
    assert rows["v1"]["unfinished_runs"] == unfinished >= 1
    assert rows["v2"]["latest"] == "yes"

    approve(stack, approval)
    assert finished(stack, ledger, f"versioned__v1/{old_run}") == "success"
    assert task_ids(stack, "versioned__v1", old_run) == {"prepare", "ask", "v1_finish"}
    old = ledger.run(f"versioned__v1/{old_run}")
    assert old is not None and (old["version"], old["spec_hash"]) == (1, v1_hash)
    assert set(ledger.outputs(f"versioned__v1/{old_run}")) == {"prepare", "ask", "v1_finish"}

    latest = f"versioned__v{versions.latest_version(folder)}"
    new_run = stack.trigger(latest, {"ref": ref})
    approve(stack, parked(stack, ledger, latest, new_run))
    assert finished(stack, ledger, f"{latest}/{new_run}") == "success"
    assert task_ids(stack, latest, new_run) == {"prepare", "ask", "v2_check", "v2_finish"}
    new = ledger.run(f"{latest}/{new_run}")
    assert new is not None and new["version"] == 2
    assert new["spec_hash"] == versions.recorded_hash(folder / "v2.yaml")
    # v1 is retirable once none of its runs is unfinished: approve the scheduled one too.
    for other in airflow_unfinished(stack, "versioned__v1"):
        approve(stack, parked(stack, ledger, "versioned__v1", other))
        assert finished(stack, ledger, f"versioned__v1/{other}") == "success"
    assert version_rows(stack)["v1"]["retirable"] == "yes"


def test_a_changed_published_version_is_an_import_error_until_restored(
    stack: AirflowStack,
) -> None:
    """Editing a published version's YAML in the running deployment makes its DAG file an
    import error naming the file and "published version changed; ... publish a new
    version"; restoring the file clears it."""
    folder: Path = stack.dags_folder / "workflows" / "retry_six"
    assert cli(stack, "sync", str(folder)).returncode == 0
    path = folder / "v1.yaml"
    original = path.read_text(encoding="utf-8")

    def errors() -> list[str]:
        return [
            e["stack_trace"]
            for e in stack.import_errors()
            if str(e["filename"]).endswith("retry_six/v1.py")
        ]

    try:
        path.write_text(original.replace("Six steps", "Six edited steps"), encoding="utf-8")
        found = wait_for(errors, 120, "the import error of the edited version")
        assert "workflows/retry_six/v1.yaml: published version changed" in found[0]
        assert "publish a new version v2" in found[0]
    finally:
        path.write_text(original, encoding="utf-8")
    wait_for(lambda: not errors(), 120, "the import error cleared")
