"""Where a step runs and how often it may call out: ``queue``, ``concurrency`` and ``rate``.

* ``queue``: the Airflow queue of the step's task (CeleryExecutor: only workers started
  with ``-q <queue>`` take it), e.g. payment steps on their own workers.
* ``concurrency: N``: at most N calls of the step in flight at once, across all workers
  (an Airflow pool of N slots, see ``workflow.limits``). A tool may declare it too
  (``@tool(..., concurrency=N)``): then it holds for every step calling the tool.
* ``rate: "10/s"``: at most that many calls per second (``/s``, ``/m``, ``/h``), across all
  workers, spaced evenly: a token bucket in the ledger (``ledger.rates``). A tool may
  declare it too; a step meeting both waits for both.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field, field_validator

QUEUE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$"
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}


def parse_rate(value: Any) -> float:
    """``"10/s"``, ``"600/m"``, ``"5/h"`` -> calls per second (> 0)."""
    match = _RATE.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            f"{value!r} is not a rate: write calls per unit, e.g. '10/s', '600/m', '5/h'"
        )
    per_second = float(match.group(1)) / _PER[match.group(2)]
    if not 0 < per_second <= 100_000:
        raise ValueError(f"{value!r}: a rate is more than 0 and at most 100000/s")
    return per_second


class Placement(BaseModel):
    """The fields every step kind has (mixed into the step models)."""

    queue: str | None = Field(None, pattern=QUEUE_PATTERN)
    """The Airflow queue of the step's task (default: Airflow's ``default_queue``)."""
    concurrency: int | None = Field(None, ge=1, le=10_000)
    """At most this many calls of this step in flight, across all workers and runs."""
    rate: str | None = None
    """At most this many calls per unit of time across all workers: ``10/s``, ``600/m``."""

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value
