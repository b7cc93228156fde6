"""Request bodies are bounded before they are read (``api._limits.BodyLimit``).

The app is Ledgerflow's own (``create_app`` on a SQLite ledger), driven over ASGI by
httpx, which streams a chunked body to it chunk by chunk: the test counts how much of a
body the app pulled before it answered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ledgerflow.api import create_app
from ledgerflow.api._limits import MAX_BODY_BYTES
from ledgerflow.ledger.store import Ledger

CHUNK = 64 * 1024


@pytest.fixture
def app(tmp_path: Path) -> object:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    return create_app(ledger)


def post(app: object, path: str, **kw: object) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post(path, **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


@pytest.mark.parametrize(
    "path", ["/hooks/any", "/api/approvals/1/decision", "/api/workflows/checkout/runs"]
)
def test_a_declared_length_over_the_limit_is_413_before_anything_runs(
    app: object, path: str
) -> None:
    """No login, no signature, no body read: the size alone answers."""
    resp = post(app, path, content=b"x" * (MAX_BODY_BYTES + 1))
    assert resp.status_code == 413
    assert "at most 1,000,000 bytes" in resp.json()["detail"]


@pytest.mark.parametrize("path", ["/hooks/any", "/api/approvals/1/decision"])
def test_a_chunked_body_is_cut_off_at_the_limit(app: object, path: str) -> None:
    """Without Content-Length the body is counted as it arrives: the app stops pulling
    it one chunk past the limit and answers 413 (was: the webhook read all of it)."""
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(200):  # 12.5 MB offered
            sent += CHUNK
            yield b"x" * CHUNK

    resp = post(app, path, content=chunks())
    assert resp.status_code == 413, resp.text
    assert sent <= MAX_BODY_BYTES + 2 * CHUNK


def test_a_body_under_the_limit_reaches_the_route(app: object) -> None:
    """The limit changes nothing below it: the webhook route answers as before (404:
    no workflow of that name accepts webhooks)."""
    resp = post(app, "/hooks/nope", content=b"{}", headers={"Content-Type": "application/json"})
    assert resp.status_code == 404
