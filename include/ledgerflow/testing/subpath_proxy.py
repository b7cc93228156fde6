"""A reverse proxy on loopback that serves one sub-path, as an ingress does for Airflow
behind ``[api] base_url = http://host/airflow``.

Requests under ``prefix`` go to the upstream unchanged (path, query, headers, body; the
``Host`` header as the browser sent it); anything else is 404, as it would be on a real
host where other paths belong to other applications. A link that forgets the sub-path
therefore breaks here exactly as it would in production (the api-server alone would still
answer it: Starlette routes a path without its ``root_path`` too).

``AirflowStack(base_path="/airflow")`` puts one in front of its api-server.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Headers of one hop, not of the request (RFC 9110 7.6.1), and the body's framing, which
# this proxy sets itself.
_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
}


class SubpathProxy:
    """``with SubpathProxy("/airflow", upstream_port=8080) as proxy: proxy.port``."""

    def __init__(self, prefix: str, upstream_port: int, port: int = 0) -> None:
        self.prefix = "/" + prefix.strip("/")
        self.upstream_port = upstream_port
        self.requested_port = port
        self.refused: list[str] = []  # paths answered 404 for being outside the prefix
        self._server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    def inside(self, path: str) -> bool:
        return path == self.prefix or path.startswith((f"{self.prefix}/", f"{self.prefix}?"))

    def start(self) -> SubpathProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                if not proxy.inside(self.path):
                    proxy.refused.append(self.path)
                    refusal = f"{self.path} is outside {proxy.prefix}\n".encode()
                    self.send_response(404)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(refusal)))
                    self.end_headers()
                    self.wfile.write(refusal)
                    return
                size = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(size) if size else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    answer = upstream.getresponse()
                    payload = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in _HOP:
                            self.send_header(key, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                finally:
                    upstream.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve

        self._server = ThreadingHTTPServer(("127.0.0.1", self.requested_port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> SubpathProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
