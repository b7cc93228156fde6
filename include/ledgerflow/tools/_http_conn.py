"""An Airflow ``http`` connection read as the http provider's ``HttpHook`` reads it.

Users bring connections made for ``HttpHook`` / ``HttpOperator``; the ``http`` tool must
send what the hook would send. The provider is not a dependency (it pulls requests,
aiohttp and tenacity into every worker), so its reading of a connection is reproduced
here from its source (apache/airflow ``providers/http/.../hooks/http.py``:
``_process_extra_options_from_connection``, ``HttpHook._set_base_url``,
``_extract_auth`` and ``_configure_session_from_extra``):

- base URL: ``host`` if it holds ``://``, else ``{schema or "http"}://{host}``; then
  ``:{port}`` when a port is set;
- ``login``/``password``: HTTP Basic auth (it overrides an ``Authorization`` extra);
- the extras ``stream``, ``cert``, ``proxies`` (or ``proxy``), ``timeout``, ``verify``
  (or ``verify_ssl``), ``allow_redirects``, ``max_redirects``, ``trust_env`` and
  ``check_response`` are request options; EVERY OTHER top-level extra is a header.

Also read, as the provider's 4.x connection form wrote them: a nested ``headers``
object (or its JSON text; Ledgerflow's own documented form until now), which wins over
top-level headers, and ``auth_type`` (Basic or Digest; any other class is refused, never
imported). Where the hook would fail on a value a form or a URI stores as text
(``"false"``, ``"30"``, a JSON object), the text is read as what it says.

No heavy import here: the DAG factory imports the tool registry.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ledgerflow.errors import HttpConnectionError

# requests.models.DEFAULT_REDIRECT_LIMIT, the hook's default max_redirects.
DEFAULT_REDIRECT_LIMIT = 30
OPTION_KEYS = frozenset(
    {
        "stream",
        "cert",
        "proxies",
        "proxy",
        "timeout",
        "verify",
        "verify_ssl",
        "allow_redirects",
        "max_redirects",
        "trust_env",
        "check_response",
    }
)
# Read by the provider's 4.x form; never headers.
AUTH_KEYS = frozenset({"auth_type", "auth_kwargs", "headers"})
BASIC_AUTH_TYPES = frozenset({"requests.auth.HTTPBasicAuth", "aiohttp.BasicAuth"})
DIGEST_AUTH_TYPES = frozenset({"requests.auth.HTTPDigestAuth"})


@dataclass(frozen=True)
class HttpConnection:
    """What one ``http`` connection asks of a request."""

    conn_id: str
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    auth: tuple[str, str] | None = None
    digest: bool = False
    verify: bool | str = True
    cert: str | tuple[str, str] | None = None
    proxies: dict[str, str] = field(default_factory=dict)
    timeout: float | tuple[float, float] | None = None
    allow_redirects: bool = True
    max_redirects: int = DEFAULT_REDIRECT_LIMIT
    trust_env: bool = True
    check_response: bool = True

    def url(self, path: str) -> str:
        # One slash between base and path (the hook would keep both of "/" + "/x").
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")


def read_connection(conn_id: str, conn: Any) -> HttpConnection:
    """``conn`` (an Airflow connection) as ``HttpHook`` would use it."""
    host = conn.host or "localhost"
    base = host if "://" in host else f"{conn.schema or 'http'}://{host}"
    if conn.port:
        base = f"{base}:{conn.port}"
    extra = conn.extra_dejson or {}
    if not isinstance(extra, dict):
        raise HttpConnectionError(conn_id, "extra", "must be a JSON object")
    read = _Reader(conn_id, extra)
    headers = {k: read.header(k, v) for k, v in extra.items() if k not in OPTION_KEYS | AUTH_KEYS}
    headers.update(read.nested_headers())
    auth_type = extra.get("auth_type")
    if auth_type and auth_type not in BASIC_AUTH_TYPES | DIGEST_AUTH_TYPES:
        read.fail("auth_type", f"{auth_type!r} is not supported (Basic or Digest only)")
    if extra.get("auth_kwargs"):
        read.fail("auth_kwargs", "is not supported (login and password give the credentials)")
    trust_env = read.flag("trust_env", True)
    verify = read.verify()
    if verify is True and trust_env:
        # requests' merge_environment_settings: these name the CA bundle when trusted.
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return HttpConnection(
        conn_id=conn_id,
        base_url=base,
        headers=headers,
        auth=(conn.login, conn.password or "") if conn.login else None,
        digest=auth_type in DIGEST_AUTH_TYPES,
        verify=verify,
        cert=read.cert(),
        proxies=read.proxies(),
        timeout=read.timeout(),
        allow_redirects=read.flag("allow_redirects", True),
        max_redirects=read.integer("max_redirects", DEFAULT_REDIRECT_LIMIT),
        trust_env=trust_env,
        check_response=read.flag("check_response", True),
    )


class _Reader:
    """Reads one option of the extra, naming the field when its value cannot be used."""

    def __init__(self, conn_id: str, extra: dict[str, Any]) -> None:
        self.conn_id = conn_id
        self.extra = extra

    def fail(self, name: str, problem: str) -> Any:
        raise HttpConnectionError(self.conn_id, name, problem)

    def get(self, *names: str) -> tuple[str, Any]:
        for name in names:
            if self.extra.get(name) is not None:
                return name, self.extra[name]
        return names[0], None

    def header(self, name: str, value: Any) -> str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        return self.fail(name, "a header value must be text (is this extra meant for the hook?)")

    def nested_headers(self) -> dict[str, str]:
        name, value = self.get("headers")
        if value is None:
            return {}
        if isinstance(value, str):
            value = self._json(name, value)
        if not isinstance(value, dict):
            self.fail(name, "must be an object of header names to values")
        return {str(k): self.header(f"{name}.{k}", v) for k, v in value.items()}

    def flag(self, name: str, default: bool) -> bool:
        _, value = self.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return bool(self.fail(name, f"must be true or false, got {value!r}"))

    def integer(self, name: str, default: int) -> int:
        _, value = self.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except (TypeError, ValueError):
            return int(self.fail(name, f"must be a whole number, got {value!r}"))

    def verify(self) -> bool | str:
        name, value = self.get("verify", "verify_ssl")
        if value is None or isinstance(value, bool):
            return True if value is None else value
        if isinstance(value, str):
            if value.strip().lower() in ("true", "false"):
                return value.strip().lower() == "true"
            if not os.path.exists(value):
                self.fail(name, f"no CA bundle or directory at {value!r}")
            return value
        return bool(self.fail(name, "must be true, false or the path of a CA bundle"))

    def cert(self) -> str | tuple[str, str] | None:
        name, value = self.get("cert")
        if value is None:
            return None
        if isinstance(value, list | tuple) and len(value) == 2:
            value = (str(value[0]), str(value[1]))
        elif not isinstance(value, str):
            self.fail(name, "must be a PEM file or [certificate file, key file]")
        for path in [value] if isinstance(value, str) else value:
            if not os.path.isfile(path):
                self.fail(name, f"no file at {path!r}")
        return value  # type: ignore[no-any-return]

    def proxies(self) -> dict[str, str]:
        name, value = self.get("proxies", "proxy")
        if value is None:
            return {}
        if isinstance(value, str) and value.lstrip().startswith("{"):
            value = self._json(name, value)
        if isinstance(value, str):
            return {"all": value}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            self.fail(name, 'must map schemes to proxy URLs, e.g. {"https": "http://proxy:3128"}')
        return {str(k): v for k, v in value.items()}

    def timeout(self) -> float | tuple[float, float] | None:
        name, value = self.get("timeout")
        try:
            if value is None:
                return None
            if isinstance(value, list | tuple) and len(value) == 2:
                return (float(value[0]), float(value[1]))  # requests' (connect, read)
            return float(value)
        except (TypeError, ValueError):
            return self.fail(name, f"must be seconds or [connect, read], got {value!r}")

    def _json(self, name: str, text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            return self.fail(name, "is text that is not a JSON object")


def client_options(conn: HttpConnection, timeout: float | None) -> dict[str, Any]:
    """Keyword arguments of ``httpx.Client`` doing what the hook's requests session does."""
    import ssl

    import httpx

    try:
        verify = _tls(conn)
    except (OSError, ssl.SSLError) as exc:  # a CA bundle or certificate that does not load
        raise HttpConnectionError(conn.conn_id, "verify/cert", str(exc)) from None
    seconds = timeout if timeout is not None else conn.timeout
    if seconds is None:
        seconds = DEFAULT_TIMEOUT_S
    mounts: dict[str, Any] = {}
    for key, proxy in conn.proxies.items():
        # requests keys: "http", "https", "all", or "scheme://host"; httpx patterns end in ://
        pattern = key if "://" in key else f"{key}://"
        mounts[pattern] = httpx.HTTPTransport(proxy=proxy, verify=verify, trust_env=conn.trust_env)
    return {
        "verify": verify,
        "mounts": mounts or None,
        "trust_env": conn.trust_env,
        "follow_redirects": conn.allow_redirects,
        "max_redirects": conn.max_redirects,
        "timeout": (
            httpx.Timeout(seconds[1], connect=seconds[0])
            if isinstance(seconds, tuple)
            else httpx.Timeout(seconds)
        ),
        "auth": (httpx.DigestAuth(*conn.auth) if conn.digest else conn.auth) if conn.auth else None,
    }


DEFAULT_TIMEOUT_S = 30.0


def default_tls(trust_env: bool = True) -> Any:
    """httpx's default SSL context (``verify=True``: certifi's CAs, or ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` when ``trust_env``), made once per process and shared by every client.

    httpx makes a new one for each client, ~20 ms of CPU loading the CA bundle: most of
    an HTTP step's own cost. ``ledgerflow.preload`` makes it in the components that fork
    task processes, so a task inherits it."""
    if not trust_env:
        return _default_context(False, None, None)
    return _default_context(True, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _default_context(trust_env: bool, cert_file: str | None, cert_dir: str | None) -> Any:
    # The environment's CA locations are part of the key: a changed one makes a new context.
    import httpx

    return httpx.create_ssl_context(verify=True, trust_env=trust_env)


def _tls(conn: HttpConnection) -> Any:
    """``verify`` for httpx: the shared default context (:func:`default_tls`), or an SSL
    context for what requests takes as ``verify=False``, ``verify=<CA file or
    directory>`` and ``cert``."""
    if conn.verify is True and conn.cert is None:
        return default_tls(conn.trust_env)
    import ssl

    if conn.verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif isinstance(conn.verify, str) and os.path.isdir(conn.verify):
        context = ssl.create_default_context(capath=conn.verify)
    elif isinstance(conn.verify, str):
        context = ssl.create_default_context(cafile=conn.verify)
    else:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    if isinstance(conn.cert, tuple):
        context.load_cert_chain(conn.cert[0], conn.cert[1])
    elif conn.cert is not None:
        context.load_cert_chain(conn.cert)
    return context
