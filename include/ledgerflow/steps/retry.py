"""A step's retry policy as an Airflow 3.3 ``RetryPolicy``.

Airflow evaluates it in the worker on every failure: non-retryable errors fail the task
at once (no attempt burned), everything else is retried after an exponential backoff
with full jitter: ``uniform(0, min(max, initial * multiplier ** (attempt - 1)))``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import RetryDecision, RetryPolicy

from ledgerflow.errors import NonRetryableError
from ledgerflow.spec.models import RetryPolicySpec


def backoff_delay(
    spec: RetryPolicySpec, attempt: int, rng: random.Random | None = None
) -> timedelta:
    """The wait before retry number ``attempt`` (1 = the first retry)."""
    cap = min(
        spec.backoff.max.total_seconds(),
        spec.backoff.initial.total_seconds() * spec.backoff.multiplier ** max(attempt - 1, 0),
    )
    if spec.jitter == "full":
        cap = (rng or random).uniform(0, cap)
    return timedelta(seconds=cap)


def is_non_retryable(
    error: BaseException, spec: RetryPolicySpec, tool_errors: tuple[type[BaseException], ...] = ()
) -> bool:
    if isinstance(error, NonRetryableError) or (tool_errors and isinstance(error, tool_errors)):
        return True
    names = set(spec.non_retryable)
    # Ledgerflow's own errors moved into ledgerflow.errors; a workflow naming one by its
    # older path (ledgerflow.tools.builtin.HttpStatusError) still means that error.
    ours = {n.rsplit(".", 1)[1] for n in names if n.startswith("ledgerflow.") and "." in n}
    for kind in type(error).__mro__:
        if kind.__name__ in names or f"{kind.__module__}.{kind.__qualname__}" in names:
            return True
        if kind.__module__ == "ledgerflow.errors" and kind.__name__ in ours:
            return True
    return False


def final_attempt(
    try_number: int,
    retries: int,
    spec: RetryPolicySpec,
    tool_errors: tuple[type[BaseException], ...] = (),
) -> Callable[[BaseException], bool]:
    """Whether a failure of try ``try_number`` is the last one: the retries are used up,
    or the error is one that ``StepRetryPolicy`` fails at once."""

    def final(error: BaseException) -> bool:
        return try_number > retries or is_non_retryable(error, spec, tool_errors)

    return final


class StepRetryPolicy(RetryPolicy):
    def __init__(
        self, spec: RetryPolicySpec, tool_errors: tuple[type[BaseException], ...] = ()
    ) -> None:
        self.spec = spec
        self.tool_errors = tool_errors

    def evaluate(
        self, exception: BaseException, try_number: int, max_tries: int, context: Any = None
    ) -> RetryDecision:
        if is_non_retryable(exception, self.spec, self.tool_errors):
            return RetryDecision.fail(reason=f"non-retryable {type(exception).__name__}")
        delay = backoff_delay(self.spec, try_number)
        return RetryDecision.retry(
            delay=delay, reason=f"retry {try_number} in {delay.total_seconds():.2f}s"
        )

    def serialize(self) -> dict[str, Any]:
        return {"__type": "ledgerflow.StepRetryPolicy", "spec": self.spec.model_dump(mode="json")}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> StepRetryPolicy:
        return cls(RetryPolicySpec.model_validate(data["spec"]))
