"""A loopback HTTP service that echoes the request's headers back, credentials first, as
careless APIs and debugging proxies do: ``/fail`` answers 500 with them, any other path
200. A canary for secrets that travel from a connection into what Ledgerflow stores."""

from __future__ import annotations

import json
import threading
from typing import Any

from ledgerflow.testing.loopback import Answer, LoopbackPeer

# The credentials of a canary connection: looked for everywhere after a run.
CANARY_LOGIN = "canary-user"
CANARY_PASSWORD = "canary-pw-3e81d6f0"
CANARY_API_KEY = "canary-key-9b27c4a5"

# Echoed first: an error message keeps only the start of a body.
_FIRST = ("authorization", "x-api-key")


class EchoPeer(LoopbackPeer):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        got = {k.lower(): v for k, v in headers.items()}
        echoed = {k: got[k] for k in _FIRST if k in got}
        echoed.update({k: v for k, v in got.items() if k not in echoed})
        with self._lock:
            self.seen.append(got)
        status = 500 if path.rstrip("/").endswith("/fail") else 200
        return Answer.json(status, {"echo": echoed, "path": path})

    def canary_connection(self) -> str:
        """An ``AIRFLOW_CONN_*`` value (JSON) for an http connection to this peer with the
        canary credentials: Basic auth from login/password, the API key as a header."""
        return json.dumps(
            {
                "conn_type": "http",
                "host": "127.0.0.1",
                "port": int(self.url.rsplit(":", 1)[1]),
                "login": CANARY_LOGIN,
                "password": CANARY_PASSWORD,
                "extra": {"headers": {"X-Api-Key": CANARY_API_KEY}},
            }
        )
