"""What one run did, read from the ledger: the run page, its JSON API and ``ledgerflow show``.

``run_document`` gathers a run's steps with every attempt, inputs and outputs, effects,
approvals with their audit trail, LLM calls, quality results, compensations and the
saga's outcome, dead letters and the retry chain both ways. It only reads.

What a person sees is bounded and safe: values under a key that names a secret
(``password``, ``token``, ``secret``, ``api_key``, ``authorization``...) are replaced by
``***`` at any depth, and a value whose JSON is longer than :data:`VALUE_CAP` is cut to a
preview (``*_truncated`` says so, ``*_bytes`` gives the full size).
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote

from sqlalchemy import func, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Ledger, loads

VALUE_CAP = 2048
MASK = "***"
SECRET_KEY = re.compile(
    r"pass(word|wd|phrase)?|secret|token|api[-_]?key|authorization|auth[-_]?header|"
    r"credential|private[-_]?key|cookie|session[-_]?id|signature",
    re.IGNORECASE,
)
RUN_STATUSES = (
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "compensated",
    "compensation_failed",
)


def redact(value: Any) -> Any:
    """``value`` with every entry under a secret-looking key masked, at any depth."""
    if isinstance(value, dict):
        return {
            k: (MASK if isinstance(k, str) and SECRET_KEY.search(k) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def capped(value: Any, limit: int = VALUE_CAP) -> tuple[Any, bool, int]:
    """(the redacted value, or a preview of its JSON when longer than ``limit``;
    truncated; the JSON's size in bytes)."""
    clean = redact(value)
    text = json.dumps(clean, default=str, sort_keys=True, ensure_ascii=False)
    size = len(text.encode())
    if size <= limit:
        return clean, False, size
    return text.encode()[:limit].decode(errors="ignore") + "…", True, size


def _put(out: dict[str, Any], name: str, value: Any) -> None:
    shown, truncated, size = capped(value)
    out[name] = shown
    out[f"{name}_truncated"] = truncated
    out[f"{name}_bytes"] = size


def _text(value: str | None, limit: int = VALUE_CAP) -> str | None:
    if value is None or len(value) <= limit:
        return value
    return value[:limit] + "…"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def split_run_id(run_id: str) -> tuple[str, str]:
    """``<dag_id>/<airflow run id>`` -> (dag_id, airflow run id)."""
    dag_id, _, airflow_run_id = run_id.partition("/")
    return dag_id, airflow_run_id


def airflow_links(run_id: str) -> dict[str, str]:
    """Airflow 3 UI paths of the run: its grid, and the task page prefix."""
    dag_id, airflow_run_id = split_run_id(run_id)
    base = f"/dags/{quote(dag_id, safe='')}/runs/{quote(airflow_run_id, safe='')}"
    return {"grid": base, "tasks": f"{base}/tasks"}


def task_log_link(run_id: str, step_key: str, task_id: str | None = None) -> str:
    """The task instance's page in Airflow's UI (its logs): ``step[2]`` is map index 2;
    ``task_id``: the fused segment's task that ran the step."""
    if task_id is not None:
        return f"{airflow_links(run_id)['tasks']}/{quote(task_id, safe='')}"
    match = re.fullmatch(r"(.+)\[(\d+)\]", step_key)
    task_id, suffix = (match.group(1), f"/mapped/{match.group(2)}") if match else (step_key, "")
    return f"{airflow_links(run_id)['tasks']}/{quote(task_id, safe='')}{suffix}"


def _run_row(row: Any) -> dict[str, Any]:
    _dag_id, airflow_run_id = split_run_id(row["run_id"])
    out = {
        "run_id": row["run_id"],
        "dag_id": row["dag_id"],
        "airflow_run_id": airflow_run_id,
        "workflow": row["workflow"],
        "version": int(row["version"]),
        "status": row["status"],
        "saga": row["saga"],
        "failed_step": row["failed_step"],
        "trigger_kind": row["trigger_kind"],
        "retry_of": row["retry_of"],
        "retry_from": row.get("retry_from"),
        "created_at": _iso(row["created_at"]),
        "updated_at": _iso(row["updated_at"]),
        "duration_s": None
        if row["status"] == "running"
        else _seconds(row["created_at"], row["updated_at"]),
    }
    if row["status"] == "cancelled":  # who, when, why (``ledgerflow.cancel``)
        out.update(
            cancelled_by=row.get("cancelled_by"),
            cancelled_at=_iso(row.get("cancelled_at")),
            cancel_reason=row.get("cancel_reason"),
            cancel_compensate=bool(row.get("cancel_compensate")),
        )
    return out


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """``30m``, ``2h``, ``7d`` (ago) or an ISO date/time (UTC unless it says otherwise)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
        try:
            delta = timedelta(**{unit[match.group(2)]: int(match.group(1))})
            return (now or datetime.now(timezone.utc)) - delta
        except OverflowError:
            raise ValueError(
                f"{value.strip()} ago is before the year 1 (use a smaller number)"
            ) from None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f"not a time: {value!r} (use 30m, 2h, 7d or an ISO date like 2026-01-31T12:00)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def list_runs(
    ledger: Ledger,
    *,
    workflow: str | None = None,
    version: int | None = None,
    status: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Runs, newest first. ``status`` is the run's (running, succeeded, failed, cancelled) or the
    saga's outcome (compensated, compensation_failed)."""
    runs = t.runs
    query = select(runs).order_by(runs.c.created_at.desc(), runs.c.run_id).limit(limit)
    if workflow:
        query = query.where(runs.c.workflow == workflow)
    if version is not None:
        query = query.where(runs.c.version == version)
    if status in ("compensated", "compensation_failed"):
        query = query.where(runs.c.saga == status)
    elif status:
        query = query.where(runs.c.status == status)
    if since is not None:
        query = query.where(runs.c.created_at >= since)
    if until is not None:
        query = query.where(runs.c.created_at < until)
    with ledger.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
        ids = [r["run_id"] for r in rows]
        retried: dict[str, int] = (
            dict(
                conn.execute(
                    select(runs.c.retry_of, func.count())
                    .where(runs.c.retry_of.in_(ids))
                    .group_by(runs.c.retry_of)
                ).all()
            )
            if ids
            else {}
        )
    return [{**_run_row(r), "retries": int(retried.get(r["run_id"], 0))} for r in rows]


def workflows(ledger: Ledger) -> list[tuple[str, int]]:
    """Every (workflow, version) with a run, for the filters."""
    query = select(t.runs.c.workflow, t.runs.c.version).distinct()
    with ledger.engine.connect() as conn:
        return sorted((w, int(v)) for w, v in conn.execute(query))


def _rows(conn: Any, table: Any, run_id: str, order: Any) -> list[dict[str, Any]]:
    query = select(table).where(table.c.run_id == run_id).order_by(order)
    return [dict(r) for r in conn.execute(query).mappings()]


def _chain(conn: Any, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """The runs this one retries (nearest first) and the runs retrying it (breadth first)."""
    runs = t.runs
    before: list[dict[str, Any]] = []
    seen = {run_id}
    current = conn.execute(select(runs.c.retry_of).where(runs.c.run_id == run_id)).scalar()
    while current is not None and current not in seen and len(before) < 1000:
        seen.add(current)
        row = conn.execute(select(runs).where(runs.c.run_id == current)).mappings().first()
        if row is None:
            before.append({"run_id": current, "status": "unknown"})
            break
        before.append(_run_row(row))
        current = row["retry_of"]
    after: list[dict[str, Any]] = []
    queue = [run_id]
    while queue and len(after) < 1000:
        parent = queue.pop(0)
        query = select(runs).where(runs.c.retry_of == parent).order_by(runs.c.created_at)
        for row in conn.execute(query).mappings():
            if row["run_id"] not in seen:
                seen.add(row["run_id"])
                after.append(_run_row(row))
                queue.append(row["run_id"])
    return {"retries": before, "retried_by": after}


def run_document(ledger: Ledger, run_id: str) -> dict[str, Any] | None:
    """Everything the ledger knows about one run (None: not in the ledger)."""
    with ledger.engine.connect() as conn:
        row = conn.execute(select(t.runs).where(t.runs.c.run_id == run_id)).mappings().first()
        if row is None:
            return None
        steps = _rows(conn, t.steps, run_id, t.steps.c.step_key)
        attempts = _rows(conn, t.attempts, run_id, t.attempts.c.id)
        effects = _rows(conn, t.effects, run_id, t.effects.c.id)
        events = _rows(conn, t.events, run_id, t.events.c.id)
        compensations = _rows(conn, t.compensations, run_id, t.compensations.c.updated_at)
        dead = _rows(conn, t.dead_letters, run_id, t.dead_letters.c.id)
        approval_rows = _rows(conn, t.approvals, run_id, t.approvals.c.id)
        llm_rows = _rows(conn, t.llm_calls, run_id, t.llm_calls.c.id)
        quality_rows = _rows(conn, t.quality_results, run_id, t.quality_results.c.id)
        chain = _chain(conn, run_id)
        # Steps whose key names an effect another run made (a business key): that run
        keys = [s["idempotency_key"] for s in steps if s["idempotency_key"]]
        effect_from: dict[str, str] = {}
        if keys:
            effect_from = {
                key: other
                for key, other in conn.execute(
                    select(t.effects.c.idempotency_key, t.effects.c.run_id).where(
                        t.effects.c.idempotency_key.in_(keys), t.effects.c.run_id != run_id
                    )
                ).all()
            }

    run = _run_row(row)
    run["params"], run["params_truncated"], run["params_bytes"] = capped(loads(row["params"]))
    reused_from = {
        e["step_key"]: (loads(e["data"]) or {}).get("run_id")
        for e in events
        if e["kind"] == "checkpoint_reused_from"
    }
    # A fused step ran in its segment's task (``steps.segment``): its log is there.
    task_of = {
        step: str(data["task_id"])
        for e in events
        if e["kind"] == "segment_started"
        for data in [loads(e["data"]) or {}]
        for step in data.get("steps", ())
    }

    by_step: dict[str, list[dict[str, Any]]] = {}
    for a in attempts:
        by_step.setdefault(a["step_key"], []).append(
            {
                "try_number": int(a["try_number"]),
                "status": a["status"],
                "error_type": a["error_type"],
                "error": _text(a["error"]),
                "hostname": a["hostname"],
                "pid": a["pid"],
                "started_at": _iso(a["started_at"]),
                "ended_at": _iso(a["ended_at"]),
                "duration_s": _seconds(a["started_at"], a["ended_at"]),
            }
        )
    effects_by_step: dict[str, list[dict[str, Any]]] = {}
    effect_list = []
    for e in effects:
        item = {
            "idempotency_key": e["idempotency_key"],
            "tool": e["tool"],
            "step_key": e["step_key"],
            "status": e["status"],
            "created_at": _iso(e["created_at"]),
            "completed_at": _iso(e["completed_at"]),
        }
        _put(item, "result", loads(e["result"]))
        effects_by_step.setdefault(e["step_key"], []).append(item)
        effect_list.append(item)

    step_list = []
    far = datetime.max.replace(tzinfo=timezone.utc)
    for s in steps:
        item = {
            "step_key": s["step_key"],
            "step_id": s["step_id"],
            "map_index": int(s["map_index"]),
            "status": s["status"],
            "attempt_count": int(s["attempts"]),
            "idempotency_key": s["idempotency_key"],
            "error": _text(s["error"]),
            "started_at": _iso(s["started_at"]),
            "completed_at": _iso(s["completed_at"]),
            "duration_s": _seconds(s["started_at"], s["completed_at"]),
            "reused_from": reused_from.get(s["step_key"]),
            "effect_from": None
            if reused_from.get(s["step_key"])
            else effect_from.get(s["idempotency_key"]),
            "attempts": by_step.pop(s["step_key"], []),
            "effects": effects_by_step.get(s["step_key"], []),
            "task_log": task_log_link(run_id, s["step_key"], task_of.get(s["step_id"])),
        }
        _put(item, "args", loads(s["args"]))
        _put(item, "output", loads(s["output"]))
        started = s["started_at"] or s["completed_at"]
        if started is not None and started.tzinfo is None:
            started = started.replace(tzinfo=timezone.utc)
        step_list.append((started or far, s["step_key"], item))
    step_list.sort(key=lambda x: (x[0], x[1]))

    approval_list = []
    for a in approval_rows:
        audit = [
            {
                "kind": e["kind"],
                "at": _iso(e["at"]),
                "data": redact(loads(e["data"])),
            }
            for e in events
            if e["kind"].startswith("approval_")
            and (loads(e["data"]) or {}).get("approval_id") in (a["id"], None)
            and e["step_key"] == a["step_key"]
        ]
        item = {
            "id": int(a["id"]),
            "step_key": a["step_key"],
            "subject": a["subject"],
            "status": a["status"],
            "approvers": loads(a["approvers"]),
            "level": int(a["level"]),
            "deadline": _iso(a["deadline"]),
            "decided_by": a["decided_by"],
            "decided_at": _iso(a["decided_at"]),
            "comment": a["comment"],
            "payload_hash": a["payload_hash"],
            "seen_hash": a["seen_hash"],
            "created_at": _iso(a["created_at"]),
            "waited_s": _seconds(a["created_at"], a["decided_at"]),
            "audit": audit,
        }
        _put(item, "payload", loads(a["payload"]))
        approval_list.append(item)

    llm_list = []
    for c in llm_rows:
        item = {
            "step_key": c["step_key"],
            "idempotency_key": c["idempotency_key"],
            "model": c["model"],
            "status": c["status"],
            "path": c["path"],
            "reason": _text(c["reason"]),
            "requests": int(c["requests"]),
            "input_tokens": int(c["input_tokens"]),
            "output_tokens": int(c["output_tokens"]),
            "latency_ms": int(c["latency_ms"]),
            "prompt": _text(c["prompt"]),
            "errors": redact(loads(c["errors"])),
            "created_at": _iso(c["created_at"]),
        }
        _put(item, "output", loads(c["output"]))
        llm_list.append(item)

    quality_list = []
    for q in quality_rows:
        item = {
            "step_key": q["step_key"],
            "try_number": int(q["try_number"]),
            "dataset": q["dataset"],
            "success": bool(q["success"]),
            "outcome": q["outcome"],
            "row_count": q["row_count"],
            "evaluated": int(q["evaluated"]),
            "failed_count": int(q["failed_count"]),
            "duration_ms": int(q["duration_ms"]),
            "created_at": _iso(q["created_at"]),
        }
        _put(item, "failed", loads(q["failed"]))
        quality_list.append(item)

    return {
        "run": run,
        "links": airflow_links(run_id),
        "steps": [item for _, _, item in step_list],
        "effects": effect_list,
        "approvals": approval_list,
        "llm_calls": llm_list,
        "quality_results": quality_list,
        "compensations": [
            {
                "step_key": c["step_key"],
                "tool": c["tool"],
                "status": c["status"],
                "detail": _text(c["detail"]),
                "updated_at": _iso(c["updated_at"]),
            }
            for c in compensations
        ],
        "saga": {"outcome": row["saga"], "failed_step": row["failed_step"]},
        "dead_letters": [
            {
                "id": int(d["id"]),
                "step_key": d["step_key"],
                "attempts": int(d["attempts"]),
                "error_type": d["error_type"],
                "error": _text(d["error"]),
                "idempotency_key": d["idempotency_key"],
                "status": d["status"],
                "created_at": _iso(d["created_at"]),
            }
            for d in dead
        ],
        "retry_chain": chain,
        "events": [
            {
                "step_key": e["step_key"],
                "kind": e["kind"],
                "at": _iso(e["at"]),
                "data": capped(loads(e["data"]))[0],
            }
            for e in events
        ],
    }
