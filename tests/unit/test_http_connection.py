"""The http tool reads an Airflow ``http`` connection as the http provider's HttpHook does.

Connections are defined as Airflow users define them (``AIRFLOW_CONN_*`` in Airflow's
JSON form); the peers are real HTTP(S) servers on loopback that record what they got.
"""

from __future__ import annotations

import base64
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import NonRetryableError, ToolError
from ledgerflow.testing.http_peer import RecordingPeer
from ledgerflow.testing.tls import self_signed, server_context
from ledgerflow.tools._http_conn import HttpConnectionError
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import get_tool

KEY = "wf/run-1/charge/1"


def ctx() -> ToolContext:
    return ToolContext(
        run_id="wf__v1/run-1", step_key="charge", workflow="wf", version=1, try_number=1,
        idempotency_key=KEY,
    )  # fmt: skip


def call(**args: Any) -> Any:
    return get_tool("http").call(ctx(), args)


def connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> str:
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "http", **fields})
    )
    return conn_id


def host_port(url: str) -> tuple[str, int, str]:
    scheme, rest = url.split("://", 1)
    host, port = rest.split(":")
    return scheme, int(port), host


@pytest.fixture
def peer() -> Iterator[RecordingPeer]:
    with RecordingPeer() as peer:
        yield peer


def test_top_level_extras_are_headers_and_options_are_not(
    peer: RecordingPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every top-level extra of the connection is a header (HttpHook's reading), except
    the hook's request options (timeout, verify, allow_redirects...), which never leave
    the client; the step's own headers win over the connection's, and the idempotency key
    is sent."""
    scheme, port, host = host_port(peer.url)
    conn_id = connection(
        monkeypatch,
        "billing_api",
        host=host,
        port=port,
        schema=scheme,
        extra={
            "Authorization": "Bearer s3cret-token",
            "X-Api-Key": "k-123",
            "X-Tenant": "acme",
            "timeout": 5,
            "verify": True,
            "allow_redirects": True,
            "trust_env": False,
        },
    )
    result = call(url="/charge", json={"amount": 3}, conn_id=conn_id, headers={"X-Tenant": "beta"})
    assert result == {"status": 200, "body": {"ok": True}}
    [(method, path, headers)] = peer.requests
    assert (method, path) == ("POST", "/charge")
    assert headers["authorization"] == "Bearer s3cret-token"
    assert headers["x-api-key"] == "k-123"
    assert headers["x-tenant"] == "beta"
    assert headers["idempotency-key"] == KEY
    for option in ("timeout", "verify", "allow_redirects", "trust_env"):
        assert option not in headers


def test_the_nested_headers_form_still_works_and_wins(
    peer: RecordingPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``extra.headers`` (Ledgerflow's earlier documented form, and the provider 4.x
    form, also as JSON text) still sends its headers; it wins over a top-level extra of
    the same name."""
    scheme, port, host = host_port(peer.url)
    connection(
        monkeypatch,
        "old_form",
        host=f"{scheme}://{host}",
        port=port,
        extra={"headers": {"Authorization": "Bearer nested"}, "authorization": "Bearer top"},
    )
    connection(
        monkeypatch,
        "text_form",
        host=f"{scheme}://{host}",
        port=port,
        extra={"headers": json.dumps({"X-Api-Key": "from-text"})},
    )
    call(url="a", conn_id="old_form")
    call(url="b", conn_id="text_form")
    (_, path_a, a), (_, path_b, b) = peer.requests
    assert (path_a, path_b) == ("/a", "/b")
    assert a["authorization"] == "Bearer nested"
    assert b["x-api-key"] == "from-text" and "headers" not in b


def test_login_and_password_are_basic_auth(
    peer: RecordingPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """login/password become an HTTP Basic ``Authorization`` header (a password with
    ``@/#:`` intact); ``auth_type: requests.auth.HTTPBasicAuth`` means the same and is
    not sent as a header."""
    _scheme, port, host = host_port(peer.url)
    password = "p@ss/w#rd:1"
    connection(
        monkeypatch,
        "basic_api",
        host=host,
        port=port,
        login="svc",
        password=password,
        extra={"auth_type": "requests.auth.HTTPBasicAuth", "X-Trace": "on"},
    )
    call(url="/x", method="GET", conn_id="basic_api")
    [(method, _, headers)] = peer.requests
    expected = "Basic " + base64.b64encode(f"svc:{password}".encode()).decode()
    assert method == "GET"
    assert headers["authorization"] == expected
    assert headers["x-trace"] == "on" and "auth_type" not in headers


def test_verify_false_cert_and_ca_bundle_against_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against an HTTPS peer with a self-signed certificate that asks for a client
    certificate: the default (verify) refuses the peer; ``verify: false`` or ``verify:
    <its certificate>`` with ``cert: [client cert, key]`` gets through; without ``cert``
    the peer refuses the client."""
    server_cert, server_key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")
    tls = server_context(server_cert, server_key, client_ca=client_cert)
    cert = [str(client_cert), str(client_key)]
    with RecordingPeer(tls=tls) as peer:
        scheme, port, host = host_port(peer.url)
        assert scheme == "https"
        base = {"host": host, "port": port, "schema": "https"}
        connection(monkeypatch, "tls_default", **base, extra={"cert": cert})
        connection(monkeypatch, "tls_off", **base, extra={"verify": False, "cert": cert})
        connection(monkeypatch, "tls_ca", **base, extra={"verify": str(server_cert), "cert": cert})
        connection(monkeypatch, "tls_nocert", **base, extra={"verify": False})
        connection(monkeypatch, "tls_text", **base, extra={"verify_ssl": "false", "cert": cert})
        with pytest.raises(ToolError, match="CERTIFICATE_VERIFY_FAILED"):
            call(url="/secure", conn_id="tls_default")
        assert call(url="/off", conn_id="tls_off")["status"] == 200
        assert call(url="/ca", conn_id="tls_ca")["status"] == 200
        assert call(url="/text", conn_id="tls_text")["status"] == 200
        with pytest.raises(ToolError, match="transport error"):
            call(url="/nocert", conn_id="tls_nocert")
    assert [path for _, path, _ in peer.requests] == ["/off", "/ca", "/text"]


def test_the_default_verification_is_shared_and_follows_ssl_cert_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a connection, a step verifies the peer with one SSL context per process
    (made once: ~20 ms each time httpx makes one), which trusts ``SSL_CERT_FILE`` as httpx
    does and is made anew when that variable changes."""
    from ledgerflow.tools._http_conn import default_tls

    server_cert, server_key = self_signed(tmp_path, "server")
    with RecordingPeer(tls=server_context(server_cert, server_key)) as peer:
        monkeypatch.setenv("SSL_CERT_FILE", str(server_cert))
        assert default_tls() is default_tls()
        assert call(url=f"{peer.url}/trusted")["status"] == 200
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(ToolError, match="CERTIFICATE_VERIFY_FAILED"):
            call(url=f"{peer.url}/untrusted")
    assert [path for _, path, _ in peer.requests] == ["/trusted"]


@pytest.fixture
def masker(masker: None) -> Any:
    """Airflow's process-wide masker of the Task SDK (the suite's ``masker`` puts both
    maskers back as they were after each test)."""
    from airflow.sdk._shared.secrets_masker import _secrets_masker

    return _secrets_masker()


def test_proxies_are_honoured(
    peer: RecordingPeer, monkeypatch: pytest.MonkeyPatch, masker: Any
) -> None:
    """``proxies`` (requests' form, scheme -> proxy URL) sends the request through the
    proxy: the loopback proxy receives the absolute URL of a host that does not even
    resolve, with the connection's headers and the proxy's credentials, whose password
    is then known to Airflow's secrets masker."""
    proxy = peer.url.replace("://", "://relay:pr0xy-s3cret@")
    connection(
        monkeypatch,
        "behind_proxy",
        host="ledgerflow-upstream.invalid",
        schema="http",
        extra={"proxies": {"http": proxy}, "X-Api-Key": "via-proxy"},
    )
    call(url="/charge", conn_id="behind_proxy")
    [(_, path, headers)] = peer.requests
    assert path == "http://ledgerflow-upstream.invalid/charge"
    assert headers["x-api-key"] == "via-proxy"
    basic = base64.b64encode(b"relay:pr0xy-s3cret").decode()
    assert headers["proxy-authorization"] == f"Basic {basic}"
    assert masker.redact("proxy said pr0xy-s3cret") == "proxy said ***"


def test_check_response_false_returns_the_error_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_response: false`` hands a 4xx answer back as a result, as the hook does;
    without it a 4xx is a non-retryable error."""

    class Refusing(RecordingPeer):
        def answer(self, method: str, path: str, headers: Any, body: bytes) -> Any:
            from ledgerflow.testing.loopback import Answer

            return Answer.json(404, {"error": "no such order"})

    with Refusing() as peer:
        _scheme, port, host = host_port(peer.url)
        connection(monkeypatch, "lenient", host=host, port=port, extra={"check_response": False})
        connection(monkeypatch, "strict", host=host, port=port)
        assert call(url="/o", conn_id="lenient") == {
            "status": 404,
            "body": {"error": "no such order"},
        }
        with pytest.raises(NonRetryableError, match="HTTP 404"):
            call(url="/o", conn_id="strict")


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"verify": "/no/such/ca.pem"}, "verify"),
        ({"verify": __file__}, "verify/cert"),  # a file, but no certificate in it
        ({"cert": ["/no/such/client.pem", "/no/such/client.key"]}, "cert"),
        ({"timeout": "soon"}, "timeout"),
        ({"proxies": ["http://p:1"]}, "proxies"),
        ({"auth_type": "requests_kerberos.HTTPKerberosAuth"}, "auth_type"),
        ({"X-Nested": {"a": 1}}, "X-Nested"),
    ],
)
def test_an_unusable_extra_is_a_clear_error_naming_its_field(
    monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], field: str
) -> None:
    """An extra that cannot be honoured fails the step without a retry, naming the
    connection and the field; the error survives a pickle round trip."""
    connection(monkeypatch, "broken", host="127.0.0.1", port=9, extra=extra)
    with pytest.raises(HttpConnectionError) as caught:
        call(url="/x", conn_id="broken")
    assert isinstance(caught.value, NonRetryableError)
    assert (caught.value.conn_id, caught.value.field) == ("broken", field)
    assert f"connection 'broken': extra field {field!r}" in str(caught.value)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (type(again), str(again)) == (HttpConnectionError, str(caught.value))


class DigestPeer(RecordingPeer):
    """Asks for HTTP Digest auth (RFC 7616, MD5, qop=auth) and checks the answer."""

    realm, nonce = "ledgerflow", "n0nce-1"

    def __init__(self, login: str, password: str) -> None:
        super().__init__()
        self.login, self.password = login, password

    def answer(self, method: str, path: str, headers: Any, body: bytes) -> Any:
        import hashlib
        import re

        from ledgerflow.testing.loopback import Answer

        self.requests.append((method, path, {k.lower(): v for k, v in headers.items()}))
        given = dict(re.findall(r'(\w+)="?([^",]+)"?', headers.get("Authorization", "")))

        def md5(text: str) -> str:
            return hashlib.md5(text.encode()).hexdigest()

        ha1 = md5(f"{self.login}:{self.realm}:{self.password}")
        ha2 = md5(f"{method}:{path}")
        parts = (ha1, self.nonce, given.get("nc"), given.get("cnonce"), "auth", ha2)
        if given.get("username") == self.login and given.get("response") == md5(
            ":".join(map(str, parts))
        ):
            return Answer.json(200, {"ok": True})
        challenge = f'Digest realm="{self.realm}", nonce="{self.nonce}", qop="auth"'
        return Answer(401, b"{}", headers=(("WWW-Authenticate", challenge),))


def test_auth_type_digest_answers_the_challenge(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auth_type: requests.auth.HTTPDigestAuth`` (the provider's 4.x connection form)
    answers a Digest challenge with login and password instead of sending them as Basic."""
    with DigestPeer("svc", "p@ss:1") as peer:
        _scheme, port, host = host_port(peer.url)
        extra = {"auth_type": "requests.auth.HTTPDigestAuth"}
        connection(
            monkeypatch,
            "digest_api",
            host=host,
            port=port,
            login="svc",
            password="p@ss:1",
            extra=extra,
        )
        connection(
            monkeypatch, "wrong_pw", host=host, port=port, login="svc", password="x", extra=extra
        )
        assert call(url="/d", method="GET", conn_id="digest_api")["status"] == 200
        with pytest.raises(NonRetryableError, match="HTTP 401"):
            call(url="/d", method="GET", conn_id="wrong_pw")
    first, second = peer.requests[:2]
    assert "authorization" not in first[2]
    assert second[2]["authorization"].startswith('Digest username="svc"')
