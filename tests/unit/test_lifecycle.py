"""The lifecycle as data: the drawing in docs/lifecycle.md is the table in code."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest

from ledgerflow import lifecycle
from ledgerflow.errors import LedgerflowError
from ledgerflow.lifecycle import IllegalTransition

DOC = Path(__file__).resolve().parents[2] / "docs" / "lifecycle.md"


def test_every_machine_is_drawn_as_it_is() -> None:
    """Each machine's Mermaid diagram in docs/lifecycle.md equals the one generated from
    lifecycle.py, so the page a new engineer reads cannot drift from what the ledger
    enforces."""
    text = DOC.read_text()
    for machine in lifecycle.MACHINES.values():
        section = re.search(
            rf"## {re.escape(machine.name.capitalize())}\n.*?```mermaid\n(.*?)\n```",
            text,
            re.S,
        )
        assert section is not None, f"no diagram for {machine.name}"
        assert section.group(1) == lifecycle.mermaid(machine), machine.name


def test_terminal_statuses_have_no_way_out() -> None:
    """A terminal status has no edge to another status (check() refuses every one), and
    the drawing ends it (``--> [*]``) and draws nothing out of it; a repeat of the same
    status (a self-loop, accepted as a no-op) is not a way out."""
    for machine in lifecycle.MACHINES.values():
        drawing = lifecycle.mermaid(machine).splitlines()
        for status in machine.terminal:
            for target in machine.statuses:
                if target != status:
                    assert not machine.allowed(status, target), (machine.name, status, target)
            assert f"    {status} --> [*]" in drawing, (machine.name, status)
            out = [line for line in drawing if line.startswith(f"    {status} --> ")]
            assert out == [f"    {status} --> [*]"], (machine.name, status)
        for status in set(machine.statuses) - machine.terminal:
            assert any(machine.allowed(status, t) for t in machine.statuses if t != status)


def test_final_outcomes_are_terminal() -> None:
    """The outcomes nothing may change are terminal: a finished attempt, a compensated
    effect, a decided (or withdrawn) approval, a completed compensation, a skipped step,
    a cancelled run."""
    expected = {
        "attempt": {"completed", "failed", "lost"},
        "effect": {"compensated"},
        "approval": {"approved", "rejected", "expired", "abandoned", "withdrawn"},
        "event wait": {"received", "expired", "withdrawn"},
        "event delivery": {"consumed", "expired", "rejected"},
        "compensation": {"completed", "not_compensable"},
        "step": {"skipped"},
        "run": {"cancelled"},
        "saga": set(),
        "dead letter": set(),
        "notification": {"sent", "gave_up"},
    }
    assert {name: set(m.terminal) for name, m in lifecycle.MACHINES.items()} == expected


def test_illegal_transitions_are_refused_with_a_typed_error() -> None:
    """check() refuses what the table does not list, naming the machine and both ends."""
    lifecycle.STEP.check("running", "completed")
    with pytest.raises(IllegalTransition) as info:
        lifecycle.STEP.check("completed", "running", "r/s")
    assert (info.value.machine, info.value.current, info.value.new) == (
        "step",
        "completed",
        "running",
    )
    assert isinstance(info.value, LedgerflowError)
    with pytest.raises(IllegalTransition):
        lifecycle.EFFECT.check("compensated", "done")
    assert lifecycle.STEP.sources("running") == ["compensated", "failed", "retrying", "running"]


def test_illegal_transition_survives_pickle() -> None:
    """Errors cross process boundaries (Airflow's task runner): a pickle round trip
    keeps the type and every attribute."""
    error = IllegalTransition("saga", "compensated", "compensated", "r")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is IllegalTransition and str(back) == str(error)
    assert (back.machine, back.current, back.new, back.subject) == (
        "saga",
        "compensated",
        "compensated",
        "r",
    )
