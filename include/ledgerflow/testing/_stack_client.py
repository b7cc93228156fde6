"""The REST client half of ``AirflowStack``: tokens, API calls and run helpers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ledgerflow.errors import StackError

ADMIN_USER = "admin"
ADMIN_PASSWORD = "admin"
_TERMINAL_RUN_STATES = frozenset({"success", "failed"})


class StackClient:
    """Drives a running stack over its REST API as one of its users (admin by default)."""

    users: dict[str, Any]
    _client: Any
    _token: str | None
    _user_tokens: dict[str, str]

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    def _http(self) -> Any:
        if self._client is None:
            import httpx

            self._client = httpx.Client(base_url=self.base_url, timeout=30.0)
        return self._client

    def password(self, user: str = ADMIN_USER) -> str:
        """The password of one of this stack's users (``admin``'s is ``admin``)."""
        if user not in self.users:
            raise ValueError(f"no user {user!r}; this stack has {sorted(self.users)}")
        return ADMIN_PASSWORD if user == ADMIN_USER else user

    def token(self, user: str = ADMIN_USER) -> str:
        """A JWT for ``user`` (default admin) from ``POST /auth/token``, cached."""
        if user != ADMIN_USER:
            if user not in self._user_tokens:
                resp = self._http().post(
                    "/auth/token", json={"username": user, "password": self.password(user)}
                )
                if resp.status_code >= 400:
                    raise StackError(
                        f"POST /auth/token as {user} -> {resp.status_code}: {resp.text}"
                    )
                self._user_tokens[user] = str(resp.json()["access_token"])
            return self._user_tokens[user]
        if self._token is None:
            resp = self._http().post(
                "/auth/token", json={"username": ADMIN_USER, "password": ADMIN_PASSWORD}
            )
            if resp.status_code >= 400:
                raise StackError(f"POST /auth/token -> {resp.status_code}: {resp.text}")
            self._token = str(resp.json()["access_token"])
        return self._token

    def api(self, method: str, path: str, **kw: Any) -> Any:
        """Call the REST API as admin; return parsed JSON (None if empty); raise on HTTP errors."""
        extra_headers = kw.pop("headers", {})
        for attempt in (1, 2):
            headers = {**extra_headers, "Authorization": f"Bearer {self.token()}"}
            resp = self._http().request(method, path, headers=headers, **kw)
            if resp.status_code == 401 and attempt == 1:
                self._token = None  # expired or minted by a previous api-server: re-login once
                continue
            if resp.status_code >= 400:
                raise StackError(f"{method} {path} -> {resp.status_code}: {resp.text}")
            return resp.json() if resp.content else None
        raise AssertionError("unreachable")

    def import_errors(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api(
            "GET", "/api/v2/importErrors", params={"limit": 100}
        )["import_errors"]
        return result

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 120.0) -> None:
        """Wait until every DAG in ``dag_ids`` is parsed and served by the API."""
        pending = set(dag_ids)
        deadline = time.monotonic() + timeout
        while pending:
            for dag_id in sorted(pending):
                try:
                    self.api("GET", f"/api/v2/dags/{dag_id}")
                    pending.discard(dag_id)
                except StackError as exc:
                    if "-> 404" not in str(exc):
                        raise
            if not pending:
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"DAGs not listed after {timeout:.0f}s: {sorted(pending)}; "
                    f"import errors: {self.import_errors()}"
                )
            time.sleep(1.0)

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Trigger a manual run now; return its run_id."""
        body = {"logical_date": None, "conf": conf or {}}
        return str(self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)["dag_run_id"])

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        return result

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> str:
        """Poll until the run is ``success`` or ``failed``; return that state."""
        deadline = time.monotonic() + timeout
        while True:
            state = str(self.run(dag_id, run_id)["state"])
            if state in _TERMINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                tis = [
                    (t["task_id"], t["map_index"], t["state"])
                    for t in self.task_instances(dag_id, run_id)
                ]
                raise TimeoutError(f"{dag_id}/{run_id} still {state} after {timeout:.0f}s: {tis}")
            time.sleep(0.5)

    def wait_for_runs(self, dag_id: str, run_ids: list[str], timeout: float) -> list[str]:
        """Each run's end state, in order. An api-server too busy to answer a poll in time,
        or down a moment (a test that kills it), is asked again, until ``timeout``."""
        import httpx

        deadline = time.monotonic() + timeout
        states = []
        for rid in run_ids:
            while True:
                try:
                    left = max(5.0, deadline - time.monotonic())
                    states.append(self.wait_for_run(dag_id, rid, timeout=left))
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
        return states

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """All task instances of a run (full API dicts: task_id, map_index, state, try_number,
        start_date, end_date, ...)."""
        out: list[dict[str, Any]] = []
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        while True:
            page = self.api("GET", path, params={"limit": 100, "offset": len(out)})
            out.extend(page["task_instances"])
            if not page["task_instances"] or len(out) >= page["total_entries"]:
                return out
