"""Services of a test's own, to restart without disturbing anyone else's.

The machine's Postgres (127.0.0.1:5432) and RabbitMQ (127.0.0.1:5672) serve every test
that runs at the same time, so a test that restarts "the ledger's Postgres" or "the
broker" starts its own first:

```python
with PrivatePostgres() as pg:             # initdb in a temporary folder, its own port
    url = pg.create_database("ledger")    # postgresql://postgres@127.0.0.1:<port>/ledger
    pg.restart(down_for=5)                 # stopped (immediate), 5 s down, started again
with PrivateRabbitMQ() as mq:              # its own Erlang node, port and data folder
    mq.url("/")                            # amqp://guest:guest@127.0.0.1:<port>//
    mq.restart(down_for=5)
```

Both run as the services' own system users (``postgres``, ``rabbitmq``) when this process
is root, as the machine's do; their data folders are removed at ``stop()``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from ledgerflow.errors import StackError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as(user: str, args: list[str]) -> list[str]:
    """``args`` run as ``user`` when this process is root (Postgres refuses root)."""
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", user, "--", *args]
    return args


def _run(
    args: list[str], what: str, timeout: float = 120, env: dict[str, str] | None = None
) -> str:
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    if done.returncode != 0:
        raise StackError(f"{what} failed ({done.returncode}): {done.stderr or done.stdout}")
    return done.stdout


def _give(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user, user)


def _wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise StackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


class PrivatePostgres:
    """A Postgres cluster of its own: ``initdb`` into a temporary folder, trust auth on
    127.0.0.1 at a free port; stopped and removed at ``stop()``."""

    def __init__(self, max_connections: int = 400, bin_dir: str | None = None) -> None:
        self.max_connections = max_connections
        self.bin_dir = Path(bin_dir or _pg_bin_dir())
        self.port = 0
        self.base: Path | None = None

    @property
    def data(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PrivatePostgres:
        self.base = Path(tempfile.mkdtemp(prefix="lf_pg_"))
        _give(self.base, "postgres")
        self.port = free_port()
        _run(
            _as(
                "postgres",
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ],
            ),
            "initdb",
        )
        self._pg_ctl_start()
        return self

    def _pg_ctl_start(self) -> None:
        assert self.base is not None
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} "
            # fsync=off: a restart here stops the server process, never the machine, so
            # what was written reaches the disk through the OS. Commits stay synchronous:
            # with synchronous_commit=off an immediate stop loses the last acknowledged
            # transactions (a checkpoint the ledger was told is durable).
            f"-c max_connections={self.max_connections} -c fsync=off"
        )
        _run(
            _as(
                "postgres",
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.base / "postgres.log"),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ),
            "pg_ctl start",
        )

    def _pg_ctl_stop(self, mode: str) -> None:
        _run(
            _as(
                "postgres",
                [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
            ),
            f"pg_ctl stop -m {mode}",
        )

    def restart(self, down_for: float = 0.0, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash, every connection cut, crash
        recovery at the next start), stay down ``down_for`` seconds, start it again."""
        self._pg_ctl_stop(mode)
        time.sleep(down_for)
        self._pg_ctl_start()

    def is_up(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(self.url())
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)

    def log_tail(self, lines: int = 40) -> str:
        assert self.base is not None
        path = self.base / "postgres.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.base is None:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self._pg_ctl_stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> PrivatePostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _pg_bin_dir() -> str:
    root = Path("/usr/lib/postgresql")
    versions = sorted(root.glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        found = shutil.which("initdb")
        if found is None:
            raise StackError("initdb not found: a private Postgres needs the server binaries")
        return str(Path(found).parent)
    return str(versions[-1].parent)


class PrivateRabbitMQ:
    """A RabbitMQ node of its own (``lf_<port>@localhost``): its own AMQP and distribution
    ports, data and log folders in a temporary folder; ``guest`` may log in from
    loopback as on the machine's node."""

    def __init__(self) -> None:
        self.port = 0
        self.dist_port = 0
        self.base: Path | None = None
        self.node = ""

    def url(self, vhost: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/{vhost}"

    def _env(self) -> dict[str, str]:
        assert self.base is not None
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.base / "rabbit.pid"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
        }

    def start(self) -> PrivateRabbitMQ:
        self.base = Path(tempfile.mkdtemp(prefix="lf_mq_"))
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"lf_{self.port}@localhost"
        for folder in ("mnesia", "log"):
            (self.base / folder).mkdir()
        (self.base / "rabbitmq.conf").write_text(
            "loopback_users = none\n"
            "management_agent.disable_metrics_collector = true\n"
            "disk_free_limit.absolute = 50MB\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "advanced.config").write_text("[].\n")
        if os.geteuid() == 0:
            for path in [self.base, *self.base.rglob("*")]:
                _give(path, "rabbitmq")
        self._start_node()
        return self

    def _ctl(self, *args: str, timeout: float = 120) -> str:
        tool = shutil.which("rabbitmqctl")
        if tool is None:
            raise StackError("rabbitmqctl not found: a private RabbitMQ needs the server")
        return _run(
            _as("rabbitmq", [tool, "-n", self.node, *args]),
            f"rabbitmqctl {' '.join(args)}",
            timeout=timeout,
            env=self._env(),
        )

    def _start_node(self) -> None:
        server = shutil.which("rabbitmq-server")
        if server is None:
            raise StackError("rabbitmq-server not found: a private RabbitMQ needs it")
        _run(_as("rabbitmq", [server, "-detached"]), "rabbitmq-server -detached", env=self._env())
        _wait_port(self.port, 120, f"RabbitMQ node {self.node}")
        self._ctl("await_startup", "--timeout", "120", timeout=150)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the whole node (``rabbitmqctl stop``: every connection closed), stay down
        ``down_for`` seconds, start it again (its durable queues and messages kept)."""
        self._ctl("stop")
        self._wait_down()
        time.sleep(down_for)
        self._start_node()

    def _wait_down(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                probe.settimeout(1.0)
                if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
        raise StackError(f"RabbitMQ node {self.node} still listening after stop")

    def add_vhost(self, name: str) -> str:
        self._ctl("add_vhost", name)
        self._ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return self.url(name)

    def stop(self) -> None:
        if self.base is None:
            return
        try:
            self._ctl("stop", timeout=60)
        except (StackError, subprocess.TimeoutExpired):
            pass
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> PrivateRabbitMQ:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
