"""``ledgerflow.preload`` covers what a task process imports of the package.

A fresh interpreter does what the Ledgerflow plugin does in every Airflow component
(``preload()``), then what a task process forked from it does: parse a workflow's DAG
file the way the task runner does (``BundleDagBag`` of that one file) and run a step's
``execute`` on a SQLite ledger. Any module of the package imported after ``preload()``
is one that every task pays for again; the test names it. The ledger is migrated first,
as a deployment's is: only the first task on an empty ledger imports the migration code
(Alembic), once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys
from pathlib import Path

import airflow.sdk.execution_time.task_runner  # what a task process has before its DAG
from airflow.dag_processing.dagbag import BundleDagBag

from ledgerflow.preload import TASK_MODULES, preload

preload()
before = set(sys.modules)
dags = Path(sys.argv[1])
bag = BundleDagBag(
    dag_folder=str(dags / "workflows" / "checkout" / "v1.py"),
    safe_mode=False,
    load_op_links=False,
    bundle_path=dags,
    bundle_name="dags-folder",
)
assert not bag.import_errors, bag.import_errors
dag = bag.dags["checkout__v1"]
task = dag.get_task("reserve_inventory")


class DagRun:
    dag_id = "checkout__v1"
    run_id = "manual__preload"
    logical_date = None
    run_after = None
    run_type = "manual"


class TaskInstance:
    try_number = 1
    map_index = -1


from ledgerflow.workflow.loaded import spec_for_dag

params = {name: p.default for name, p in spec_for_dag("checkout__v1").params.items()}
params["order_id"] = "o-preload"
output = task.execute({"dag_run": DagRun(), "ti": TaskInstance(), "params": params})
print(json.dumps({
    "output": output,
    "listed": list(TASK_MODULES),
    "imported_after": sorted(m for m in set(sys.modules) - before if m.startswith("ledgerflow")),
}))
"""


def test_a_parse_and_a_step_import_nothing_of_ledgerflow_after_preload(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "home"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        AIRFLOW_CONN_LEDGERFLOW_DB=f"sqlite:///{tmp_path / 'ledger.db'}",
        LEDGERFLOW_DEMO_TOOLS="1",
    )
    migrated = subprocess.run(
        [str(Path(sys.executable).with_name("ledgerflow")), "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT / "dags")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["output"], result  # the step ran and returned its tool's output
    # The demo's tools are the team's own code in a real deployment: the registry loads
    # them in the task, by entry point or by LEDGERFLOW_DEMO_TOOLS.
    missing = [m for m in result["imported_after"] if m != "ledgerflow.tools.demo"]
    assert missing == [], f"add these to ledgerflow.preload.TASK_MODULES: {missing}"


LLM_CHILD = """
import json, os, sys
from pathlib import Path

import airflow.sdk.execution_time.task_runner  # what a task process has before its DAG
from airflow.dag_processing.dagbag import BundleDagBag

from ledgerflow.preload import preload
from ledgerflow.testing.openai_peer import OpenAIPeer

preload(llm=True)  # what the scheduler and the workers do ([ledgerflow] preload_llm = auto)
peer = OpenAIPeer().start()
peer.default = json.dumps(
    {"category": "billing", "priority": "high", "summary": "Charged twice.", "confidence": 0.9}
)
os.environ["AIRFLOW_CONN_LEDGERFLOW_LLM"] = peer.connection_uri()
before = set(sys.modules)
dags = Path(sys.argv[1])
bag = BundleDagBag(
    dag_folder=str(dags / "workflows" / "ticket_triage" / "v1.py"),
    safe_mode=False,
    load_op_links=False,
    bundle_path=dags,
    bundle_name="dags-folder",
)
assert not bag.import_errors, bag.import_errors

from ledgerflow.ledger.store import Ledger
from ledgerflow.steps.kernel import RunRef
from ledgerflow.steps.llm import execute_llm_step
from ledgerflow.workflow.loaded import spec_for_dag

spec = spec_for_dag("ticket_triage__v1")
result = execute_llm_step(
    Ledger.from_airflow(),
    spec,
    spec.step("classify"),
    RunRef(run_id="ticket_triage__v1/manual__preload", dag_id="ticket_triage__v1"),
    params={"ticket_id": "P-1", "ticket": "I was charged twice."},
)
ours = ("ledgerflow", "pydantic_ai", "pydantic_graph", "openai", "genai_prices", "jsonschema")
print(json.dumps({
    "path": result.path,
    "requests": peer.calls(),
    "imported_after": sorted(
        m for m in set(sys.modules) - before
        if m.split(".")[0] in ours or m.startswith("airflow.providers.common.ai")
    ),
}))
"""


def test_an_llm_step_imports_nothing_after_preload_with_llm(tmp_path: Path) -> None:
    """In a component that preloads for LLM steps (the scheduler, the workers), a task
    process's LLM step, through common.ai's hook and the OpenAI client to a loopback model,
    imports no module of the package, of pydantic-ai or of the OpenAI client: each one it
    imported was seconds of every LLM task (issue 12)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "home"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        AIRFLOW_CONN_LEDGERFLOW_DB=f"sqlite:///{tmp_path / 'ledger.db'}",
        LEDGERFLOW_DEMO_TOOLS="1",
    )
    migrated = subprocess.run(
        [str(Path(sys.executable).with_name("ledgerflow")), "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-c", LLM_CHILD, str(ROOT / "dags")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["path"] == "main" and result["requests"] == 1, result
    # The demo's tools stand for a team's own code, which the registry loads in the task.
    missing = [m for m in result["imported_after"] if m != "ledgerflow.tools.demo"]
    assert missing == [], f"add these to ledgerflow.preload.LLM_MODULES: {missing}"
