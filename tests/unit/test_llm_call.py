"""What an LLM step builds once per process, and what it must not share.

The agent of a step (its output type, schema validator, repairs, settings, instructions)
is built once per process for one connection's hook and one content digest of the step
(``llm.call.agent_key``), so a task process that runs many LLM steps pays it once; a step
that differs in anything the agent is built from, or another connection, gets its own.
The models here are offline: ``ledgerflow:rules`` through common.ai's hook."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.spec.models import LlmStep
from ledgerflow.workflow.validate import load_workflow

ROOT = Path(__file__).resolve().parents[2]
TRIAGE = ROOT / "dags" / "workflows" / "ticket_triage" / "v1.yaml"
RULES = json.dumps({"conn_type": "pydanticai", "extra": {"model": "ledgerflow:rules"}})


@pytest.fixture
def step(monkeypatch: pytest.MonkeyPatch) -> LlmStep:
    monkeypatch.setenv("AIRFLOW_CONN_UNIT_RULES", RULES)
    monkeypatch.setenv("AIRFLOW_CONN_UNIT_RULES_TWO", RULES)
    loaded = load_workflow(TRIAGE).step("classify")
    assert isinstance(loaded, LlmStep)
    return loaded.model_copy(update={"conn_id": "unit_rules"})


def test_an_equal_step_is_served_the_agent_built_for_it(step: LlmStep) -> None:
    """A copy of a step (the spec parsed again, a fused segment's own copy) with the same
    connection is served the agent already built: nothing is built twice."""
    from ledgerflow.llm.call import agent_for
    from ledgerflow.llm.local import hook_for

    first = agent_for(hook_for("unit_rules"), step, "triage")
    again = agent_for(hook_for("unit_rules"), step.model_copy(deep=True), "triage")
    assert again is first


def test_a_different_schema_prompt_setting_or_connection_is_not_served_the_cached_agent(
    step: LlmStep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Everything the agent is built from is in its key: another output schema, system
    prompt, repair count, model setting or output mode, and another connection (or the
    same connection id with another model), each get an agent of their own."""
    from ledgerflow.llm.call import agent_for
    from ledgerflow.llm.local import hook_for

    assert step.output_schema is not None
    base = agent_for(hook_for("unit_rules"), step, "triage")
    narrower = dict(step.output_schema, required=["category"])
    variants = {
        "schema": (step.model_copy(update={"output_schema": narrower}), "triage", "unit_rules"),
        "prompt": (step, "another system prompt", "unit_rules"),
        "repairs": (step.model_copy(update={"repair_attempts": 3}), "triage", "unit_rules"),
        "settings": (
            step.model_copy(
                update={"model_settings": step.model_settings.model_copy(update={"max_tokens": 7})}
            ),
            "triage",
            "unit_rules",
        ),
        "mode": (step.model_copy(update={"output_mode": "native"}), "triage", "unit_rules"),
        "connection": (step, "triage", "unit_rules_two"),
    }
    agents: dict[str, Any] = {
        name: agent_for(hook_for(conn_id), variant, prompt)
        for name, (variant, prompt, conn_id) in variants.items()
    }
    for name, agent in agents.items():
        assert agent is not base, f"the {name} variant was served the cached agent"
    assert len({id(a) for a in agents.values()}) == len(agents)
    # The connection itself changes (another model, same id): a new hook, a new agent.
    monkeypatch.setenv(
        "AIRFLOW_CONN_UNIT_RULES",
        json.dumps({"conn_type": "pydanticai", "extra": {"model": "test"}}),
    )
    changed = hook_for("unit_rules")
    assert agent_for(changed, step, "triage") is not base
    assert changed.get_conn().model_name == "test"


def test_the_schema_check_runs_without_a_thread_per_call(
    step: LlmStep, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inline JSON Schema is checked on the call's own event loop: a call starts no
    thread (pydantic-ai ran a plain validator in a worker thread of a loop that is new on
    every call, one thread per call), and the check still rejects what does not fit."""
    from ledgerflow.llm.call import agent_for, call_model
    from ledgerflow.llm.local import hook_for

    agent = agent_for(hook_for("unit_rules"), step, "triage")
    call_model(agent, "Ticket 1.\n\nI was charged twice.")  # warm: first-use imports
    started: list[str] = []
    original = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self.name)
        original(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    outcome = call_model(agent, "Ticket 2.\n\nThe app crashes with an error.")
    assert outcome.valid and outcome.output["category"] == "technical"
    assert started == []
    # The validator still works: a schema the rules model's answer cannot fit.
    assert step.output_schema is not None
    strict = dict(step.output_schema)
    strict["properties"] = dict(strict["properties"], summary={"type": "string", "maxLength": 1})
    rejected = call_model(
        agent_for(hook_for("unit_rules"), step.model_copy(update={"output_schema": strict}), "t"),
        "Ticket 3.\n\nThe app crashes with an error.",
    )
    assert not rejected.valid and "summary" in rejected.errors[-1]


CONNECTION_CHILD = """
import json, sys
from pathlib import Path

from ledgerflow.llm import local

path = Path(sys.argv[1])
first = local.hook_for("file_llm")
path.write_text(json.dumps({"file_llm": {"conn_type": "pydanticai", "extra": {"model": "test"}}}))
within_ttl = local.hook_for("file_llm")
local.CONNECTION_TTL_S = 0.0
after_ttl = local.hook_for("file_llm")
print(json.dumps({
    "same_within_ttl": within_ttl is first,
    "models": [h._get_configured_model_name() for h in (first, within_ttl, after_ttl)],
}))
"""


def test_a_connection_from_a_secrets_backend_is_looked_up_once_per_ttl(tmp_path: Path) -> None:
    """A connection that is not an ``AIRFLOW_CONN_*`` variable (in a task: a round trip
    through the supervisor to the API server) is looked up once per ``CONNECTION_TTL_S``
    in a process: a changed connection is served from the process's copy until then, and
    seen, with a new hook, after it. The backend here is Airflow's file backend."""
    import os
    import subprocess
    import sys

    conns = tmp_path / "connections.json"
    conns.write_text(
        json.dumps(
            {"file_llm": {"conn_type": "pydanticai", "extra": {"model": "ledgerflow:rules"}}}
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "home"),
        AIRFLOW__SECRETS__BACKEND="airflow.secrets.local_filesystem.LocalFilesystemBackend",
        AIRFLOW__SECRETS__BACKEND_KWARGS=json.dumps({"connections_file_path": str(conns)}),
    )
    proc = subprocess.run(
        [sys.executable, "-c", CONNECTION_CHILD, str(conns)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "same_within_ttl": True,
        "models": ["ledgerflow:rules", "ledgerflow:rules", "test"],
    }
