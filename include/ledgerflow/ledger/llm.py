"""LLM calls in the ledger, one row per idempotency key (``lf_llm_calls``).

The row is written in the transaction that completes the step (or fails it), so the
answer and the checkpoint are there together or not at all: a retried task finds the
checkpoint, and a later run with the same key (a custom key, or a retry run) finds the
row and reuses it instead of paying for the call again. Two concurrent twins with one key
both insert; the second insert does nothing and both follow the row that won.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, select

from ledgerflow import observability
from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, dumps, loads, now


@dataclass(frozen=True)
class LlmCall:
    idempotency_key: str
    run_id: str
    step_key: str
    model: str | None
    prompt: str
    responses: list[str]
    status: str
    output: Any
    errors: list[str]
    requests: int
    input_tokens: int
    output_tokens: int
    latency_ms: int
    path: str
    reason: str | None


_FIND = select(t.llm_calls).where(t.llm_calls.c.idempotency_key == bindparam("b_key"))


def find(ledger: Ledger, key: str, conn: Connection | None = None) -> LlmCall | None:
    with ledger._read(conn) as conn:
        row = conn.execute(_FIND, {"b_key": key}).mappings().first()
    return None if row is None else _call(row)


def record(
    ledger: Ledger,
    *,
    key: str,
    run_id: str,
    step_key: str,
    system_prompt: str,
    prompt: str,
    outcome: Any,
    path: str,
    reason: str | None,
    conn: Connection | None = None,
) -> tuple[LlmCall, bool]:
    """Store the call once; returns (the stored call, whether this call stored it)."""
    values = {
        "idempotency_key": key,
        "run_id": run_id,
        "step_key": step_key,
        "model": outcome.model,
        "system_prompt": system_prompt,
        "prompt": prompt,
        "responses": dumps(outcome.responses),
        "status": outcome.status,
        "output": None if outcome.output is None else dumps(outcome.output),
        "errors": dumps(outcome.errors),
        "requests": outcome.requests,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "latency_ms": outcome.latency_ms,
        "path": path,
        "reason": reason,
        "created_at": now(),
    }
    with ledger.begin(conn) as conn:
        inserted = conn.execute(
            ledger._insert(t.llm_calls).values(**values).on_conflict_do_nothing()
        ).rowcount
        if not inserted:  # a concurrent twin stored its answer first: use that one
            stored = find(ledger, key, conn)
            assert stored is not None
            ledger._event(conn, run_id, step_key, "llm_call_raced", {"key": key})
            return stored, False
    if path == "fallback":
        observability.llm_fallback(run_id, step_key)
    return _call({**values, "responses": values["responses"]}), True


def calls(ledger: Ledger, run_id: str | None = None) -> list[LlmCall]:
    query = select(t.llm_calls).order_by(t.llm_calls.c.id)
    if run_id is not None:
        query = query.where(t.llm_calls.c.run_id == run_id)
    with ledger.engine.connect() as conn:
        return [_call(r) for r in conn.execute(query).mappings()]


def _call(row: Any) -> LlmCall:
    return LlmCall(
        idempotency_key=row["idempotency_key"],
        run_id=row["run_id"],
        step_key=row["step_key"],
        model=row["model"],
        prompt=row["prompt"],
        responses=loads(row["responses"]),
        status=row["status"],
        output=loads(row["output"]),
        errors=loads(row["errors"]) or [],
        requests=int(row["requests"]),
        input_tokens=int(row["input_tokens"]),
        output_tokens=int(row["output_tokens"]),
        latency_ms=int(row["latency_ms"]),
        path=row["path"],
        reason=row["reason"],
    )
