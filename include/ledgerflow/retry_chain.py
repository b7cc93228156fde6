"""The rules of a retry chain: which run of a chain may be retried, and why not.

A chain is the oldest run (through the ledger's ``retry_of``) and every run descending
from it, of the same DAG. It has at most one live continuation: a run whose chain has a
running or succeeded retry is not retried again, and only the newest failed run of a
chain is (a cancelled run counts as failed here: it may be retried). A run's status
is Airflow's state when Airflow knows the run, else the ledger's; a cancelled run is
cancelled whatever its DagRun says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection

from ledgerflow.errors import RetryRefused
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import RETRYABLE_RUN_STATUSES

StateOf = Callable[[str, str], str | None]


def airflow_state(dag_id: str, dag_run_id: str) -> str | None:
    """The DagRun's state in Airflow's metadata database (None: unknown or unreachable).

    Airflow's state is the truth about "still running": the ledger's status is written by
    the DAG's callback, which runs a moment after the run ends."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            state = session.scalar(
                select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == dag_run_id)
            )
    except Exception:
        return None
    return None if state is None else str(getattr(state, "value", state))


_STATUS_OF_STATE = {"queued": "running", "running": "running", "success": "succeeded"}


@dataclass(frozen=True)
class Standing:
    """Where a run stands in its retry chain (statuses as Airflow says, when it knows)."""

    run_id: str
    status: str  # running | succeeded | failed | cancelled
    # Another run of the chain that is live (running or queued), or a retry that
    # succeeded: the chain is continued, this run is not retried again.
    continued_by: dict[str, Any] | None = None
    # The newest failed run of the chain when it is newer than this run: retry that one.
    newest_failed: dict[str, Any] | None = None
    chain: list[dict[str, Any]] = field(default_factory=list)  # oldest first, with status

    def refusal(self, from_step: str | None) -> RetryRefused | None:
        """Why this run may not be retried (``from_step``: ``--from``), or None."""
        run_id = self.run_id
        if self.status == "running":
            return RetryRefused(
                f"run {run_id} is still running; retry it once it has failed", reason="running"
            )
        other = self.continued_by
        if other is not None:
            return RetryRefused(
                f"run {run_id} is already continued by {other['run_id']} ({other['status']}): "
                "a retry chain has at most one live continuation",
                reason="continued",
                run_id=other["run_id"],
            )
        if self.status == "succeeded" and from_step is None:
            return RetryRefused(
                f"run {run_id} succeeded: nothing to resume. To run steps again, name the "
                f"first one: ledgerflow retry {run_id} --from STEP",
                reason="succeeded",
            )
        newest = self.newest_failed
        if newest is not None:
            return RetryRefused(
                f"run {run_id} is not the newest failed run of its retry chain: "
                f"retry {newest['run_id']} instead",
                reason="not_newest",
                run_id=newest["run_id"],
            )
        return None


def standing(
    ledger: Ledger,
    run_id: str,
    *,
    state_of: StateOf | None = None,
    conn: Connection | None = None,
) -> Standing:
    """Where ``run_id`` stands in its retry chain: the ledger's rows give the chain,
    ``state_of(dag_id, dag_run_id)`` (``airflow_state``) each run's status when it knows
    it, else the ledger's. Raises RetryRefused for a run not in the ledger."""
    from ledgerflow.ledger import chains

    with ledger._read(conn) as conn:
        members = chains.family(ledger, run_id, conn)
        unborn = _never_started(conn, [r["run_id"] for r in members])
    # A retry Airflow refused to create never ran: it neither continues the chain nor
    # stands in the way of retrying the run it was meant to retry.
    members = [r for r in members if r["run_id"] == run_id or r["run_id"] not in unborn]
    if not any(r["run_id"] == run_id for r in members):
        raise RetryRefused(
            f"no run {run_id!r} in the ledger (ids look like <dag_id>/<airflow run id>; "
            "`ledgerflow runs` lists them)",
            reason="unknown_run",
        )
    chain = [{**r, "status": _status(r, state_of)} for r in members]
    position = next(i for i, r in enumerate(chain) if r["run_id"] == run_id)
    me = chain[position]
    others = chain[:position] + chain[position + 1 :]
    # A live run anywhere in the chain, else the newest retry that succeeded.
    live = [r for r in others if r["status"] == "running"]
    done = [r for r in others if r["status"] == "succeeded" and r["retry_of"] is not None]
    continuing = live or done[::-1]
    # A cancelled run is retried like a failed one (lifecycle.RETRYABLE_RUN_STATUSES).
    newer_failed = [r for r in chain[position + 1 :] if r["status"] in RETRYABLE_RUN_STATUSES]
    return Standing(
        run_id=run_id,
        status=me["status"],
        continued_by=continuing[0] if continuing else None,
        newest_failed=newer_failed[-1] if newer_failed else None,
        chain=chain,
    )


def _never_started(conn: Connection, run_ids: list[str]) -> set[str]:
    from sqlalchemy import select

    from ledgerflow.ledger import schema as t

    query = select(t.events.c.run_id).where(
        t.events.c.run_id.in_(run_ids), t.events.c.kind == "retry_not_started"
    )
    return {r[0] for r in conn.execute(query)}


def _status(row: dict[str, Any], state_of: StateOf | None) -> str:
    if row["status"] == "cancelled":
        return "cancelled"  # terminal in the ledger, whatever Airflow's DagRun says
    state = state_of(row["dag_id"], str(row["run_id"]).split("/", 1)[-1]) if state_of else None
    if state is None:
        return str(row["status"])
    return _STATUS_OF_STATE.get(state, "failed")
