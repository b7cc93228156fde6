"""A real SMTP server on loopback (aiosmtpd) that keeps every message it receives.

```python
with MailServer() as mail:          # AIRFLOW_CONN_...: smtp://127.0.0.1:<mail.port>
    ...
    message = mail.wait_for(1)[0]  # email.message.EmailMessage
```
"""

from __future__ import annotations

import email
import email.policy
import threading
import time
from email.message import EmailMessage
from typing import Any


class MailServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self._lock = threading.Lock()
        self._controller: Any = None

    @property
    def port(self) -> int:
        return int(self._controller.port)

    def conn_uri(self, from_email: str = "ledgerflow@example.com") -> str:
        """An Airflow SMTP connection to this server: plain SMTP, no TLS, no login."""
        from urllib.parse import quote

        return (
            f"smtp://{self.host}:{self.port}?disable_ssl=true&disable_tls=true"
            f"&from_email={quote(from_email)}&timeout=5&retry_limit=0"
        )

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self._lock:
            self.messages.append(message)  # type: ignore[arg-type]
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"

    def start(self) -> MailServer:
        import socket

        from aiosmtpd.controller import Controller

        with socket.socket() as probe:  # a free port (aiosmtpd checks it is up by connecting)
            probe.bind((self.host, 0))
            port = probe.getsockname()[1]
        self._controller = Controller(self, hostname=self.host, port=port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def wait_for(self, count: int, timeout: float = 20.0) -> list[EmailMessage]:
        """The first ``count`` messages, once received (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"{len(self.messages)} messages received, {count} expected")

    def __enter__(self) -> MailServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def html_text(message: EmailMessage) -> str:
    """The message's HTML part (what SmtpNotifier sends)."""
    part = message.get_body(preferencelist=("html", "plain"))
    return "" if part is None else str(part.get_content())
