"""``api._wait``: the ``wait`` parameter and the bounded poll behind
``POST /api/workflows/{name}/runs?wait=...``, driven with a fake clock."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from fastapi import HTTPException

from ledgerflow.api._wait import MAX_WAIT, intervals, parse_wait, wait_for_end


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(None, None), ("30", 30.0), ("30s", 30.0), ("2m", None), ("250ms", 0.25), ("0", 0.0)],
)
def test_wait_reads_the_specs_durations_up_to_the_cap(
    value: str | None, seconds: float | None
) -> None:
    """``30``, ``30s``, ``250ms`` as in the workflow format; no ``wait`` is no waiting;
    ``2m`` is over the 60 s cap (422 below)."""
    if value == "2m":
        with pytest.raises(HTTPException):
            parse_wait(value)
        return
    assert parse_wait(value) == seconds


@pytest.mark.parametrize("value", ["soon", "", "-1s", "61s", "1h", "P1D", "nan"])
def test_a_bad_wait_is_422_naming_the_parameter(value: str) -> None:
    """Not a duration, negative, or above the cap: 422 whose detail names ``wait``."""
    with pytest.raises(HTTPException) as info:
        parse_wait(value)
    assert info.value.status_code == 422
    [problem] = info.value.detail
    assert problem["loc"] == ["query", "wait"] and problem["field"] == "wait"
    assert MAX_WAIT == 60.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run(states: list[str | None], seconds: float, clock: FakeClock) -> tuple[str | None, int]:
    looks = iter(states)
    count = 0

    async def look() -> str | None:
        nonlocal count
        count += 1
        return next(looks)

    result = asyncio.run(wait_for_end(look, seconds, clock=clock, sleep=clock.sleep))
    return result, count


def test_the_wait_ends_at_the_first_look_that_sees_the_run_finished() -> None:
    """The run's end is answered at the look that sees it, 50 ms after the look before."""
    clock = FakeClock()
    state, looks = run(["queued", "running", "running", "success", "x"], 30, clock)
    assert (state, looks) == ("success", 4)
    assert clock.sleeps == [0.05, 0.05, 0.05]


def test_the_wait_is_bounded_and_its_looks_thin_out() -> None:
    """A run that does not end: the last state seen when the wait runs out (never a sleep
    past the deadline), looks every 50 ms, then 100 ms, then 250 ms: ~60 looks for 10 s."""
    clock = FakeClock()
    state, looks = run(["running"] * 1000, 10, clock)
    assert state == "running"
    assert clock.now == pytest.approx(10)
    assert looks == 20 + 40 + 20 + 1
    assert list(itertools.islice(intervals(), 19, 22)) == [0.05, 0.1, 0.1]
    assert list(itertools.islice(intervals(), 59, 62)) == [0.1, 0.25, 0.25]


def test_a_zero_wait_looks_once() -> None:
    """``wait=0``: one look (a run an idempotency key names may have ended), no sleep."""
    clock = FakeClock()
    assert run(["failed"], 0, clock) == ("failed", 1)
    assert run(["running"], 0, clock) == ("running", 1) and clock.sleeps == []
