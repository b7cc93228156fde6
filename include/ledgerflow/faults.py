"""Named fault points for crash tests (DBOS-style).

``LEDGERFLOW_FAULT=<point>[@<step_key>]:<action>`` arms one point in this process:
``raise`` raises ``InjectedFault``; ``exit`` ends the process at once (``os._exit``),
like a SIGKILL; ``sleep=<seconds>`` pauses there (time for a test to kill the process).
With ``LEDGERFLOW_FAULT_ONCE=<file>`` the fault fires only if the file does not exist,
and creates it, so the retry that follows runs clean.

Points: ``before_effect``, ``after_effect`` (effect done, not committed),
``before_commit``, ``after_commit`` (committed, caller has not seen it yet).
Unarmed, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time

from ledgerflow.errors import InjectedFault


def hit(point: str, step_key: str | None = None) -> None:
    spec = os.environ.get("LEDGERFLOW_FAULT")
    if not spec:
        return
    name, _, action = spec.partition(":")
    name, _, only_step = name.partition("@")
    if name != point or (only_step and only_step != step_key):
        return
    once = os.environ.get("LEDGERFLOW_FAULT_ONCE")
    if once:
        try:
            fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    if action == "exit":
        os._exit(137)
    if action.startswith("sleep="):
        time.sleep(float(action.split("=", 1)[1]))
        return
    raise InjectedFault(f"injected fault at {point}")
