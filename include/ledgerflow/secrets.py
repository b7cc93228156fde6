"""Connection secrets stay out of the ledger, its pages, XCom and traces.

Airflow's secrets masker knows every secret a task has seen: a connection's password and
extras are registered with it when the connection is read (``BaseHook.get_connection``),
Airflow's own sensitive config values at start-up, anything passed to ``mask_secret``.
Airflow applies it to its task logs only. Ledgerflow applies the same masker to what it
stores:

- :func:`install` hooks the ledger's engine so that every string parameter of every
  statement passes through :func:`scrub` before it reaches the database. Errors, outputs,
  events and dead letters, whoever writes them, cannot bypass it; with nothing registered
  it costs one attribute check per statement.
- :func:`mask_http_credentials` registers what an HTTP call sends on top of what Airflow
  registers itself: the encoded Basic value (``base64(login:password)``, which a peer
  that echoes request headers sends back) and header values taken from the connection.

Nothing here imports Airflow: a masker that was never loaded has nothing registered.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sys
from collections.abc import Mapping
from typing import Any

# Airflow 3.3 keeps two maskers: the Task SDK's (tasks, triggerer) and core's (servers).
_MASKERS = ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker")

# Header values that are never credentials; any other header value from a connection is.
PUBLIC_HEADERS = frozenset(
    {
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "cache-control",
        "connection",
        "content-encoding",
        "content-language",
        "content-type",
        "host",
        "user-agent",
    }
)


def _active() -> list[Any]:
    """The loaded maskers that have at least one secret registered."""
    active = []
    for name in _MASKERS:
        module = sys.modules.get(name)
        if module is not None and module._secrets_masker().replacer is not None:
            active.append(module)
    return active


def scrub(value: Any) -> Any:
    """``value`` with every registered secret in its strings replaced by ``***``, at any
    depth (dict keys included). Only registered values are masked: a key's name alone
    (``password: x``) changes nothing, so stored data keeps its shape."""
    maskers = _active()
    return _scrub(value, maskers) if maskers else value


def _scrub(value: Any, maskers: list[Any]) -> Any:
    if isinstance(value, str):
        for masker in maskers:
            value = masker.redact(value)
        return value
    if isinstance(value, dict):
        return {_scrub(k, maskers): _scrub(v, maskers) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, maskers) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, maskers) for v in value)
    return value


def scrub_exception(error: BaseException) -> BaseException:
    """``error`` with its arguments (its message) scrubbed, and those of its cause and
    context: what Airflow logs and reports of a failed task, in every process (the
    scheduler's own log included), without registered secrets."""
    maskers = _active()
    seen: set[int] = set()
    current: BaseException | None = error
    pending: list[BaseException] = []
    while maskers and current is not None and id(current) not in seen:
        seen.add(id(current))
        with contextlib.suppress(AttributeError, TypeError):  # an extension type's fixed args
            current.args = tuple(_scrub(a, maskers) for a in current.args)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        current = pending.pop() if pending else None
    return error


def _scrub_parameters(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    maskers = _active()
    if not maskers or parameters is None:
        return statement, parameters
    return statement, _scrub_bound(parameters, maskers)


def _scrub_bound(parameters: Any, maskers: list[Any]) -> Any:
    # A dict's keys are bind names (kept); a list holds executemany's parameter sets.
    if isinstance(parameters, dict):
        return {k: _scrub(v, maskers) for k, v in parameters.items()}
    if isinstance(parameters, list):
        return [_scrub_bound(p, maskers) for p in parameters]
    return _scrub(parameters, maskers)


def install(engine: Any) -> None:
    """Scrub every statement's parameters on ``engine`` (a SQLAlchemy ``Engine``)."""
    from sqlalchemy import event

    event.listen(engine, "before_cursor_execute", _scrub_parameters, retval=True)


def mask_http_credentials(
    *, login: str | None, password: str | None, headers: Mapping[str, Any] | None
) -> None:
    """Register with Airflow's masker what an HTTP call built from a connection sends:
    the password, the Basic value ``base64(login:password)``, and every header value from
    the connection (the token of ``Bearer <token>`` too) but those of :data:`PUBLIC_HEADERS`.
    In a task, the supervisor learns them as well and masks them in the task log."""
    from airflow.sdk.log import mask_secret

    values: list[str] = []
    if password:
        values.append(password)
        basic = f"{login or ''}:{password}".encode()
        values.append(base64.b64encode(basic).decode())
    for name, value in (headers or {}).items():
        if not isinstance(value, str) or str(name).lower() in PUBLIC_HEADERS:
            continue
        values.append(value)
        scheme, _, token = value.strip().partition(" ")
        if token and scheme.isalpha():
            values.append(token.strip())
    for value in values:
        mask_secret(value)
        # As the ledger stores it inside JSON (quotes, backslashes, non-ASCII escaped).
        escaped = json.dumps(value)[1:-1]
        if escaped != value:
            mask_secret(escaped)
