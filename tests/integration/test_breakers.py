"""Circuit breakers in the ledger, on SQLite and Postgres."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import ToolError
from ledgerflow.ledger import breakers
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import BreakerSpec, WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.tools.registry import tool
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

SERVICE = {"healthy": False, "calls": 0}


@tool("test.service", behaviour="natural")
def service(ctx: Any) -> dict[str, int]:
    SERVICE["calls"] += 1
    if not SERVICE["healthy"]:
        raise ToolError("service unavailable")
    return {"calls": SERVICE["calls"]}


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    SERVICE.update(healthy=False, calls=0)
    return ledger


COOLDOWN = 2.0  # long enough that a loaded machine does not outrun it between two calls


def make_spec(tmp_path: Path, cooldown: float) -> WorkflowSpec:
    path = tmp_path / "wf.yaml"
    path.write_text(f"""
name: brk
version: 1
steps:
  - id: call
    tool: test.service
    breaker: {{failures: 2, cooldown: {cooldown}}}
""")
    return load_workflow(path)


@pytest.fixture
def spec(tmp_path: Path) -> WorkflowSpec:
    return make_spec(tmp_path, COOLDOWN)


def run(ledger: Ledger, spec: WorkflowSpec, name: str) -> Any:
    return execute_step(
        ledger, spec, spec.steps[0], RunRef(f"brk__v1/{name}", "brk__v1"), params={}
    )


def state(ledger: Ledger) -> str:
    (row,) = breakers.states(ledger)
    return str(row["state"])


def test_failures_open_the_breaker_and_later_calls_wait(ledger: Ledger, tmp_path: Path) -> None:
    """Two consecutive failures (across runs) open the breaker; a third run's step does not
    call the tool and records no attempt: it is told to wait."""
    spec = make_spec(tmp_path, 60)
    for name in ("r1", "r2"):
        with pytest.raises(ToolError):
            run(ledger, spec, name)
    assert state(ledger) == "open"
    with pytest.raises(breakers.BreakerOpen) as wait:
        run(ledger, spec, "r3")
    assert SERVICE["calls"] == 2
    assert ledger.attempts("brk__v1/r3") == []
    assert wait.value.until > breakers.now()


def test_after_the_cooldown_one_trial_closes_it(ledger: Ledger, spec: WorkflowSpec) -> None:
    """After the cooldown exactly one caller gets the trial (others keep waiting); a
    successful trial closes the breaker and calls flow again."""
    for name in ("r1", "r2"):
        with pytest.raises(ToolError):
            run(ledger, spec, name)
    time.sleep(COOLDOWN + 0.3)
    breaker = BreakerSpec(failures=2, cooldown=COOLDOWN)
    with ledger.begin() as conn:
        assert breakers.acquire(ledger, conn, "test.service", breaker).trial
    with ledger.begin() as conn, pytest.raises(breakers.BreakerOpen):
        breakers.acquire(ledger, conn, "test.service", breaker)  # the trial is taken
    time.sleep(COOLDOWN + 0.3)  # that trial's caller never reported back: the slot frees up again
    SERVICE["healthy"] = True
    assert run(ledger, spec, "r3").status == "completed"
    assert state(ledger) == "closed"
    assert run(ledger, spec, "r4").status == "completed"
    kinds = [e["kind"] for e in ledger.events("breaker:test.service")]
    assert kinds.count("breaker_opened") == 1 and kinds[-1] == "breaker_closed"


def test_a_failed_trial_opens_it_again(ledger: Ledger, spec: WorkflowSpec) -> None:
    """A trial that fails re-opens the breaker for another cooldown at once."""
    for name in ("r1", "r2"):
        with pytest.raises(ToolError):
            run(ledger, spec, name)
    time.sleep(COOLDOWN + 0.3)
    with pytest.raises(ToolError):
        run(ledger, spec, "trial")
    assert state(ledger) == "open"
    with pytest.raises(breakers.BreakerOpen):
        run(ledger, spec, "r4")
    assert SERVICE["calls"] == 3
