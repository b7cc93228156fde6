"""A step's retry policy: exponential backoff with optional full jitter, non-retryable errors."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from typing import Any

import pytest
from airflow.sdk import RetryAction, RetryPolicy

from ledgerflow.errors import NonRetryableError, ToolError
from ledgerflow.spec.models import RetryPolicySpec
from ledgerflow.steps.retry import StepRetryPolicy, backoff_delay, is_non_retryable
from ledgerflow.tools.builtin import HttpClientError, HttpStatusError
from ledgerflow.tools.demo import PaymentDeclined


class GatewayHiccup(Exception):
    """A test-local error type, named in ``non_retryable`` by simple or dotted name."""


class SubHiccup(GatewayHiccup):
    pass


def policy(**fields: Any) -> RetryPolicySpec:
    base: dict[str, Any] = {
        "max_attempts": 6,
        "backoff": {"initial": "1s", "multiplier": 2, "max": "10s"},
        "jitter": "none",
    }
    return RetryPolicySpec.model_validate({**base, **fields})


SPEC = policy(
    max_attempts=4,
    backoff={"initial": "2s", "multiplier": 2.5, "max": "20s"},
    jitter="none",
    non_retryable=["PaymentDeclined", "builtins.LookupError"],
)


@pytest.mark.parametrize(
    ("attempt", "seconds"), [(1, 1), (2, 2), (3, 4), (4, 8), (5, 10), (6, 10), (50, 10)]
)
def test_backoff_without_jitter(attempt: int, seconds: float) -> None:
    """Jitter "none": delay(n) = min(max, initial * multiplier ** (n - 1)), exactly."""
    assert backoff_delay(policy(), attempt) == timedelta(seconds=seconds)


def test_backoff_other_parameters() -> None:
    """The formula holds for other initial/multiplier/max values (250ms, x3, 5s)."""
    spec = policy(backoff={"initial": "250ms", "multiplier": 3, "max": "5s"})
    delays = [backoff_delay(spec, n).total_seconds() for n in range(1, 6)]
    assert delays == pytest.approx([0.25, 0.75, 2.25, 5.0, 5.0])


def test_backoff_attempt_zero_is_the_initial_delay() -> None:
    """An attempt number below 1 never yields less than the initial delay."""
    assert backoff_delay(policy(), 0) == timedelta(seconds=1)


@pytest.mark.parametrize("attempt", [1, 3, 5, 9])
def test_full_jitter_stays_within_the_cap(attempt: int) -> None:
    """Full jitter: 1000 samples all lie in [0, cap] and are not all equal."""
    cap = min(10.0, 1.0 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    spec = policy(jitter="full")
    samples = [backoff_delay(spec, attempt, rng).total_seconds() for _ in range(1000)]
    assert all(0 <= s <= cap for s in samples)
    assert len(set(samples)) > 1
    # Spread over the whole range, not squeezed at one end.
    assert min(samples) < cap * 0.1
    assert max(samples) > cap * 0.9


def test_full_jitter_is_deterministic_for_a_seeded_rng() -> None:
    """The same seed gives the same delays (reproducible tests, no hidden global state)."""
    spec = policy(jitter="full")
    first = [backoff_delay(spec, 4, random.Random(7)) for _ in range(3)]
    second = [backoff_delay(spec, 4, random.Random(7)) for _ in range(3)]
    assert first == second


def test_full_jitter_without_rng_uses_the_global_generator() -> None:
    """Without an rng argument the delay is still within [0, cap]."""
    spec = policy(jitter="full")
    assert all(timedelta(0) <= backoff_delay(spec, 3) <= timedelta(seconds=4) for _ in range(100))


def test_step_retry_policy_is_an_airflow_retry_policy() -> None:
    """StepRetryPolicy plugs into Airflow 3.3's ``retry_policy`` task argument."""
    assert isinstance(StepRetryPolicy(policy()), RetryPolicy)


@pytest.mark.parametrize(
    "error",
    [
        NonRetryableError("bad input"),
        PaymentDeclined("card declined"),
        HttpClientError(404, "not found"),
    ],
)
def test_non_retryable_errors_fail_at_once(error: BaseException) -> None:
    """A NonRetryableError (or any subclass) fails the task without burning an attempt."""
    decision = StepRetryPolicy(policy()).evaluate(error, try_number=1, max_tries=5)
    assert decision.action is RetryAction.FAIL
    assert type(error).__name__ in (decision.reason or "")


def test_tool_declared_error_classes_fail_at_once() -> None:
    """An error class the tool declared non-retryable fails, including its subclasses."""
    retry = StepRetryPolicy(policy(), tool_errors=(GatewayHiccup,))
    for error in (GatewayHiccup("x"), SubHiccup("y")):
        assert retry.evaluate(error, try_number=2, max_tries=5).action is RetryAction.FAIL
    assert retry.evaluate(KeyError("k"), try_number=2, max_tries=5).action is RetryAction.RETRY


@pytest.mark.parametrize(
    "name",
    [
        "GatewayHiccup",
        f"{GatewayHiccup.__module__}.{GatewayHiccup.__qualname__}",
    ],
)
def test_non_retryable_by_simple_and_dotted_name(name: str) -> None:
    """A class named in ``non_retryable`` (``Name`` or ``module.Name``) and its subclasses fail."""
    retry = StepRetryPolicy(policy(non_retryable=[name]))
    assert retry.evaluate(GatewayHiccup(), try_number=1, max_tries=5).action is RetryAction.FAIL
    assert retry.evaluate(SubHiccup(), try_number=1, max_tries=5).action is RetryAction.FAIL
    assert retry.evaluate(ValueError(), try_number=1, max_tries=5).action is RetryAction.RETRY


def test_non_retryable_builtin_by_name_matches_subclasses() -> None:
    """``non_retryable: [LookupError]`` also covers KeyError and IndexError (via the MRO)."""
    retry = StepRetryPolicy(policy(non_retryable=["LookupError"]))
    for error in (KeyError("k"), IndexError("i"), LookupError("l")):
        assert retry.evaluate(error, try_number=1, max_tries=5).action is RetryAction.FAIL
    assert retry.evaluate(ValueError(), try_number=1, max_tries=5).action is RetryAction.RETRY


def test_a_name_that_only_shares_a_prefix_does_not_match() -> None:
    """``non_retryable: [Gateway]`` does not match ``GatewayHiccup``: names match whole."""
    assert not is_non_retryable(GatewayHiccup(), policy(non_retryable=["Gateway"]))


@pytest.mark.parametrize(
    "error", [ToolError("flaky"), HttpStatusError(503, "busy"), RuntimeError("boom")]
)
@pytest.mark.parametrize("try_number", [1, 2, 3, 4, 5])
def test_other_errors_are_retried_after_the_backoff(error: BaseException, try_number: int) -> None:
    """Any other error is RETRY with the backoff delay for that try number."""
    decision = StepRetryPolicy(policy()).evaluate(error, try_number=try_number, max_tries=6)
    assert decision.action is RetryAction.RETRY
    assert decision.retry_delay == backoff_delay(policy(), try_number)
    assert decision.retry_delay is not None and decision.retry_delay > timedelta(0)


def test_serialize_is_json_and_carries_the_spec() -> None:
    """serialize() is plain JSON naming the policy type and holding every spec field."""
    data = json.loads(json.dumps(StepRetryPolicy(SPEC).serialize()))
    assert data["__type"] == "ledgerflow.StepRetryPolicy"
    assert data["spec"]["max_attempts"] == 4
    assert data["spec"]["jitter"] == "none"
    assert data["spec"]["backoff"]["multiplier"] == 2.5
    assert data["spec"]["non_retryable"] == ["PaymentDeclined", "builtins.LookupError"]


def test_serialize_round_trip() -> None:
    """deserialize(serialize()) gives a policy with the same spec and the same decisions."""
    original = StepRetryPolicy(SPEC)
    restored = StepRetryPolicy.deserialize(json.loads(json.dumps(original.serialize())))
    assert isinstance(restored, StepRetryPolicy)
    assert restored.spec == SPEC
    for error in (KeyError("k"), RuntimeError("r"), NonRetryableError("n")):
        for try_number in (1, 2, 3):
            assert restored.evaluate(error, try_number, 4) == original.evaluate(
                error, try_number, 4
            )


def test_a_ledgerflow_error_named_by_its_older_module_path_still_matches() -> None:
    """Ledgerflow's errors moved into ``ledgerflow.errors``; a workflow that names one by
    the path it had (``ledgerflow.tools.builtin.HttpStatusError``) keeps its meaning: the
    error is not retried. An error of another package is matched by its own path only."""
    error = HttpStatusError(503, "busy")
    for name in ("ledgerflow.tools.builtin.HttpStatusError", "ledgerflow.errors.HttpStatusError"):
        assert is_non_retryable(error, RetryPolicySpec(non_retryable=(name,)))
    assert not is_non_retryable(error, RetryPolicySpec(non_retryable=("acme.HttpStatusError",)))
