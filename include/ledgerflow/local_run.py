"""The process behind ``ledgerflow run``: one DagRun of one workflow, here (``dag.test()``).

``ledgerflow.cli_local`` starts it with an environment that points Airflow (metadata
database, dags folder, home) and the ledger at a throwaway folder, and one JSON argument:
``dag_file`` (the two-line DAG file), ``params``, ``decisions`` (approval step id ->
``approve`` | ``reject``), ``events`` (event step id -> the payload to deliver), ``template`` (a migrated metadata database to keep for the next
run) and ``result`` (where the outcome is written as JSON)."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

DECIDED_BY = "ledgerflow-run"


def _prepare_metadata(template: Path) -> None:
    """A migrated Airflow metadata database: copied from ``template`` by the parent when it
    exists; else created here (``initdb``) and kept as the template for the next run."""
    db = Path(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///"))
    if db.exists():
        return
    from airflow.utils import db as airflow_db

    airflow_db.initdb()
    template.parent.mkdir(parents=True, exist_ok=True)
    partial = template.with_suffix(f".{os.getpid()}.partial")
    # SQLite's backup, not a file copy: the database may still be in its write-ahead log
    with sqlite3.connect(db) as source, sqlite3.connect(partial) as copy:
        source.backup(copy)
    partial.replace(template)


def _decider(
    ledger: Any, decisions: dict[str, str], stop: threading.Event, events: dict[str, Any]
) -> None:
    """Decide the run's approvals as asked (``--decide STEP=approve``) and deliver its
    events (``--event STEP=JSON``); an approval or event nobody asked for ends the run:
    ``dag.test()`` would otherwise wait until its deadline."""
    from ledgerflow.ledger import approvals

    while not stop.wait(0.2):
        _deliver_events(ledger, events)
        for approval in approvals.listing(ledger, status="pending"):
            step_id = approval.step_key.split("[")[0]
            choice = decisions.get(step_id)
            if choice is None:
                print(
                    f"ledgerflow run: step {step_id} waits for an approval; say what to "
                    f"decide with --decide {step_id}=approve (or =reject)",
                    file=sys.stderr,
                )
                os._exit(3)
            approvals.decide(
                ledger,
                approval.id,
                decision="approved" if choice == "approve" else "rejected",
                by=DECIDED_BY,
                comment="decided by `ledgerflow run --decide`",
                seen_hash=approval.payload_hash,
                settle=True,  # for the whole quorum: one local user stands for everyone
            )


def _deliver_events(ledger: Any, events: dict[str, Any]) -> None:
    from ledgerflow.errors import EventPayloadInvalid
    from ledgerflow.ledger import event_waits

    for wait in event_waits.waiting(ledger):
        if wait.step_key not in events:
            print(
                f"ledgerflow run: step {wait.step_key} waits for event {wait.name} (key "
                f"{wait.key!r}); give its payload with --event {wait.step_key}='<JSON>'",
                file=sys.stderr,
            )
            os._exit(3)
        try:
            event_waits.deliver(
                ledger,
                name=wait.name,
                key=wait.key,
                event_id=f"{DECIDED_BY}:{wait.run_id}:{wait.step_key}",
                payload=events[wait.step_key],
                source="local",
                by=DECIDED_BY,
            )
        except EventPayloadInvalid as exc:
            print(f"ledgerflow run: --event {wait.step_key}: {exc}", file=sys.stderr)
            os._exit(3)


def main(request: dict[str, Any]) -> int:
    _prepare_metadata(Path(request["template"]))
    from ledgerflow import dag_for_spec_file
    from ledgerflow.factory import _finish_run
    from ledgerflow.ledger.runview import run_document
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger.from_airflow()
    ledger.migrate()
    dag = dag_for_spec_file(request["dag_file"])
    stop = threading.Event()
    decider = threading.Thread(
        target=_decider,
        args=(ledger, request["decisions"], stop, request.get("events") or {}),
        daemon=True,
    )
    decider.start()
    # The run's outcome in the ledger is written here, once the run has ended, as the
    # deployment's failure callback and scheduler listener would (factory._finish_run):
    # inside dag.test() Airflow 3.3.2 builds a callback's context by validating the params
    # again without the run's conf, which fails for a required param without a default
    # ("No value passed and Param has no default value") and ends dag.test().
    dag.on_failure_callback = None
    dag.has_on_failure_callback = False
    started = time.monotonic()
    try:
        dag_run = dag.test(run_conf=request["params"] or None)
    finally:
        stop.set()
    state = str(getattr(dag_run.state, "value", dag_run.state))
    if state in ("success", "failed"):
        _finish_run({"dag": dag, "dag_run": dag_run, "run_id": dag_run.run_id, "reason": state})
    run_id = f"{dag.dag_id}/{dag_run.run_id}"
    result = {
        "dag_id": dag.dag_id,
        "run_id": run_id,
        "state": state,
        "seconds": time.monotonic() - started,
        "view": run_document(ledger, run_id),
    }
    Path(request["result"]).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
