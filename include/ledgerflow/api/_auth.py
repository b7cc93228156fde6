"""Who is calling: Airflow's own authentication, the user's roles, and CSRF tokens.

Plugin apps get no authentication from Airflow. Every route except ``/health`` depends on
:func:`current_user`, which delegates to Airflow's ``get_user`` (a Bearer token or the
``_token`` cookie the Airflow UI carries, validated by the configured auth manager).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends


@dataclass(frozen=True)
class Caller:
    """The authenticated Airflow user: the name recorded as approver, their roles, and the
    DAGs they may read (``None``: everything, for a caller built without Airflow)."""

    name: str
    roles: frozenset[str]
    dags: frozenset[str] | None = None

    def may_read(self, dag_id: str) -> bool:
        """Whether Airflow lets this user read the DAG (and so its approvals and runs)."""
        return self.dags is None or dag_id in self.dags


def roles_of(user: Any) -> frozenset[str]:
    """The role names of an Airflow user object, whatever the auth manager.

    SimpleAuthManager users carry one ``role`` string; FAB users a ``roles`` list of Role
    objects (``.name``); other managers may carry plain strings.
    """
    found: set[str] = set()
    role = getattr(user, "role", None)
    if isinstance(role, str) and role:
        found.add(role)
    roles = getattr(user, "roles", None)
    if isinstance(roles, Iterable) and not isinstance(roles, str | bytes):
        for item in roles:
            name = item if isinstance(item, str) else getattr(item, "name", None)
            if isinstance(name, str) and name:
                found.add(name)
    return frozenset(found)


def roles_of_name(name: str) -> frozenset[str] | None:
    """The roles of a user known only by name (the ``assignee`` filter); None if unknown.

    SimpleAuthManager's users are configuration; FAB's are in its security manager.
    """
    try:
        from airflow.api_fastapi.app import get_auth_manager

        manager = get_auth_manager()
    except Exception:
        return None
    get_users = getattr(manager, "get_users", None)
    if callable(get_users):  # SimpleAuthManager
        for user in get_users():
            if getattr(user, "username", None) == name:
                return roles_of(user)
        return None
    security_manager = getattr(manager, "security_manager", None)  # FAB
    find_user = getattr(security_manager, "find_user", None)
    if callable(find_user):
        try:
            user = find_user(username=name)
        except Exception:
            return None
        return None if user is None else roles_of(user)
    return None


async def current_user(user: Annotated[Any, Depends(get_user)]) -> Caller:
    """Airflow's authenticated user (401 anonymous, 403 an invalid token), with the DAGs
    Airflow's auth manager lets them read (its own rule, teams included)."""
    return Caller(name=str(user.get_name()), roles=roles_of(user), dags=readable_dags(user))


CallerDep = Annotated[Caller, Depends(current_user)]


def csrf_token(secret: bytes, user: str, approval_id: int, *, at: int | None = None) -> str:
    """A form token bound to one user and one approval (HMAC with a server secret), and to
    the time the page was rendered: it expires ``[ledgerflow] form_token_ttl`` later."""
    return form_token(secret, user, f"decide:{approval_id}", at=at)


def csrf_ok(
    secret: bytes, user: str, approval_id: int, token: str, *, now: float | None = None
) -> bool:
    return form_token_ok(secret, user, f"decide:{approval_id}", token, now=now)


def form_token(secret: bytes, user: str, purpose: str, *, at: int | None = None) -> str:
    """A form token bound to one user and one purpose (e.g. ``retry:<run id>``) and the
    time it was made: the unix time in 10 hex digits, then the hex HMAC of all three."""
    issued = int(time.time()) if at is None else at
    return f"{issued:010x}{_form_mac(secret, user, purpose, issued)}"


def form_token_ok(
    secret: bytes, user: str, purpose: str, token: str, *, now: float | None = None
) -> bool:
    """Made by this server for this user and purpose, and no older than
    ``[ledgerflow] form_token_ttl`` (nor from the future, beyond a minute of clock skew)."""
    from ledgerflow import settings

    token = token or ""
    try:
        issued = int(token[:10], 16)
    except ValueError:
        return False
    if not token.isascii():  # compare_digest takes ASCII text only
        return False
    if not hmac.compare_digest(_form_mac(secret, user, purpose, issued), token[10:]):
        return False
    age = (time.time() if now is None else now) - issued
    return -60 <= age <= int(settings.get("form_token_ttl"))


def _form_mac(secret: bytes, user: str, purpose: str, issued: int) -> str:
    msg = f"ledgerflow-form:{purpose}:{user}:{issued}".encode()
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def server_secret() -> bytes:
    """Derived from Airflow's ``[api] secret_key`` (shared by all api-server workers), else
    from the JWT secret; a per-process random key as the last resort (forms then only
    work against the worker that rendered them)."""
    from airflow.configuration import conf

    for section, key in (("api", "secret_key"), ("api_auth", "jwt_secret")):
        value = conf.get(section, key, fallback=None)
        if value:
            return hashlib.sha256(b"ledgerflow-csrf:" + value.encode()).digest()
    return _RANDOM


_RANDOM = os.urandom(32)


def readable_dags(user: Any) -> frozenset[str]:
    """The DAG ids Airflow's auth manager lets this user read (its own rule, teams included)."""
    from airflow.api_fastapi.app import get_auth_manager

    return frozenset(get_auth_manager().get_authorized_dag_ids(user=user, method="GET"))


def may_read_runs(user: Any, dag_id: str) -> bool:
    """Airflow's own rule for reading a DAG's runs (``GET`` on its runs) for this user."""
    return _may_on_runs(user, dag_id, "GET")


def may_create_runs(user: Any, dag_id: str) -> bool:
    """Airflow's own rule for triggering a DAG (``POST`` on its runs) for this user."""
    return _may_on_runs(user, dag_id, "POST")


def may_edit_runs(user: Any, dag_id: str) -> bool:
    """Airflow's rule for changing a DAG's runs (``PUT``: marking a run's state, clearing
    it) for this user: what cancelling a run needs."""
    return _may_on_runs(user, dag_id, "PUT")


def may_read_xcom(user: Any, dag_id: str) -> bool:
    """Airflow's rule for reading a DAG's XCom (the results its own run wait returns)."""
    return _may_on_runs(user, dag_id, "GET", "XCOM")


def _may_on_runs(
    user: Any, dag_id: str, method: Literal["GET", "POST", "PUT"], entity: str = "RUN"
) -> bool:
    from fastapi import HTTPException

    try:
        require_dag(user, dag_id, method, entity)
    except HTTPException as exc:
        if exc.status_code == 403:
            return False
        raise
    return True


def require_dag(
    user: Any, dag_id: str, method: Literal["GET", "POST", "PUT"], entity: str = "RUN"
) -> None:
    """Airflow's own permission dependency for one DAG (``requires_access_dag``, as its
    public API routes declare it), called with the DAG a Ledgerflow route resolved from
    its workflow, run or approval: the auth manager decides, with the DAG's team in a
    multi-team deployment (403 otherwise). Our routes name a workflow, a run or an
    approval rather than a ``dag_id`` path parameter, so the dependency is applied to the
    DAG id the route found instead of being declared on the route."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    check = requires_access_dag(method, DagAccessEntity[entity], param_dag_id=dag_id)
    check(None, user)  # type: ignore[arg-type]  # the request is read only without a dag id
