"""What every benchmark shares: where results go, how it logs, which commit it measured,
the medians and millisecond columns of its report, and its last line.

Importing it puts the demo's tools on the allow-list (``LEDGERFLOW_DEMO_TOOLS=1``) for the
benchmark and every process it starts (Airflow stacks, children): the benchmarks' workflows
run the demo's tools (``demo.noop``, ``demo.charge_payment``...).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
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
