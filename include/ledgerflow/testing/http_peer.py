"""A loopback HTTP service for tests: de-duplicates by ``Idempotency-Key`` like real APIs.

``POST /charge`` (any path but ``/bad``) records one effect per key and answers it again
for a repeated key; ``/bad`` answers 400; ``fail_first`` makes the first N requests of
each key answer 503 (not on ``/down``); while ``down`` is set, ``/down`` answers 503.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class IdempotentPeer:
    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[str] = []
        self.effects: dict[str, dict[str, Any]] = {}
        self.fail_first = fail_first
        self.fail_next = 0
        self.down = False  # while True, /down answers 503 (an outage)
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

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

    def start(self) -> IdempotentPeer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                status, payload = peer._answer(
                    self.path, self.headers.get("Idempotency-Key", ""), body
                )
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> IdempotentPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
