"""Start a run of a workflow for a request: Ledgerflow's REST trigger and its webhooks.

Runs in the api-server (``ledgerflow.api._triggers``). It finds the workflow's versions
among Airflow's DAGs (tagged ``workflow:<name>``), takes the latest unless a version is
named, checks the params against that version's params schema (``spec.params``), and
creates the DagRun through Airflow's own Python API, as Airflow's public
``POST /api/v2/dags/{dag_id}/dagRuns`` does: the serialized DAG's ``create_dagrun`` with
run type ``manual``, state ``queued``, triggered by ``rest_api``. The scheduler takes it
like any manual run; the first task registers it in the ledger.

Idempotency: a request with a key gets an Airflow run id derived from the workflow and
the key (``key__<sha256>``), so Airflow's unique ``(dag_id, run_id)`` on ``dag_run``
decides which of several concurrent requests creates the run, and the rest find it.
Not a table in the ledger: the ledger and Airflow's metadata are two databases, so a key
row and its DagRun would commit separately and a crash between the two commits leaves a
key without a run (or a run without its key) to repair; with the run id, the run and its
key are one row, created atomically or not at all. On Postgres a transaction-scoped
advisory lock on the key also serializes same-key requests across the workflow's
versions (uniqueness itself is per DAG: without the lock, a new version published between
two requests could take a second run). The key lives as long as the DagRun does.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ledgerflow.errors import LedgerflowError, TriggerRefused
from ledgerflow.spec.params import ENGINE_PREFIX, check_params

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from ledgerflow.ledger.store import Ledger
    from ledgerflow.spec.models import WorkflowSpec

KEY_PATTERN = r"^[\x21-\x7e]{1,200}$"
"""An idempotency key or delivery id: 1-200 printable ASCII characters, no spaces."""
_DAG_VERSION = re.compile(r"^(?P<base>.+)__v(?P<version>[1-9][0-9]*)$")


@dataclass(frozen=True)
class Launched:
    """The run a trigger request started (``created``) or found under its key."""

    workflow: str
    version: int
    dag_id: str
    run_id: str  # Airflow's run id
    created: bool
    idempotency_key: str | None = None

    @property
    def ledger_run_id(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dag_id": self.dag_id,
            "ledger_run_id": self.ledger_run_id,
            "workflow": self.workflow,
            "version": self.version,
            "created": self.created,
            "idempotency_key": self.idempotency_key,
            "links": {
                "run_page": f"/ledgerflow/runs/{self.ledger_run_id}",
                "grid": f"/dags/{self.dag_id}/runs/{self.run_id}",
            },
        }


def keyed_run_id(workflow: str, key: str) -> str:
    """The Airflow run id of the run started under ``key`` (the same for every version)."""
    digest = hashlib.sha256(f"ledgerflow-trigger\0{workflow}\0{key}".encode()).hexdigest()
    return f"key__{digest[:40]}"


# ---------------------------------------------------------------- workflow versions


@dataclass(frozen=True)
class _Version:
    version: int
    dag_id: str
    fileloc: str | None
    import_errors: bool = False


def workflow_versions(session: Session, name: str) -> dict[int, _Version]:
    """The workflow's versions Airflow knows (its DAGs tagged ``workflow:<name>``)."""
    from airflow.models.dag import DagModel, DagTag
    from sqlalchemy import select

    rows = session.execute(
        select(DagModel.dag_id, DagModel.fileloc, DagModel.has_import_errors)
        .join(DagTag, DagTag.dag_id == DagModel.dag_id)
        .where(DagTag.name == f"workflow:{name}", ~DagModel.is_stale)
    ).all()
    found: dict[int, _Version] = {}
    for dag_id, fileloc, import_errors in rows:
        match = _DAG_VERSION.match(dag_id)
        if match and match["base"] == name.replace("-", "_"):
            number = int(match["version"])
            found[number] = _Version(number, dag_id, fileloc, bool(import_errors))
    return found


_SPECS: dict[Path, tuple[tuple[int, int], WorkflowSpec]] = {}
_SPECS_LOCK = threading.Lock()


def _spec_file(name: str, version: _Version) -> Path:
    if version.fileloc:
        beside = Path(version.fileloc).with_suffix(".yaml")
        if beside.exists():
            return beside
    from ledgerflow.settings import workflow_file

    return workflow_file(name, version.version)


def load_spec(path: Path) -> WorkflowSpec:
    """The workflow file, parsed once per change of the file."""
    from ledgerflow.factory import display_path
    from ledgerflow.workflow.validate import load_workflow

    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _SPECS_LOCK:
        cached = _SPECS.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    spec = load_workflow(path, display_path=display_path(path))
    with _SPECS_LOCK:
        _SPECS[path] = (stamp, spec)
    return spec


def latest_spec(name: str) -> WorkflowSpec | None:
    """The latest version's spec of workflow ``name`` (None: Airflow has no such DAG)."""
    from airflow.utils.session import create_session

    with create_session() as session:
        versions = workflow_versions(session, name)
    if not versions:
        return None
    return load_spec(_spec_file(name, versions[max(versions)]))


def version_spec(name: str, version: int) -> WorkflowSpec | None:
    """The spec of version ``version`` of workflow ``name`` (None: Airflow has no such
    version)."""
    from airflow.utils.session import create_session

    with create_session() as session:
        found = workflow_versions(session, name).get(version)
    return None if found is None else load_spec(_spec_file(name, found))


# ---------------------------------------------------------------- starting a run

_DAG_BAG: Any = None
_DAG_BAG_LOCK = threading.Lock()


def _dag_bag() -> Any:
    """Serialized DAGs, cached as the api-server's own routes cache them."""
    global _DAG_BAG
    with _DAG_BAG_LOCK:
        if _DAG_BAG is None:
            from airflow.api_fastapi.common.dagbag import create_dag_bag

            _DAG_BAG = create_dag_bag()
        return _DAG_BAG


def _lock_key(session: Session, workflow: str, key: str) -> None:
    """Serialize requests with the same key (Postgres; elsewhere the unique run id does)."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return
    from sqlalchemy import func, select

    digest = hashlib.sha256(f"ledgerflow-trigger-lock\0{workflow}\0{key}".encode()).digest()
    session.execute(
        select(func.pg_advisory_xact_lock(int.from_bytes(digest[:8], "big", signed=True)))
    )


def _existing(
    session: Session, versions: Mapping[int, _Version], run_id: str
) -> tuple[_Version, dict[str, Any]] | None:
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    by_dag = {v.dag_id: v for v in versions.values()}
    if not by_dag:
        return None
    row = session.execute(
        select(DagRun.dag_id, DagRun.conf).where(
            DagRun.run_id == run_id, DagRun.dag_id.in_(list(by_dag))
        )
    ).first()
    if row is None:
        return None
    return by_dag[row[0]], dict(row[1] or {})


def _same_request(
    found: _Version, conf: Mapping[str, Any], params: Mapping[str, Any], version: int | None
) -> str | None:
    """Why a request with a used key is not the same request (None: it is)."""
    if version is not None and version != found.version:
        return f"it started a run of v{found.version}, this request asks for v{version}"
    stored = {k: v for k, v in conf.items() if not k.startswith(ENGINE_PREFIX)}
    if stored != dict(params):
        return "it started a run with other params"
    return None


def launch(
    name: str,
    params: Mapping[str, Any],
    *,
    idempotency_key: str | None = None,
    version: int | None = None,
    user: str | None,
    via: str,
    may_trigger: Callable[[str], bool] | None = None,
    ledger: Ledger | None = None,
) -> Launched:
    """Start a run of workflow ``name`` (or return the run started under the same key).

    ``via``: ``rest_api`` or ``webhook`` (recorded in the ledger's ``triggered`` event).
    ``may_trigger(dag_id)``: whether the caller may create runs of that DAG (403 if not).
    Raises TriggerRefused, or InvalidParams (422) naming each field that does not fit.
    """
    import pendulum
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType
    from sqlalchemy.exc import IntegrityError

    params = dict(params)
    run_id = keyed_run_id(name, idempotency_key) if idempotency_key is not None else None
    try:
        with create_session() as session:
            versions = workflow_versions(session, name)
            if not versions:
                raise TriggerRefused(f"no workflow {name!r} in Airflow", status=404)
            if version is not None and version not in versions:
                known = ", ".join(f"v{v}" for v in sorted(versions))
                raise TriggerRefused(f"{name} has no version {version} ({known})", status=404)
            if run_id is not None:
                assert idempotency_key is not None
                _lock_key(session, name, idempotency_key)
                found = _existing(session, versions, run_id)
                if found is not None:
                    return _found(
                        name, found, params, version, run_id, idempotency_key, may_trigger
                    )
            target = versions[version if version is not None else max(versions)]
            if may_trigger is not None and not may_trigger(target.dag_id):
                raise TriggerRefused(f"{user} may not trigger runs of {target.dag_id}", status=403)
            if target.import_errors:
                # As Airflow's own trigger route: the file no longer builds this DAG (e.g. a
                # published version was edited), so its last parsed form is not run.
                raise TriggerRefused(
                    f"{target.dag_id} has import errors and cannot be triggered", status=409
                )
            try:
                spec = load_spec(_spec_file(name, target))
            except (OSError, LedgerflowError) as exc:
                raise TriggerRefused(
                    f"{target.dag_id}: its workflow file cannot be read: {exc}", status=409
                ) from exc
            check_params(spec.name, spec.version, spec.params, params)
            dag = _dag_bag().get_latest_version_of_dag(target.dag_id, session=session)
            if dag is None:
                raise TriggerRefused(f"Airflow has no serialized DAG {target.dag_id}", status=404)
            run_after = pendulum.now("UTC")
            airflow_run_id = run_id or dag.timetable.generate_run_id(
                run_type=DagRunType.MANUAL, run_after=run_after, data_interval=None
            )
            try:
                dag_run = dag.create_dagrun(
                    run_id=airflow_run_id,
                    logical_date=None,
                    data_interval=None,
                    run_after=run_after,
                    conf=params,
                    run_type=DagRunType.MANUAL,
                    triggered_by=DagRunTriggeredByType.REST_API,
                    triggering_user_name=user,
                    state=DagRunState.QUEUED,
                    session=session,
                )
            except ValueError as exc:  # Airflow's own checks (ParamValidationError is one)
                raise TriggerRefused(str(exc), status=400) from exc
            assert isinstance(dag_run, DagRun)
            launched = Launched(
                name, target.version, target.dag_id, airflow_run_id, True, idempotency_key
            )
    except IntegrityError:
        # Another request created the run under this key between our lookup and insert.
        if run_id is None or idempotency_key is None:
            raise
        with create_session() as session:
            versions = workflow_versions(session, name)
            found = _existing(session, versions, run_id)
        if found is None:
            raise
        return _found(name, found, params, version, run_id, idempotency_key, may_trigger)
    if ledger is not None:
        _record_trigger(ledger, launched, via, user)
    return launched


def _record_trigger(ledger: Ledger, launched: Launched, via: str, user: str | None) -> None:
    """The ``triggered`` event, once the run is committed (the scheduler never waits for the
    ledger; a lost event loses who triggered it, not the run, which its first task
    registers)."""
    try:
        ledger.record_event(
            launched.ledger_run_id,
            None,
            "triggered",
            {"via": via, "by": user, "idempotency_key": launched.idempotency_key},
        )
    except Exception:
        import logging

        logging.getLogger(__name__).exception(
            "run %s started, but its triggered event is not in the ledger", launched.ledger_run_id
        )


def _found(
    name: str,
    found: tuple[_Version, dict[str, Any]],
    params: Mapping[str, Any],
    version: int | None,
    run_id: str,
    key: str,
    may_trigger: Callable[[str], bool] | None,
) -> Launched:
    existing, conf = found
    if may_trigger is not None and not may_trigger(existing.dag_id):
        raise TriggerRefused(f"you may not trigger runs of {existing.dag_id}", status=403)
    why = _same_request(existing, conf, params, version)
    if why is not None:
        raise TriggerRefused(
            f"idempotency key {key!r} was used before: {why} ({existing.dag_id}/{run_id})",
            status=409,
        )
    return Launched(name, existing.version, existing.dag_id, run_id, False, key)
