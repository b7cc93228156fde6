"""The lifecycle of every durable record, as data: statuses and their allowed transitions.

Each record kind (run, step, attempt, effect, saga, compensation, approval, event wait,
event delivery, dead letter) has an enum of statuses and one ``Machine`` that says which
status may follow which.
The ledger writes a status only through ``Machine.check`` (or a guarded UPDATE built from
``Machine.sources``), so an illegal transition is refused with ``IllegalTransition``
instead of being stored. ``docs/lifecycle.md`` draws these machines; a unit test checks
that the drawing and this module agree.

The values are the strings stored in the ledger (``str`` enums compare equal to them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from ledgerflow.errors import IllegalTransition


class RunStatus(str, Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # Stopped by an operator (``ledgerflow cancel``): terminal, whatever Airflow does next.
    CANCELLED = "cancelled"


class StepStatus(str, Enum):
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    # The saga undid the step's effect: its output describes something that no longer
    # exists, so neither this run (after a clear) nor a retry run may reuse it.
    COMPENSATED = "compensated"


class AttemptStatus(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    # A later attempt found this one still running: its process was killed or lost.
    LOST = "lost"


class EffectStatus(str, Enum):
    PENDING = "pending"  # the key is claimed, the call's result not yet recorded
    DONE = "done"
    COMPENSATED = "compensated"  # undone by the saga: never reused under any key kind


class SagaStatus(str, Enum):
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"  # at least one completed step was undone
    COMPENSATION_FAILED = "compensation_failed"
    NOTHING_TO_COMPENSATE = "nothing_to_compensate"  # failed, nothing was undone


class CompensationStatus(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    NOT_NEEDED = "not_needed"  # the step did not complete
    NOT_COMPENSABLE = "not_compensable"  # completed, declares no compensate


class ApprovalStatus(str, Enum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    # The run's task can no longer resume (its run ended while the approval waited).
    ABANDONED = "abandoned"
    # Its run was cancelled while it waited: nobody may decide it any more.
    WITHDRAWN = "withdrawn"


class EventWaitStatus(str, Enum):
    WAITING = "waiting"
    RECEIVED = "received"  # a delivery fit its schema: the payload is the step's output
    EXPIRED = "expired"  # the deadline passed first: ``on_deadline`` decides
    # Taken back while parked (a cancelled run): no delivery completes it any more.
    WITHDRAWN = "withdrawn"


class EventDeliveryStatus(str, Enum):
    KEPT = "kept"  # arrived before any wait for it: kept until its time to live ends
    CONSUMED = "consumed"  # taken by a wait (the first one, when it woke several)
    EXPIRED = "expired"  # its time to live ended before a wait took it
    # Kept, then found not to fit the schema of the wait that would take it.
    REJECTED = "rejected"


class DeadLetterStatus(str, Enum):
    OPEN = "open"
    RESOLVED = "resolved"


class NotificationStatus(str, Enum):
    PENDING = "pending"  # recorded with its event, not tried yet
    SENDING = "sending"  # claimed by one sender (a claim older than a few minutes is stale)
    SENT = "sent"
    FAILED = "failed"  # the notifier refused or was down: tried again at ``next_at``
    GAVE_UP = "gave_up"  # failed MAX_ATTEMPTS times: an operator reads ``last_error``


# ``None`` stands for "no record yet".
Transitions = Mapping[str | None, frozenset[str]]


@dataclass(frozen=True)
class Machine:
    name: str
    statuses: tuple[str, ...]
    transitions: Transitions
    terminal: frozenset[str]

    def allowed(self, current: str | None, new: str) -> bool:
        return _value(new) in self.transitions.get(_value(current), frozenset())

    def check(self, current: str | None, new: str, subject: str = "") -> None:
        """Raise ``IllegalTransition`` unless ``current -> new`` is allowed."""
        if not self.allowed(current, new):
            raise IllegalTransition(self.name, _value(current), _value(new) or "", subject)

    def sources(self, new: str) -> list[str]:
        """The statuses from which ``new`` may be reached (for a guarded UPDATE)."""
        value = _value(new)
        return sorted(s for s, targets in self.transitions.items() if s and value in targets)

    def edges(self) -> Iterable[tuple[str | None, str]]:
        for source, targets in self.transitions.items():
            for target in sorted(targets):
                yield source, target


def _value(status: str | Enum | None) -> str | None:
    if status is None:
        return None
    return str(status.value) if isinstance(status, Enum) else str(status)


def _machine(name: str, kind: type[Enum], edges: dict[str | None, Iterable[Enum]]) -> Machine:
    transitions = {
        _value(source): frozenset(str(t.value) for t in targets)
        for source, targets in edges.items()
    }
    statuses = tuple(str(s.value) for s in kind)
    # A self-loop is a repeat the ledger accepts as a no-op, not a way out: a status is
    # terminal when no transition leads to another status.
    terminal = frozenset(s for s in statuses if not transitions.get(s, frozenset()) - {s})
    return Machine(name, statuses, transitions, terminal)


N = NotificationStatus
R, S, A, E, G, C, P, D = (
    RunStatus,
    StepStatus,
    AttemptStatus,
    EffectStatus,
    SagaStatus,
    CompensationStatus,
    ApprovalStatus,
    DeadLetterStatus,
)

RUN = _machine(
    "run",
    RunStatus,
    {
        None: [R.RUNNING, R.FAILED],  # FAILED: a retry run that Airflow refused to create
        # CANCELLED: an operator stopped it (``ledgerflow.cancel``); no way back, not even
        # an Airflow clear (a forward step of a cancelled run refuses to start).
        R.RUNNING: [R.RUNNING, R.SUCCEEDED, R.FAILED, R.CANCELLED],
        R.CANCELLED: [R.CANCELLED],
        # A task cleared in Airflow reopens a finished run.
        R.SUCCEEDED: [R.SUCCEEDED, R.RUNNING],
        R.FAILED: [R.FAILED, R.RUNNING],
    },
)

STEP = _machine(
    "step",
    StepStatus,
    {
        # COMPLETED from nothing: a checkpoint adopted from the retry chain.
        None: [S.RUNNING, S.SKIPPED, S.COMPLETED],
        S.RUNNING: [S.RUNNING, S.COMPLETED, S.RETRYING, S.FAILED],
        S.RETRYING: [S.RUNNING, S.FAILED],
        S.FAILED: [S.RUNNING],  # a cleared task tries again
        S.COMPLETED: [S.COMPENSATED],
        S.COMPENSATED: [S.RUNNING],  # a cleared task performs it again, as a new effect
        S.SKIPPED: [S.SKIPPED],  # a twin task that skipped it too
    },
)

ATTEMPT = _machine(
    "attempt",
    AttemptStatus,
    {
        None: [A.RUNNING],
        A.RUNNING: [A.COMPLETED, A.FAILED, A.LOST],
    },
)

EFFECT = _machine(
    "effect",
    EffectStatus,
    {
        None: [E.PENDING, E.DONE],
        E.PENDING: [E.DONE],
        E.DONE: [E.COMPENSATED],
        # Terminal: performing the step again is a new effect under a new key.
        E.COMPENSATED: [],
    },
)

SAGA = _machine(
    "saga",
    SagaStatus,
    {
        None: [G.COMPENSATING],
        # COMPENSATING again: a second failure (a parallel branch, an approval's own
        # report and its task's callback) joins the saga already started.
        G.COMPENSATING: [
            G.COMPENSATING,
            G.COMPENSATED,
            G.COMPENSATION_FAILED,
            G.NOTHING_TO_COMPENSATE,
        ],
        # A compensation task retried or cleared after the saga ended runs it again.
        G.COMPENSATION_FAILED: [G.COMPENSATING],
        G.COMPENSATED: [G.COMPENSATING],
        G.NOTHING_TO_COMPENSATE: [G.COMPENSATING],
    },
)

COMPENSATION = _machine(
    "compensation",
    CompensationStatus,
    {
        # COMPLETED/FAILED from nothing: an outcome recorded without its start (by hand).
        None: [C.RUNNING, C.NOT_NEEDED, C.NOT_COMPENSABLE, C.COMPLETED, C.FAILED],
        C.RUNNING: [C.RUNNING, C.COMPLETED, C.FAILED],
        C.FAILED: [C.RUNNING, C.FAILED],
        C.NOT_NEEDED: [C.NOT_NEEDED, C.RUNNING],
        C.NOT_COMPENSABLE: [C.NOT_COMPENSABLE],
        C.COMPLETED: [C.COMPLETED],
    },
)

APPROVAL = _machine(
    "approval",
    ApprovalStatus,
    {
        None: [P.PENDING],
        # PENDING again: one decision of a quorum short of ``required`` (recorded in
        # lf_approval_decisions), or an escalation to the next level.
        P.PENDING: [P.PENDING, P.APPROVED, P.REJECTED, P.EXPIRED, P.ABANDONED, P.WITHDRAWN],
    },
)

W = EventWaitStatus
EVENT_WAIT = _machine(
    "event wait",
    EventWaitStatus,
    {
        None: [W.WAITING, W.RECEIVED],  # RECEIVED at once: a kept delivery was waiting
        W.WAITING: [W.RECEIVED, W.EXPIRED, W.WITHDRAWN],
    },
)

V = EventDeliveryStatus
EVENT_DELIVERY = _machine(
    "event delivery",
    EventDeliveryStatus,
    {
        None: [V.KEPT, V.CONSUMED],  # CONSUMED at once: waits were parked for it
        V.KEPT: [V.CONSUMED, V.EXPIRED, V.REJECTED],
    },
)

DEAD_LETTER = _machine(
    "dead letter",
    DeadLetterStatus,
    {
        None: [D.OPEN],
        # OPEN again: the same step failed for good once more (a cleared task); the
        # letter carries the newest error.
        D.OPEN: [D.OPEN, D.RESOLVED],
        # RESOLVED again: a re-run from the CLI completes the step, which resolves the
        # letter, then the CLI resolves it too. OPEN: a step that completed was undone
        # and, performed again, exhausted its retries (a cleared task).
        D.RESOLVED: [D.RESOLVED, D.OPEN],
    },
)

NOTIFICATION = _machine(
    "notification",
    NotificationStatus,
    {
        None: [N.PENDING],
        N.PENDING: [N.SENDING],
        # SENDING again: a sender that died holding its claim; another takes it over.
        N.SENDING: [N.SENDING, N.SENT, N.FAILED],
        N.FAILED: [N.SENDING, N.GAVE_UP],
    },
)

MACHINES: dict[str, Machine] = {
    m.name: m
    for m in (
        RUN,
        STEP,
        ATTEMPT,
        EFFECT,
        SAGA,
        COMPENSATION,
        APPROVAL,
        EVENT_WAIT,
        EVENT_DELIVERY,
        DEAD_LETTER,
        NOTIFICATION,
    )
}

# A run "has ended" for the retry rules when Airflow's DagRun ended; these are the run
# statuses a retry chain may continue from. A cancelled run is retried like a failed one:
# the retry is a new decision by whoever asks for it (``docs/lifecycle.md``).
RETRYABLE_RUN_STATUSES = frozenset({RunStatus.FAILED.value, RunStatus.CANCELLED.value})


def mermaid(machine: Machine) -> str:
    """The machine as a Mermaid ``stateDiagram-v2`` (what ``docs/lifecycle.md`` shows)."""
    lines = ["stateDiagram-v2"]
    for source, target in machine.edges():
        if source == target:
            continue
        lines.append(f"    {source or '[*]'} --> {target}")
    for status in sorted(machine.terminal):
        lines.append(f"    {status} --> [*]")
    return "\n".join(lines)
