"""Airflow's task supervisor notices a task process's exit once it happens.

Found with ``bench/throughput.py`` on Celery: 37-60 % of the tasks held their executor
slot ~5 s after their process had finished. Once every socket of the process was at
end-of-file but the process could not be reaped yet (the kernel closes a process's files
a moment before that), Airflow's supervisor waited on a selector with nothing left in it
for ``[workers] min_heartbeat_interval``; the SIGCHLD did not wake it. Here the moment is
made long on purpose: the child closes every socket, then waits for the test's word
before it exits. ``ledgerflow.supervisor_exit`` makes the supervisor wait on the process.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Any, ClassVar

import attrs
import pytest
from airflow.sdk.execution_time.supervisor import WatchedSubprocess
from pydantic import TypeAdapter

from ledgerflow import supervisor_exit
from ledgerflow.preload import preload

WAIT = 120.0  # what the supervisor may wait at most; the test gives it 60 s


@attrs.define(kw_only=True)
class _Supervised(WatchedSubprocess):
    decoder: ClassVar[TypeAdapter[Any]] = TypeAdapter(dict)

    def _handle_request(self, msg: Any, log: Any, req_id: int) -> None:  # never called
        raise AssertionError(msg)


def _closes_its_sockets_then_waits(release: int, code: int) -> Any:
    def target() -> None:
        os.closerange(0, release)  # stdin/stdout/stderr, the requests and logs sockets
        os.closerange(release + 1, 65536)
        os.read(release, 1)
        os._exit(code)

    return target


def _supervise(code: int) -> tuple[_Supervised, int]:
    release, go = os.pipe()
    proc = _Supervised.start(id=uuid.uuid4(), target=_closes_its_sockets_then_waits(release, code))
    os.close(release)
    while proc._open_sockets:  # every socket reaches end-of-file; the process lives on
        proc._service_subprocess(max_wait_time=1.0)
    assert proc._exit_code is None
    return proc, go


def test_the_supervisor_notices_the_exit_of_a_process_whose_sockets_are_closed() -> None:
    assert supervisor_exit.apply()
    proc, go = _supervise(code=7)
    seen: list[int | None] = []
    waiting = threading.Thread(
        target=lambda: seen.append(proc._service_subprocess(max_wait_time=WAIT)), daemon=True
    )
    waiting.start()
    os.write(go, b"x")  # the process exits now
    waiting.join(timeout=WAIT / 2)
    assert not waiting.is_alive(), "the supervisor slept on an empty selector"
    assert seen == [7]


def test_a_process_still_alive_is_waited_for_no_longer_than_asked() -> None:
    """The same timeout as before: the supervisor's loop still heartbeats on time."""
    assert supervisor_exit.apply()
    proc, go = _supervise(code=0)
    assert proc._service_subprocess(max_wait_time=0.2) is None
    os.write(go, b"x")
    assert proc._service_subprocess(max_wait_time=WAIT) == 0


def test_the_components_that_supervise_tasks_apply_it_and_a_setting_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    current = WatchedSubprocess._service_subprocess
    airflows = getattr(current, "__wrapped__", current)
    monkeypatch.setattr(WatchedSubprocess, "_service_subprocess", airflows)
    monkeypatch.setattr("sys.argv", ["/venv/bin/airflow", "celery", "worker"])
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__SUPERVISOR_EXIT_WAIT", "false")
    preload(llm=False)
    assert WatchedSubprocess._service_subprocess is airflows
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__SUPERVISOR_EXIT_WAIT", "true")
    preload(llm=False)
    assert WatchedSubprocess._service_subprocess.__wrapped__ is airflows
