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

``think_s`` makes every answer take that long, like a model's own time; ``served`` keeps,
for every request, its messages' text and the seconds the server spent on it (the model's
time as the server sees it, for benchmarks that subtract it).
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

from ledgerflow.testing.loopback import Answer, LoopbackPeer

Reply = str | tuple[int, dict[str, Any]]


class OpenAIPeer(LoopbackPeer):
    keep_alive = True  # like a real API
    base_path = "/v1"  # url: the base URL a client is configured with

    def __init__(self, model: str = "peer-model") -> None:
        super().__init__()
        self.model = model
        self.default: Reply | None = None
        self.think_s = 0.0
        self.served: list[tuple[str, float]] = []
        self.bodies: list[dict[str, Any]] = []
        self._scripts: dict[str, list[Reply]] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

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

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        if not path.rstrip("/").endswith("/chat/completions"):
            return Answer.json(404, {"error": {"message": f"no route {path}"}})
        started = time.perf_counter()
        request = json.loads(body or b"{}")
        if self.think_s:
            time.sleep(self.think_s)
        answer = Answer.json(*self._reply(request))
        text = "\n".join(_content_text(m.get("content")) for m in request.get("messages", []))
        with self._lock:
            self.served.append((text, time.perf_counter() - started))
        return answer

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
