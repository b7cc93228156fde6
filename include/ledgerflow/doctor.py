"""``ledgerflow doctor``: where the ledger and Airflow disagree, why, and the safe repairs.

Airflow is the truth about what runs; the ledger is the truth about what was done. The
doctor reads every ledger record that is still open (a run ``running``, an attempt
``running``, a step ``running``/``retrying``, a saga ``compensating``, an effect
``pending``, an approval ``pending``), asks Airflow about their DagRuns and
TaskInstances (``doctor_airflow``), and lists each record that nothing will ever move
on, with its cause:

- ``run_ended`` / ``run_missing``: a ledger run still open whose DagRun ended (its end
  never reached the ledger: the scheduler's listener or the DAG's failure callback could
  not write it) or no longer exists. Fix: the run ends as Airflow says
  (``failed`` when Airflow no longer knows it: never a success it did not see).
- ``attempt_lost``: an attempt still running with no live task: its DagRun ended, its
  TaskInstance is not running/queued/deferred, its try number moved on, or its process
  (on this host) is gone. Fix: the attempt is ``lost``.
- ``step_stranded``: a step still ``running``/``retrying`` in a run that ended. Fix:
  ``failed`` (unless Airflow says the run succeeded: then a person looks).
- ``saga_stuck``: a saga ``compensating`` whose DagRun ended: its compensation tasks will
  not run again. Fix: compensations left running are ``failed``; the saga ends by its own
  rule, or ``compensation_failed`` when a completed step that declares a compensation
  has no compensation record (it may not have been undone: the manual action names it).
- ``effect_unfinished``: an effect claimed (``pending``) in a run that ended, with no
  running attempt under its key. Never changed: whether the remote side performed it is
  unknown. The documented rule stands: the next attempt under the same key (a retry run,
  a cleared task) calls the tool again with the SAME key, and the remote side
  de-duplicates. The manual action says so.
- ``approval_stranded``: an approval ``pending`` whose run ended. Fix: ``abandoned``.
- ``unknown_dag``: open records of a DAG that this Airflow does not know: nothing is
  repaired (is it the Airflow the ledger belongs to?).

A DagRun that ended less than ``grace`` ago is left alone: its callback may still be
writing. Statuses are read from the lifecycle machines, not listed here: a run status
that ends a run (``succeeded``, ``failed``, any added later) is simply not open.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from ledgerflow.doctor_airflow import (
    CHUNK,
    DAG_RUN_ENDED,
    TASK_LIVE,
    AirflowFacts,
    DagRunFact,
    RunKey,
)
from ledgerflow.ledger import repairs
from ledgerflow.ledger._engine import now
from ledgerflow.ledger.open_records import RUN_OPEN, not_undone, open_records
from ledgerflow.ledger.store import Ledger
from ledgerflow.lifecycle import (
    RunStatus,
    SagaStatus,
)

CAUSES = {
    "run_ended": "a ledger run still open whose DagRun ended",
    "run_missing": "a ledger run still open whose DagRun no longer exists",
    "attempt_lost": "an attempt still running with no live task",
    "step_stranded": "a step still running or retrying in a run that ended",
    "saga_stuck": "a saga compensating that nothing will finish",
    "effect_unfinished": "an effect claimed but never finished, its attempt gone",
    "approval_stranded": "an approval pending whose run ended",
    "unknown_dag": "open records of a DAG this Airflow does not know",
}
# The order repairs are made in: what is inside a run before the run itself.
REPAIR_ORDER = ("attempt_lost", "step_stranded", "saga_stuck", "approval_stranded", "run_ended")

_STATUS_OF_DAG_RUN = {"success": RunStatus.SUCCEEDED.value, "failed": RunStatus.FAILED.value}
_HOST = socket.gethostname()


@dataclass
class Finding:
    cause: str
    run_id: str
    subject: str  # what record: the run, "step attempt #id", the effect's key...
    why: str
    fix: str | None  # what --fix does; None: a person must act
    manual: str | None = None
    workflow: str = ""
    # found | repaired | unchanged (it moved on meanwhile: nothing to do) | manual
    status: str = "found"
    # what the repair needs (not shown)
    ref: dict[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("ref")
        return data


@dataclass
class Report:
    findings: list[Finding]
    scanned: dict[str, int]
    fixed: bool = False

    @property
    def orphaned_runs(self) -> int:
        """Runs with at least one disagreement (the ``orphaned_runs`` gauge)."""
        return len({f.run_id for f in self.findings if f.cause != "unknown_dag"})

    @property
    def needs_person(self) -> list[Finding]:
        """What is left after this report: found (not fixed) or needing a person."""
        return [f for f in self.findings if f.status not in ("repaired", "unchanged")]

    def as_dict(self) -> dict[str, Any]:
        return {
            "fixed": self.fixed,
            "scanned": self.scanned,
            "orphaned_runs": self.orphaned_runs,
            "findings": [f.as_dict() for f in self.findings],
            "counts": {c: sum(1 for f in self.findings if f.cause == c) for c in CAUSES},
            "repaired": sum(1 for f in self.findings if f.status == "repaired"),
            "needs_person": len(self.needs_person),
        }


Progress = Callable[[int, int], None]


def examine(
    ledger: Ledger,
    airflow: AirflowFacts,
    *,
    grace: timedelta,
    dags_folder: str | Path | None = None,
    progress: Progress | None = None,
) -> Report:
    """Every disagreement between the ledger's open records and Airflow (nothing written)."""
    open_ = open_records(ledger)
    runs = open_["runs"]
    keys = {rid: _airflow_key(r["dag_id"], rid) for rid, r in runs.items()}
    known = airflow.known_dags({r["dag_id"] for r in runs.values()})
    dag_runs: dict[RunKey, DagRunFact] = {}
    ordered = sorted(keys.values())
    for i in range(0, len(ordered), CHUNK):
        dag_runs.update(airflow.dag_runs(ordered[i : i + CHUNK]))
        if progress is not None:
            progress(min(i + CHUNK, len(ordered)), len(ordered))
    with_attempts = sorted({keys[a["run_id"]] for a in open_["attempts"] if a["run_id"] in keys})
    tasks = airflow.task_instances(with_attempts) if with_attempts else {}
    current = now()
    specs = _Specs(dags_folder)

    def ended(run_id: str) -> tuple[bool, str]:
        """(the run ended in Airflow longer than ``grace`` ago, its state)."""
        run = runs.get(run_id)
        if run is None or run["dag_id"] not in known:
            return False, "unknown"
        fact = dag_runs.get(keys[run_id])
        if fact is None:
            since = run["updated_at"]
            return _aware(since) <= current - grace, "missing"
        if fact.state not in DAG_RUN_ENDED:
            return False, fact.state
        return _aware(fact.end_date or run["updated_at"]) <= current - grace, fact.state

    findings: list[Finding] = []
    for dag_id in sorted({r["dag_id"] for r in runs.values()} - known):
        ids = sorted(rid for rid, r in runs.items() if r["dag_id"] == dag_id)
        findings.append(
            Finding(
                "unknown_dag",
                ids[0],
                f"DAG {dag_id} ({len(ids)} run(s))",
                f"Airflow has no DAG {dag_id!r}",
                None,
                manual="check that AIRFLOW_HOME / [database] points at the Airflow this "
                "ledger belongs to, or that the DAG's file is in its dags folder",
                workflow=runs[ids[0]]["workflow"],
            )
        )

    lost_attempts: set[int] = set()
    for a in open_["attempts"]:
        run = runs.get(a["run_id"])
        if run is None:
            continue
        why = _attempt_gone(
            a, run, ended(a["run_id"]), tasks.get(keys[a["run_id"]], []), specs, current - grace
        )
        if why is None:
            continue
        lost_attempts.add(a["id"])
        findings.append(
            Finding(
                "attempt_lost",
                a["run_id"],
                f"{a['step_key']} attempt #{a['id']} (try {a['try_number']})",
                why,
                "attempt -> lost",
                workflow=run["workflow"],
                ref={"step_key": a["step_key"], "attempt_id": a["id"]},
            )
        )

    for s in open_["steps"]:
        gone, state = ended(s["run_id"])
        if not gone:
            continue
        run = runs[s["run_id"]]
        succeeded = state == "success"
        findings.append(
            Finding(
                "step_stranded",
                s["run_id"],
                f"{s['step_key']} ({s['status']})",
                f"its DagRun is {state}; the step is still {s['status']}",
                None if succeeded else "step -> failed",
                manual="Airflow says the run succeeded but the ledger never saw this step "
                "end: read its task's log, then mark it by hand"
                if succeeded
                else None,
                workflow=run["workflow"],
                ref={"step_key": s["step_key"]},
            )
        )

    for run_id, run in sorted(runs.items()):
        gone, state = ended(run_id)
        if not gone:
            continue
        if run["saga"] == SagaStatus.COMPENSATING.value:
            left = not_undone(ledger, run_id, specs.get(run["workflow"], run["version"]))
            findings.append(
                Finding(
                    "saga_stuck",
                    run_id,
                    f"saga of {run_id}",
                    f"its DagRun is {state}: no compensation task will run again",
                    "saga -> compensation_failed" if left else "saga -> its outcome",
                    manual=f"may not have been undone: {', '.join(left)}: undo by hand, or clear "
                    f"its compensate__* and saga__finish tasks in Airflow"
                    if left
                    else None,
                    workflow=run["workflow"],
                    ref={"left": left},
                )
            )
        if run["status"] in RUN_OPEN:
            target = _STATUS_OF_DAG_RUN.get(state, RunStatus.FAILED.value)
            missing = state == "missing"
            findings.append(
                Finding(
                    "run_missing" if missing else "run_ended",
                    run_id,
                    run_id,
                    "its DagRun no longer exists" if missing else f"its DagRun is {state}",
                    f"run -> {target}",
                    workflow=run["workflow"],
                    ref={"target": target},
                )
            )

    live_keys = {a["idempotency_key"] for a in open_["attempts"] if a["id"] not in lost_attempts}
    for e in open_["effects"]:
        if e["idempotency_key"] in live_keys:
            continue
        gone, state = ended(e["run_id"])
        if not gone:
            continue
        findings.append(
            Finding(
                "effect_unfinished",
                e["run_id"],
                f"{e['tool']} under {e['idempotency_key']}",
                f"claimed by {e['step_key']}, never finished; its DagRun is {state}",
                None,
                manual="unknown whether the call took effect: check it with the remote side; "
                f"`ledgerflow retry {e['run_id']}` calls it again with the same key (the "
                "remote side de-duplicates)",
                workflow=runs[e["run_id"]]["workflow"] if e["run_id"] in runs else "",
            )
        )

    for p in open_["approvals"]:
        gone, state = ended(p["run_id"])
        if not gone:
            continue
        findings.append(
            Finding(
                "approval_stranded",
                p["run_id"],
                f"approval {p['id']} ({p['step_key']})",
                f"its DagRun is {state}: the task can no longer resume",
                "approval -> abandoned",
                workflow=p["workflow"],
            )
        )
    scanned = {name: len(rows) for name, rows in open_.items()}
    return Report(findings, scanned)


def repair(
    ledger: Ledger, report: Report, *, by: str, dags_folder: str | Path | None = None
) -> Report:
    """Make every safe repair of ``report`` (each recorded with a ``doctor_repaired``
    event); the rest is marked ``manual``. A record that moved on meanwhile is left."""
    specs = _Specs(dags_folder)
    order = {c: i for i, c in enumerate(REPAIR_ORDER)}
    abandoned: set[str] = set()
    for f in sorted(report.findings, key=lambda f: order.get(_kind(f.cause), len(order))):
        if f.fix is None:
            f.status = "manual"
            continue
        why = f"{CAUSES[f.cause]}: {f.why}"
        done: bool | int | str | None
        if f.cause == "attempt_lost":
            done = repairs.lose_attempt(
                ledger, f.run_id, f.ref["step_key"], f.ref["attempt_id"], why=why, by=by
            )
        elif f.cause == "step_stranded":
            done = repairs.fail_step(ledger, f.run_id, f.ref["step_key"], why=why, by=by)
        elif f.cause == "saga_stuck":
            done = repairs.end_saga(ledger, f.run_id, unfinished=f.ref["left"], why=why, by=by)
            if done == SagaStatus.COMPENSATION_FAILED.value:
                f.status = "repaired"
                continue  # repaired, and its manual action stands
        elif f.cause == "approval_stranded":
            if f.run_id in abandoned:
                done = True  # the run's approvals went together
            else:
                done = repairs.abandon_approvals(ledger, f.run_id, why=f.why, by=by)
                abandoned.add(f.run_id)
        else:  # run_ended / run_missing
            done = repairs.end_run(ledger, f.run_id, f.ref["target"], why=why, by=by)
            if done and f.ref["target"] == RunStatus.FAILED.value:
                _end_saga_without_compensations(ledger, f.run_id, f.workflow, specs)
        f.status = "repaired" if done else "unchanged"
        if f.status == "repaired" and f.cause != "saga_stuck":
            f.manual = None
    report.fixed = True
    return report


def _kind(cause: str) -> str:
    return "run_ended" if cause == "run_missing" else cause


def _end_saga_without_compensations(
    ledger: Ledger, run_id: str, workflow: str, specs: _Specs
) -> None:
    """What the DAG's callback does for a failed run of a workflow with nothing to undo:
    its saga ends at once (``nothing_to_compensate``)."""
    from ledgerflow.steps.saga import has_compensations

    run = ledger.run(run_id) or {}
    spec = specs.get(workflow, int(run.get("version") or 0))
    if spec is None or has_compensations(spec) or run.get("saga") is not None:
        return
    ledger.start_saga(run_id, run.get("failed_step"))
    ledger.finish_saga(run_id)


def _attempt_gone(
    a: dict[str, Any],
    run: dict[str, Any],
    run_ended: tuple[bool, str],
    tasks: list[Any],
    specs: _Specs,
    cutoff: datetime,
) -> str | None:
    """Why a running attempt has no live task (None: it may still report)."""
    gone, state = run_ended
    if gone:
        return "its DagRun no longer exists" if state == "missing" else f"its DagRun is {state}"
    if state in ("unknown", "missing"):
        return None  # unknown DAG, or a missing DagRun within the grace
    step_id = a["step_id"] or a["step_key"].split("[")[0]
    spec = specs.get(run["workflow"], run["version"])
    task_id = step_id
    if spec is not None:
        from ledgerflow.workflow.segments import task_of

        task_id = task_of(spec, step_id)
    own = task_id == step_id
    map_index = (a["map_index"] if a["map_index"] is not None else -1) if own else -1
    ti = next((x for x in tasks if x.task_id == task_id and x.map_index == map_index), None)
    started = _aware(a["started_at"])
    if ti is None:
        return f"its DagRun has no task {task_id}" if started <= cutoff else None
    if ti.state not in TASK_LIVE:
        ended_at = _aware(ti.end_date) if ti.end_date else started
        return f"its task {task_id} is {ti.state}" if ended_at <= cutoff else None
    if own and ti.try_number > a["try_number"]:
        return f"its task {task_id} moved on to try {ti.try_number}"
    # Only a task that runs has a process: a deferred one (an approval waiting) has none.
    if ti.state == "running" and a["hostname"] == _HOST and a["pid"] and not _alive(a["pid"]):
        return f"its process (pid {a['pid']} on {_HOST}) is gone; its task {task_id} is {ti.state}"
    return None


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _airflow_key(dag_id: str, run_id: str) -> RunKey:
    """The ledger's run id is ``<dag_id>/<Airflow's run id>``."""
    prefix = f"{dag_id}/"
    return dag_id, run_id[len(prefix) :] if run_id.startswith(prefix) else run_id


def _aware(value: datetime) -> datetime:
    from datetime import timezone

    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class _Specs:
    """Workflow specs by (name, version) from the dags folder; None when not loadable."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = folder
        self._cache: dict[tuple[str, int], Any] = {}

    def get(self, workflow: str, version: int) -> Any:
        key = (workflow, int(version))
        if key not in self._cache:
            from ledgerflow import settings
            from ledgerflow.workflow.validate import load_workflow

            try:
                self._cache[key] = load_workflow(
                    settings.workflow_file(workflow, version, self.folder)
                )
            except Exception:
                self._cache[key] = None
        return self._cache[key]


def who(via: str = "cli") -> str:
    import getpass

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"ledgerflow doctor ({via}, {user}@{_HOST})"


def run_doctor(
    ledger: Ledger,
    airflow: AirflowFacts,
    *,
    fix: bool,
    grace: timedelta,
    by: str,
    dags_folder: str | Path | None = None,
    progress: Progress | None = None,
) -> Report:
    report = examine(ledger, airflow, grace=grace, dags_folder=dags_folder, progress=progress)
    if fix:
        repair(ledger, report, by=by, dags_folder=dags_folder)
    return report


def summary(report: Report) -> Iterable[str]:
    counts = report.as_dict()["counts"]
    found = ", ".join(f"{n} {c}" for c, n in counts.items() if n) or "none"
    yield f"disagreements: {len(report.findings)} ({found}); orphaned runs: {report.orphaned_runs}"
    if report.fixed:
        repaired = sum(1 for f in report.findings if f.status == "repaired")
        yield f"repaired: {repaired}; left for a person: {len(report.needs_person)}"
