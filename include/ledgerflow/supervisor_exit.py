"""Airflow's task supervisor can wait 5 s for a task process that has already finished.

Airflow 3.3's task supervisor (``WatchedSubprocess._monitor_subprocess`` in the task SDK)
reads the task process's four sockets until each reaches end-of-file, checking after
each read whether the process has exited. A process's last sockets (its stdout and
stderr) close while the kernel tears the process down, a moment *before* it can be
reaped. When the supervisor's check falls in that moment, it finds the process still
running, and its next wait is a ``select`` on a selector with nothing left in it: it
sleeps ``[workers] min_heartbeat_interval`` (5 s by default). The ``SIGCHLD`` that
arrives meanwhile does not end the sleep (Python retries an interrupted ``select``).

For those seconds the task's executor slot (a Celery worker's pool process, a
LocalExecutor worker) stays taken, and the next task waits for it. With
``bench/throughput.py`` on Celery (5-step runs, 8 slots), 37-60 % of the tasks ended this
way, ~5 s each, for a task that ran 0.2 s.

:func:`apply` makes the supervisor wait on the process itself once every socket is closed:
it returns as soon as the process can be reaped, or after the same timeout as before.
Nothing else changes: the same exit checks, logs and timeouts. Applied in the processes
that supervise tasks (``ledgerflow.preload``: the scheduler, whose LocalExecutor workers
run the supervisors, and Celery or Edge workers), unless ``[ledgerflow]
supervisor_exit_wait`` is false. If Airflow's supervisor no longer has the parts this
relies on, nothing is changed.
"""

from __future__ import annotations

import contextlib
from typing import Any

_PARTS = ("_service_subprocess", "_check_subprocess_exit")
_FIELDS = ("_exit_code", "_open_sockets", "_process")


def apply() -> bool:
    """Make the supervisor wait on an exiting process rather than on an empty selector.
    Idempotent; False when Airflow's supervisor is not the one this was written for."""
    try:
        from airflow.sdk.execution_time.supervisor import WatchedSubprocess
    except ImportError:
        return False
    original = WatchedSubprocess._service_subprocess
    if getattr(original, "ledgerflow_exit_wait", False):
        return True
    fields = {a.name for a in getattr(WatchedSubprocess, "__attrs_attrs__", ())}
    if not all(hasattr(WatchedSubprocess, p) for p in _PARTS) or not all(
        f in fields for f in _FIELDS
    ):
        return False

    def _service_subprocess(
        self: Any,
        max_wait_time: float,
        raise_on_timeout: bool = False,
        expect_signal: int | None = None,
    ) -> int | None:
        if self._exit_code is None and not self._open_sockets:
            # Every socket is at end-of-file: the process is exiting. Wait for it (the
            # selector has nothing to wake it), at least as long as the selector would.
            with contextlib.suppress(self._process.TimeoutExpired):
                self._process.wait(timeout=max(0.01, max_wait_time))
            return self._check_subprocess_exit(  # type: ignore[no-any-return]
                raise_on_timeout=raise_on_timeout, expect_signal=expect_signal
            )
        return original(  # type: ignore[no-any-return]
            self, max_wait_time, raise_on_timeout=raise_on_timeout, expect_signal=expect_signal
        )

    _service_subprocess.ledgerflow_exit_wait = True  # type: ignore[attr-defined]
    _service_subprocess.__doc__ = original.__doc__
    _service_subprocess.__wrapped__ = original  # type: ignore[attr-defined]
    WatchedSubprocess._service_subprocess = _service_subprocess  # type: ignore[method-assign]
    return True
