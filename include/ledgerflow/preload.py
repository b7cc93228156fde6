"""Import a step's code once per Airflow component, not once per task.

Airflow 3 starts a task as a fork: the LocalExecutor forks its workers from the scheduler
when it starts, and a worker forks the task process (``supervise``); the dag-processor
forks a child for each file it parses. A module the parent has imported costs the child
nothing. Every Airflow component loads the plugins before that (``Job.__init__`` asks
the listener manager, which loads them), so the Ledgerflow plugin calls ``preload()``.

Measured in a fresh process (``bench/overhead.py``'s shapes: parse one workflow's DAG
file, then run one tool step on Postgres): 28 ms parse + 26 ms ``execute`` without, and
9 + 15 ms after ``preload()``.

Only Ledgerflow's own modules, and nothing that does work at import: no engine, thread
or connection is made here (those would not survive a fork). Team tools registered
through entry points are user code and stay where the registry loads them, in the task.
``tests/integration/test_preload.py`` checks that a parse and a step import no module of
the package that is not listed here.
"""

from __future__ import annotations

import importlib

TASK_MODULES = (
    # the DAG file's parse: the spec, its validation and templates, the factory
    "ledgerflow.factory",
    "ledgerflow.workflow.loaded",
    "ledgerflow.spec.loader",
    "ledgerflow.spec.templates",
    "ledgerflow.spec.params",
    "ledgerflow.workflow.validate",
    "ledgerflow.workflow.segments",
    # a step's execute: operators, kernel, ledger
    "ledgerflow.steps.operator",
    "ledgerflow.steps.protocol",
    "ledgerflow.steps.kernel",
    "ledgerflow.steps.kind",
    "ledgerflow.steps.retry",
    "ledgerflow.steps.branching",
    "ledgerflow.steps.run",
    "ledgerflow.steps.saga",
    "ledgerflow.steps.segment",
    "ledgerflow.steps.approval",
    "ledgerflow.steps.llm",
    "ledgerflow.steps.quality",
    "ledgerflow.ledger.store",
    "ledgerflow.ledger.breakers",
    "ledgerflow.tools.registry",
    "ledgerflow.tools.builtin",
    "ledgerflow.tools.context",
    "ledgerflow.faults",
    "ledgerflow.versions",
    "ledgerflow.settings",
)


def preload() -> None:
    """Import ``TASK_MODULES`` (~15 ms in a process that has Airflow loaded already)."""
    for name in TASK_MODULES:
        importlib.import_module(name)
