"""What a kind of step supplies to the kernel, and what the kernel hands it.

``StepKind`` is the part a tool, LLM, quality, approval or compensation step writes for
itself; ``Rendered``, ``Attempt``, ``Reuse``, ``Committed`` and ``Prologue`` are the
records that pass between it and ``steps.kernel``, which re-exports all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from ledgerflow.errors import InjectedFault
from ledgerflow.ledger.store import Checkpoint, Ledger
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.run import Chain, RunRef

# Not a failed attempt: a crash signal, an exit, an injected crash. The next attempt
# finds this one still running and marks it lost.
CRASHES = (InjectedFault, KeyboardInterrupt, SystemExit, GeneratorExit)


@dataclass
class StepResult:
    status: str  # completed | reused | skipped
    output: Any = None
    idempotency_key: str | None = None
    effect_reused: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rendered:
    """A step's inputs for this attempt: what the attempt records (``args``), the
    idempotency key, and whatever else the kind rendered for itself (``extra``)."""

    args: Any
    idempotency_key: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # What a dead letter keeps of the inputs (default: ``args``).
    letter_args: Any = ...

    def __post_init__(self) -> None:
        if self.letter_args is ...:
            self.letter_args = self.args


@dataclass
class Attempt:
    """One attempt of one step, as the kind sees it."""

    ledger: Ledger
    spec: WorkflowSpec
    step: Any
    run: RunRef
    key: str
    map_index: int
    try_number: int
    rendered: Rendered
    context: dict[str, Any]
    first: bool  # no checkpoint row existed before this attempt
    attempt_id: int = 0
    # A dead letter may be open for this step (an earlier failure in this run, or a run
    # it retries): completing it looks for them.
    letters: bool = True
    prepared: Any = None  # what ``prepare`` found (a recorded answer...)
    # A forward step commits only while its run is not cancelled (a compensation does).
    forward: bool = True


@dataclass(frozen=True)
class Reuse:
    """A finished effect found under the step's key: its result is the output;
    ``from_run`` is the run that made it."""

    result: Any
    from_run: str | None = None


@dataclass
class Committed:
    """What ``commit`` stored: the checkpoint's output, or a final rejection."""

    output: Any = None
    reused: bool = False
    rejection: BaseException | None = None  # recorded as the final failure
    letter_args: Any = None
    details: dict[str, Any] = field(default_factory=dict)


class StepKind:
    """What one kind of step supplies to the kernel. Override what is yours."""

    # Errors of this kind that Airflow's retry policy fails at once (with spec names).
    tool_errors: tuple[type[BaseException], ...] = ()

    def render(self, attempt_context: dict[str, Any]) -> Rendered:
        raise NotImplementedError

    def claim(
        self, ledger: Ledger, run: RunRef, key: str, rendered: Rendered, conn: Connection
    ) -> Reuse | None:
        """Inside the attempt's transaction, before the attempt row: claim the effect's
        key (it may change: a compensated effect is redone under a new key). Returns a
        finished effect to reuse, or ``None``."""
        return None

    def gate(self, ledger: Ledger, conn: Connection) -> None:
        """Inside the attempt's transaction: raise to wait (a circuit breaker)."""

    def prepare(self, attempt: Attempt, conn: Connection) -> Any:
        """Inside the attempt's transaction, after the attempt row."""
        return None

    def transactional(self, attempt: Attempt) -> bool:
        """Perform inside the commit's transaction (a tool writing through ``ctx.db``)."""
        return False

    def perform(self, attempt: Attempt, db: Connection | None) -> Any:
        raise NotImplementedError

    def commit(self, attempt: Attempt, outcome: Any, conn: Connection) -> Committed:
        return Committed(output=outcome)

    def reused(self, checkpoint: Checkpoint) -> StepResult:
        return StepResult("reused", checkpoint.output, checkpoint.idempotency_key)

    def finished(self, ledger: Ledger, error: BaseException | None) -> None:
        """After the work: success (``None``) or the error (a breaker counts them)."""


@dataclass
class Prologue:
    """Steps 1-5 of the kernel: what a step finds before it does anything."""

    key: str
    checkpoint: Checkpoint | None
    context: dict[str, Any]
    rendered: Rendered | None = None
    error: BaseException | None = None  # a render error: recorded as the final failure
    reused: StepResult | None = None
    skipped: bool = False
    chain: Chain = field(default_factory=lambda: Chain(None, None))


def jsonable(value: Any) -> Any:
    """The value as the ledger stores and returns it (JSON round trip)."""
    from ledgerflow.ledger.store import dumps, loads

    return loads(dumps(value))
