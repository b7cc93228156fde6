"""Connection secrets stay out of the ledger, its pages, XCom and traces.

Airflow's secrets masker knows every secret a task has seen: a connection's password and
extras are registered with it when the connection is read (``BaseHook.get_connection``),
Airflow's own sensitive config values at start-up, anything passed to ``mask_secret``.
Airflow applies it to its task logs only. Ledgerflow applies the same masker to what it
stores:

- :func:`install` hooks the ledger's engine so that every string parameter of every
  statement passes through :func:`scrub` before it reaches the database. Errors, outputs,
  events and dead letters, whoever writes them, cannot bypass it; with nothing registered
  it costs one attribute check per statement. Airflow 3.3 has two maskers (the Task
  SDK's and core's): a string is first screened by one pattern made of both maskers'
  patterns (one scan; the parameters are not copied when none holds a secret, the
  common case), and only a string that holds a secret goes through the maskers
  themselves, each in turn, as before.
- :func:`mask_http_credentials` registers what an HTTP call sends on top of what Airflow
  registers itself: the encoded Basic value (``base64(login:password)``, which a peer
  that echoes request headers sends back) and header values taken from the connection.

Nothing here imports Airflow: a masker that was never loaded has nothing registered.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

# Airflow 3.3 keeps two maskers: the Task SDK's (tasks, triggerer) and core's (servers).
MASKER_MODULES = ("airflow.sdk._shared.secrets_masker", "airflow._shared.secrets_masker")

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
    for name in MASKER_MODULES:
        module = sys.modules.get(name)
        if module is not None and module._secrets_masker().replacer is not None:
            active.append(module)
    return active


# The screen of the maskers' current patterns: (their compiled patterns, the screen).
_SCREEN: tuple[tuple[re.Pattern[str], ...], re.Pattern[str] | None] = ((), None)


def _screen(maskers: list[Any]) -> re.Pattern[str]:
    """One pattern that matches wherever a secret of any of ``maskers`` occurs.

    A masker compiles a new pattern whenever a secret is added (or its patterns are put
    back), so the screen is rebuilt when a masker's pattern is not the one it was made
    from."""
    global _SCREEN
    replacers = tuple(m._secrets_masker().replacer for m in maskers)
    made_from, screen = _SCREEN
    if (
        screen is not None
        and len(made_from) == len(replacers)
        and all(a is b for a, b in zip(made_from, replacers, strict=True))
    ):
        return screen
    if len(replacers) == 1:
        screen = replacers[0]
    else:
        # Each masker's whole pattern as one group: a match of either, nothing else.
        screen = re.compile("|".join(f"(?:{r.pattern})" for r in replacers))
    _SCREEN = (replacers, screen)
    return screen


def scrub(value: Any) -> Any:
    """``value`` with every registered secret in its strings replaced by ``***``, at any
    depth (dict keys included). Only registered values are masked: a key's name alone
    (``password: x``) changes nothing, so stored data keeps its shape."""
    maskers = _active()
    return _scrub(value, maskers, _screen(maskers)) if maskers else value


def _scrub(value: Any, maskers: list[Any], screen: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        if screen.search(value) is None:
            return value  # no secret of any masker in it: both would leave it as it is
        for masker in maskers:
            value = masker.redact(value)
        return value
    if isinstance(value, dict):
        return {_scrub(k, maskers, screen): _scrub(v, maskers, screen) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, maskers, screen) for v in value]
    if isinstance(value, tuple):
        return tuple(_scrub(v, maskers, screen) for v in value)
    return value


def scrub_exception(error: BaseException) -> BaseException:
    """``error`` with its arguments (its message) scrubbed, and those of its cause and
    context: what Airflow logs and reports of a failed task, in every process (the
    scheduler's own log included), without registered secrets."""
    maskers = _active()
    screen = _screen(maskers) if maskers else None
    seen: set[int] = set()
    current: BaseException | None = error
    pending: list[BaseException] = []
    while screen is not None and current is not None and id(current) not in seen:
        seen.add(id(current))
        with contextlib.suppress(AttributeError, TypeError):  # an extension type's fixed args
            current.args = tuple(_scrub(a, maskers, screen) for a in current.args)
        pending += [e for e in (current.__cause__, current.__context__) if e is not None]
        current = pending.pop() if pending else None
    return error


def _scrub_parameters(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    maskers = _active()
    if not maskers or parameters is None:
        return statement, parameters
    return statement, _scrub_bound(parameters, maskers, _screen(maskers))


def _scrub_bound(parameters: Any, maskers: list[Any], screen: re.Pattern[str]) -> Any:
    # A dict's keys are bind names (kept); a list holds executemany's parameter sets.
    # Copied only when a value changes: most statements carry no secret at all.
    if isinstance(parameters, dict):
        changed: dict[str, Any] | None = None
        for name, value in parameters.items():
            scrubbed = _scrub(value, maskers, screen)
            if scrubbed is not value:
                if changed is None:
                    changed = dict(parameters)
                changed[name] = scrubbed
        return parameters if changed is None else changed
    if isinstance(parameters, list):
        return [_scrub_bound(p, maskers, screen) for p in parameters]
    return _scrub(parameters, maskers, screen)


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
