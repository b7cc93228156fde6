"""Runs written through the ledger's own API at chosen times, for tests and benchmarks.

``LedgerClock`` sets the time the ledger writes (every module of ``ledgerflow.ledger``
reads ``_engine.now``): the rows are the ones real tasks write, only their times are
chosen, so indicators can be checked against exact numbers. ``record_run`` plays a run:
registration, each step's attempts (failures, retries), an approval's wait, the end,
and a saga when it failed.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ledgerflow.ledger import _engine
from ledgerflow.ledger.store import Ledger


class LedgerClock:
    """The ledger's clock, set by hand: ``at(t)``, ``advance(seconds)``."""

    def __init__(self, start: datetime) -> None:
        self.current = start

    def __call__(self) -> datetime:
        return self.current

    def at(self, when: datetime) -> None:
        self.current = when

    def advance(self, seconds: float) -> datetime:
        self.current += timedelta(seconds=seconds)
        return self.current


@contextmanager
def ledger_clock(start: datetime) -> Iterator[LedgerClock]:
    """Every ``ledgerflow.ledger`` module that bound ``_engine.now`` reads ``clock`` instead."""
    clock = LedgerClock(start)
    real = _engine.now
    patched = []
    for name, module in list(sys.modules.items()):
        if name.startswith("ledgerflow.") and getattr(module, "now", None) is real:
            module.now = clock  # type: ignore[attr-defined]
            patched.append(module)
    try:
        yield clock
    finally:
        for module in patched:
            module.now = real  # type: ignore[attr-defined]


@dataclass
class Step:
    """One step of a played run: its tries' outcomes (``ok`` / ``fail``) and durations."""

    key: str
    tries: Sequence[str] = ("ok",)
    seconds: float = 1.0
    approval_wait: float | None = None  # an approval step waiting this long, then approved


@dataclass
class PlayedRun:
    run_id: str
    started: datetime
    ended: datetime | None
    steps: list[Step] = field(default_factory=list)


def record_run(
    ledger: Ledger,
    clock: LedgerClock,
    *,
    workflow: str,
    run: str,
    steps: Sequence[Step],
    first_step_after: float = 1.0,
    end: str | None = "auto",
    compensate: bool = False,
    version: int = 1,
) -> PlayedRun:
    """Play one run from ``clock``'s current time. ``end``: ``auto`` (succeeded when every
    step's last try is ok, else failed), ``None`` (still running) or a status."""
    from ledgerflow.errors import ToolError
    from ledgerflow.ledger import approvals

    dag_id = f"{workflow}__v{version}"
    run_id = f"{dag_id}/{run}"
    started = clock()
    ledger.ensure_run(
        run_id=run_id,
        dag_id=dag_id,
        workflow=workflow,
        version=version,
        params={"run": run},
        trigger_kind="manual",
    )
    clock.advance(first_step_after)
    ok = True
    for step in steps:
        if step.approval_wait is not None:
            approval, _ = approvals.request(
                ledger,
                run_id=run_id,
                step_key=step.key,
                dag_id=dag_id,
                task_id=step.key,
                workflow=workflow,
                version=version,
                subject=f"approve {run}",
                body="",
                payload={"run": run},
                approvers={"users": ["admin"], "roles": []},
                deadline=clock() + timedelta(days=3),
                at_deadline="reject",
            )
            clock.advance(step.approval_wait)
            approvals.decide(ledger, approval.id, decision="approved", by="admin")
            continue
        for number, outcome in enumerate(step.tries, 1):
            attempt = ledger.begin_attempt(
                run_id=run_id,
                step_key=step.key,
                step_id=step.key,
                map_index=-1,
                try_number=number,
                args={"n": number},
                idempotency_key=f"{run_id}/{step.key}",
                first=number == 1,
            )
            clock.advance(step.seconds)
            final = number == len(step.tries)
            if outcome == "ok":
                ledger.complete_step(
                    run_id=run_id,
                    step_key=step.key,
                    attempt_id=attempt,
                    output={"ok": 1},
                    reused=False,
                )
            else:
                ledger.fail_attempt(
                    run_id=run_id,
                    step_key=step.key,
                    attempt_id=attempt,
                    error=ToolError("refused"),
                    final=final,
                )
                if final:
                    ok = False
        if not ok:
            break
    if end is None:
        return PlayedRun(run_id, started, None, list(steps))
    status = ("succeeded" if ok else "failed") if end == "auto" else end
    if status == "failed" and compensate:
        done = [s for s in steps if s.approval_wait is None and s.tries[-1] == "ok"]
        ledger.start_saga(run_id, steps[-1].key)
        for s in done:
            ledger.record_compensation(run_id, s.key, "completed", tool="undo")
        ledger.finish_saga(run_id)
    ledger.finish_run(run_id, status)
    return PlayedRun(run_id, started, clock(), list(steps))


def run_ids(played: Sequence[PlayedRun]) -> list[str]:
    return [p.run_id for p in played]


def as_utc(value: Any) -> Any:
    """A naive time (SQLite) as UTC."""
    from ledgerflow.ledger.indicators import aware

    return aware(value)


def record_llm_fallback(ledger: Ledger, run_id: str, step_key: str) -> None:
    """An LLM call of the run that took its fallback path (the invalid answer kept)."""
    from types import SimpleNamespace

    from ledgerflow.ledger import llm

    outcome = SimpleNamespace(
        model="test:rules",
        responses=["not json"],
        status="invalid",
        output=None,
        errors=["not JSON"],
        requests=2,
        input_tokens=10,
        output_tokens=3,
        latency_ms=5,
    )
    llm.record(
        ledger,
        key=f"{run_id}/{step_key}/llm",
        run_id=run_id,
        step_key=step_key,
        system_prompt="",
        prompt="classify",
        outcome=outcome,
        path="fallback",
        reason="not JSON",
    )


def populate(
    ledger: Ledger,
    *,
    runs: int,
    start: datetime,
    span: timedelta,
    workflows: Sequence[str] = ("checkout", "onboarding", "ticket_triage", "nightly_report"),
    progress: Any = None,
) -> list[PlayedRun]:
    """``runs`` runs spread evenly over ``[start, start + span)``, a mix as production
    has them: most succeed, some retry a step, some wait for an approval, a few fail
    (half of those compensated, with a dead letter), some LLM answers fall back, a few
    are still running. Deterministic (the n-th run is always the same)."""
    played = []
    gap = span / max(runs, 1)
    with ledger_clock(start) as clock:
        for n in range(runs):
            clock.at(start + gap * n)
            workflow = workflows[n % len(workflows)]
            kind = (n // len(workflows)) % 40
            steps = [Step("reserve", seconds=2 + n % 7), Step("charge", seconds=3 + n % 5)]
            end: str | None = "auto"
            compensate = False
            if kind in (1, 2, 3, 4):  # a retried step
                steps[1] = Step("charge", tries=("fail", "ok"), seconds=4)
            elif kind in (5, 6, 7, 8, 9, 10):  # waits for a person
                steps.insert(1, Step("approve", approval_wait=600 + 60 * (n % 30)))
            elif kind in (11, 12):  # fails for good
                steps[1] = Step("charge", tries=("fail", "fail", "fail"), seconds=2)
                compensate = kind == 11
            elif kind == 13:
                end = None
            run = record_run(
                ledger,
                clock,
                workflow=workflow,
                run=f"bench__{n:06d}",
                steps=steps,
                end=end,
                compensate=compensate,
                first_step_after=0.5 + (n % 4),
            )
            if kind in (11, 12):
                from ledgerflow.errors import ToolError

                ledger.dead_letter(
                    workflow=workflow,
                    version=1,
                    run_id=run.run_id,
                    step_key="charge",
                    attempts=3,
                    error=ToolError("refused"),
                    args={"n": n},
                    idempotency_key=None,
                )
            if kind in (14, 15) and workflow == "ticket_triage":
                record_llm_fallback(ledger, run.run_id, "classify")
            played.append(run)
            if progress is not None and (n + 1) % 1000 == 0:
                progress(n + 1)
    return played
