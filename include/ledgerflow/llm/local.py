"""The model behind an LLM step's connection, and the offline rule-based model.

An LLM step names an Airflow connection of type ``pydanticai`` (common.ai). Its ``model``
extra chooses the model: ``openai:gpt-4o-mini`` (with the API key as the password),
``ollama:llama3.2`` (with the Ollama URL as the host), ... resolved by common.ai's
``PydanticAIHook``, including its ``fallback_conn_ids`` provider failover.

One more value is ours: ``ledgerflow:rules``, the **deterministic local rule-based
model**. It is not a language model: a pydantic-ai ``FunctionModel`` that reads the last
paragraph of the prompt, matches keywords, and answers JSON that fits the requested
schema. It runs offline, costs nothing and answers the same way every time, which is
what the demo (no network) and examples need. Change the connection, not the workflow,
to use a real model.

This module loads common.ai's hook and so pydantic-ai: import it only where a step runs
(never from a DAG file or the spec code).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

from airflow.providers.common.ai.hooks.pydantic_ai import PydanticAIHook

from ledgerflow.rules_model import classify

Connection = Any  # Airflow's or the Task SDK's, whichever the secrets backend returns

if TYPE_CHECKING:
    from pydantic_ai.messages import ModelMessage, ModelResponse
    from pydantic_ai.models import Model
    from pydantic_ai.models.function import AgentInfo

LOCAL_MODEL = "ledgerflow:rules"


class LedgerflowAIHook(PydanticAIHook):
    """common.ai's ``PydanticAIHook``, plus the offline ``ledgerflow:rules`` model."""

    def get_conn(self) -> Model:
        if self._model is None and self._get_configured_model_name() == LOCAL_MODEL:
            self._model = rules_model()
        return super().get_conn()


_HOOKS: dict[tuple[str, ...], LedgerflowAIHook] = {}
_MAX_HOOKS = 32

CONNECTION_TTL_S = 60.0
_CONNECTIONS: dict[str, tuple[float, Connection]] = {}


def hook_for(conn_id: str) -> LedgerflowAIHook:
    """The hook of a connection, kept while the connection stays the same.

    A resolved model holds an HTTP client whose TLS context alone costs tens of
    milliseconds to build; a process that runs many steps builds it once per connection.
    """
    conn = connection(conn_id)
    secret = hashlib.sha256((conn.password or "").encode()).hexdigest()
    fingerprint = (conn_id, conn.conn_type or "", conn.host or "", secret, conn.extra or "")
    hook = _HOOKS.get(fingerprint)
    if hook is None:
        hook = LedgerflowAIHook(llm_conn_id=conn_id)
        hook._seed_connection(conn)
        if len(_HOOKS) >= _MAX_HOOKS:
            _HOOKS.clear()
        _HOOKS[fingerprint] = hook
    return hook


def connection(conn_id: str) -> Connection:
    """The connection, looked up at most once per ``CONNECTION_TTL_S`` in a process.

    In a task, a connection that is not an ``AIRFLOW_CONN_*`` variable is a round trip
    through the task's supervisor to Airflow's API server (or a secrets backend's own);
    a task process that runs many LLM steps (a fused segment, a ``for_each``) asks once.
    A variable is read where it is every time: it costs nothing, and a change is seen at
    once. A connection changed in Airflow reaches a running process within the TTL."""
    if f"AIRFLOW_CONN_{conn_id.upper()}" in os.environ:
        return LedgerflowAIHook.get_connection(conn_id)
    now = time.monotonic()
    cached = _CONNECTIONS.get(conn_id)
    if cached is not None and now - cached[0] < CONNECTION_TTL_S:
        return cached[1]
    conn = LedgerflowAIHook.get_connection(conn_id)
    _CONNECTIONS[conn_id] = (now, conn)
    return conn


def rules_model() -> Model:
    from pydantic_ai.models.function import FunctionModel

    return FunctionModel(_answer, model_name="rules")


async def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    # async: pydantic-ai would run a plain function in a new worker thread on every call.
    from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

    prompt = ""
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    prompt = part.content
    target = info.model_request_parameters.output_object
    schema = target.json_schema if target is not None else {"type": "string"}
    return ModelResponse(parts=[TextPart(json.dumps(classify(prompt, schema)))])
