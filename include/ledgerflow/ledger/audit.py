"""The audit trail out of the ledger, and the authorization failures into it.

``export_rows`` streams the event log of a time span (who, what, when, which run and
step) with a server-side cursor, a thousand rows at a time: an export of years holds one
batch in memory. ``write_jsonl`` / ``write_csv`` format it.

``AuthFailures`` counts the plugin's 401 and 403 answers in the api-server process, per
minute and status, and adds its counts to ``lf_auth_failures`` at most every few seconds
from a background timer: a flood of refused requests costs a dictionary increment each,
never a database write each.
"""

from __future__ import annotations

import csv
import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from sqlalchemy import select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.indicators import aware

if TYPE_CHECKING:
    from ledgerflow.ledger.store import Ledger

log = logging.getLogger(__name__)

COLUMNS = ("id", "at", "run_id", "dag_id", "workflow", "step_key", "kind", "who", "data")
BATCH = 1000
WHO_KEYS = ("by", "user", "decided_by", "approver")


def who(data: Any) -> str:
    """The person behind an event (``by`` in its data), else ``system``."""
    if isinstance(data, dict):
        for key in WHO_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
    return "system"


def export_rows(
    ledger: Ledger,
    *,
    since: datetime,
    until: datetime,
    dag_ids: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Events recorded in ``[since, until)``, oldest first, as flat rows; with ``dag_ids``
    only the events of runs of those DAGs (a breaker's events belong to no DAG)."""
    from ledgerflow.ledger._engine import loads

    ev, r = t.events, t.runs
    query = (
        select(
            ev.c.id,
            ev.c.at,
            ev.c.run_id,
            r.c.dag_id,
            r.c.workflow,
            ev.c.step_key,
            ev.c.kind,
            ev.c.data,
        )
        .select_from(ev.outerjoin(r, r.c.run_id == ev.c.run_id))
        .where(ev.c.at >= since, ev.c.at < until)
        .order_by(ev.c.at, ev.c.id)
    )
    if dag_ids is not None:
        query = query.where(r.c.dag_id.in_(sorted(set(dag_ids))))
    with ledger.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=BATCH).execute(query)
        for row in result:
            data = loads(row.data) if row.data is not None else None
            at = aware(row.at)
            yield {
                "id": int(row.id),
                "at": at.isoformat() if at is not None else None,
                "run_id": row.run_id,
                "dag_id": row.dag_id,
                "workflow": row.workflow,
                "step_key": row.step_key,
                "kind": row.kind,
                "who": who(data),
                "data": data,
            }


def jsonl_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(row, default=str, sort_keys=False, ensure_ascii=False) + "\n"


class _Line:
    """A file-like that hands back what csv.writer wrote."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)


def csv_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """A header, then one line per event (``data`` as compact JSON)."""
    line = _Line()
    writer = csv.writer(line, lineterminator="\n")
    writer.writerow(COLUMNS)
    yield line.text
    for row in rows:
        line.text = ""
        data = row["data"]
        cells = [row[c] for c in COLUMNS[:-1]]
        cells.append("" if data is None else json.dumps(data, default=str, sort_keys=True))
        writer.writerow(["" if c is None else c for c in cells])
        yield line.text


def lines(rows: Iterable[dict[str, Any]], fmt: str) -> Iterator[str]:
    if fmt == "jsonl":
        return jsonl_lines(rows)
    if fmt == "csv":
        return csv_lines(rows)
    raise ValueError(f"format must be jsonl or csv, got {fmt!r}")


def write(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    """Write the rows; returns how many events were written."""
    n = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal n
        for row in rows:
            n += 1
            yield row

    for text in lines(counted(), fmt):
        out.write(text)
    return n


# -- authorization failures ----------------------------------------------------------


FLUSH_SECONDS = 5.0


def add_auth_failures(ledger: Ledger, counts: dict[tuple[datetime, int], int]) -> None:
    """Add counts per (minute, status) to ``lf_auth_failures``."""
    au = t.auth_failures
    with ledger.begin() as conn:
        for (minute, status), n in sorted(counts.items()):
            stmt = ledger._insert(au).values(minute=minute, status=status, count=n)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=[au.c.minute, au.c.status],
                    set_={"count": au.c.count + stmt.excluded.count},
                )
            )


class AuthFailures:
    """This process's 401/403 answers, written to the ledger in batches."""

    def __init__(self, ledger: Callable[[], Ledger], flush_seconds: float = FLUSH_SECONDS):
        self._ledger = ledger
        self._flush_seconds = flush_seconds
        self._lock = threading.Lock()
        self._counts: dict[tuple[datetime, int], int] = defaultdict(int)
        self._timer: threading.Timer | None = None

    def record(self, status: int) -> None:
        """Count one refused request (cheap: the write happens later, in a batch)."""
        from ledgerflow import observability
        from ledgerflow.ledger._engine import now

        minute = now().replace(second=0, microsecond=0)
        with self._lock:
            self._counts[(minute, status)] += 1
            if self._timer is None and self._flush_seconds > 0:
                self._timer = threading.Timer(self._flush_seconds, self._flush_quietly)
                self._timer.daemon = True
                self._timer.start()
        observability.auth_failure(status)

    def flush(self) -> int:
        """Write what was counted; returns how many failures were written."""
        with self._lock:
            counts, self._counts = dict(self._counts), defaultdict(int)
            self._timer = None
        if counts:
            try:
                add_auth_failures(self._ledger(), counts)
            except Exception:
                with self._lock:  # keep them for the next flush
                    for key, n in counts.items():
                        self._counts[key] += n
                raise
        return sum(counts.values())

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception:
            log.warning("authorization failures not written to the ledger", exc_info=True)
