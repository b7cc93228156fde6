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

An LLM step also needs common.ai's hook, pydantic-ai and the OpenAI client (which OpenAI,
Ollama, vLLM and other OpenAI-compatible connections use): 2-4 s of imports in a task
process on this machine, and most of what an LLM task cost beyond its model
(``bench/_llm_step.py``; issue 12). ``LLM_MODULES`` are imported only in the components
that fork task processes (the scheduler, whose LocalExecutor workers fork the tasks, and
Celery or Edge workers), ~1.5 s and ~40 MB once per component; the DAG processor, the
API server and the triggerer never run an LLM step and skip them
(``[ledgerflow] preload_llm``: ``auto``, ``true`` or ``false``). Those components also make
the HTTP steps' default SSL context there (``tools._http_conn.default_tls``, ~20 ms).

A Celery worker does not load plugins by itself (Airflow loads them lazily), so its task
processes would each load the plugin, and this preload, after their fork: Celery workers
run with ``AIRFLOW__CORE__LAZY_LOAD_PLUGINS=False`` (docker-compose.yml, the tests' stack),
and ``PRELOADED_IN`` lets a step see where its code came from (``demo.task_process``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

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
    "ledgerflow.tools._http_conn",
    "ledgerflow.tools.context",
    "ledgerflow.faults",
    "ledgerflow.versions",
    "ledgerflow.settings",
)


# What an LLM step imports, including what pydantic-ai and the OpenAI client import only on
# their first request (their absence cost the first step ~150 ms more).
LLM_MODULES = (
    "ledgerflow.llm.local",
    "ledgerflow.llm.call",
    "ledgerflow.llm.registry",
    "ledgerflow.llm.builtin",
    "ledgerflow.ledger.llm",
    "jsonschema",
    "pydantic_ai.models.openai",
    "pydantic_ai.providers.openai",
    "pydantic_ai.models.function",
    "openai.resources.chat.chat",  # the client's resources load lazily, on first use
    "openai.resources.chat.completions.completions",
    "openai.lib.streaming.chat",
    "anyio._backends._asyncio",
    "genai_prices.data",
    "genai_prices.decompose",
    "genai_prices.validation",
    "jiter",
    # a connection's lookup (a task process forked by the supervisor has the rest)
    "airflow.sdk.definitions.connection",
    "airflow.sdk.execution_time.cache",
)

# Airflow commands whose process forks task processes.
_TASK_RUNNERS = ("scheduler", "worker")

PRELOADED_IN: int | None = None
"""The process that first called :func:`preload` (its pid, or None: never called). In a
task process, a pid other than its own says the step code was inherited from the
component that forked it, as intended; its own pid says the task imported it itself."""


def preload(llm: bool | None = None) -> None:
    """Import ``TASK_MODULES`` (~15 ms in a process that has Airflow loaded already), and
    ``LLM_MODULES`` when ``llm`` is true; ``None`` decides by ``[ledgerflow] preload_llm``."""
    global PRELOADED_IN
    if PRELOADED_IN is None:
        PRELOADED_IN = os.getpid()
    for name in TASK_MODULES:
        importlib.import_module(name)
    if llm is None:
        llm = preload_llm()
    if llm:
        for name in LLM_MODULES:
            # An optional client that is not installed: nothing to save.
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
    if forks_tasks():
        # The HTTP steps' default SSL context (~20 ms of CPU to load the CA bundle): made
        # once here, inherited by every task process. A value, not a connection.
        from ledgerflow.tools._http_conn import default_tls

        default_tls()
        from ledgerflow import settings, supervisor_exit

        if settings.get("supervisor_exit_wait"):
            supervisor_exit.apply()


def preload_llm(argv: list[str] | None = None) -> bool:
    """Whether this process should import ``LLM_MODULES``: ``[ledgerflow] preload_llm``,
    whose ``auto`` means "this Airflow command forks task processes"."""
    from ledgerflow import settings

    choice = settings.get("preload_llm")
    if choice != "auto":
        return bool(choice)
    return forks_tasks(argv)


def forks_tasks(argv: list[str] | None = None) -> bool:
    """Whether this process is an Airflow command that forks task processes (the
    scheduler, whose LocalExecutor workers fork them, or a Celery or Edge worker)."""
    args = sys.argv[1:3] if argv is None else argv[1:3]
    program = Path(sys.argv[0] if argv is None else argv[0]).name
    return program in ("airflow", "__main__.py") and any(a in _TASK_RUNNERS for a in args)
