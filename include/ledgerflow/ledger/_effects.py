"""Effects (one row per idempotency key) and dead letters in the ledger.

An effect is claimed (``pending``), then ``done``; the saga may mark it ``compensated``,
after which it is never reused (``lifecycle.EFFECT``)."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from ledgerflow import observability
from ledgerflow.ledger import schema as t
from ledgerflow.ledger._base import LedgerBase, dialect_insert, refuse
from ledgerflow.ledger._engine import dumps, loads, now
from ledgerflow.ledger._records import Effect, _error_text, _error_type
from ledgerflow.lifecycle import DEAD_LETTER, EFFECT, DeadLetterStatus, EffectStatus


class EffectsMixin(LedgerBase):
    def effect(self, key: str, conn: Connection | None = None) -> Effect | None:
        query = select(t.effects).where(t.effects.c.idempotency_key == key)
        with self._read(conn) as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            return None
        return Effect(
            idempotency_key=row["idempotency_key"],
            tool=row["tool"],
            status=row["status"],
            result=loads(row["result"]),
            run_id=row["run_id"],
            step_key=row["step_key"],
        )

    def claim_effect(
        self,
        conn: Connection | None = None,
        *,
        key: str,
        tool: str,
        run_id: str,
        step_key: str,
    ) -> bool:
        """Insert a pending effect row; False when the key is already claimed (the caller
        reads ``effect(key)``: a ``compensated`` one is never reused)."""
        with self.begin(conn) as conn:
            result = conn.execute(
                _claim_effect(self.dialect),
                {
                    "b_key": key,
                    "b_tool": tool,
                    "b_run": run_id,
                    "b_step": step_key,
                    "b_stamp": now(),
                },
            )
        return bool(result.rowcount)

    def insert_effect(
        self,
        conn: Connection | None = None,
        *,
        key: str,
        tool: str,
        run_id: str,
        step_key: str,
        result: Any,
    ) -> None:
        """Record a finished effect. A plain INSERT: a concurrent twin with the same key fails
        on the unique key and its transaction (with its effect) rolls back."""
        stamp = now()
        with self.begin(conn) as conn:
            conn.execute(
                t.effects.insert().values(
                    idempotency_key=key,
                    tool=tool,
                    run_id=run_id,
                    step_key=step_key,
                    status=EffectStatus.DONE.value,
                    result=dumps(result),
                    created_at=stamp,
                    completed_at=stamp,
                )
            )

    def finish_effect(self, conn: Connection | None = None, *, key: str, result: Any) -> None:
        """The claimed (pending) effect is done. A compensated one is refused: its key
        was undone, and the step must be performed again under a new one."""
        with self.begin(conn) as conn:
            finished = conn.execute(
                _FINISH_EFFECT, {"b_key": key, "result": dumps(result), "stamp": now()}
            ).rowcount
            if not finished:
                current = conn.execute(
                    select(t.effects.c.status).where(t.effects.c.idempotency_key == key)
                ).scalar()
                refuse(EFFECT, current, EffectStatus.DONE.value, key)

    def effects(self, run_id: str | None = None) -> list[dict[str, Any]]:
        query = select(t.effects).order_by(t.effects.c.id)
        if run_id is not None:
            query = query.where(t.effects.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    # -- dead letters -----------------------------------------------------------

    def dead_letter(
        self,
        *,
        workflow: str,
        version: int,
        run_id: str,
        step_key: str,
        attempts: int,
        error: BaseException,
        args: Any,
        idempotency_key: str | None,
        conn: Connection | None = None,
    ) -> None:
        """The step failed for good: its letter (one per run and step) is ``open`` with
        this failure. A letter already there is opened again with the newest error (the
        step, cleared or undone and performed again, failed for good once more) - unless
        a retry of this run has completed the step since: the business step is done, and
        the letter is resolved at once, naming that run."""
        values = {
            "workflow": workflow,
            "version": version,
            "attempts": attempts,
            "error_type": _error_type(error),
            "error": _error_text(error),
            "args": dumps(args),
            "idempotency_key": idempotency_key,
            "status": DeadLetterStatus.OPEN.value,
        }
        with self.begin(conn) as conn:
            insert = self._insert(t.dead_letters).values(
                run_id=run_id, step_key=step_key, created_at=now(), **values
            )
            written = conn.execute(
                insert.on_conflict_do_update(
                    index_elements=[t.dead_letters.c.run_id, t.dead_letters.c.step_key],
                    set_=values,
                    where=t.dead_letters.c.status.in_(DEAD_LETTER.sources(DeadLetterStatus.OPEN)),
                )
            ).rowcount
            if not written:
                current = conn.execute(
                    select(t.dead_letters.c.status).where(
                        t.dead_letters.c.run_id == run_id, t.dead_letters.c.step_key == step_key
                    )
                ).scalar()
                refuse(DEAD_LETTER, current, DeadLetterStatus.OPEN.value, f"{run_id}/{step_key}")
            self._event(conn, run_id, step_key, "dead_lettered", {"attempts": attempts})
            done_by = self._completed_by_a_retry(conn, run_id, step_key)
            if done_by is not None:
                conn.execute(
                    update(t.dead_letters)
                    .where(t.dead_letters.c.run_id == run_id, t.dead_letters.c.step_key == step_key)
                    .values(status=DeadLetterStatus.RESOLVED.value)
                )
                self._event(
                    conn,
                    run_id,
                    step_key,
                    "dead_letter_resolved",
                    {"how": "completed_by", "run_id": done_by},
                )
        observability.dead_lettered(workflow, step_key)

    def _completed_by_a_retry(self, conn: Connection, run_id: str, step_key: str) -> str | None:
        """A retry of ``run_id`` (at any depth) in which ``step_key`` completed, if any."""
        from ledgerflow.ledger import chains

        retries = [r["run_id"] for r in chains.descendants(self, run_id, conn)]  # type: ignore[arg-type]
        if not retries:
            return None
        done = conn.execute(
            select(t.steps.c.run_id).where(
                t.steps.c.run_id.in_(retries),
                t.steps.c.step_key == step_key,
                t.steps.c.status.in_(["completed", "compensated"]),
            )
        ).scalars()
        return min(done, default=None)

    def dead_letters(self, status: str | None = "open") -> list[dict[str, Any]]:
        query = select(t.dead_letters).order_by(t.dead_letters.c.id)
        if status:
            query = query.where(t.dead_letters.c.status == status)
        with self.engine.connect() as conn:
            return [{**r, "args": loads(r["args"])} for r in conn.execute(query).mappings()]

    def dead_letter_by_id(self, letter_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(select(t.dead_letters).where(t.dead_letters.c.id == letter_id))
                .mappings()
                .first()
            )
        return None if row is None else {**row, "args": loads(row["args"])}

    def resolve_dead_letter(self, letter_id: int, how: str, conn: Connection | None = None) -> bool:
        """Resolve an open letter; True when this call did. A letter already resolved
        (e.g. by the completion of its step) stays as it is; an unknown one is refused."""
        with self.begin(conn) as conn:
            changed = conn.execute(
                update(t.dead_letters)
                .where(
                    t.dead_letters.c.id == letter_id,
                    t.dead_letters.c.status.in_(
                        [
                            s
                            for s in DEAD_LETTER.sources(DeadLetterStatus.RESOLVED)
                            if s != DeadLetterStatus.RESOLVED.value
                        ]
                    ),
                )
                .values(status=DeadLetterStatus.RESOLVED.value)
            ).rowcount
            if not changed:
                current = conn.execute(
                    select(t.dead_letters.c.status).where(t.dead_letters.c.id == letter_id)
                ).scalar()
                refuse(DEAD_LETTER, current, DeadLetterStatus.RESOLVED.value, f"#{letter_id}")
                return False
            row = conn.execute(
                select(t.dead_letters.c.run_id, t.dead_letters.c.step_key).where(
                    t.dead_letters.c.id == letter_id
                )
            ).one()
            self._event(conn, row[0], row[1], "dead_letter_resolved", {"how": how})
        return True


@functools.cache
def _claim_effect(dialect: str) -> Any:
    insert = dialect_insert(dialect, t.effects)
    return insert.values(
        idempotency_key=bindparam("b_key"),
        tool=bindparam("b_tool"),
        run_id=bindparam("b_run"),
        step_key=bindparam("b_step"),
        status=EffectStatus.PENDING.value,
        created_at=bindparam("b_stamp"),
    ).on_conflict_do_nothing()


_FINISH_EFFECT = (
    update(t.effects)
    .where(
        t.effects.c.idempotency_key == bindparam("b_key"),
        t.effects.c.status == EffectStatus.PENDING.value,
    )
    .values(status="done", result=bindparam("result"), completed_at=bindparam("stamp"))
)
