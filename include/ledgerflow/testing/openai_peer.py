"""A loopback HTTP server speaking the OpenAI chat-completions protocol, for tests.

It answers ``POST .../chat/completions`` with scripted message contents and counts every
request, so a test can assert how many model calls really reached the server.

    with OpenAIPeer() as peer:
        peer.script("ticket-17", "not json", '{"category": "billing", ...}')
        ...  # a request whose messages mention "ticket-17" gets "not json", the next one
             # gets the JSON, later ones the JSON again
        assert peer.calls("ticket-17") == 2

A script entry may also be ``(status, body)`` to answer an HTTP error. A request that
matches no script gets ``default`` (when set) or a 400 error.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | tuple[int, dict[str, Any]]


class OpenAIPeer:
    def __init__(self, model: str = "peer-model") -> None:
        self.model = model
        self.default: Reply | None = None
        self.bodies: list[dict[str, Any]] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The base URL a client is configured with (``.../v1``)."""
        assert self._server is not None, "start() first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, marker: str, *replies: Reply) -> None:
        """Requests whose messages contain ``marker`` get ``replies`` in order (the last
        one repeats)."""
        if not replies:
            raise ValueError("script at least one reply")
        with self._lock:
            self._scripts[marker] = list(replies)

    def calls(self, marker: str | None = None) -> int:
        """Requests received (for one marker, or all)."""
        with self._lock:
            return sum(self._counts.values()) if marker is None else self._counts[marker]

    def _reply(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        text = "\n".join(_content_text(m.get("content")) for m in body.get("messages", []))
        with self._lock:
            self.bodies.append(body)
            marker = next((m for m in self._scripts if m in text), None)
            self._counts[marker or ""] += 1
            if marker is None:
                reply = self.default
            else:
                replies = self._scripts[marker]
                seen = self._counts[marker]
                reply = replies[min(seen, len(replies)) - 1]
        if reply is None:
            return 400, {"error": {"message": "no scripted reply", "type": "invalid_request"}}
        if isinstance(reply, tuple):
            return reply
        prompt_tokens = len(text.split())
        completion_tokens = len(reply.split())
        return 200, {
            "id": f"chatcmpl-{self.calls()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def start(self) -> OpenAIPeer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like a real API
            # Headers and body are two writes: without TCP_NODELAY the body waits for the
            # client's delayed ACK (~40 ms), which would swamp what the benchmark measures.
            disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    status, payload = 404, {"error": {"message": f"no route {self.path}"}}
                else:
                    status, payload = peer._reply(json.loads(raw or b"{}"))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OpenAIPeer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connection_uri(self, model: str = "gpt-4o-mini") -> str:
        """An ``AIRFLOW_CONN_<ID>`` value: a ``pydanticai`` connection to this server."""
        return json.dumps(
            {
                "conn_type": "pydanticai",
                "host": self.url,
                "password": "sk-loopback-test",
                "extra": {"model": f"openai-chat:{model}"},
            }
        )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""
