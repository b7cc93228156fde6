"""Ledgerflow's settings: the ``[ledgerflow]`` section of Airflow's configuration.

Every setting is read here and nowhere else, the way Airflow reads its own: the
environment variable ``AIRFLOW__LEDGERFLOW__<KEY>`` first, then ``airflow.cfg``, then the
default below. In a process that has loaded Airflow's configuration already (every
Airflow component, a task, the DAG processor) Airflow's ``conf`` answers, with its
``_cmd`` / ``_secret`` variants and secrets backends; a light command that does not load
Airflow (``ledgerflow validate``, ``new``, ``run``: loading it costs ~1 s) reads the
environment and ``$AIRFLOW_HOME/airflow.cfg`` itself.

The dags folder is one rule in every process: a command's ``--dags-folder``, else
``AIRFLOW__CORE__DAGS_FOLDER``, else ``[core] dags_folder`` in ``airflow.cfg``, else
``./dags`` (a project's layout). Airflow itself falls back to ``$AIRFLOW_HOME/dags`` when
neither is set: set one of them so that Airflow and Ledgerflow agree (every deployment of
ours does).

``ledgerflow config`` prints every option with its value and where it came from.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledgerflow.errors import SettingError

SECTION = "ledgerflow"


@dataclass(frozen=True)
class Option:
    default: str
    description: str
    type: Callable[[str], Any] = str
    legacy_env: str | None = None
    """An older environment variable still honoured (after ``AIRFLOW__LEDGERFLOW__*``)."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _auto_bool(text: str) -> bool | str:
    if text.strip().lower() == "auto":
        return "auto"
    return _bool(text)


def _seconds(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {text!r}")
    return value


def parse_duration(text: str) -> Any:
    """``90d``, ``12h``, ``30m``, ``45s`` or a number of seconds -> a positive timedelta."""
    import re
    from datetime import timedelta

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a positive duration such as 90d, 12h or 30m, got {text!r}")
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[match.group(2)]
    return timedelta(seconds=float(match.group(1)) * unit)


OPTIONS: dict[str, Option] = {
    "conn_id": Option(
        "ledgerflow_db",
        "The Airflow connection of the ledger (postgres or sqlite). Without such a "
        "connection the ledger is the SQLite file $AIRFLOW_HOME/ledgerflow.db.",
    ),
    "webhook_tolerance": Option(
        "300",
        "Seconds a signed webhook's timestamp may differ from the server's clock; older "
        "or newer deliveries are refused (replay protection).",
        _seconds,
    ),
    "form_token_ttl": Option(
        "7200",
        "Seconds a page's form (decide an approval, retry a run) stays valid after the "
        "page was rendered.",
        _seconds,
    ),
    "demo_tools": Option(
        "False",
        "Put the demo's tools (demo.*) on the tool allow-list. Only for the demo.",
        _bool,
        legacy_env="LEDGERFLOW_DEMO_TOOLS",
    ),
    "skip_saga_on_success": Option(
        "True",
        "When the last step of a run that can no longer fail ends, it skips the "
        "compensation tasks and saga__finish at once (no worker starts for them). Off: "
        "each of them starts on a worker and skips itself (slower; the result is the same).",
        _bool,
    ),
    "suites_dir": Option(
        "",
        "Folder of shared Great Expectations suites (<name>.yaml); empty: "
        "include/ledgerflow_suites beside the package.",
        legacy_env="LEDGERFLOW_SUITES_DIR",
    ),
    "retention": Option(
        "90d",
        "How long finished runs keep their payloads and events in the ledger: the "
        "maintenance DAG's prune removes older ones (`ledgerflow prune --older-than`).",
        parse_duration,
    ),
    "effect_key_horizon": Option(
        "365d",
        "How long an effect's idempotency key (and its recorded result) outlives its run: "
        "a prune keeps effects younger than this, so a late retry still finds them.",
        parse_duration,
    ),
    "event_ttl": Option(
        "24h",
        "How long an event delivered before any step waits for it (its name and key) is "
        "kept in the ledger for a wait that starts later; after that it is never taken.",
        parse_duration,
    ),
    "event_webhook_conn_id": Option(
        "ledgerflow_events_webhook",
        "The Airflow connection whose password (or extra.secret) signs deliveries to "
        "POST /ledgerflow/hooks/events/<name> (as a workflow's webhook is signed).",
    ),
    "orphan_after": Option(
        "1d",
        "A running run with no ledger event for this long, and no pending approval, counts "
        "as orphaned in the SLO indicators.",
        parse_duration,
    ),
    "doctor_fix": Option(
        "False",
        "The maintenance DAG's doctor (ledgerflow_doctor) also repairs what is safe to "
        "repair (`ledgerflow doctor --fix`); off: it reports only.",
        _bool,
    ),
    "doctor_grace": Option(
        "5m",
        "`ledgerflow doctor` leaves a DagRun that ended less than this ago alone: its "
        "callback may still be writing the run's end to the ledger.",
        parse_duration,
    ),
    "preload_llm": Option(
        "auto",
        "Import what an LLM step needs (pydantic-ai, common.ai's hook, the OpenAI client: "
        "~1.5 s, ~40 MB) once in the Airflow component, so that each task process forked "
        "from it does not (2-4 s per LLM task). auto: in the components that fork task "
        "processes (the scheduler, Celery and Edge workers); true: in every one; "
        "false: in none.",
        _auto_bool,
    ),
    "supervisor_exit_wait": Option(
        "true",
        "In the components that supervise task processes (the scheduler's LocalExecutor "
        "workers, Celery and Edge workers), make Airflow's task supervisor wait on a task "
        "process that has closed its sockets, instead of sleeping [workers] "
        "min_heartbeat_interval (5 s) before it notices the exit and frees the slot "
        "(ledgerflow.supervisor_exit).",
        _bool,
    ),
}


def get(key: str) -> Any:
    """The typed value of ``[ledgerflow] <key>``."""
    option = OPTIONS[key]
    raw, source = lookup(SECTION, key, option.default, option.legacy_env)
    try:
        return option.type(raw)
    except ValueError as exc:
        raise SettingError(f"[{SECTION}] {key} (from {source}): {exc}") from None


def dags_folder(explicit: str | Path | None = None) -> Path:
    """Where ``workflows/<name>/v<N>.yaml`` live: ``explicit`` (a ``--dags-folder``), else
    ``[core] dags_folder`` as set in the environment or ``airflow.cfg``, else ``./dags``."""
    if explicit:
        return Path(explicit)
    return Path(lookup("core", "dags_folder", "dags", ask_airflow=False)[0]).expanduser()


def workflow_file(workflow: str, version: int, folder: str | Path | None = None) -> Path:
    """The file of one workflow version: ``<dags folder>/workflows/<name>/v<N>.yaml``."""
    return dags_folder(folder) / "workflows" / workflow / f"v{version}.yaml"


DAGS_FOLDER_HELP = (
    "where workflows/<name>/v<N>.yaml live (default: [core] dags_folder from the "
    "environment or airflow.cfg, else ./dags)"
)


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow").expanduser()


def lookup(
    section: str,
    key: str,
    default: str,
    legacy_env: str | None = None,
    *,
    ask_airflow: bool = True,
) -> tuple[str, str]:
    """The raw value of ``[section] key`` and where it came from; ``ask_airflow=False``
    reads only the environment and ``airflow.cfg`` (never Airflow's own default)."""
    env = f"AIRFLOW__{section.upper()}__{key.upper()}"
    if env in os.environ:
        return os.environ[env], f"${env}"
    if legacy_env and legacy_env in os.environ:
        return os.environ[legacy_env], f"${legacy_env}"
    if ask_airflow and "airflow.configuration" in sys.modules:  # loaded: Airflow answers
        from airflow.configuration import conf

        value = conf.get(section, key, fallback=None)
        if value is not None:
            return str(value), "Airflow's configuration"
        return default, "default"
    value = _from_cfg_file(section, key)
    if value is not None:
        return value, str(airflow_home() / "airflow.cfg")
    return default, "default"


def _from_cfg_file(section: str, key: str) -> str | None:
    import configparser

    path = Path(os.environ.get("AIRFLOW_CONFIG") or airflow_home() / "airflow.cfg")
    if not path.is_file():
        return None
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error:
        return None
    value = parser.get(section, key, fallback=None)
    return None if value is None else value.replace("{AIRFLOW_HOME}", str(airflow_home()))


def describe() -> list[dict[str, str]]:
    """Every option with its current value and source (``ledgerflow config``)."""
    rows = []
    for key, option in OPTIONS.items():
        value, source = lookup(SECTION, key, option.default, option.legacy_env)
        rows.append({"option": key, "value": value, "source": source, "about": option.description})
    folder = dags_folder()
    rows.append(
        {
            "option": "[core] dags_folder",
            "value": str(folder),
            "source": lookup("core", "dags_folder", "", ask_airflow=False)[1],
            "about": "Where workflows/<name>/v<N>.yaml live (Airflow's own setting; "
            "unset: ./dags).",
        }
    )
    return rows


def provider_config() -> dict[str, Any]:
    """The section as a provider declares it (``get_provider_info()["config"]``), so
    ``airflow config list`` shows it with descriptions and defaults."""
    return {
        SECTION: {
            "description": "Ledgerflow: durable workflows on Airflow.",
            "options": {
                key: {
                    "description": option.description,
                    "version_added": None,
                    "type": "boolean"
                    if option.type is _bool
                    else "integer"
                    if option.type is _seconds
                    else "string",
                    "example": None,
                    "default": option.default,
                }
                for key, option in OPTIONS.items()
            },
        }
    }
