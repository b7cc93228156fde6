"""A tiny StatsD server for tests: a real UDP socket on 127.0.0.1 that keeps what it hears.

Airflow's StatsD client sends one datagram per metric (``name:value|type``, several lines
when pipelined); this server sums counters and keeps every timing and gauge value, for the metric names
that start with one of ``keep`` (everything else Airflow sends is counted, not kept).
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from typing import Any


class StatsdListener:
    def __init__(self, keep: tuple[str, ...] = ("",)) -> None:
        self.keep = keep
        self.counters: Counter[str] = Counter()
        self.timings: dict[str, list[float]] = {}
        self.gauges: dict[str, list[float]] = {}  # every value set, in order
        self.ignored = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._sock is not None, "start() first"
        return int(self._sock.getsockname()[1])

    def start(self) -> StatsdListener:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._sock.bind(("127.0.0.1", 0))
        self._thread = threading.Thread(target=self._serve, name="statsd", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> StatsdListener:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65535)
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                self._record(line)

    def _record(self, line: str) -> None:
        name, _, rest = line.partition(":")
        value, _, kind = rest.partition("|")
        kind = kind.split("|", 1)[0]
        with self._lock:
            if not name.startswith(self.keep):
                self.ignored += 1
                return
            try:
                number = float(value)
            except ValueError:
                return
            if kind == "c":
                self.counters[name] += int(number)
            elif kind == "ms":
                self.timings.setdefault(name, []).append(number)
            elif kind == "g":
                self.gauges.setdefault(name, []).append(number)

    def snapshot(self, prefix: str = "") -> dict[str, Any]:
        """``{"counters": {...}, "timings": {...}}`` of the names starting with ``prefix``."""
        with self._lock:
            return {
                "counters": {k: v for k, v in self.counters.items() if k.startswith(prefix)},
                "timings": {k: list(v) for k, v in self.timings.items() if k.startswith(prefix)},
            }
