"""Which Airflow components import what an LLM step needs before they fork.

An LLM task forked from a component that has not imported pydantic-ai, common.ai's hook
and the OpenAI client pays 2-4 s of imports (issue 12). ``[ledgerflow] preload_llm =
auto`` imports them only in the commands that fork task processes; ``true`` and ``false``
decide for every process; anything else is refused with the option's name."""

from __future__ import annotations

import pytest

from ledgerflow.errors import SettingError
from ledgerflow.preload import preload_llm

AIRFLOW = "/opt/venv/bin/airflow"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([AIRFLOW, "scheduler"], True),
        ([AIRFLOW, "standalone"], False),  # it starts `airflow scheduler`, which preloads
        ([AIRFLOW, "celery", "worker", "-q", "default"], True),
        ([AIRFLOW, "edge", "worker"], True),
        (["/usr/lib/python3/site-packages/airflow/__main__.py", "scheduler"], True),
        ([AIRFLOW, "dag-processor"], False),
        ([AIRFLOW, "api-server"], False),
        ([AIRFLOW, "triggerer"], False),
        ([AIRFLOW, "celery", "flower"], False),
        (["ledgerflow", "worker"], False),  # not Airflow
        (["-c"], False),
    ],
)
def test_auto_preloads_in_the_components_that_fork_tasks(
    argv: list[str], expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto (the default): the scheduler (LocalExecutor) and the Celery and Edge workers fork
    task processes and import the LLM modules; the others do not (``standalone`` starts
    each component as its own ``airflow <component>`` process)."""
    monkeypatch.delenv("AIRFLOW__LEDGERFLOW__PRELOAD_LLM", raising=False)
    assert preload_llm(argv) is expected


def test_the_setting_decides_for_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """true and false override the command; a value that is neither is refused, naming the
    option and where it came from."""
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__PRELOAD_LLM", "false")
    assert preload_llm([AIRFLOW, "scheduler"]) is False
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__PRELOAD_LLM", "true")
    assert preload_llm([AIRFLOW, "api-server"]) is True
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__PRELOAD_LLM", "sometimes")
    with pytest.raises(SettingError, match=r"\[ledgerflow\] preload_llm .*PRELOAD_LLM"):
        preload_llm([AIRFLOW, "scheduler"])
