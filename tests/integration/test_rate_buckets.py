"""Rate limits in the ledger (``ledger.rates``), on SQLite and Postgres: each turn gets its
own slot, spaced by 1/rate, whichever process takes it; the kernel waits for the slot before
a step's call, on every attempt, and not for a reused checkpoint."""

from __future__ import annotations

import itertools
import multiprocessing
import time
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import ToolError
from ledgerflow.ledger.rates import take_slot, take_turn
from ledgerflow.ledger.store import Ledger
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.tools.registry import tool
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

CALLS: list[float] = []


@tool("test.rated_call", behaviour="natural", rate="5/s")
def rated_call(ctx: Any, fail: int = 0) -> dict[str, int]:
    CALLS.append(time.time())
    if len(CALLS) <= fail:
        raise ToolError("busy")
    return {"calls": len(CALLS)}


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    CALLS.clear()
    return ledger


def _turns(url: str, name: str, per_second: float, count: int, out: Any) -> None:
    ledger = Ledger(url)
    ledger.engine.dispose(close=False)  # a forked child: never the parent's connections
    for _ in range(count):
        out.put(take_slot(ledger, name, per_second)[0])


def test_turns_from_several_processes_are_spaced_by_the_rate(ledger_url: str) -> None:
    Ledger(ledger_url).migrate()
    Ledger(ledger_url).engine.dispose()
    per_second, each = 20.0, 8
    out: Any = multiprocessing.get_context("fork").Queue()
    workers = [
        multiprocessing.get_context("fork").Process(
            target=_turns, args=(ledger_url, "tool:x", per_second, each, out)
        )
        for _ in range(3)
    ]
    for w in workers:
        w.start()
    starts = sorted(out.get(timeout=60) for _ in range(3 * each))
    for w in workers:
        w.join(timeout=30)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Each slot is its own, 50 ms after the one before.
    assert min(gaps) >= 1 / per_second - 1e-6, gaps
    # Another bucket is not held up by this one.
    assert take_turn(Ledger(ledger_url), "tool:y", per_second) == 0.0


def test_an_idle_bucket_lets_the_next_call_go_at_once(ledger: Ledger) -> None:
    assert take_turn(ledger, "step:w.s", 10.0) == 0.0
    assert take_turn(ledger, "step:w.s", 10.0) == pytest.approx(0.1, abs=0.05)
    time.sleep(0.3)
    assert take_turn(ledger, "step:w.s", 10.0) == 0.0


def test_the_kernel_waits_for_each_attempt_and_not_for_a_reused_checkpoint(
    ledger: Ledger, tmp_path: Path
) -> None:
    path = tmp_path / "wf.yaml"
    path.write_text(
        """
name: rated
version: 1
steps:
  - id: call
    tool: test.rated_call
    args: {fail: 2}
    rate: 2/s
"""
    )
    spec = load_workflow(path)
    run = RunRef("rated__v1/r1", "rated__v1")
    for try_number in (1, 2):
        with pytest.raises(ToolError):
            execute_step(
                ledger, spec, spec.steps[0], run, params={}, try_number=try_number, max_attempts=3
            )
    done = execute_step(ledger, spec, spec.steps[0], run, params={}, try_number=3, max_attempts=3)
    assert done.output == {"calls": 3}
    # The tool's 5/s and the step's 2/s: the slower one spaces the three calls (each call
    # starts at its slot plus the step's own work, which varies by some ms on a busy machine).
    gaps = [b - a for a, b in itertools.pairwise(CALLS)]
    assert min(gaps) >= 0.5 - 0.1 and CALLS[-1] - CALLS[0] >= 2 * 0.5 - 0.05, gaps
    again = execute_step(ledger, spec, spec.steps[0], run, params={}, try_number=4, max_attempts=4)
    assert again.output == {"calls": 3} and len(CALLS) == 3
