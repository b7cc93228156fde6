"""Pydantic models of a workflow file.

Every model forbids unknown fields, so a typo in YAML is an error, not a silent default.
Step kinds form a discriminated union on ``kind``: the approval, llm and quality kinds
of later releases slot in as new members without touching the existing ones.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ledgerflow.spec.limits import Placement
from ledgerflow.spec.slo import SloSpec

_ID = r"^[a-z][a-z0-9_]{0,62}$"
_NAME = r"^[a-z][a-z0-9_-]{0,62}$"
_RESULT_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: Any) -> timedelta:
    """``30``, ``"30s"``, ``"5m"``, ``"1.5h"``, ``"250ms"`` -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '2h'")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match:
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
        elif str(value).startswith("P"):  # ISO 8601, as pydantic writes timedeltas
            from pydantic import TypeAdapter

            seconds = TypeAdapter(timedelta).validate_python(value).total_seconds()
        else:
            raise ValueError(
                f"{value!r} is not a duration (use a number of seconds or '250ms', '30s', '5m', '2h', '1d')"
            )
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds != seconds or seconds > 10 * 365 * 86400:
        raise ValueError(f"{value!r} is not a usable duration (at most 10 years)")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, Field(description="seconds, or '250ms', '30s', '5m', '2h', '1d'")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Backoff(_Model):
    """Exponential backoff: delay_n = min(max, initial * multiplier ** (n - 1))."""

    initial: Duration = timedelta(seconds=1)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    max: Duration = timedelta(minutes=5)

    _parse = field_validator("initial", "max", mode="before")(parse_duration)


class RetryPolicySpec(_Model):
    """How a step is retried inside one run."""

    max_attempts: int = Field(3, ge=1, le=100)
    backoff: Backoff = Backoff()
    jitter: Literal["full", "none"] = "full"
    non_retryable: tuple[str, ...] = ()
    """Exception class names (``ValueError`` or ``module.ValueError``) that fail at once."""

    @field_validator("non_retryable")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not re.match(r"^[A-Za-z_][\w.]*$", name):
                raise ValueError(f"{name!r} is not an exception class name")
        return value


class BreakerSpec(_Model):
    """A circuit breaker: after ``failures`` consecutive failed calls (across runs) it opens
    for ``cooldown``; steps meeting it wait (deferred, no worker slot); then one trial call
    is let through: success closes it, failure opens it again."""

    name: str | None = None
    """Calls sharing a name share a breaker (default: the tool's name)."""
    failures: int = Field(5, ge=1, le=1000)
    cooldown: Duration = timedelta(seconds=30)

    _parse = field_validator("cooldown", mode="before")(parse_duration)


class Defaults(_Model):
    retry: RetryPolicySpec = RetryPolicySpec()
    timeout: Duration = timedelta(minutes=10)

    _parse = field_validator("timeout", mode="before")(parse_duration)


class ParamSpec(_Model):
    type: Literal["string", "integer", "number", "boolean", "array", "object"] = "string"
    description: str | None = None
    required: bool = False
    default: Any = None
    enum: tuple[Any, ...] | None = None

    @model_validator(mode="after")
    def _default_fits(self) -> ParamSpec:
        if self.default is not None and self.enum is not None and self.default not in self.enum:
            raise ValueError(f"default {self.default!r} is not one of enum {list(self.enum)}")
        if self.default is not None and not _json_type_ok(self.type, self.default):
            raise ValueError(f"default {self.default!r} is not of type {self.type}")
        return self


def _json_type_ok(kind: str, value: Any) -> bool:
    checks: dict[str, Any] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "array": lambda v: isinstance(v, list | tuple),
        "object": lambda v: isinstance(v, dict),
    }
    return bool(checks[kind](value))


class KeyedIdempotency(_Model):
    """Effects are de-duplicated by a key rendered from this template."""

    key: str = Field(min_length=1)


Idempotency = Literal["natural", "none"] | KeyedIdempotency
"""``natural``: calling twice is harmless. ``none``: never retried automatically.
``{key: template}``: the effect is recorded under the rendered key and never repeated."""


class ToolCall(_Model):
    """A registered tool with templated arguments (used by ``compensate``)."""

    tool: str
    args: dict[str, Any] = {}
    idempotency: Idempotency | None = None
    retry: RetryPolicySpec | None = None


class _StepBase(_Model, Placement):  # + queue, concurrency, rate (spec.limits)
    id: str = Field(pattern=_ID)
    description: str | None = None
    needs: tuple[str, ...] = ()
    when: str | None = None
    """A Jinja expression on ``params`` and ``steps``; false -> the step is skipped."""
    for_each: str | None = None
    """A Jinja expression giving a list; the step runs once per ``item`` (dynamic mapping)."""
    retry: RetryPolicySpec | None = None
    timeout: Duration | None = None
    breaker: BreakerSpec | None = None
    segment: str | None = Field(None, pattern=_ID)
    """Fuse this step with the other steps of the same segment (a chain of tool and LLM
    steps) into one Airflow task; see ``workflow.segments``."""

    _parse = field_validator("timeout", mode="before")(
        lambda v: None if v is None else parse_duration(v)
    )

    @field_validator("needs", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value


class ToolStep(_StepBase):
    """Calls one registered tool with templated arguments."""

    kind: Literal["tool"] = "tool"
    tool: str
    args: dict[str, Any] = {}
    idempotency: Idempotency | None = None
    compensate: ToolCall | None = None


class Approvers(_Model):
    """Who may decide: Airflow user names and/or Airflow roles (any match is enough)."""

    users: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _someone(self) -> Approvers:
        if not self.users and not self.roles:
            raise ValueError("name at least one approver user or role")
        return self


DeadlineOutcome = Literal["reject", "approve", "fail"]


class Escalation(_Model):
    """At the deadline, hand the approval to other approvers with a new deadline."""

    approvers: Approvers
    deadline: Duration
    at_deadline: DeadlineOutcome | EscalateTo = "reject"

    _parse = field_validator("deadline", mode="before")(parse_duration)


class EscalateTo(_Model):
    escalate: Escalation


Escalation.model_rebuild()


class ApprovalStep(_StepBase):
    """Waits for a person's decision without holding a worker slot (deferred)."""

    kind: Literal["approval"]
    subject: str = Field(min_length=1)
    body: str = ""
    """Markdown, templated like args."""
    payload: dict[str, Any] = {}
    """What the approver sees and decides on (templated); its hash is recorded."""
    approvers: Approvers
    deadline: Duration = timedelta(days=3)
    at_deadline: DeadlineOutcome | EscalateTo = "reject"
    on_reject: str | None = None
    """A step that needs this one, taken when the decision is reject (other branches are
    skipped); without it a reject fails the run (and so compensates)."""

    _parse_deadline = field_validator("deadline", mode="before")(parse_duration)

    branch_field: ClassVar[str] = "on_reject"

    @property
    def branch_target(self) -> str | None:
        return self.on_reject


class QualityDataset(_Model):
    """What a quality step validates: exactly one of ``table``, ``query`` (through the
    Postgres/SQLite connection ``conn_id``), ``step`` (an upstream step's output) or
    ``expression`` (a template expression giving records or columns)."""

    conn_id: str = "ledgerflow_db"
    table: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")
    query: str | None = None
    """SQL text, not a template: values come in as ``:name``, bound from ``parameters``."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Values of the query's ``:name`` placeholders, templated like args."""
    step: str | None = Field(None, pattern=_ID)
    expression: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> QualityDataset:
        given = [k for k in ("table", "query", "step", "expression") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of table, query, step or expression"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.parameters and self.query is None:
            raise ValueError("parameters are the values of a query's :name placeholders")
        return self


class QualityBranch(_Model):
    branch: str = Field(pattern=_ID)


class QualityStep(_StepBase):
    """Validates a dataset with Great Expectations; a failure fails, warns or branches."""

    kind: Literal["quality"]
    dataset: QualityDataset
    expectations: tuple[dict[str, Any], ...] = ()
    """Each item is one expectation: ``{not_null: column}`` or ``{between: {column: ...,
    min: ..., max: ...}}`` (checked against the catalog when the workflow is loaded)."""
    suite: str | None = Field(None, pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    """A suite file ``<name>.yaml`` of the suites folder (a name, never a path)."""
    on_failure: Literal["fail", "warn"] | QualityBranch = "fail"
    data_docs: bool = False
    """Also build GX Data Docs under ``$AIRFLOW_HOME/ledgerflow/data_docs``."""

    branch_field: ClassVar[str] = "on_failure"

    @property
    def branch_target(self) -> str | None:
        return self.on_failure.branch if isinstance(self.on_failure, QualityBranch) else None

    @model_validator(mode="after")
    def _something_to_check(self) -> QualityStep:
        if not self.expectations and self.suite is None:
            raise ValueError("declare expectations, a suite, or both")
        return self


class LlmSettings(_Model):
    """Model settings passed to pydantic-ai (the provider applies what it supports)."""

    temperature: float | None = Field(None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)


class LlmCheck(_Model):
    """One evaluation check on the validated output: a Jinja expression on ``output``
    (and ``params``, ``steps``, ``run``) that must be true, or a registered check function.
    A plain string is an expression."""

    expr: str | None = None
    function: str | None = None
    message: str | None = None
    """The reason recorded when the check fails (default: the check itself)."""

    @model_validator(mode="before")
    @classmethod
    def _plain(cls, value: Any) -> Any:
        return {"expr": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one(self) -> LlmCheck:
        if (self.expr is None) == (self.function is None):
            raise ValueError("a check is either an expression (expr) or a registered function")
        return self

    @property
    def label(self) -> str:
        return self.message or self.expr or f"{self.function}(output)"


class LlmStep(_StepBase):
    """Asks a model (an Airflow ``pydanticai`` connection) for output that fits a schema.

    Valid output that passes the checks continues on the main path; output still invalid
    after ``repair_attempts`` re-asks, or a failed check, takes the ``on_invalid`` branch.
    """

    kind: Literal["llm"]
    conn_id: str = Field("ledgerflow_llm", min_length=1)
    system_prompt: str = ""
    """Templated like args."""
    prompt: str = Field(min_length=1)
    """Templated like args."""
    output_schema: dict[str, Any] | None = None
    """An inline JSON Schema (type: object) the output must fit."""
    output_model: str | None = None
    """Or the name of a registered pydantic model (never an import path)."""
    output_mode: Literal["prompted", "native"] = "prompted"
    """``prompted``: the schema goes in the instructions and the text is parsed (works with
    any chat model); ``native``: the provider's structured-output mode (OpenAI, Ollama)."""
    model_settings: LlmSettings = LlmSettings()
    repair_attempts: int = Field(1, ge=0, le=5)
    """How often an invalid answer is sent back with the validation error."""
    checks: tuple[LlmCheck, ...] = ()
    on_invalid: str | None = None
    """A step that needs this one, taken when the output is invalid or a check fails
    (other branches are skipped); without it that fails the step."""
    idempotency: KeyedIdempotency | None = None
    """The cache key of the response (default: the run and the step; a retry run reuses
    its retry chain's completed checkpoint instead)."""

    branch_field: ClassVar[str] = "on_invalid"

    @property
    def branch_target(self) -> str | None:
        return self.on_invalid


class WebhookTrigger(_Model):
    """``POST /ledgerflow/hooks/<name>`` starts a run; the body is the run's params."""

    secret_conn_id: str = Field(min_length=1, max_length=250)
    """The Airflow connection whose password (or ``extra.secret``) signs each request:
    ``X-Ledgerflow-Signature: sha256=<hex HMAC-SHA256 of the body>``."""


class TriggersSpec(_Model):
    """Event triggers beside schedule, UI and REST (which every workflow has)."""

    webhook: WebhookTrigger | None = None
    assets: tuple[str, ...] = ()
    """Airflow asset URIs: an event on any of them starts a run (with the params'
    defaults), as well as the cron ``schedule`` if there is one."""

    @field_validator("assets")
    @classmethod
    def _uris(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for uri in value:
            if not uri or uri != uri.strip() or len(uri) > 1500:
                raise ValueError(f"{uri!r} is not an asset URI")
        if len(set(value)) != len(value):
            raise ValueError("an asset is listed twice")
        return value


AnyStep = ToolStep | ApprovalStep | LlmStep | QualityStep
Step = Annotated[AnyStep, Field(discriminator="kind")]


class WorkflowSpec(_Model):
    """One version of one workflow: the whole content of a workflow file."""

    name: str = Field(pattern=_NAME)
    version: int = Field(ge=1)
    description: str = ""
    owner: str = "ledgerflow"
    tags: tuple[str, ...] = ()
    schedule: str | None = None
    """A cron expression or a preset (``@daily``); none means manual/REST only."""
    timezone: str = "UTC"
    start_date: str = "2026-01-01"

    @field_validator("start_date", mode="before")
    @classmethod
    def _date_text(cls, value: Any) -> Any:
        # YAML reads an unquoted 2026-01-01 as a date; both spellings mean the same.
        return value.isoformat() if hasattr(value, "isoformat") else value

    params: dict[str, ParamSpec] = {}
    defaults: Defaults = Defaults()
    max_active_runs: int = Field(16, ge=1, le=100_000)
    """Runs of this version at once, parked ones included (raise it for approval workflows)."""
    triggers: TriggersSpec = TriggersSpec()
    execution: Literal["tasks", "fused"] = "tasks"
    """``tasks``: one Airflow task per step. ``fused``: every chain of tool and LLM steps
    runs in one Airflow task (a segment), each step still checkpointed on its own."""
    steps: tuple[Step, ...] = Field(min_length=1)
    result: dict[str, Any] | None = None
    """What the run answers a caller who waits for it (``POST .../runs?wait=30s``) when it
    succeeds: each entry rendered like args, from the run's checkpoints
    (``steps.<id>.output...``), ``params`` and ``run``."""
    slo: SloSpec | None = None
    """Service level objectives (``ledgerflow.spec.slo``): judged by ``ledgerflow slo``,
    the dashboard and the alerts."""

    @property
    def dag_id(self) -> str:
        return f"{self.name.replace('-', '_')}__v{self.version}"

    def step(self, step_id: str) -> AnyStep:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def tool_step(self, step_id: str) -> ToolStep:
        """The step ``step_id``, which must call a tool."""
        step = self.step(step_id)
        if not isinstance(step, ToolStep):
            raise KeyError(f"step {step_id!r} is a {step.kind} step, not a tool step")
        return step

    def retry_for(self, step: AnyStep) -> RetryPolicySpec:
        return step.retry or self.defaults.retry

    def timeout_for(self, step: AnyStep) -> timedelta:
        return step.timeout or self.defaults.timeout

    @field_validator("steps", mode="before")
    @classmethod
    def _default_kind(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return [
                {"kind": "tool", **item} if isinstance(item, dict) and "kind" not in item else item
                for item in value
            ]
        return value

    @field_validator("params")
    @classmethod
    def _param_names(cls, value: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        for name in value:
            if not re.match(_ID, name):
                raise ValueError(f"param name {name!r} must match {_ID}")
        return value

    @field_validator("result")
    @classmethod
    def _result_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            if not value:
                raise ValueError("name at least one result entry, or leave result out")
            for name in value:
                if not re.match(_RESULT_NAME, str(name)):
                    raise ValueError(f"result name {name!r} must match {_RESULT_NAME}")
        return value

    @model_validator(mode="after")
    def _asset_triggers(self) -> WorkflowSpec:
        # An asset-triggered run carries no conf: every required param needs a default.
        if self.triggers.assets:
            if self.schedule == "@once":
                raise ValueError("triggers.assets: an asset schedule cannot be combined with @once")
            missing = [n for n, p in self.params.items() if p.required and p.default is None]
            if missing:
                raise ValueError(
                    f"triggers.assets: runs started by an asset event get the params' "
                    f"defaults, but {', '.join(missing)} is required without a default"
                )
        return self
