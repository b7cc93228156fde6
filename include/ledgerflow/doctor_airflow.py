"""What ``ledgerflow doctor`` reads from Airflow: DagRuns and TaskInstances, through
Airflow's own models and session (the metadata database ``AIRFLOW_HOME`` configures),
in bulk (one query per DAG and chunk of runs).

``AirflowFacts`` is the one interface the doctor uses; ``MetadataFacts`` reads it from
Airflow's metadata database (the CLI); ``TaskSdkFacts`` through the Task SDK's execution
API, inside an Airflow task, where Airflow 3 blocks the ORM (the maintenance DAG). The
execution API tells neither a DagRun's end date nor a task's try number: there, the grace
counts from the ledger's last write and a moved-on try is not detected. An Airflow that cannot be reached raises
``AirflowUnreachable``: the doctor must never take "cannot see it" for "it is gone".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from ledgerflow.errors import AirflowUnreachable

CHUNK = 500

# Airflow's finished DagRun states (``State.finished_dr_states``).
DAG_RUN_ENDED = frozenset({"success", "failed"})
# TaskInstance states in which the try that started is still alive (or parked: deferred,
# waiting for a person, rescheduled), so an attempt of that try may still report.
TASK_LIVE = frozenset(
    {
        "scheduled",
        "queued",
        "running",
        "restarting",
        "deferred",
        "awaiting_input",
        "up_for_reschedule",
    }
)


@dataclass(frozen=True)
class DagRunFact:
    state: str
    end_date: datetime | None


@dataclass(frozen=True)
class TaskFact:
    task_id: str
    map_index: int
    state: str | None
    try_number: int
    end_date: datetime | None


RunKey = tuple[str, str]  # (dag_id, Airflow's run_id)


class AirflowFacts(Protocol):
    def known_dags(self, dag_ids: Iterable[str]) -> set[str]: ...

    def dag_runs(self, keys: Iterable[RunKey]) -> dict[RunKey, DagRunFact]: ...

    def task_instances(self, keys: Iterable[RunKey]) -> dict[RunKey, list[TaskFact]]: ...


def _text(state: object) -> str | None:
    return None if state is None else str(getattr(state, "value", state))


def _by_dag(keys: Iterable[RunKey]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for dag_id, run_id in sorted(set(keys)):
        grouped.setdefault(dag_id, []).append(run_id)
    return grouped


class MetadataFacts:
    """Airflow's metadata database, read through its models (``create_session``)."""

    def _rows(
        self, build: Callable[[str, list[str]], Any], grouped: dict[str, list[str]]
    ) -> list[Any]:
        try:
            from airflow.utils.session import create_session

            rows: list[Any] = []
            with create_session() as session:
                for dag_id, run_ids in grouped.items():
                    for i in range(0, len(run_ids), CHUNK):
                        rows.extend(session.execute(build(dag_id, run_ids[i : i + CHUNK])))
            return rows
        except Exception as exc:  # any failure to read is "unknown", never "gone"
            raise AirflowUnreachable(f"cannot read Airflow's metadata database: {exc}") from exc

    def known_dags(self, dag_ids: Iterable[str]) -> set[str]:
        wanted = sorted(set(dag_ids))
        if not wanted:
            return set()
        try:
            from airflow.models.dag import DagModel
            from airflow.utils.session import create_session
            from sqlalchemy import select

            with create_session() as session:
                return set(
                    session.scalars(select(DagModel.dag_id).where(DagModel.dag_id.in_(wanted)))
                )
        except Exception as exc:
            raise AirflowUnreachable(f"cannot read Airflow's metadata database: {exc}") from exc

    def dag_runs(self, keys: Iterable[RunKey]) -> dict[RunKey, DagRunFact]:
        from airflow.models.dagrun import DagRun
        from sqlalchemy import select

        def build(dag_id: str, run_ids: list[str]) -> Any:
            return select(DagRun.dag_id, DagRun.run_id, DagRun.state, DagRun.end_date).where(
                DagRun.dag_id == dag_id, DagRun.run_id.in_(run_ids)
            )

        found: dict[RunKey, DagRunFact] = {}
        for dag_id, run_id, state, end_date in self._rows(build, _by_dag(keys)):
            found[(dag_id, run_id)] = DagRunFact(_text(state) or "", end_date)
        return found

    def task_instances(self, keys: Iterable[RunKey]) -> dict[RunKey, list[TaskFact]]:
        from airflow.models.taskinstance import TaskInstance as TI
        from sqlalchemy import select

        def build(dag_id: str, run_ids: list[str]) -> Any:
            return select(
                TI.dag_id, TI.run_id, TI.task_id, TI.map_index, TI.state, TI.try_number, TI.end_date
            ).where(TI.dag_id == dag_id, TI.run_id.in_(run_ids))

        found: dict[RunKey, list[TaskFact]] = {}
        for dag_id, run_id, task_id, map_index, state, tries, end in self._rows(
            build, _by_dag(keys)
        ):
            found.setdefault((dag_id, run_id), []).append(
                TaskFact(task_id, int(map_index), _text(state), int(tries or 0), end)
            )
        return found


class TaskSdkFacts:
    """Inside an Airflow task: DagRun and task states through the Task SDK (the
    supervisor asks the execution API), one DagRun at a time."""

    def _sdk(self) -> Any:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        return RuntimeTaskInstance

    def known_dags(self, dag_ids: Iterable[str]) -> set[str]:
        """The DAGs Airflow has (a 404 from the execution API: it has not)."""
        known: set[str] = set()
        for dag_id in sorted(set(dag_ids)):
            try:
                self._sdk().get_dag(dag_id)
            except Exception as exc:
                detail = getattr(getattr(exc, "error", None), "detail", None)
                if isinstance(detail, dict) and detail.get("status_code") == 404:
                    continue
                raise AirflowUnreachable(f"cannot ask Airflow's execution API: {exc}") from exc
            known.add(dag_id)
        return known

    def dag_runs(self, keys: Iterable[RunKey]) -> dict[RunKey, DagRunFact]:
        sdk = self._sdk()
        found: dict[RunKey, DagRunFact] = {}
        try:
            for dag_id, run_ids in _by_dag(keys).items():
                for run_id in run_ids:
                    if sdk.get_dr_count(dag_id=dag_id, run_ids=[run_id]):
                        state = _text(sdk.get_dagrun_state(dag_id=dag_id, run_id=run_id))
                        found[(dag_id, run_id)] = DagRunFact(state or "", None)
        except Exception as exc:
            raise AirflowUnreachable(f"cannot ask Airflow's execution API: {exc}") from exc
        return found

    def task_instances(self, keys: Iterable[RunKey]) -> dict[RunKey, list[TaskFact]]:
        import re

        sdk = self._sdk()
        found: dict[RunKey, list[TaskFact]] = {}
        try:
            for dag_id, run_ids in _by_dag(keys).items():
                for i in range(0, len(run_ids), CHUNK):
                    states = sdk.get_task_states(dag_id=dag_id, run_ids=run_ids[i : i + CHUNK])
                    for run_id, by_task in states.items():
                        facts = found.setdefault((dag_id, run_id), [])
                        for key, state in by_task.items():
                            # A mapped task's key is "<task_id>_<map_index>"; a task id may
                            # end so itself: both readings are kept.
                            facts.append(TaskFact(key, -1, _text(state), 0, None))
                            mapped = re.fullmatch(r"(.+)_(\d+)", key)
                            if mapped:
                                facts.append(
                                    TaskFact(mapped[1], int(mapped[2]), _text(state), 0, None)
                                )
        except Exception as exc:
            raise AirflowUnreachable(f"cannot ask Airflow's execution API: {exc}") from exc
        return found


def in_task() -> bool:
    """Whether this process is an Airflow task's (the Task SDK's supervisor is attached)."""
    try:
        from airflow.sdk.execution_time import task_runner
    except Exception:
        return False
    return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None
