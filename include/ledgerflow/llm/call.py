"""One LLM call with schema validation and repair, through pydantic-ai.

The schema is enforced by pydantic-ai's structured output: an answer that is not JSON or
does not fit (a registered pydantic model, or an inline JSON Schema checked with
``jsonschema`` in an output validator) is sent back to the model with the validation
error, ``repair_attempts`` times. Every raw answer, every validation error, the tokens
and the latency are collected for the ledger whether the output ends valid or not.

A transport failure (the provider is down, rate-limited, refuses the key) is not an
invalid answer: it raises, and the task is retried like any failed step.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ledgerflow.spec.models import LlmStep

if TYPE_CHECKING:
    from pydantic_ai import Agent

    from ledgerflow.llm.local import LedgerflowAIHook


@dataclass
class LlmOutcome:
    """What one call produced: ``valid`` with ``output``, or ``invalid`` with ``errors``."""

    status: str
    output: Any
    errors: list[str]
    responses: list[str]
    model: str | None
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.status == "valid"


def output_type(step: LlmStep) -> Any:
    """The pydantic-ai output type of a step (prompted or native structured output)."""
    from pydantic_ai import NativeOutput, PromptedOutput, StructuredDict

    from ledgerflow.llm.registry import get_output_model

    target: Any
    if step.output_model is not None:
        target = get_output_model(step.output_model)
    else:
        assert step.output_schema is not None
        target = StructuredDict(dict(step.output_schema), name=step.id)
    return NativeOutput(target) if step.output_mode == "native" else PromptedOutput(target)


_AGENTS: dict[tuple[int, str], tuple[LedgerflowAIHook, Agent[Any, Any]]] = {}
_AGENTS_LOCK = threading.Lock()
_MAX_AGENTS = 64


def agent_key(step: LlmStep, system_prompt: str) -> str:
    """A digest of everything ``build_agent`` reads from a step: the output type (the
    registered model's name or the inline JSON Schema, and the step id that names it), the
    output mode, the repairs, the model settings and the rendered system prompt."""
    described = {
        "id": step.id,
        "output_model": step.output_model,
        "output_schema": step.output_schema,
        "output_mode": step.output_mode,
        "repair_attempts": step.repair_attempts,
        "model_settings": step.model_settings.model_dump(),
        "system_prompt": system_prompt,
    }
    text = json.dumps(described, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def agent_for(hook: LedgerflowAIHook, step: LlmStep, system_prompt: str) -> Agent[Any, Any]:
    """``build_agent``, built once per process for one hook (``llm.local.hook_for`` keeps one
    per connection's content: its id, type, host, key and extra) and one ``agent_key``.

    An agent holds no state between runs; building one costs more than the bookkeeping of
    a step (schema, output tools, validator), and a task process that runs many LLM steps
    (a fused segment, a ``for_each``) would pay it for each."""
    key = (id(hook), agent_key(step, system_prompt))
    with _AGENTS_LOCK:
        cached = _AGENTS.get(key)
    if cached is not None and cached[0] is hook:
        return cached[1]
    agent = build_agent(hook, step, system_prompt)
    with _AGENTS_LOCK:
        if len(_AGENTS) >= _MAX_AGENTS:
            _AGENTS.clear()
        _AGENTS[key] = (hook, agent)
    return agent


def build_agent(hook: LedgerflowAIHook, step: LlmStep, system_prompt: str) -> Agent[Any, Any]:
    """An agent from common.ai's hook, with the step's schema, repairs and settings."""
    from pydantic_ai import ModelRetry

    settings: dict[str, Any] = {
        k: v for k, v in step.model_settings.model_dump().items() if v is not None
    }
    agent = hook.create_agent(
        output_type(step),
        instructions=system_prompt or "Answer with JSON only.",
        retries={"output": step.repair_attempts, "tools": 0},
        model_settings=settings or None,
    )
    if step.output_schema is not None:
        from jsonschema import Draft202012Validator

        validator = Draft202012Validator(dict(step.output_schema))

        # async: pydantic-ai runs a plain function in a worker thread, and run_sync's event
        # loop is new on every call, so each call started a thread for a check that takes
        # microseconds.
        @agent.output_validator
        async def _fits_schema(output: Any) -> Any:
            problems = sorted(validator.iter_errors(output), key=lambda e: list(e.absolute_path))
            if problems:
                raise ModelRetry(
                    "the JSON does not fit the schema: "
                    + "; ".join(f"{_where(e.absolute_path)}: {e.message}" for e in problems)
                )
            return output

    return agent


def call_model(agent: Agent[Any, Any], prompt: str) -> LlmOutcome:
    """Run the agent once (with its repairs); a transport error raises."""
    from pydantic_ai import capture_run_messages
    from pydantic_ai.exceptions import ModelAPIError, UnexpectedModelBehavior

    started = time.perf_counter()
    output: Any = None
    final_error: str | None = None
    with capture_run_messages() as messages:
        try:
            result = agent.run_sync(prompt)
            output = result.output
        except ModelAPIError:
            raise
        except UnexpectedModelBehavior as exc:
            retry = getattr(exc.__cause__, "tool_retry", None)
            final_error = _feedback(retry.content) if retry is not None else str(exc)
    latency_ms = round((time.perf_counter() - started) * 1000)
    outcome = _collect(messages)
    outcome.latency_ms = latency_ms
    if final_error is None:
        outcome.status = "valid"
        outcome.output = output.model_dump(mode="json") if hasattr(output, "model_dump") else output
    else:
        outcome.errors.append(final_error)
    return outcome


def _collect(messages: list[Any]) -> LlmOutcome:
    from pydantic_ai.messages import ModelRequest, ModelResponse, RetryFeedbackPart, TextPart

    outcome = LlmOutcome(status="invalid", output=None, errors=[], responses=[], model=None)
    for message in messages:
        if isinstance(message, ModelResponse):
            outcome.requests += 1
            outcome.responses.append(
                "".join(p.content for p in message.parts if isinstance(p, TextPart))
            )
            outcome.input_tokens += message.usage.input_tokens or 0
            outcome.output_tokens += message.usage.output_tokens or 0
            if message.model_name:
                provider = message.provider_name
                outcome.model = (
                    f"{provider}:{message.model_name}" if provider else message.model_name
                )
        elif isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, RetryFeedbackPart):
                    outcome.errors.append(_feedback(part.content))
    return outcome


def _feedback(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "; ".join(f"{_where(item.get('loc', ()))}: {item.get('msg')}" for item in content)


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return "/".join(parts) if parts else "<root>"
