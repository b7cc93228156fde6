"""Run a real Airflow 3 deployment as local subprocesses, for end-to-end tests and benchmarks.

``AirflowStack`` starts ``api-server``, ``scheduler``, ``dag-processor`` and ``triggerer``
(LocalExecutor, Postgres metadata DB; or ``executor="celery"`` with ``celery_workers`` Celery
workers, see :mod:`ledgerflow.testing.celery_stack`), waits until ``/api/v2/monitor/health`` says every
component is healthy, and offers a small REST client to drive DAG runs. Every component runs in
its own session/process group; ``stop()`` (and ``kill()``) reach the whole process tree, so no
orphans survive, even when ``start()`` fails halfway.

Heavy imports (httpx, psycopg2) happen inside functions: this module stays importable anywhere.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from ledgerflow.errors import StackError
from ledgerflow.testing import celery_stack
from ledgerflow.testing._stack_client import ADMIN_PASSWORD, ADMIN_USER, StackClient

__all__ = ["ADMIN_PASSWORD", "ADMIN_USER", "COMPONENTS", "AirflowStack", "StackError"]

COMPONENTS: tuple[str, ...] = ("api-server", "scheduler", "dag-processor", "triggerer")
_HEALTH_KEYS = {
    "scheduler": "scheduler",
    "dag-processor": "dag_processor",
    "triggerer": "triggerer",
}
_PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"


def _log(msg: str) -> None:
    print(f"[airflow-stack {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """Map pid -> (ppid, session id, start time) for every live process (Linux /proc)."""
    table: dict[int, tuple[int, int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # fields after "pid (comm) "
        # fields[0]=state [1]=ppid [2]=pgrp [3]=session ... [19]=starttime
        table[int(entry.name)] = (int(fields[1]), int(fields[3]), int(fields[19]))
    return table


def _tree(root: int) -> dict[int, int]:
    """Processes belonging to ``root``: its descendants and every member of its session.

    Returns pid -> start time, so a later kill can skip pids that were reused meanwhile.
    """
    table = _proc_table()
    found = {pid: st for pid, (_, sid, st) in table.items() if sid == root}
    if root in table:
        found[root] = table[root][2]
    # Children may have left the session (setsid, e.g. BashOperator): walk down from every member.
    frontier = list(found)
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, st) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = st
                frontier.append(pid)
    return found


def _kill_tree(root: int, known: dict[int, int]) -> None:
    """SIGKILL ``root``'s process group, then every process of its tree still alive."""
    with contextlib.suppress(OSError):
        os.killpg(root, signal.SIGKILL)
    table = _proc_table()
    targets = dict(known)
    targets.update(_tree(root))
    for pid, start in targets.items():
        if pid != os.getpid() and pid in table and table[pid][2] == start:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


class AirflowStack(StackClient):
    """A real Airflow 3 deployment (api-server, scheduler, dag-processor, triggerer)."""

    def __init__(
        self,
        *,
        dags_folder: Path,
        home: Path,
        db_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        plugins_folder: Path | None = None,
        parallelism: int = 4,
        users: dict[str, str] | None = None,
        setup: list[list[str]] | None = None,
        base_path: str = "",
        executor: str = "local",
        celery_workers: int = 2,
        worker_queues: dict[str, list[str]] | None = None,
        worker_concurrency: int = 4,
        broker_url: str | None = None,
    ) -> None:
        """``users``: more SimpleAuthManager users beyond ``admin``, name -> role
        (viewer, user, op, admin; ``role:team1|team2`` in a multi-team deployment); each
        one's password is its name (see :meth:`token`). ``setup``: Airflow CLI commands
        run after ``db migrate`` and before the components start (e.g. ``["teams",
        "sync"]``).

        ``base_path`` (e.g. ``/airflow``): serve Airflow under that sub-path, as behind an
        ingress: ``[api] base_url`` is ``http://127.0.0.1:PORT/airflow`` and a
        :class:`~ledgerflow.testing.subpath_proxy.SubpathProxy` on ``port`` passes only that
        sub-path on to the api-server (on ``api_port``).

        ``executor="celery"``: CeleryExecutor on RabbitMQ, with ``celery_workers`` workers
        (components ``worker1``, ``worker2``, ...) of ``worker_concurrency`` slots each;
        ``worker_queues`` maps a worker's name to the queues it serves (default: the
        ``default`` queue). ``broker_url``: the broker to use instead of a virtual host of
        its own on the machine's RabbitMQ (e.g. a
        :class:`~ledgerflow.testing.private_services.PrivateRabbitMQ` a test restarts)."""
        if executor not in ("local", "celery"):
            raise ValueError(f"executor must be 'local' or 'celery', not {executor!r}")
        self.executor = executor
        self.workers = celery_stack.worker_names(celery_workers) if executor == "celery" else ()
        unknown = set(worker_queues or {}) - set(self.workers)
        if unknown:
            raise ValueError(f"worker_queues names no such worker: {sorted(unknown)}")
        self.worker_queues = dict(worker_queues or {})
        self.worker_concurrency = worker_concurrency
        self.vhost: str | None = None
        self.broker_url = broker_url
        self.dags_folder = Path(dags_folder).resolve()
        self.home = Path(home).resolve()
        self.db_url = db_url
        self.extra_env = dict(extra_env or {})
        self.plugins_folder = Path(plugins_folder).resolve() if plugins_folder else None
        self.parallelism = parallelism
        self.users = {ADMIN_USER: "admin", **(users or {})}
        self.setup = [list(c) for c in setup or []]
        self.base_path = f"/{base_path.strip('/')}" if base_path.strip("/") else ""
        self.port = 0
        self.api_port = 0  # the api-server's own port: ``port`` unless behind the proxy
        self._proxy: Any = None
        self.env: dict[str, str] = {}
        self._created_db: str | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._trees: dict[str, dict[int, int]] = {}
        self._log_offsets: dict[str, int] = {}
        self._token: str | None = None
        self._user_tokens: dict[str, str] = {}
        self._client: Any = None  # httpx.Client, created lazily
        self._atexit_registered = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def components(self) -> tuple[str, ...]:
        """Every component this stack runs: Airflow's four, then the Celery workers."""
        return COMPONENTS + self.workers

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> AirflowStack:
        """Create the DB if needed, migrate it, start all components, wait until healthy."""
        t0 = time.monotonic()
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            self.logs_dir.mkdir(parents=True, exist_ok=True)
            if self.db_url is None:
                self.db_url = self._create_database()
            self.port = _free_port()
            self.api_port = _free_port() if self.base_path else self.port
            if self.base_path:
                from ledgerflow.testing.subpath_proxy import SubpathProxy

                self._proxy = SubpathProxy(self.base_path, self.api_port, port=self.port).start()
            if self.executor == "celery" and self.vhost is None and self.broker_url is None:
                self.vhost = celery_stack.create_vhost()
            self.env = self._build_env()
            self._migrate(timeout=max(30.0, timeout - (time.monotonic() - t0)))
            for name in self.components:
                self.start_component(name)
            self.wait_healthy(
                timeout=max(10.0, timeout - (time.monotonic() - t0)), components=self.components
            )
        except BaseException:
            self.stop()
            raise
        _log(f"stack healthy at {self.base_url} in {time.monotonic() - t0:.1f}s")
        return self

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every component's process group, SIGKILL leftovers, drop the created DB."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        self._token = None
        self._user_tokens.clear()
        procs = list(self._procs.items())
        for name, proc in procs:
            self._trees[name] = {**self._trees.get(name, {}), **_tree(proc.pid)}
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for name, proc in procs:
            _kill_tree(proc.pid, self._trees.pop(name, {}))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        if self.vhost is not None:
            with contextlib.suppress(StackError):
                celery_stack.delete_vhost(self.vhost)
            self.vhost = None
        if self._created_db is not None:
            self._drop_database(self._created_db)
            self._created_db = None
            self.db_url = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def start_component(self, name: str) -> None:
        """Start one component (it must not be running)."""
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; expected one of {self.components}")
        if self.is_alive(name):
            raise StackError(f"{name} is already running")
        args = [name] if name != "api-server" else [name, "--port", str(self.api_port)]
        env = self.env
        if name == "api-server":
            args += ["--host", "127.0.0.1"]
        elif name in self.workers:
            args = celery_stack.worker_args(
                name, self.worker_queues.get(name), self.worker_concurrency
            )
            env = {
                **self.env,
                **celery_stack.WORKER_ENV,
                celery_stack.WORKER_HOSTNAME_ENV: name,
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "ledgerflow.testing.celery_stack.hostname",
            }
        with open(self.log_path(name), "ab") as log:
            log.write(f"\n===== airflow-stack: starting {name} at {time.ctime()} =====\n".encode())
            log.flush()
            self._log_offsets[name] = log.tell()
            proc = subprocess.Popen(
                [*self._airflow_cmd(), *args],
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session + process group: stop() reaches children
            )
        self._procs[name] = proc
        self._trees[name] = {}
        _log(f"started {name} (pid {proc.pid}), log: {self.log_path(name)}")

    def kill(self, name: str) -> None:
        """SIGKILL one component and its whole process tree (a crash, not a shutdown)."""
        proc = self._procs.pop(name, None)
        if proc is None:
            raise StackError(f"{name} is not managed by this stack")
        _kill_tree(proc.pid, {**self._trees.pop(name, {}), **_tree(proc.pid)})
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        _log(f"killed {name} (pid {proc.pid})")

    def restart(self, name: str, *, wait: bool = True, timeout: float = 120.0) -> None:
        """SIGKILL ``name`` (if running) and start it again; wait until it is healthy again."""
        since = datetime.now().astimezone()
        if name in self._procs:
            self.kill(name)
        self.start_component(name)
        if wait:
            self.wait_healthy(timeout=timeout, components=[name], since=since)

    def is_alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int:
        return self._procs[name].pid

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def health(self) -> dict[str, Any]:
        """``GET /api/v2/monitor/health`` (no auth needed)."""
        resp = self._http().get("/api/v2/monitor/health", timeout=10)
        resp.raise_for_status()
        result: dict[str, Any] = resp.json()
        return result

    def wait_healthy(
        self,
        timeout: float = 120.0,
        components: Iterable[str] = COMPONENTS,
        since: datetime | None = None,
    ) -> None:
        """Wait until ``components`` are healthy (with a heartbeat after ``since`` if given)."""
        wanted = list(components)
        deadline = time.monotonic() + timeout
        last_report = 0.0
        status: dict[str, str] = {}
        while True:
            for name in self._procs:
                if not self.is_alive(name):
                    raise StackError(
                        f"{name} exited with code {self._procs[name].returncode} while "
                        f"waiting for health; last log lines:\n{self.log_tail(name)}"
                    )
            status = self._component_status(wanted, since)
            if all(s == "healthy" for s in status.values()):
                return
            now = time.monotonic()
            if now > deadline:
                tails = "\n".join(
                    f"--- {n} ---\n{self.log_tail(n, 15)}"
                    for n, s in status.items()
                    if s != "healthy"
                )
                raise StackError(f"stack not healthy after {timeout:.0f}s: {status}\n{tails}")
            if now - last_report > 5:
                _log("waiting for health: " + ", ".join(f"{k}={v}" for k, v in status.items()))
                last_report = now
            time.sleep(0.5)

    def _component_status(self, wanted: list[str], since: datetime | None) -> dict[str, str]:
        try:
            health = self.health()
        except Exception as exc:
            return {"api-server": f"not-up({type(exc).__name__})"}
        status: dict[str, str] = {}
        for name in wanted:
            if name in self.workers:
                try:
                    log = self.log_path(name).read_bytes()
                except OSError:
                    log = b""
                ready = celery_stack.worker_ready(log, self._log_offsets.get(name, 0))
                status[name] = "healthy" if ready else "starting"
                continue
            if name == "api-server":
                ok = health.get("metadatabase", {}).get("status") == "healthy"
                status[name] = "healthy" if ok else "db-unhealthy"
                continue
            info = health.get(_HEALTH_KEYS[name], {})
            beat = next((v for k, v in info.items() if k.endswith("heartbeat")), None)
            state = str(info.get("status"))
            stale = beat is None or (since and datetime.fromisoformat(beat) <= since)
            if state == "healthy" and since is not None and stale:
                state = "stale-heartbeat"
            status[name] = state
        return status

    # ------------------------------------------------------------------ setup internals

    def _airflow_cmd(self) -> list[str]:
        script = Path(sys.executable).parent / "airflow"
        return [str(script)] if script.exists() else [sys.executable, "-m", "airflow"]

    def _build_env(self) -> dict[str, str]:
        assert self.db_url is not None
        passwords = self.home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({u: self.password(u) for u in self.users}) + "\n")
        plugins = self.plugins_folder or (self.home / "plugins")
        plugins.mkdir(parents=True, exist_ok=True)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("AIRFLOW__") and k not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")
        }
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "PYTHONUNBUFFERED": "1",
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
                "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "1",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": (
                    f"http://127.0.0.1:{self.api_port}{self.base_path}/execution/"
                ),
                "AIRFLOW__CORE__AUTH_MANAGER": (
                    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                    f"{name}:{role}" for name, role in self.users.items()
                ),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.api_port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.05",
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "15",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
                # New files are found within 5 s; a file already parsed is parsed again
                # after 30 s (Airflow's default). Re-parsing every file every 5 s kept about
                # a core busy with an e2e dags folder of ~30 workflows (two stacks: two).
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
                "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.home / "dag_bundles"),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(_free_port()),
            }
        )
        if self.executor == "celery":
            broker = self.broker_url
            if broker is None:
                assert self.vhost is not None
                broker = celery_stack.broker_url(self.vhost)
            env.update(
                celery_stack.celery_env(
                    broker,
                    self.db_url.replace("postgresql+psycopg2://", "postgresql://", 1),
                    self.worker_concurrency,
                )
            )
        env.update(self.extra_env)
        return env

    def _migrate(self, timeout: float) -> None:
        t0 = time.monotonic()
        _log("airflow db migrate ...")
        with open(self.log_path("db-migrate"), "ab") as log:
            try:
                rc = subprocess.run(
                    [*self._airflow_cmd(), "db", "migrate"],
                    env=self.env,
                    cwd=self.home,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    start_new_session=True,
                ).returncode
            except subprocess.TimeoutExpired as exc:
                raise StackError(f"airflow db migrate timed out after {timeout:.0f}s") from exc
        if rc != 0:
            raise StackError(f"airflow db migrate failed ({rc}):\n{self.log_tail('db-migrate')}")
        for command in self.setup:
            with open(self.log_path("db-migrate"), "ab") as log:
                done = subprocess.run(
                    [*self._airflow_cmd(), *command],
                    env=self.env,
                    cwd=self.home,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    start_new_session=True,
                )
            if done.returncode != 0:
                raise StackError(
                    f"airflow {' '.join(command)} failed:\n{self.log_tail('db-migrate')}"
                )
        _log(f"db migrated in {time.monotonic() - t0:.1f}s")

    def _create_database(self) -> str:
        import psycopg2

        name = f"lf_af_{secrets.token_hex(6)}"
        conn = psycopg2.connect(_PG_ADMIN_DSN)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        self._created_db = name
        _log(f"created database {name}")
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"

    @staticmethod
    def _drop_database(name: str) -> None:
        import psycopg2

        try:
            conn = psycopg2.connect(_PG_ADMIN_DSN)
            try:
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                conn.close()
        except Exception as exc:  # never mask the real failure from stop()
            _log(f"could not drop database {name}: {exc}")
