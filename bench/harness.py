"""What every benchmark shares: where results go, how it logs, which commit it measured,
the medians and millisecond columns of its report, its last line, and (for those that
run Airflow) the stack: a fresh ledger database, the real processes, the clean-up.

Importing it puts the demo's tools on the allow-list (``LEDGERFLOW_DEMO_TOOLS=1``) for the
benchmark and every process it starts (Airflow stacks, children): the benchmarks' workflows
run the demo's tools (``demo.noop``, ``demo.charge_payment``...).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

os.environ.setdefault("LEDGERFLOW_DEMO_TOOLS", "1")


def logger(name: str, *, clock: bool = True) -> Callable[[str], None]:
    """``log(message)``: ``[name HH:MM:SS] message`` on stderr, flushed (progress lines)."""

    def log(message: str) -> None:
        stamp = f" {time.strftime('%H:%M:%S')}" if clock else ""
        print(f"[{name}{stamp}] {message}", file=sys.stderr, flush=True)

    return log


def med(values: Iterable[float | None]) -> float | None:
    """The median of the values present (None: nothing measured)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def ms(value: float | None, width: int = 7) -> str:
    """Seconds as a right-aligned whole number of milliseconds ('-' when missing)."""
    return f"{'-':>{width}s}" if value is None else f"{1000 * value:{width}.0f}"


def git_revision() -> str:
    """The commit measured (the package is installed editable), ``+dirty`` with local edits."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "include"],
            cwd=ROOT,
            capture_output=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_results(path: Path, report: dict[str, Any]) -> None:
    """The report as JSON (``bench/results/<name>.json`` unless ``--json`` says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))


def finish(path: Path, report: dict[str, Any], key: str, value: float, fmt: str = ".3f") -> None:
    """Write the report (with the commit measured) and print the last line ``key=value``."""
    report.setdefault("git", git_revision())
    write_results(path, report)
    print(f"{key}={value:{fmt}}")


def rounds(
    count: int, kinds: Sequence[str], *, warmup: int = 0, alternate: bool = True
) -> Iterator[tuple[str, bool, tuple[str, ...]]]:
    """Interleaved runs: ``(label, warm_up, kinds in this round's order)`` for ``warmup``
    rounds (labels ``w1``...) then ``count`` measured ones (``1``...). With ``alternate``
    every other round reverses the order, so no kind always goes first on a busier machine."""
    for r in range(warmup + count):
        order = tuple(reversed(kinds)) if alternate and r % 2 else tuple(kinds)
        label = f"w{r + 1}" if r < warmup else str(r - warmup + 1)
        yield label, r < warmup, order


def write_workflow(dags: Path, name: str, body: str) -> Path:
    """``workflows/<name>/v1.yaml`` and its DAG file (the shim ``ledgerflow sync`` writes)."""
    from ledgerflow.cli import SHIM

    folder = dags / "workflows" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "v1.yaml").write_text(body, encoding="utf-8")
    (folder / "v1.py").write_text(SHIM, encoding="utf-8")
    return folder / "v1.py"


@dataclass
class Deployment:
    """A benchmark's Airflow (``ledgerflow.testing.airflow_stack.AirflowStack``) and its
    ledger on a fresh Postgres database; ``base`` holds ``dags/`` and the stack's home."""

    base: Path
    stack: Any
    ledger: Any
    ledger_url: str
    keep: bool = False  # leave it running at the end (a benchmark's --keep)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dags(self) -> Path:
        return self.base / "dags"


def settled_statuses(ledger: Any, dag_id: str, timeout: float = 120.0) -> Counter[str]:
    """The ledger's run statuses of ``dag_id``, once none is ``running`` (``timeout`` at
    most): a run's end reaches the ledger from Airflow's end-of-run callback, which the
    dag-processor runs a few seconds after the DagRun ends."""
    from sqlalchemy import text

    from ledgerflow.ledger.outage import ride_out

    query = text("SELECT status FROM lf_runs WHERE dag_id = :d")

    def read() -> Counter[str]:
        with ledger.engine.connect() as conn:
            return Counter(row.status for row in conn.execute(query, {"d": dag_id}))

    deadline = time.monotonic() + timeout
    while True:
        # The soak restarts the ledger's Postgres: a pooled connection from before it is
        # dead, and ride_out drops the pool and asks again.
        statuses = ride_out(ledger, read, "reading the ledger's run statuses")
        if not statuses.get("running") or time.monotonic() > deadline:
            return statuses
        time.sleep(1)


def new_base(name: str) -> Path:
    """A fresh temporary folder for one benchmark run (``<tmp>/lf_bench_<name>_...``)."""
    base = Path(tempfile.mkdtemp(prefix=f"lf_bench_{name}_"))
    (base / "dags").mkdir()
    return base


@contextmanager
def deployment(
    name: str,
    base: Path,
    dag_ids: Iterable[str],
    log: Callable[[str], None],
    *,
    plugins: Path | None = ROOT / "plugins",
    parallelism: int | None = None,
    extra_env: dict[str, str] | None = None,
    remove_base: bool = True,
    stack_options: dict[str, Any] | None = None,
    ledger_url: str | None = None,
) -> Iterator[Deployment]:
    """Start Airflow on ``base/dags`` (the Ledgerflow plugin loaded unless ``plugins`` is
    another folder) with the ledger on a fresh database ``lf_bench_<name>_...``, wait until
    ``dag_ids`` are parsed without import errors, and yield it. On the way out: stop the
    processes, drop the ledger database and remove ``base``, unless ``keep`` was set
    (then print where it runs and how to stop it). ``stack_options``: more arguments of
    ``AirflowStack`` (e.g. ``executor="celery", celery_workers=2``). ``ledger_url``: a
    ledger database of the caller's own (e.g. on a private Postgres it restarts), left
    as it is on the way out."""
    from ledgerflow.ledger.store import Ledger
    from ledgerflow.testing.airflow_stack import COMPONENTS, AirflowStack
    from ledgerflow.testing.postgres import create_database, drop_database

    own_ledger = ledger_url is None
    if ledger_url is None:
        ledger_url = create_database(f"lf_bench_{name}")
    ledger = Ledger(ledger_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    options: dict[str, Any] = {"parallelism": parallelism} if parallelism else {}
    options.update(stack_options or {})
    stack = AirflowStack(
        dags_folder=base / "dags",
        home=base / "home",
        plugins_folder=plugins,
        extra_env={"AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url, **(extra_env or {})},
        **options,
    )
    env = Deployment(base=base, stack=stack, ledger=ledger, ledger_url=ledger_url)
    try:
        log(f"starting Airflow in {base} (ledger {ledger_url.rsplit('/', 1)[1]})")
        stack.start()
        stack.wait_for_dags(list(dag_ids), timeout=180)
        errors = stack.import_errors()
        if errors:
            raise SystemExit(f"import errors: {errors}")
        yield env
    finally:
        if env.keep:
            atexit.unregister(stack.stop)  # stack.start() registered it
            print(
                f"(--keep: Airflow is still running at {stack.base_url} (admin/admin), "
                f"AIRFLOW_HOME {stack.home}, metadata {stack.db_url}, ledger {ledger_url}; "
                "each component leads its own process group, stop them with "
                "`kill -- -<pid>`: "
                + ", ".join(f"{c} {stack.pid(c)}" for c in (stack.components or COMPONENTS))
                + "; then drop both databases)"
            )
        else:
            log("stopping the stack")
            stack.stop()
            ledger.engine.dispose()
            if own_ledger:
                drop_database(ledger_url)
            if remove_base:
                shutil.rmtree(base, ignore_errors=True)
