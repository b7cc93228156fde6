"""Every error Ledgerflow raises, in one module, under one root (``LedgerflowError``).

Each class sets a ``code`` of its own: stable, unique, what logs, scripts and the API can
match on (the class's module path is not a promise). Each survives a pickle round trip
with its attributes and its message: errors cross processes (multiprocessing, Airflow's
task runner and triggerer), and an exception's default pickling calls the class with its
message alone, which fails for a constructor taking anything else.

Only ``InjectedFault`` sits outside the root, on purpose, and only the body limit's
``_TooLarge`` outside this module (a Starlette ``HTTPException``, in ``api/_limits.py``).
This module imports nothing but the standard library: ``import ledgerflow`` loads it in
every DAG file.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime
    from pathlib import Path


class LedgerflowError(Exception):
    """Root of every error Ledgerflow raises on purpose."""

    code: ClassVar[str] = "ledgerflow_error"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (type(self), self.args, self.__dict__))


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    # An unpickled error as it was raised, without calling its __init__ again: ``args``
    # as they were and every attribute as it was set, whatever the constructor takes.
    error = cls.__new__(cls, *args)
    error.__dict__.update(state)
    return error


# --- workflow files and settings ---------------------------------------------------------


class SpecError(LedgerflowError):
    """A workflow file is invalid. Names the file, the line and the field."""

    code = "spec_invalid"
    message: str
    file: str | None
    line: int | None
    field: str | None

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.file or "<workflow>"
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f": {self.field}"
        return f"{where}: {self.message}"


class SpecErrors(SpecError):
    """Several problems in one file; ``errors`` holds each, ``str()`` lists all."""

    code = "spec_invalid_many"
    errors: list[SpecError]

    def __init__(self, errors: list[SpecError]) -> None:
        self.errors = errors
        first = errors[0]
        super().__init__(first.message, file=first.file, line=first.line, field=first.field)

    def __str__(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        return f"{len(self.errors)} problems:\n" + "\n".join(f"  {e}" for e in self.errors)


class SettingError(LedgerflowError, ValueError):
    """A ``[ledgerflow]`` setting whose value does not parse; names the option and where
    the value came from."""

    code = "setting_invalid"


class PublishedVersionChanged(LedgerflowError):
    """A published version's file no longer matches the hash recorded when it was published."""

    code = "published_version_changed"
    yaml_path: Path
    recorded: str
    actual: str

    def __init__(self, yaml_path: Path, recorded: str, actual: str, display: str) -> None:
        self.yaml_path = yaml_path
        self.recorded = recorded
        self.actual = actual
        # As versions.version_of and versions.lock_path (not imported: versions imports us).
        number = re.match(r"v([1-9][0-9]*)\.ya?ml$", yaml_path.name)
        version = int(number.group(1)) if number else 0
        super().__init__(
            f"{display}: published version changed (sha256 {actual[:12]}, recorded "
            f"{recorded[:12]} in {yaml_path.with_suffix('.lock').name}); a published version "
            f"is immutable: restore it and publish a new version v{version + 1}"
        )


class UnknownLlmName(LedgerflowError):
    """An output model or check function that is not registered."""

    code = "llm_name_unknown"


# --- tools -------------------------------------------------------------------------------


class UnknownToolError(LedgerflowError):
    """A tool name that is not in the registry."""

    code = "tool_unknown"
    name: str
    known: list[str]

    def __init__(self, name: str, known: list[str], hint: str | None = None) -> None:
        self.name = name
        self.known = known
        more = f" ({hint})" if hint else ""
        super().__init__(
            f"unknown tool {name!r}; registered tools: {', '.join(known) or 'none'}{more}"
        )


class ToolError(LedgerflowError):
    """A tool call failed in a way that may succeed when retried."""

    code = "tool_failed"


class NonRetryableError(LedgerflowError):
    """A failure that retrying cannot fix (bad input, a 4xx answer, a refused charge)."""

    code = "non_retryable"


class HttpStatusError(ToolError):
    """The ``http`` tool got a 5xx (or 408/425/429) answer: worth another try."""

    code = "http_status_retryable"
    status: int

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {body[:300]}")


class HttpClientError(NonRetryableError):
    """The ``http`` tool got a 4xx answer other than 408/425/429: the request is wrong."""

    code = "http_status_client"
    status: int

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"HTTP {status}: {body[:300]}")


class HttpConnectionError(NonRetryableError):
    """An ``http`` connection whose extra cannot be used: names the connection and field."""

    code = "http_connection_invalid"
    conn_id: str
    field: str
    problem: str

    def __init__(self, conn_id: str, field: str, problem: str) -> None:
        self.conn_id = conn_id
        self.field = field
        self.problem = problem
        super().__init__(f"connection {conn_id!r}: extra field {field!r}: {problem}")


# --- steps -------------------------------------------------------------------------------


class StepSkipped(LedgerflowError):
    """``when`` was false; the operator turns this into a skipped task."""

    code = "step_skipped"


class TemplateRenderError(NonRetryableError):
    """A template could not be rendered with this run's params and outputs."""

    code = "template_render_failed"


class UpstreamUndone(NonRetryableError):
    """A step of a run whose saga undid a step it depends on (a task cleared after the
    compensation): it refuses to run on effects that no longer exist."""

    code = "upstream_undone"


class AttemptsUsedUp(NonRetryableError):
    """A fused step whose attempts were all used by tries of its task that were
    interrupted (killed): it is not started again."""

    code = "attempts_used_up"


class RunCancelled(NonRetryableError):
    """A forward step of a cancelled run: it neither starts nor commits (no dead letter)."""

    code = "run_cancelled"


class NothingToUndo(LedgerflowError):
    """The step did not complete in this run (or the run did not fail): nothing to undo."""

    code = "nothing_to_undo"


class BreakerOpen(LedgerflowError):
    """The breaker is open (or another caller holds the trial): wait until ``until``."""

    code = "breaker_open"
    name: str
    until: datetime

    def __init__(self, name: str, until: datetime) -> None:
        self.name = name
        self.until = until
        super().__init__(f"circuit breaker {name!r} is open until {until.isoformat()}")


class LlmOutputRejected(NonRetryableError):
    """The output stayed invalid (or failed a check) and the step declares no on_invalid."""

    code = "llm_output_rejected"


class LlmCallFailed(ToolError):
    """The provider could not be asked (down, rate-limited, refused): retried like any
    failed step. The message never contains the connection's secret."""

    code = "llm_call_failed"


class QualityCheckFailed(NonRetryableError):
    """Expectations failed and the step declares ``on_failure: fail``."""

    code = "quality_failed"
    step_id: str
    dataset: str
    failed: list[dict[str, Any]]

    def __init__(self, step_id: str, dataset: str, failed: list[dict[str, Any]]) -> None:
        self.step_id = step_id
        self.dataset = dataset
        self.failed = failed
        super().__init__(
            f"quality step {step_id}: {len(failed)} expectation(s) failed on {dataset}: "
            + "; ".join(_describe(f) for f in failed)
        )


def _describe(failure: dict[str, Any]) -> str:
    if failure.get("error"):
        return f"{failure['expectation']}: {failure['error']}"
    if failure.get("unexpected_count") is not None:
        sample = ", ".join(repr(v) for v in failure.get("sample", [])[:5])
        return f"{failure['expectation']}: {failure['unexpected_count']} unexpected (e.g. {sample})"
    return f"{failure['expectation']}: observed {failure.get('observed_value')!r}"


class QualityDatasetError(NonRetryableError):
    """The dataset cannot be validated at all (an output that is not a table...)."""

    code = "quality_dataset"


class DatasetError(LedgerflowError):
    """The quality runner cannot read the data as a dataset at all (not a failed
    expectation); the quality step reports it as ``QualityDatasetError``."""

    code = "dataset_unreadable"


# --- runs: params, triggers, retries, approvals, the ledger ------------------------------


class ParamProblemLike(Protocol):
    """What ``InvalidParams.problems`` holds: ``spec.params.ParamProblem`` (not imported
    here: spec imports this module)."""

    @property
    def field(self) -> str: ...

    @property
    def message(self) -> str: ...

    def as_dict(self) -> dict[str, Any]: ...


class InvalidParams(NonRetryableError):
    """A run's params do not fit its workflow's params schema (retrying cannot fix it)."""

    code = "params_invalid"
    workflow: str
    version: int
    problems: Sequence[ParamProblemLike]

    def __init__(self, workflow: str, version: int, problems: Sequence[ParamProblemLike]) -> None:
        self.workflow = workflow
        self.version = version
        self.problems = problems
        listed = "; ".join(str(p) for p in problems)
        super().__init__(f"params of {workflow} v{version} do not fit its params schema: {listed}")


class TriggerRefused(LedgerflowError):
    """A trigger request that starts nothing; ``status`` is its HTTP status."""

    code = "trigger_refused"
    status: int

    def __init__(self, message: str, *, status: int) -> None:
        self.status = status
        super().__init__(message)


class RetryRefused(LedgerflowError):
    """A retry that must not start; ``reason`` says why (and maps to an HTTP status),
    ``run_id`` names the run the refusal points to (the run that continues the chain, or
    the one to retry instead), when there is one."""

    code = "retry_refused"
    HTTP_STATUS: ClassVar[dict[str, int]] = {
        "unknown_run": 404,
        "unknown_step": 422,
        "running": 409,
        "succeeded": 409,
        "continued": 409,
        "not_newest": 409,
        "workflow_file": 409,
    }
    reason: str
    run_id: str | None

    def __init__(self, message: str, *, reason: str, run_id: str | None = None) -> None:
        self.reason = reason
        self.run_id = run_id
        super().__init__(message)

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.reason, 409)


class CancelRefused(LedgerflowError):
    """A cancel that changes nothing: ``reason`` ``unknown_run`` (404) or ``ended`` (409:
    the run succeeded or failed before it)."""

    code = "cancel_refused"
    HTTP_STATUS: ClassVar[dict[str, int]] = {"unknown_run": 404, "ended": 409}
    reason: str

    def __init__(self, message: str, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)

    @property
    def http_status(self) -> int:
        return self.HTTP_STATUS.get(self.reason, 409)


class ApprovalNotFound(LedgerflowError):
    """No approval with that id."""

    code = "approval_not_found"


class ApprovalConflict(LedgerflowError):
    """The approval was already decided, or changed since the approver saw it."""

    code = "approval_conflict"


class DecidedBefore(ApprovalConflict):
    """This person already decided this approval (a quorum counts each person once)."""

    code = "approval_decided_before"


class EventPayloadInvalid(LedgerflowError):
    """An event's payload does not fit the JSON Schema of the step waiting for it; the
    message names the field (``payload.amount: 'x' is not of type 'number'``)."""

    code = "event_payload_invalid"
    field: str | None = None  # the payload's field (``payload.amount``), when known


class IllegalTransition(LedgerflowError):
    """The ledger refused a status change its lifecycle does not allow."""

    code = "illegal_transition"
    machine: str
    current: str | None
    new: str
    subject: str

    def __init__(self, machine: str, current: str | None, new: str, subject: str = "") -> None:
        self.machine = machine
        self.current = current
        self.new = new
        self.subject = subject
        where = f" of {subject}" if subject else ""
        super().__init__(
            f"{machine}{where}: {current or '(none)'} -> {new} is not an allowed transition"
        )


class LedgerError(LedgerflowError):
    """The ledger cannot be reached or holds something it should not."""

    code = "ledger_error"


# --- the demo's tools --------------------------------------------------------------------


class PaymentDeclined(NonRetryableError):
    """``demo.charge_payment``: the card was declined; charging it again will not help."""

    code = "demo_payment_declined"


class ShipmentUnavailable(ToolError):
    """``demo.create_shipment``: the carrier refused the booking (the demo's failure switch)."""

    code = "demo_shipment_unavailable"


class BlockedByFlag(NonRetryableError):
    """``demo.fail_while``: the flag file exists (the cause of the failure is not fixed yet)."""

    code = "demo_blocked_by_flag"


# --- tests -------------------------------------------------------------------------------


class AirflowUnreachable(LedgerflowError):
    """``ledgerflow doctor``: Airflow's metadata database (or, in a task, its execution
    API) could not be read; nothing is taken for gone and nothing is repaired."""

    code = "airflow_unreachable"


class StackError(LedgerflowError, RuntimeError):
    """``ledgerflow.testing``: the Airflow stack could not start, died, or answered an API
    call with an error."""

    code = "testing_stack"


class InjectedFault(BaseException):
    """Raised at a named commit point by the fault-injection hooks (tests only).

    A ``BaseException`` so that user code and tool code cannot swallow it.
    """

    code: ClassVar[str] = "fault_injected"
