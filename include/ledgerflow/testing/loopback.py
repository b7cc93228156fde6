"""The base of the loopback HTTP test peers (``IdempotentPeer``, ``OpenAIPeer``,
``OtlpCollector``): a threaded HTTP server on 127.0.0.1 at a free port, started and
stopped with the peer (``with Peer() as peer:``), whose requests go to ``answer``.

A peer supplies ``answer(method, path, headers, body) -> Answer`` and, if it needs them,
``keep_alive`` (HTTP/1.1 and TCP_NODELAY, like a real API) and ``base_path`` (the part of
``url`` after the port). A peer given ``tls`` (a server-side ``ssl.SSLContext``, see
``testing.tls``) speaks HTTPS."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import ssl

_Peer = TypeVar("_Peer", bound="LoopbackPeer")


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any) -> Answer:
        return cls(status, json.dumps(payload).encode())


class LoopbackPeer:
    keep_alive = False
    base_path = ""
    port = 0  # 0: any free port; set it to bring a peer up where a client was refused

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._server: ThreadingHTTPServer | None = None
        self.tls = tls

    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}{self.base_path}"

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Answer:
        raise NotImplementedError

    def start(self: _Peer) -> _Peer:
        peer = self

        class Handler(BaseHTTPRequestHandler):
            if peer.keep_alive:
                protocol_version = "HTTP/1.1"
                # Headers and body are two writes: without TCP_NODELAY the body waits for
                # the client's delayed ACK (~40 ms), which would swamp what a benchmark
                # measures.
                disable_nagle_algorithm = True

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                reply = peer.answer(self.command, self.path, self.headers, body)
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(reply.body)))
                for name, value in reply.headers:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = do_PUT = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        name = type(self).__name__
        threading.Thread(target=self._server.serve_forever, name=name, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self: _Peer) -> _Peer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
