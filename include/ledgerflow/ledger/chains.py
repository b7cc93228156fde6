"""Retry chains: which completed step of which earlier run a retry run may reuse.

A retry run links to the run it retries (``lf_runs.retry_of``, written by
``retries.start_retry`` before Airflow creates the run; nothing in a DagRun's conf can
claim it), which may itself be a retry: the retry chain is that series of runs. A step of a retry run
reuses the newest completed checkpoint of the same step in its retry chain, except

* a step the retry re-runs on purpose (``--from STEP``: that step and everything
  downstream of it), in this run or in any run between this one and the checkpoint's
  (a run that re-ran a step declared the older results stale);
* a step whose effect the saga undid (the checkpoint is ``compensated``, or
  ``lf_compensations`` says ``completed``): its output describes something that no longer
  exists; only a ``completed`` checkpoint is ever reused;
* a step whose inputs changed: the retry's rendered args differ from the args the
  checkpoint recorded (a retry that overrides params). The run's own identity is not an
  input: a run id of the chain inside an argument (``{{ run.id }}``) is compared as
  ``<run>``;
* a checkpoint of a run of another workflow or DAG: a chain never crosses workflows,
  whatever the rows say.

Reusing copies the checkpoint into the retry run (attempts 0, the source's idempotency
key, args and output) with a ``checkpoint_reused_from`` event naming the source run, so
the retry run's own rows are complete: templates, compensations, the next retry's inputs
check and ``ledgerflow show`` read them like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, select

from ledgerflow.ledger import schema as t
from ledgerflow.ledger.store import Checkpoint, Ledger, _checkpoint, dumps, loads, now
from ledgerflow.lifecycle import CompensationStatus, StepStatus
from ledgerflow.spec.models import WorkflowSpec

# A retry chain longer than this is a loop in the data, not a history of retries.
MAX_DEPTH = 1000


def rerun_steps(spec: WorkflowSpec, from_step: str | None) -> set[str]:
    """``from_step`` and every step downstream of it (through ``needs``)."""
    if from_step is None:
        return set()
    chosen = {from_step}
    changed = True
    while changed:
        changed = False
        for step in spec.steps:
            if step.id not in chosen and chosen.intersection(step.needs):
                chosen.add(step.id)
                changed = True
    return chosen


def chain(ledger: Ledger, run_id: str, conn: Connection | None = None) -> list[dict[str, Any]]:
    """The run and the runs it retries, newest first, as the ledger's rows link them.

    Stops at a run not in the ledger and at a run of another DAG: a retry chain never
    crosses workflows, whatever a row says."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    current: str | None = run_id
    with ledger._read(conn) as conn:
        while current is not None and current not in seen and len(found) < MAX_DEPTH:
            seen.add(current)
            row = conn.execute(select(t.runs).where(t.runs.c.run_id == current)).mappings().first()
            if row is None or (found and row["dag_id"] != found[0]["dag_id"]):
                break
            found.append(dict(row))
            current = row["retry_of"]
    return found


def descendants(
    ledger: Ledger, run_id: str, conn: Connection | None = None
) -> list[dict[str, Any]]:
    """Every retry of the run, of its retries, and so on (breadth first, each level
    oldest first)."""
    out: list[dict[str, Any]] = []
    queue = [run_id]
    seen = {run_id}
    with ledger._read(conn) as conn:
        while queue and len(out) < MAX_DEPTH:
            query = (
                select(t.runs)
                .where(t.runs.c.retry_of == queue.pop(0))
                .order_by(t.runs.c.created_at, t.runs.c.run_id)
            )
            for row in conn.execute(query).mappings():
                if row["run_id"] not in seen:
                    seen.add(row["run_id"])
                    out.append(dict(row))
                    queue.append(row["run_id"])
    return out


def family(ledger: Ledger, run_id: str, conn: Connection | None = None) -> list[dict[str, Any]]:
    """The whole retry chain ``run_id`` belongs to: its oldest ancestor and every run
    descending from it through ``retry_of`` (the run's own ancestors and all their
    retries), oldest first. Runs of another DAG are not part of it."""
    with ledger._read(conn) as conn:
        ancestors = chain(ledger, run_id, conn)
        if not ancestors:
            return []
        root = ancestors[-1]
        members = [root] + [
            r for r in descendants(ledger, root["run_id"], conn) if r["dag_id"] == root["dag_id"]
        ]
    return sorted(members, key=lambda r: (_stamp(r["created_at"]), r["run_id"]))


def _stamp(value: Any) -> str:
    # SQLite hands back naive datetimes, Postgres aware ones: order by the ISO text.
    return "" if value is None else value.replace(tzinfo=None).isoformat()


def same_inputs(recorded: Any, given: Any, identities: Iterable[str] = ()) -> bool:
    """Whether a step's args ``given`` now are the args ``recorded`` by its checkpoint,
    both as the ledger stores them (JSON), each run id of ``identities`` inside a string
    counted as the same run (a run's identity is not an input of its steps)."""
    recorded, given = loads(dumps(recorded)), loads(dumps(given))
    if recorded == given:
        return True
    names = sorted(set(identities), key=len, reverse=True)
    return bool(names) and _masked(recorded, names) == _masked(given, names)


def _masked(value: Any, names: list[str]) -> Any:
    if isinstance(value, str):
        for name in names:
            value = value.replace(name, "<run>")
        return value
    if isinstance(value, dict):
        return {k: _masked(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, names) for v in value]
    return value


def find_reusable(
    conn: Connection,
    spec: WorkflowSpec,
    *,
    retry_of: str,
    retry_from: str | None,
    step_key: str,
    step_id: str,
    args: Any = None,
) -> Checkpoint | None:
    """The completed checkpoint a run retrying ``retry_of`` may reuse for ``step_key``.

    ``args``: the step's rendered args in the retrying run (None: not known yet); when
    both they and the checkpoint's recorded args are known, they must match
    (``same_inputs``). Only runs of ``spec``'s workflow and DAG, reached through the
    ledger's ``retry_of`` links, are searched."""
    if step_id in rerun_steps(spec, retry_from):
        return None
    current: str | None = retry_of
    seen: list[str] = []
    while current is not None and current not in seen and len(seen) < MAX_DEPTH:
        run = conn.execute(
            select(
                t.runs.c.workflow, t.runs.c.dag_id, t.runs.c.retry_of, t.runs.c.retry_from
            ).where(t.runs.c.run_id == current)
        ).first()
        if run is None or run.workflow != spec.name or run.dag_id != spec.dag_id:
            return None
        seen.append(current)
        row = (
            conn.execute(
                select(t.steps).where(t.steps.c.run_id == current, t.steps.c.step_key == step_key)
            )
            .mappings()
            .first()
        )
        if row is not None and row["status"] == StepStatus.COMPLETED.value:
            undone = conn.execute(
                select(t.compensations.c.status).where(
                    t.compensations.c.run_id == current,
                    t.compensations.c.step_key == step_key,
                    t.compensations.c.status == CompensationStatus.COMPLETED.value,
                )
            ).first()
            if undone is not None:
                return None
            if args is not None and row["args"] is not None:
                recorded = loads(row["args"])
                if not same_inputs(recorded, args, _identities(conn, retry_of)):
                    return None
            return _checkpoint(row)
        if row is not None and row["status"] == StepStatus.COMPENSATED.value:
            return None
        if step_id in rerun_steps(spec, run.retry_from):
            return None
        current = run.retry_of
    return None


def _identities(conn: Connection, run_id: str) -> set[str]:
    """The run ids of ``run_id``'s chain and of every run retrying one of them (the
    retrying run among them): what ``{{ run.id }}`` rendered to in that chain."""
    ids: set[str] = set()
    current: str | None = run_id
    while current is not None and current not in ids and len(ids) < MAX_DEPTH:
        ids.add(current)
        current = conn.execute(select(t.runs.c.retry_of).where(t.runs.c.run_id == current)).scalar()
    retries = conn.execute(select(t.runs.c.run_id).where(t.runs.c.retry_of.in_(sorted(ids))))
    return ids | {r[0] for r in retries}


def adopt(ledger: Ledger, conn: Connection, run_id: str, source: Checkpoint) -> Checkpoint:
    """Copy a completed checkpoint of an earlier run into ``run_id`` (its args included,
    so the next retry of this run compares inputs with them), with its event."""
    stamp = now()
    args = conn.execute(
        select(t.steps.c.args).where(
            t.steps.c.run_id == source.run_id, t.steps.c.step_key == source.step_key
        )
    ).scalar()
    conn.execute(
        ledger._insert(t.steps)
        .values(
            run_id=run_id,
            step_key=source.step_key,
            step_id=source.step_id,
            map_index=source.map_index,
            status=StepStatus.COMPLETED.value,
            attempts=0,
            idempotency_key=source.idempotency_key,
            args=args,
            output=dumps(source.output),
            started_at=stamp,
            completed_at=stamp,
        )
        .on_conflict_do_nothing()
    )
    ledger._event(
        conn,
        run_id,
        source.step_key,
        "checkpoint_reused_from",
        {"run_id": source.run_id, "idempotency_key": source.idempotency_key},
    )
    return Checkpoint(
        run_id=run_id,
        step_key=source.step_key,
        step_id=source.step_id,
        map_index=source.map_index,
        status=StepStatus.COMPLETED.value,
        attempts=0,
        idempotency_key=source.idempotency_key,
        output=source.output,
        error=None,
        reused_from=source.run_id,
    )
