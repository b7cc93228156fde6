"""Indicators of workflow health, computed from the ledger's rows.

Every figure is about the runs *started* in a window ``[since, until)`` (and, for facts
that are not a run's — dead letters, LLM fallbacks, breaker openings, authorization
failures — those recorded in the window), per workflow. A handful of aggregate queries,
each bounded by the window through an index (migration 10): nothing loads the history.

- ``success_rate``: succeeded / finished runs (a failed run counts as failed whatever its
  saga did; a cancelled run is its own outcome, ``cancelled``, and counts neither way). ``step_failure_rate``: failed (or lost) attempts / attempts.
  ``retry_rate``: attempts after a step's first / attempts.
- ``completion``: a succeeded run's time from registration to its end, *minus* the time
  it waited for people (``human_wait``: each approval's request to its decision, or to
  now while pending). ``first_step``: registration to its first attempt.
- ``timer_lag``: how late the deadline outcome of an approval was recorded after its
  deadline, and how late a wait step fired after its planned time (``timer_fired``
  events recorded in the window): the triggerer's timers.
- ``pending``: runs running now; ``orphaned``: of those, runs with no ledger event for
  ``[ledgerflow] orphan_after``, no pending approval and no parked timer (nothing is
  moving them on).
- ``compensations``: runs whose saga ran (compensated or compensation_failed).
- ``throughput``: finished runs per hour of the window.
- ``audit_latency``: from a step's checkpoint to its ``step_completed`` event (mean and
  max, ms): how far the event log trails the facts.
- ``auth_failures``: the plugin's 401 and 403 answers (``ledger.audit``), not per workflow.

Percentiles are nearest-rank: the p-th percentile of n values is the ceil(p*n)-th smallest.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, bindparam, case, func, literal_column, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger._engine import loads

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement

    from ledgerflow.ledger.store import Ledger

FINISHED = ("succeeded", "failed")
SAGA_RAN = ("compensated", "compensation_failed")
# ``cancelled``: an operator stopped the run (``ledgerflow cancel``), its own outcome,
# whatever its saga did: neither a success nor a failure of the workflow.
OUTCOMES = ("succeeded", "failed", "compensated", "compensation_failed", "cancelled", "running")
NEITHER = ("running", "cancelled")  # not counted by success_rate


def aware(value: datetime | None) -> datetime | None:
    """SQLite returns naive UTC; Postgres aware times."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def percentile(values: Iterable[float], p: float) -> float | None:
    """Nearest-rank percentile (``p`` in 0..1); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(p * len(ordered)))
    return ordered[rank - 1]


def ratio(part: int, whole: int) -> float | None:
    return None if whole == 0 else part / whole


@dataclass
class RunFacts:
    """One run, as the indicators see it (seconds)."""

    run_id: str
    workflow: str
    outcome: str
    offset: float  # its registration, in seconds after the window's start
    completion: float | None  # succeeded runs only, human wait excluded
    human_wait: float  # 0 when it never waited
    first_step: float | None
    attempts: int
    failed_attempts: int
    retries: int


@dataclass
class WorkflowFacts:
    """What the window holds for one workflow: its runs and its other facts' times."""

    workflow: str
    runs: list[RunFacts] = field(default_factory=list)
    dead_letters: list[datetime] = field(default_factory=list)
    llm_fallbacks: list[datetime] = field(default_factory=list)
    timer_lags: list[float] = field(default_factory=list)
    pending: int = 0
    orphaned: int = 0
    audit_mean_ms: float | None = None
    audit_max_ms: float | None = None

    def summary(self, hours: float) -> dict[str, Any]:
        """The indicators as plain numbers (seconds, rates 0..1; None: nothing to measure)."""
        by: dict[str, int] = defaultdict(int)
        for r in self.runs:
            by[r.outcome] += 1
        succeeded = by["succeeded"]
        finished = sum(1 for r in self.runs if r.outcome != "running")
        judged = sum(1 for r in self.runs if r.outcome not in NEITHER)
        attempts = sum(r.attempts for r in self.runs)
        completion = [r.completion for r in self.runs if r.completion is not None]
        waited = [r.human_wait for r in self.runs if r.human_wait > 0]
        first = [r.first_step for r in self.runs if r.first_step is not None]
        return {
            "runs": len(self.runs),
            "outcomes": {o: by[o] for o in OUTCOMES},
            "success_rate": ratio(succeeded, judged),
            "step_failure_rate": ratio(sum(r.failed_attempts for r in self.runs), attempts),
            "retry_rate": ratio(sum(r.retries for r in self.runs), attempts),
            "attempts": attempts,
            "completion_p50_s": percentile(completion, 0.5),
            "completion_p95_s": percentile(completion, 0.95),
            "human_wait_p50_s": percentile(waited, 0.5),
            "human_wait_p95_s": percentile(waited, 0.95),
            "first_step_p50_s": percentile(first, 0.5),
            "first_step_p95_s": percentile(first, 0.95),
            "timer_lag_p95_s": percentile(self.timer_lags, 0.95),
            "pending": self.pending,
            "orphaned": self.orphaned,
            "compensations": by["compensated"] + by["compensation_failed"],
            "dead_letters": len(self.dead_letters),
            "llm_fallbacks": len(self.llm_fallbacks),
            "throughput_per_h": None if hours <= 0 else round(finished / hours, 3),
            "audit_latency_mean_ms": self.audit_mean_ms,
            "audit_latency_max_ms": self.audit_max_ms,
        }


@dataclass
class Window:
    """Every workflow's facts in ``[since, until)``, and the facts of no workflow."""

    since: datetime
    until: datetime
    workflows: dict[str, WorkflowFacts]
    breaker_openings: list[datetime]
    auth_failures: dict[int, int]  # status -> count
    auth_failure_times: list[tuple[datetime, int]]

    @property
    def hours(self) -> float:
        return (self.until - self.since).total_seconds() / 3600

    def summary(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "workflows": {n: w.summary(self.hours) for n, w in sorted(self.workflows.items())},
            "breaker_openings": len(self.breaker_openings),
            "auth_failures": {
                "unauthenticated_401": self.auth_failures.get(401, 0),
                "forbidden_403": self.auth_failures.get(403, 0),
            },
        }


def _seconds(dialect: str, start: Any, end: Any) -> ColumnElement[Any]:
    """``end - start`` in seconds, in SQL."""
    if dialect == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * literal_column("86400.0")


def measure(
    ledger: Ledger,
    *,
    since: datetime,
    until: datetime | None = None,
    workflows: Iterable[str] | None = None,
    dag_ids: Iterable[str] | None = None,
    now: datetime | None = None,
    orphan_after: timedelta | None = None,
) -> Window:
    """The facts of the runs started in ``[since, until)`` (of ``workflows`` / ``dag_ids``
    when given: ``dag_ids`` is what a caller may read)."""
    from ledgerflow.ledger._engine import now as ledger_now

    current = now or ledger_now()
    until = until or current
    if orphan_after is None:
        from ledgerflow import settings

        orphan_after = settings.get("orphan_after")
    names = None if workflows is None else sorted(set(workflows))
    dags = None if dag_ids is None else sorted(set(dag_ids))
    r = t.runs

    def scoped(query: Any, runs: Any = r) -> Any:
        if names is not None:
            query = query.where(runs.c.workflow.in_(names))
        if dags is not None:
            query = query.where(runs.c.dag_id.in_(dags))
        return query

    in_window = and_(r.c.created_at >= since, r.c.created_at < until)
    out: dict[str, WorkflowFacts] = {}

    def facts(name: str) -> WorkflowFacts:
        if name not in out:
            out[name] = WorkflowFacts(name)
        return out[name]

    # Durations are computed by the database (seconds as numbers): a row is a few numbers,
    # not three timestamps to parse.
    stamp = t.runs.c.created_at.type
    at_now = bindparam("b_now", current, type_=stamp)
    at_since = bindparam("b_since", since, type_=stamp)
    ap = t.approvals
    dialect = ledger.dialect
    waited = (
        select(
            func.coalesce(
                func.sum(
                    _seconds(dialect, ap.c.created_at, func.coalesce(ap.c.decided_at, at_now))
                ),
                0,
            )
        )
        .where(ap.c.run_id == r.c.run_id)
        .scalar_subquery()
    )
    a = t.attempts
    per_run = scoped(
        select(
            r.c.run_id,
            r.c.workflow,
            r.c.status,
            r.c.saga,
            _seconds(dialect, at_since, r.c.created_at).label("offset"),
            _seconds(dialect, r.c.created_at, r.c.updated_at).label("duration"),
            _seconds(dialect, r.c.created_at, func.min(a.c.started_at)).label("first"),
            waited.label("waited"),
            func.count(a.c.id).label("attempts"),
            func.coalesce(
                func.sum(case((a.c.status.in_(("failed", "lost")), 1), else_=0)), 0
            ).label("failed"),
            func.coalesce(func.sum(case((a.c.try_number > 1, 1), else_=0)), 0).label("retries"),
        )
        .select_from(r.outerjoin(a, a.c.run_id == r.c.run_id))
        .where(in_window)
        .group_by(r.c.run_id, r.c.workflow, r.c.status, r.c.saga, r.c.created_at, r.c.updated_at)
    )
    lags_q = scoped(
        select(r.c.workflow, _seconds(dialect, ap.c.deadline, ap.c.decided_at).label("lag"))
        .select_from(ap.join(r, r.c.run_id == ap.c.run_id))
        .where(in_window, ap.c.decided_by == "deadline", ap.c.decided_at.is_not(None))
    )
    dl = t.dead_letters
    letters_q = select(dl.c.workflow, dl.c.created_at).where(
        dl.c.created_at >= since, dl.c.created_at < until
    )
    if names is not None:
        letters_q = letters_q.where(dl.c.workflow.in_(names))
    if dags is not None:
        letters_q = letters_q.where(dl.c.run_id.in_(select(r.c.run_id).where(r.c.dag_id.in_(dags))))
    llm = t.llm_calls
    fallbacks_q = scoped(
        select(r.c.workflow, llm.c.created_at)
        .select_from(llm.join(r, r.c.run_id == llm.c.run_id))
        .where(llm.c.path == "fallback", llm.c.created_at >= since, llm.c.created_at < until)
    )
    ev = t.events
    breakers_q = select(ev.c.at).where(
        ev.c.kind == "breaker_opened", ev.c.at >= since, ev.c.at < until
    )
    running = r.c.status == "running"
    pending_q = scoped(select(r.c.workflow, func.count()).where(running).group_by(r.c.workflow))
    quiet_since = current - orphan_after
    moving = select(ev.c.id).where(ev.c.run_id == r.c.run_id, ev.c.at >= quiet_since).exists()
    waiting = select(ap.c.id).where(ap.c.run_id == r.c.run_id, ap.c.status == "pending").exists()
    st = t.steps
    timing = (
        select(st.c.run_id)
        .where(
            st.c.run_id == r.c.run_id,
            st.c.status == "running",
            st.c.idempotency_key.like("timer:%"),
        )
        .exists()
    )
    orphans_q = scoped(
        select(r.c.workflow, func.count())
        .where(running, r.c.updated_at < quiet_since, ~moving, ~waiting, ~timing)
        .group_by(r.c.workflow)
    )
    fired_q = scoped(
        select(r.c.workflow, ev.c.data)
        .select_from(ev.join(r, r.c.run_id == ev.c.run_id))
        .where(ev.c.kind == "timer_fired", ev.c.at >= since, ev.c.at < until)
    )
    lag = _seconds(ledger.dialect, st.c.completed_at, ev.c.at) * literal_column("1000.0")
    audit_q = scoped(
        select(r.c.workflow, func.avg(lag), func.max(lag))
        .select_from(
            st.join(r, r.c.run_id == st.c.run_id).join(
                ev,
                and_(
                    ev.c.run_id == st.c.run_id,
                    ev.c.step_key == st.c.step_key,
                    ev.c.kind == "step_completed",
                ),
            )
        )
        .where(in_window, st.c.status == "completed")
        .group_by(r.c.workflow)
    )
    au = t.auth_failures
    auth_q = select(au.c.minute, au.c.status, au.c.count).where(
        au.c.minute >= since, au.c.minute < until
    )

    with ledger.engine.connect() as conn:
        rows = conn.execute(per_run).all()
        for run_id, workflow, status, saga, offset, duration, first, waited, n, bad, again in rows:
            outcome = saga if status == "failed" and saga in SAGA_RAN else status
            wait = _ms(waited or 0)
            facts(workflow).runs.append(
                RunFacts(
                    run_id=run_id,
                    workflow=workflow,
                    outcome=outcome,
                    offset=_ms(offset),
                    completion=(
                        max(0.0, round(_ms(duration) - wait, 3)) if status == "succeeded" else None
                    ),
                    human_wait=wait,
                    first_step=None if first is None else _ms(first),
                    attempts=int(n),
                    failed_attempts=int(bad),
                    retries=int(again),
                )
            )
        for row in conn.execute(lags_q):
            facts(row.workflow).timer_lags.append(_ms(row.lag))
        for row in conn.execute(fired_q):
            facts(row.workflow).timer_lags.append(_ms(loads(row.data)["lag_ms"] / 1000))
        for row in conn.execute(letters_q):
            facts(row.workflow).dead_letters.append(_when(row.created_at))
        for row in conn.execute(fallbacks_q):
            facts(row.workflow).llm_fallbacks.append(_when(row.created_at))
        for workflow, n in conn.execute(pending_q):
            facts(workflow).pending = int(n)
        for workflow, n in conn.execute(orphans_q):
            facts(workflow).orphaned = int(n)
        for workflow, mean, top in conn.execute(audit_q):
            w = facts(workflow)
            w.audit_mean_ms = None if mean is None else round(float(mean), 3)
            w.audit_max_ms = None if top is None else round(float(top), 3)
        breaker_times = [_when(row.at) for row in conn.execute(breakers_q)]
        auth: dict[int, int] = defaultdict(int)
        auth_times: list[tuple[datetime, int]] = []
        for minute, status, n in conn.execute(auth_q):  # (``row.count`` is tuple.count)
            auth[int(status)] += int(n)
            auth_times.append((_when(minute), int(n)))
    return Window(
        since=since,
        until=until,
        workflows=out,
        breaker_openings=breaker_times,
        auth_failures=dict(auth),
        auth_failure_times=auth_times,
    )


def _ms(seconds: Any) -> float:
    """Seconds from the database, to the millisecond (SQLite's julianday arithmetic is
    exact to some tens of microseconds), never negative."""
    return max(0.0, round(float(seconds), 3))


def _when(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    found = aware(value)
    assert found is not None
    return found


def buckets(since: datetime, until: datetime, count: int = 24) -> list[datetime]:
    """``count`` equal spans of the window: their start times."""
    step = (until - since) / count
    return [since + step * i for i in range(count)]


def bucket_of(edges: list[datetime], until: datetime, when: datetime) -> int | None:
    """Which span ``when`` falls in (None: outside the window)."""
    if not edges or when < edges[0] or when >= until:
        return None
    step = (until - edges[0]) / len(edges)
    return min(len(edges) - 1, int((when - edges[0]) / step))


def series(window: Window, workflow: str, count: int = 24) -> dict[str, Any]:
    """Per span of the window: runs by outcome, completion p50/p95, human wait p95,
    retries, compensations, LLM fallbacks, dead letters and breaker openings."""
    edges = buckets(window.since, window.until, count)
    w = window.workflows.get(workflow) or WorkflowFacts(workflow)
    outcomes = {o: [0] * count for o in OUTCOMES}
    completion: list[list[float]] = [[] for _ in range(count)]
    waited: list[list[float]] = [[] for _ in range(count)]
    retries = [0] * count
    span = (window.until - window.since).total_seconds() / count
    for run in w.runs:
        i = int(run.offset // span) if span > 0 else 0
        if not 0 <= i < count:
            continue
        outcomes[run.outcome][i] += 1
        retries[i] += run.retries
        if run.completion is not None:
            completion[i].append(run.completion)
        if run.human_wait > 0:
            waited[i].append(run.human_wait)

    def counted(times: Iterable[datetime]) -> list[int]:
        out = [0] * count
        for when in times:
            i = bucket_of(edges, window.until, when)
            if i is not None:
                out[i] += 1
        return out

    return {
        "edges": edges,
        "outcomes": outcomes,
        "completion_p50": [percentile(c, 0.5) for c in completion],
        "completion_p95": [percentile(c, 0.95) for c in completion],
        "human_wait_p95": [percentile(c, 0.95) for c in waited],
        "retries": retries,
        "compensations": [
            a + b
            for a, b in zip(outcomes["compensated"], outcomes["compensation_failed"], strict=True)
        ],
        "llm_fallbacks": counted(w.llm_fallbacks),
        "dead_letters": counted(w.dead_letters),
        "breaker_openings": counted(window.breaker_openings),
    }
