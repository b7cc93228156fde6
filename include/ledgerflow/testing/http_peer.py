"""A loopback HTTP service for tests: de-duplicates by ``Idempotency-Key`` like real APIs.

``POST /charge`` (any path but ``/bad``) records one effect per key and answers it again
for a repeated key; ``/bad`` answers 400; ``fail_first`` makes the first N requests of
each key answer 503 (not on ``/down``); while ``down`` is set, ``/down`` answers 503.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from typing import Any

from ledgerflow.testing.loopback import Answer, LoopbackPeer


class IdempotentPeer(LoopbackPeer):
    def __init__(self, fail_first: int = 0) -> None:
        super().__init__()
        self.requests: list[str] = []
        self.effects: dict[str, dict[str, Any]] = {}
        self.fail_first = fail_first
        self.fail_next = 0
        self.down = False  # while True, /down answers 503 (an outage)
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _answer(self, path: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.requests.append(key)
            self._seen[key] += 1
            if self.fail_next:
                self.fail_next -= 1
                return 503, {"error": "busy"}
            if path == "/bad":
                return 400, {"error": "bad request"}
            if path == "/down":
                if self.down:
                    return 503, {"error": "outage"}
            elif self._seen[key] <= self.fail_first:
                return 503, {"error": f"busy ({self._seen[key]})"}
            effect = self.effects.setdefault(key, {"charge_id": len(self.effects) + 1, **body})
            return 200, effect

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        key = headers.get("Idempotency-Key", "")
        return Answer.json(*self._answer(path, key, json.loads(body or b"{}")))


class RecordingPeer(LoopbackPeer):
    """Answers 200 ``{"ok": true}`` to everything and records each request as
    ``(method, path, headers)``; behind a proxy, ``path`` is the absolute URL the client
    asked the proxy for."""

    def __init__(self, tls: Any = None) -> None:
        super().__init__(tls)
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        self.requests.append((method, path, {k.lower(): v for k, v in headers.items()}))
        return Answer.json(200, {"ok": True})


class SlackPeer(RecordingPeer):
    """A Slack incoming webhook on loopback (the peer of a ``slackwebhook`` connection,
    ``{"conn_type": "slackwebhook", "password": peer.url + "/hook/T0/B0"}``): keeps each
    JSON body in ``bodies`` and answers ``ok`` as Slack does."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        self.bodies.append(json.loads(body))
        super().answer(method, path, headers, body)
        return Answer(200, b"ok", "text/plain")

    def connection(self) -> str:
        """The Airflow connection (JSON) that sends to this peer."""
        return json.dumps({"conn_type": "slackwebhook", "password": f"{self.url}/hook/T0/B0"})


class CountingPeer(LoopbackPeer):
    """A slow idempotent API that measures its callers: each request is answered after
    ``delays[path]`` seconds (default ``delay``); while it waits it counts as in flight.
    Per path it keeps the most requests in flight at once (``max_in_flight``) and each
    request's arrival time (``arrivals``); per ``Idempotency-Key`` one effect, recorded
    with the request's JSON body (``effects``: key -> (path, body)), a repeated key
    answered with the first effect as real APIs do."""

    def __init__(self, delay: float = 0.0, delays: dict[str, float] | None = None) -> None:
        super().__init__()
        self.delay = delay
        self.delays = dict(delays or {})
        self.in_flight: Counter[str] = Counter()
        self.max_in_flight: Counter[str] = Counter()
        self.arrivals: dict[str, list[float]] = {}
        self.effects: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def effects_at(self, path: str) -> list[dict[str, Any]]:
        with self._lock:
            return [body for p, body in self.effects.values() if p == path]

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        import time

        key = headers.get("Idempotency-Key", "")
        with self._lock:
            self.in_flight[path] += 1
            self.max_in_flight[path] = max(self.max_in_flight[path], self.in_flight[path])
            self.arrivals.setdefault(path, []).append(time.time())
        try:
            time.sleep(self.delays.get(path, self.delay))
        finally:
            with self._lock:
                self.in_flight[path] -= 1
        with self._lock:
            payload = json.loads(body or b"{}")
            effect = self.effects.setdefault(key or f"unkeyed-{len(self.effects)}", (path, payload))
            return Answer.json(200, {"effect": len(self.effects), **effect[1]})
