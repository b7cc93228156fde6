"""The CeleryExecutor parts of :class:`~ledgerflow.testing.airflow_stack.AirflowStack`.

``AirflowStack(executor="celery", celery_workers=2)`` runs Airflow's CeleryExecutor with
RabbitMQ as the broker (``127.0.0.1:5672``, guest/guest: the machine's) and the stack's
Postgres metadata database as the result backend. Each stack gets a RabbitMQ virtual host of
its own (``rabbitmqctl add_vhost``, deleted at ``stop()``), so stacks started in parallel
never share a queue. Each worker is a component of its own (``worker1``, ``worker2``, ...):
an ``airflow celery worker`` process with its own Celery hostname (``-H worker1@<host>``),
its own queues (default: Airflow's ``default``), killable and restartable one by one like
the scheduler.

A worker's tasks report the worker's name as their TaskInstance ``hostname`` (Airflow's
``[core] hostname_callable`` is :func:`hostname`, which reads ``LEDGERFLOW_WORKER_HOSTNAME``
from the worker's environment): tests can see which worker ran a task.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess

from ledgerflow.errors import StackError

BROKER_HOST = "127.0.0.1:5672"
BROKER_USER = "guest"
WORKER_HOSTNAME_ENV = "LEDGERFLOW_WORKER_HOSTNAME"
READY = re.compile(rb"\S+@\S+ ready\.")
DEFAULT_QUEUE = "default"  # Airflow's [operators] default_queue

# What a Celery worker needs beyond the stack's settings. Airflow loads plugins lazily; a
# Celery worker never needs them itself, so each task process loaded them after its fork:
# the Ledgerflow plugin, its app and its preload (the LLM modules included), 2-3 s of CPU
# per task. Loaded in the worker's main process, they are inherited by its pool and by
# every task process forked from it (see ledgerflow.preload). docker-compose.yml's workers
# set the same.
WORKER_ENV = {"AIRFLOW__CORE__LAZY_LOAD_PLUGINS": "False"}


def hostname() -> str:
    """``[core] hostname_callable`` of a stack's workers: the worker's name (its
    ``LEDGERFLOW_WORKER_HOSTNAME``), else the machine's FQDN as Airflow's default."""
    return os.environ.get(WORKER_HOSTNAME_ENV) or socket.getfqdn()


def worker_names(count: int) -> tuple[str, ...]:
    return tuple(f"worker{i}" for i in range(1, count + 1))


def _rabbitmqctl(*args: str) -> None:
    tool = shutil.which("rabbitmqctl")
    if tool is None:
        raise StackError("rabbitmqctl not found: the Celery stack needs RabbitMQ on this machine")
    done = subprocess.run(
        [tool, *args], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise StackError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr or done.stdout}")


def create_vhost() -> str:
    """A fresh RabbitMQ virtual host for one stack (guest may use it)."""
    name = f"lf_{secrets.token_hex(6)}"
    _rabbitmqctl("add_vhost", name)
    _rabbitmqctl("set_permissions", "-p", name, BROKER_USER, ".*", ".*", ".*")
    return name


def delete_vhost(name: str) -> None:
    _rabbitmqctl("delete_vhost", name)


def broker_url(vhost: str) -> str:
    return f"amqp://{BROKER_USER}:{BROKER_USER}@{BROKER_HOST}/{vhost}"


def celery_env(broker: str, db_url: str, concurrency: int) -> dict[str, str]:
    """The ``[celery]`` settings every component of a Celery stack shares."""
    return {
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__CELERY__BROKER_URL": broker,
        # The metadata database: Airflow reads task states from it (not from the broker).
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + db_url,
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
        # A worker takes one message at a time (a killed worker loses no prefetched ones).
        "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
        "AIRFLOW__CELERY__SYNC_PARALLELISM": "1",
    }


def worker_args(name: str, queues: list[str] | None, concurrency: int) -> list[str]:
    """``airflow celery worker`` arguments of the worker ``name``."""
    return [
        "celery",
        "worker",
        "-H",
        f"{name}@{socket.gethostname()}",
        "-q",
        ",".join(queues or [DEFAULT_QUEUE]),
        "-c",
        str(concurrency),
        # Task logs stay on this machine's disk; several workers would fight for the port.
        "--skip-serve-logs",
        # No gossip and mingle between workers: nothing here needs it, and it costs start time.
        "--without-gossip",
        "--without-mingle",
    ]


def worker_ready(log: bytes, started_at: int) -> bool:
    """Whether the worker's log, after byte offset ``started_at``, says it is ready."""
    return READY.search(log, started_at) is not None
