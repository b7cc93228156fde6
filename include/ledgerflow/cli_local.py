"""``ledgerflow new`` and ``ledgerflow run``: the author's loop before deploying.

``new NAME`` writes a workflow that runs as it is (its file, DAG file and lock);
``run FILE`` runs one workflow file once, in one process (Airflow's ``dag.test()``),
against a throwaway Airflow metadata database and ledger (both SQLite) and prints the
timeline of its steps. Nothing outside the throwaway folder is touched."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")

TEMPLATE = """\
{modeline}name: {name}
version: 1
description: TODO - say in one line what this workflow does and for whom.
owner: TODO-your-team
tags: [{name}]
params:
  who:
    type: string
    default: world
    description: Who is greeted (Airflow's Trigger form shows this line).
defaults:
  retry: {{max_attempts: 3, backoff: {{initial: 10s, multiplier: 2, max: 5m}}}}
  timeout: 10m
steps:
  # A SQL statement on the ledger's own database runs in the step's checkpoint
  # transaction: it happens exactly once, whatever crashes or retries.
  - id: greet
    description: Make the greeting.
    tool: sql
    idempotency: natural   # running it twice changes nothing (a tool with effects: a key)
    args:
      statement: "select 'hello, ' || :who as greeting"
      parameters: {{who: "{{{{ params.who }}}}"}}
      fetch: true
  - id: shout
    description: Pass the previous step's output on (steps.<id>.output).
    needs: [greet]
    tool: sql
    idempotency: natural
    args:
      statement: "select upper(:greeting) as greeting"
      parameters: {{greeting: "{{{{ steps.greet.output.rows[0].greeting }}}}"}}
      fetch: true
"""


def add_local_commands(sub: Any) -> None:
    """The ``new`` and ``run`` subcommands of ``ledgerflow`` (``sub``: its subparsers)."""
    from ledgerflow.cli_retry import add_dags_folder_option, add_param_option

    p = sub.add_parser(
        "new",
        help="write a new workflow that runs as it is: workflows/NAME/v1.yaml, its DAG file, its lock",
        description="Write DAGS_FOLDER/workflows/NAME/v1.yaml (two SQL steps on the ledger's "
        "database, a param with a description), the two-line DAG file v1.py and the lock "
        "v1.lock, then print how to run it here (`ledgerflow run`). Refused (exit 2) for a "
        "name that is not a workflow name or a folder that exists already.",
    )
    p.add_argument("name", help="the workflow's name: lower-case letters, digits, '_' and '-'")
    add_dags_folder_option(p)
    p.set_defaults(func=cmd_new)

    p = sub.add_parser(
        "run",
        help="run a workflow file once, here, in one process (Airflow's dag.test()); print the timeline",
        description="Run one workflow file once in this machine's Python (Airflow's dag.test(): "
        "no scheduler, no api-server) against a throwaway Airflow metadata database and a "
        "throwaway ledger (SQLite, in a temporary folder removed afterwards unless --keep). "
        "Steps are printed as they end, then the timeline. Exit 0 when the run succeeded, "
        "1 when it failed, 2 when it could not run (an invalid file or params: nothing ran). "
        "The first run prepares Airflow's metadata database once (about 30 s) and keeps it "
        "under ~/.cache/ledgerflow. Connections and variables come from the environment "
        "(AIRFLOW_CONN_*, AIRFLOW_VAR_*), except the ledger's, which is the throwaway one.",
    )
    p.add_argument("file", help="the workflow file (workflows/<name>/v<N>.yaml)")
    add_param_option(p, "a param of the run")
    p.add_argument(
        "--decide",
        action="append",
        type=parse_decision,
        metavar="STEP=approve|reject",
        help="decide approval step STEP when it asks (repeatable); a run that reaches an "
        "approval with no decision given stops there (exit 2)",
    )
    p.add_argument(
        "--event",
        action="append",
        type=parse_event,
        metavar="STEP=JSON",
        help="deliver this payload to event step STEP when it waits (repeatable); a run "
        "that reaches an event step with no payload given stops there (exit 2)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (ledger, logs)")
    p.add_argument("--workdir", help="use (and keep) this folder instead of a temporary one")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Airflow's log instead of writing it to a file",
    )
    p.set_defaults(func=cmd_run)


def parse_decision(text: str) -> tuple[str, str]:
    """``STEP=approve|reject`` of ``--decide``."""
    step, sep, choice = text.partition("=")
    if not sep or choice not in ("approve", "reject") or not step:
        raise argparse.ArgumentTypeError(f"expected STEP=approve or STEP=reject, got {text!r}")
    return step, choice


def parse_event(text: str) -> tuple[str, Any]:
    """``STEP=<JSON payload>`` of ``--event``."""
    step, sep, payload = text.partition("=")
    if not sep or not step:
        raise argparse.ArgumentTypeError(f"expected STEP=<JSON payload>, got {text!r}")
    try:
        return step, json.loads(payload)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--event {step}: the payload is not JSON: {exc}"
        ) from None


def cmd_new(args: argparse.Namespace) -> int:
    from ledgerflow import settings, versions
    from ledgerflow.cli_publish import SHIM
    from ledgerflow.errors import SpecError
    from ledgerflow.workflow.validate import load_workflow

    if not _NAME.match(args.name):
        print(
            f"ledgerflow new: {args.name!r} is not a workflow name: lower-case letters, "
            "digits, '_' and '-', starting with a letter (at most 63)",
            file=sys.stderr,
        )
        return 2
    dags = settings.dags_folder(args.dags_folder)  # without loading Airflow
    folder = dags / "workflows" / args.name
    file = folder / "v1.yaml"
    if folder.exists() and any(folder.iterdir()):
        print(f"ledgerflow new: {folder} exists already; nothing written", file=sys.stderr)
        return 2
    folder.mkdir(parents=True, exist_ok=True)
    schema = Path("schema/workflow.schema.json")
    modeline = ""
    if schema.exists():
        relative = os.path.relpath(schema.resolve(), folder.resolve())
        modeline = f"# yaml-language-server: $schema={relative}\n"
    file.write_text(TEMPLATE.format(name=args.name, modeline=modeline))
    try:
        load_workflow(file, display_path=str(file))
    except SpecError as exc:  # the template is ours: say so loudly, keep nothing
        shutil.rmtree(folder)
        raise SystemExit(f"ledgerflow new: the template is invalid (a bug): {exc}") from exc
    shim = file.with_suffix(".py")
    shim.write_text(SHIM)
    versions.write_lock(file)
    print(f"wrote {file}\nwrote {shim}\nwrote {versions.lock_path(file)} (v1 is published)")
    print(
        "\nnext:\n"
        f"  ledgerflow run {file} --param who=team     # one run, here, in a few seconds\n"
        f"  edit {file}, then `ledgerflow validate {file}`;\n"
        "  v1 is locked once published: while it never ran anywhere, "
        f"`ledgerflow sync --rehash {file}`;\n"
        "  after that, publish changes as v2.yaml beside it (`ledgerflow sync`)."
    )
    return 0


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ledgerflow"


def run_env(work: Path, dags: Path) -> dict[str, str]:
    """The child's environment: Airflow and the ledger in ``work``, nothing else."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    keep.pop("AIRFLOW_HOME", None)
    keep.update(
        {
            "AIRFLOW_HOME": str(work / "airflow"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{work / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get(
                "AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"
            ),
            "AIRFLOW_CONN_LEDGERFLOW_DB": f"sqlite:///{work / 'ledger.db'}",
        }
    )
    return keep


def _stage(file: Path, work: Path) -> tuple[Path, Path]:
    """Copy the workflow file (and its lock) into ``work/dags/workflows/<name>/``, beside
    the two-line DAG file: the throwaway dags folder holds this workflow only."""
    from ledgerflow import versions
    from ledgerflow.cli_publish import SHIM

    name = file.parent.name
    folder = work / "dags" / "workflows" / name
    folder.mkdir(parents=True)
    staged = folder / file.name
    shutil.copyfile(file, staged)
    lock = versions.lock_path(file)
    if lock.exists():
        shutil.copyfile(lock, versions.lock_path(staged))
    staged.with_suffix(".py").write_text(SHIM)
    return work / "dags", staged


def cmd_run(args: argparse.Namespace) -> int:
    from ledgerflow.errors import InvalidParams, SpecError
    from ledgerflow.spec.params import check_params
    from ledgerflow.workflow.validate import load_workflow

    file = Path(args.file)
    if not file.is_file():
        print(f"ledgerflow run: {file}: no such file (relative to {Path.cwd()})", file=sys.stderr)
        return 2
    try:
        spec = load_workflow(file, display_path=str(file))
    except SpecError as exc:
        print(f"ledgerflow run: {exc}", file=sys.stderr)
        return 2
    params = dict(args.params or [])
    try:
        check_params(spec.name, spec.version, spec.params, params)
    except InvalidParams as exc:
        print(f"ledgerflow run: {exc}", file=sys.stderr)
        return 2
    decisions = dict(args.decide or [])
    unknown = sorted(set(decisions) - {s.id for s in spec.steps if s.kind == "approval"})
    if unknown:
        print(f"ledgerflow run: --decide {unknown}: no approval step of that id", file=sys.stderr)
        return 2
    events = dict(args.event or [])
    unknown = sorted(set(events) - {s.id for s in spec.steps if s.kind == "event"})
    if unknown:
        print(f"ledgerflow run: --event {unknown}: no event step of that id", file=sys.stderr)
        return 2

    work = (
        Path(args.workdir).resolve()
        if args.workdir
        else Path(tempfile.mkdtemp(prefix="ledgerflow-run-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    dags, staged = _stage(file, work)
    template = cache_dir() / f"airflow-{_airflow_version()}-metadata.db"
    if template.exists():
        shutil.copyfile(template, work / "airflow.db")
    else:
        print(
            "ledgerflow run: preparing a throwaway Airflow metadata database "
            f"(first run only, about 30 s; kept in {template.parent})...",
            file=sys.stderr,
        )
    log_path = work / "airflow.log"
    request = {
        "dag_file": str(staged.with_suffix(".py")),
        "params": params,
        "decisions": decisions,
        "events": events,
        "template": str(template),
        "result": str(work / "result.json"),
    }
    print(f"ledgerflow run: {spec.dag_id} (Airflow's log: {log_path})", file=sys.stderr)
    started = time.monotonic()
    with open(log_path, "w") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "ledgerflow.local_run", json.dumps(request)],
            env=run_env(work, dags),
            stdout=out if not args.verbose else None,
            stderr=subprocess.STDOUT if not args.verbose else None,
        )
        code = _follow(child, work / "ledger.db")
    result_file = work / "result.json"
    if not result_file.exists():
        own = [x for x in log_path.read_text().splitlines() if x.startswith("ledgerflow run:")]
        for line in own:  # the child's own reason (an approval nobody decided)
            print(line, file=sys.stderr)
        print(
            f"ledgerflow run: the run did not finish (exit {code}); see {log_path}",
            file=sys.stderr,
        )
        return 2
    result = json.loads(result_file.read_text())
    _print_timeline(result, time.monotonic() - started)
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif result.get("run_id"):
        print(
            f"kept {work}: `ledgerflow show --url sqlite:///{work / 'ledger.db'} "
            f"{result['run_id']}`",
            file=sys.stderr,
        )
    return 0 if result.get("state") == "success" else 1


def _airflow_version() -> str:
    from importlib.metadata import version

    return version("apache-airflow")


def _follow(child: subprocess.Popen[bytes], ledger_db: Path) -> int:
    """Wait for the child, printing each step as it ends (read from the throwaway ledger)."""
    import sqlite3

    seen: set[tuple[str, str]] = set()
    while True:
        code = child.poll()
        if ledger_db.exists():
            try:
                with sqlite3.connect(f"file:{ledger_db}?mode=ro", uri=True, timeout=1) as db:
                    rows = db.execute(
                        "select step_key, status, attempts from lf_steps "
                        "where status in ('completed', 'failed', 'skipped', 'waiting') "
                        "order by coalesce(completed_at, started_at)"
                    ).fetchall()
            except sqlite3.Error:  # not migrated yet, or busy: next time
                rows = []
            for step_key, status, attempts in rows:
                if (step_key, status) not in seen:
                    seen.add((step_key, status))
                    tries = f" (try {attempts})" if attempts and attempts > 1 else ""
                    print(f"  {step_key}: {status}{tries}", file=sys.stderr)
        if code is not None:
            return code
        time.sleep(0.3)


def _print_timeline(result: dict[str, Any], elapsed: float) -> None:
    view = result.get("view") or {}
    steps = view.get("steps") or []
    print(f"\n{result.get('dag_id')}  {result.get('run_id')}")
    origin = None
    for s in steps:
        if s.get("started_at"):
            origin = s["started_at"]
            break
    from datetime import datetime

    def offset(stamp: str | None) -> str:
        if not stamp or not origin:
            return "       "
        delta = datetime.fromisoformat(stamp) - datetime.fromisoformat(origin)
        return f"+{delta.total_seconds():5.2f}s"

    width = max([len(s["step_key"]) for s in steps] + [4])
    for s in steps:
        took = f"{s['duration_s']:.2f}s" if s.get("duration_s") is not None else ""
        extra = []
        if s.get("attempt_count", 0) > 1:
            extra.append(f"{s['attempt_count']} tries")
        if s.get("reused_from"):
            extra.append(f"reused from {s['reused_from']}")
        if s.get("error"):
            extra.append(str(s["error"])[:120])
        elif s.get("output") is not None and s["status"] == "completed":
            shown = json.dumps(s["output"], default=str)
            extra.append(f"-> {shown[:70]}{'...' if len(shown) > 70 else ''}")
        note = f"  {'; '.join(extra)}" if extra else ""
        print(
            f"  {offset(s.get('started_at'))}  {s['step_key']:<{width}}  "
            f"{s['status']:<11} {took:>7}{note}"
        )
    for a in view.get("approvals") or []:
        who = f" by {a['decided_by']}" if a.get("decided_by") else ""
        print(f"  approval {a['step_key']}: {a['status']}{who}")
    saga = (view.get("saga") or {}).get("outcome")
    tail = f", saga {saga}" if saga else ""
    print(f"run {result.get('state')}{tail} in {elapsed:.1f} s")
