"""Request bodies are bounded before they are read, on every route of the app.

A pure ASGI middleware, in front of authentication and of FastAPI's body parsing: a
``Content-Length`` over the limit is answered 413 at once, and a body sent without one
(chunked) is counted as it arrives and cut off at the limit. Nothing over the limit is
ever held in memory, whoever sends it (the webhook route takes requests without an
Airflow login, so it must not read a body before it knows its size).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

from ledgerflow.errors import LedgerflowError

# The largest body any route takes: a decision with a comment, a trigger's params, a
# webhook delivery. A workflow's params are small; 1 MB is far above any of them.
MAX_BODY_BYTES = 1_000_000

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _TooLarge(LedgerflowError, HTTPException):
    """Raised while the app reads the body: FastAPI answers it like any HTTPException
    (a plain exception there would become its generic 400 "error parsing the body").
    Defined here, not in ``ledgerflow.errors``, which imports no web framework."""

    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


def _message(limit: int) -> str:
    return f"a request body may have at most {limit:,} bytes"


class BodyLimit:
    """``app = BodyLimit(app, limit)``: 413 for any request body over ``limit`` bytes."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_long = declared is not None and int(declared) > self.limit
        except ValueError:
            await self._refuse(send, 400, "Content-Length is not a number")
            return
        if too_long:
            await self._refuse(send, 413, _message(self.limit))
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:  # read outside FastAPI's handlers
            if not started:
                await self._refuse(send, 413, _message(self.limit))

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
