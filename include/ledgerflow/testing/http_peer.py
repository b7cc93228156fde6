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
