"""Steps and their attempts in the ledger: checkpoints, attempts, outputs.

Only a running step completes; a completed or skipped step is never attempted again
(``lifecycle.STEP``). A step that completes resolves the open dead letters of the same
step in its run and up its retry chain."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, bindparam, literal, select, text, update

from ledgerflow import observability
from ledgerflow.errors import IllegalTransition
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._base import LedgerBase, dialect_insert, refuse
from ledgerflow.ledger._engine import dumps, now
from ledgerflow.ledger._records import (
    Checkpoint,
    RunRow,
    _checkpoint,
    _error_text,
    _error_type,
    _outputs,
)
from ledgerflow.lifecycle import (
    ATTEMPT,
    STEP,
    AttemptStatus,
    DeadLetterStatus,
    StepStatus,
)

_HOSTNAME = socket.gethostname()
# A retry chain longer than this is a loop in the data, not a history of retries.
MAX_CHAIN = 1000


class StepsMixin(LedgerBase):
    def checkpoint(
        self, run_id: str, step_key: str, conn: Connection | None = None
    ) -> Checkpoint | None:
        with self._read(conn) as conn:
            row = (
                conn.execute(
                    select(t.steps).where(
                        t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else _checkpoint(row)

    def run_and_steps(
        self, run_id: str, step_key: str, step_ids: Iterable[str], conn: Connection
    ) -> tuple[RunRow | None, Checkpoint | None, dict[str, dict[str, Any]]]:
        """What a step reads before it runs, in one round trip: its run's row (``None``:
        not registered yet, so no step of it exists either), its own checkpoint and the
        outputs of ``step_ids``."""
        wanted = sorted(step_ids)
        rows = list(
            conn.execute(
                _RUN_AND_STEPS, {"b_run": run_id, "b_key": step_key, "b_wanted": wanted}
            ).mappings()
        )
        if not rows:
            return None, None, {}
        head = rows[0]
        run = RunRow(
            head["run_status"], head["run_retry_of"], head["run_retry_from"], head["run_saga"]
        )
        found = [_checkpoint(r) for r in rows if r["step_key"] is not None]
        own = next((c for c in found if c.step_key == step_key), None)
        return run, own, _outputs(c for c in found if c.step_id in wanted)

    def checkpoints(self, run_id: str) -> list[Checkpoint]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t.steps)
                .where(t.steps.c.run_id == run_id)
                .order_by(t.steps.c.step_id, t.steps.c.map_index)
            ).mappings()
            return [_checkpoint(r) for r in rows]

    def begin_attempt(
        self,
        *,
        run_id: str,
        step_key: str,
        step_id: str,
        map_index: int,
        try_number: int,
        args: Any,
        idempotency_key: str | None,
        first: bool = False,
        conn: Connection | None = None,
    ) -> int:
        """Record an attempt; ``first``: no checkpoint row existed (skips the lost-attempt sweep)."""
        stamp = now()
        with self.begin(conn) as conn:
            written = conn.execute(
                _begin_step(self.dialect),
                {
                    "b_run": run_id,
                    "b_key": step_key,
                    "b_step": step_id,
                    "b_map": map_index,
                    "b_idem": idempotency_key,
                    "b_args": dumps(args),
                    "b_stamp": stamp,
                },
            ).rowcount
            if not written:
                current = self._step_status(conn, run_id, step_key)
                raise IllegalTransition("step", current, "running", f"{run_id}/{step_key}")
            if not first:
                # A new attempt proves that an earlier one still marked running is gone
                # (its process was killed or lost); say so instead of leaving it running.
                conn.execute(
                    update(t.attempts)
                    .where(
                        t.attempts.c.run_id == run_id,
                        t.attempts.c.step_key == step_key,
                        t.attempts.c.status == "running",
                    )
                    .values(status="lost", ended_at=stamp)
                )
            attempt_id = conn.execute(
                _INSERT_ATTEMPT,
                {
                    "run_id": run_id,
                    "step_key": step_key,
                    "try_number": try_number,
                    "status": "running",
                    "pid": os.getpid(),
                    "hostname": _HOSTNAME,
                    "started_at": stamp,
                },
            ).scalar_one()
        observability.attempt_started(run_id, step_key, try_number, int(attempt_id))
        return int(attempt_id)

    def complete_step(
        self,
        conn: Connection | None = None,
        *,
        run_id: str,
        step_key: str,
        attempt_id: int,
        output: Any,
        reused: bool,
        letters: bool = True,
    ) -> None:
        """Mark the step completed; call inside the transaction that holds the effect.

        Only a running step completes, and only through a running attempt: a twin that
        finished the step first, or an attempt a later one found lost, is refused
        (``IllegalTransition``) and its transaction, effect included, rolls back.
        ``letters=False``: the caller knows no dead letter can be open for the step (its
        first attempt, in a run that retries none): the read for them is skipped."""
        stamp = now()
        subject = f"{run_id}/{step_key}"
        values = {"b_run": run_id, "b_key": step_key, "output": dumps(output), "stamp": stamp}
        with self.begin(conn) as conn:
            if self.dialect == "postgresql":
                # The three writes in one statement: one round trip instead of three.
                done, ended = conn.execute(
                    _COMPLETE_ALL,
                    {**values, "b_id": attempt_id, "data": dumps({"reused_effect": reused})},
                ).one()
            else:
                done = conn.execute(_COMPLETE_STEP, values).rowcount
                ended = None
            if not done:
                current = self._step_status(conn, run_id, step_key)
                raise IllegalTransition(STEP.name, current, StepStatus.COMPLETED, subject)
            if ended is None:
                ended = conn.execute(
                    _COMPLETE_ATTEMPT, {"b_id": attempt_id, "stamp": stamp}
                ).rowcount
            if not ended:
                refuse(ATTEMPT, self._attempt_status(conn, attempt_id), "completed", subject)
            if self.dialect != "postgresql":
                self._event(conn, run_id, step_key, "step_completed", {"reused_effect": reused})
            if letters:
                self._resolve_dead_letters(conn, run_id, step_key)
        observability.attempt_ended(attempt_id)

    def mark_step(
        self,
        *,
        run_id: str,
        step_key: str,
        step_id: str,
        map_index: int,
        status: str,
        conn: Connection | None = None,
    ) -> None:
        """Record a step that ended without an attempt (``skipped``): only a step with no
        checkpoint yet; the same status written again (a twin) is a no-op."""
        with self.begin(conn) as conn:
            STEP.check(None, status, f"{run_id}/{step_key}")
            written = conn.execute(
                self._insert(t.steps)
                .values(
                    run_id=run_id,
                    step_key=step_key,
                    step_id=step_id,
                    map_index=map_index,
                    status=status,
                    attempts=0,
                    completed_at=now(),
                )
                .on_conflict_do_nothing()
            ).rowcount
            if not written:
                current = self._step_status(conn, run_id, step_key)
                refuse(STEP, current, status, f"{run_id}/{step_key}")
                return
            self._event(conn, run_id, step_key, f"step_{status}", None)

    def fail_attempt(
        self,
        *,
        run_id: str,
        step_key: str,
        attempt_id: int,
        error: BaseException,
        final: bool,
        conn: Connection | None = None,
    ) -> None:
        """The running attempt failed; its step is ``failed`` (``final``) or ``retrying``.
        A step that a twin completed meanwhile stays completed (the attempt still
        failed); an attempt no longer running (found lost) is refused."""
        stamp = now()
        message = _error_text(error)
        subject = f"{run_id}/{step_key}"
        new = StepStatus.FAILED.value if final else StepStatus.RETRYING.value
        with self.begin(conn) as conn:
            ended = conn.execute(
                update(t.attempts)
                .where(
                    t.attempts.c.id == attempt_id,
                    t.attempts.c.status.in_(ATTEMPT.sources(AttemptStatus.FAILED)),
                )
                .values(
                    status="failed", error_type=_error_type(error), error=message, ended_at=stamp
                )
            ).rowcount
            if not ended:
                refuse(ATTEMPT, self._attempt_status(conn, attempt_id), "failed", subject)
            changed = conn.execute(
                update(t.steps)
                .where(
                    t.steps.c.run_id == run_id,
                    t.steps.c.step_key == step_key,
                    t.steps.c.status.in_(STEP.sources(new)),
                )
                .values(status=new, error=message)
            ).rowcount
            if not changed:
                current = self._step_status(conn, run_id, step_key)
                if current != StepStatus.COMPLETED.value:
                    refuse(STEP, current, new, subject)
            self._event(
                conn,
                run_id,
                step_key,
                "step_failed" if final and changed else "attempt_failed",
                {"error_type": _error_type(error), "error": message[:500]},
            )
        observability.attempt_ended(attempt_id, error)

    def attempts(self, run_id: str, step_key: str | None = None) -> list[dict[str, Any]]:
        query = select(t.attempts).where(t.attempts.c.run_id == run_id).order_by(t.attempts.c.id)
        if step_key is not None:
            query = query.where(t.attempts.c.step_key == step_key)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def outputs(
        self, run_id: str, step_ids: Iterable[str] | None = None, conn: Connection | None = None
    ) -> dict[str, dict[str, Any]]:
        """``{step_id: {"status", "output"}}`` of the run's steps (or only ``step_ids``).

        A for_each step's output is the list of its items' outputs, in item order.
        """
        query = select(t.steps).where(t.steps.c.run_id == run_id)
        if step_ids is not None:
            wanted = sorted(step_ids)
            if not wanted:
                return {}
            query = query.where(t.steps.c.step_id.in_(wanted))
        with self._read(conn) as conn:
            rows = conn.execute(query.order_by(t.steps.c.step_id, t.steps.c.map_index)).mappings()
            return _outputs(_checkpoint(r) for r in rows)

    def _step_status(self, conn: Connection, run_id: str, step_key: str) -> str | None:
        return conn.execute(  # type: ignore[no-any-return]
            select(t.steps.c.status).where(
                t.steps.c.run_id == run_id, t.steps.c.step_key == step_key
            )
        ).scalar()

    def _attempt_status(self, conn: Connection, attempt_id: int) -> str | None:
        return conn.execute(  # type: ignore[no-any-return]
            select(t.attempts.c.status).where(t.attempts.c.id == attempt_id)
        ).scalar()

    def _resolve_dead_letters(self, conn: Connection, run_id: str, step_key: str) -> None:
        """The step completed: its open dead letters in this run and up the retry chain
        are resolved (one indexed read when there are none, the common case)."""
        open_in = [r[0] for r in conn.execute(_OPEN_LETTERS, {"b_key": step_key, "b_open": "open"})]
        if not open_in:
            return
        chain: set[str] = set()
        current: str | None = run_id
        while current is not None and current not in chain and len(chain) < MAX_CHAIN:
            chain.add(current)
            current = conn.execute(
                select(t.runs.c.retry_of).where(t.runs.c.run_id == current)
            ).scalar()
        for letter_run in sorted(chain.intersection(open_in)):
            conn.execute(
                update(t.dead_letters)
                .where(
                    t.dead_letters.c.run_id == letter_run,
                    t.dead_letters.c.step_key == step_key,
                    t.dead_letters.c.status == DeadLetterStatus.OPEN.value,
                )
                .values(status=DeadLetterStatus.RESOLVED.value)
            )
            self._event(
                conn,
                letter_run,
                step_key,
                "dead_letter_resolved",
                {"how": "completed_by", "run_id": run_id},
            )


# The statements of every step, built once: building a Core statement per call costs
# more Python than the database needs to run it.
_COMPLETE_STEP = (
    update(t.steps)
    .where(
        t.steps.c.run_id == bindparam("b_run"),
        t.steps.c.step_key == bindparam("b_key"),
        t.steps.c.status == StepStatus.RUNNING.value,
    )
    .values(
        status="completed", output=bindparam("output"), completed_at=bindparam("stamp"), error=None
    )
)
_COMPLETE_ATTEMPT = (
    update(t.attempts)
    .where(t.attempts.c.id == bindparam("b_id"), t.attempts.c.status == AttemptStatus.RUNNING.value)
    .values(status="completed", ended_at=bindparam("stamp"))
)
# Postgres: the same two updates and the ``step_completed`` event as one statement
# (data-modifying CTEs), each part only if the step's own update changed its row, as the
# statements one by one would do. Returns (steps changed, attempts changed).
_COMPLETE_ALL = text(
    f"""
WITH step AS (
    UPDATE {t.steps.name}
    SET status = '{StepStatus.COMPLETED.value}', output = :output, completed_at = :stamp,
        error = NULL
    WHERE run_id = :b_run AND step_key = :b_key AND status = '{StepStatus.RUNNING.value}'
    RETURNING 1
), attempt AS (
    UPDATE {t.attempts.name}
    SET status = '{AttemptStatus.COMPLETED.value}', ended_at = :stamp
    WHERE id = :b_id AND status = '{AttemptStatus.RUNNING.value}'
      AND EXISTS (SELECT 1 FROM step)
    RETURNING 1
), event AS (
    INSERT INTO {t.events.name} (run_id, step_key, kind, data, at)
    SELECT :b_run, :b_key, 'step_completed', :data, :stamp
    WHERE EXISTS (SELECT 1 FROM step)
)
SELECT (SELECT count(*) FROM step), (SELECT count(*) FROM attempt)
"""
)
_INSERT_ATTEMPT = t.attempts.insert().returning(t.attempts.c.id)
# What a step reads before it runs: its run's row joined with its own checkpoint and the
# steps it reads outputs of. The step side is bound to the run id itself, not to the join
# column: the planner then needs no join filter (a third of the planning time).
_RUN_AND_STEPS = (
    select(
        t.runs.c.status.label("run_status"),
        t.runs.c.retry_of.label("run_retry_of"),
        t.runs.c.retry_from.label("run_retry_from"),
        t.runs.c.saga.label("run_saga"),
        t.steps,
    )
    .select_from(
        t.runs.outerjoin(
            t.steps,
            (t.steps.c.run_id == bindparam("b_run"))
            & (
                (t.steps.c.step_key == bindparam("b_key"))
                | t.steps.c.step_id.in_(bindparam("b_wanted", expanding=True))
            ),
        )
    )
    .where(t.runs.c.run_id == bindparam("b_run"))
    .order_by(t.steps.c.step_id, t.steps.c.map_index)
)


@functools.cache
def _begin_step(dialect: str) -> Any:
    """The step's row as its attempt begins: inserted, or moved to running again from
    a status that allows it (a completed or skipped step is never attempted again)."""
    insert = dialect_insert(dialect, t.steps)
    insert = insert.values(
        run_id=bindparam("b_run"),
        step_key=bindparam("b_key"),
        step_id=bindparam("b_step"),
        map_index=bindparam("b_map"),
        status=StepStatus.RUNNING.value,
        attempts=1,
        idempotency_key=bindparam("b_idem"),
        args=bindparam("b_args"),
        started_at=bindparam("b_stamp"),
    )
    return insert.on_conflict_do_update(
        index_elements=[t.steps.c.run_id, t.steps.c.step_key],
        set_={
            "status": StepStatus.RUNNING.value,
            "attempts": t.steps.c.attempts + 1,
            "idempotency_key": insert.excluded.idempotency_key,
            "args": insert.excluded.args,
            "error": None,
        },
        # A fixed list of literals, not an expanding IN: compiled once, not per call.
        where=t.steps.c.status.in_([literal(s) for s in STEP.sources(StepStatus.RUNNING)]),
    )


_OPEN_LETTERS = select(t.dead_letters.c.run_id).where(
    t.dead_letters.c.step_key == bindparam("b_key"),
    t.dead_letters.c.status == bindparam("b_open"),
)
