"""The container topology (docker-compose.yml, Dockerfile, .dockerignore) agrees with the code.

Docker does not run where these tests run, so nothing here starts a container: the tests read the
files and check them against what they must match: the installed Airflow (its CLI commands and
config options, read from the venv's ``airflow`` package), requirements/lock.txt, pyproject.toml,
the ``ledgerflow`` CLI and ledger code, docker/postgres-init.sql and README.md.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
LOCK = ROOT / "requirements" / "lock.txt"
README = ROOT / "README.md"
PG_INIT = ROOT / "docker" / "postgres-init.sql"

# Long-running Airflow components: compose service name == `airflow <command>`.
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# Components whose health is `airflow jobs check --job-type <Job>`.
JOB_TYPES = {
    "scheduler": "SchedulerJob",
    "dag-processor": "DagProcessorJob",
    "triggerer": "TriggererJob",
}
CELERY_PROFILE = "celery"
WORKER = "worker"
# The Celery workers, as the tests' Celery stack runs them: name -> the queues it serves.
WORKERS = {WORKER: "default,payments", "worker-2": "default"}
INIT = "airflow-init"
POSTGRES = "postgres"
RABBITMQ = "rabbitmq"
COMMON_ANCHOR = "x-airflow-common"

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")
_AIRFLOW_OPTION_ENV = re.compile(r"\bAIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)\b")

# Dumps the installed Airflow CLI (the same command tree `airflow --help` is built from) as JSON.
_CLI_DUMP = r"""
import json

from airflow.cli import cli_config
from airflow.executors.executor_constants import CORE_EXECUTOR_NAMES


def walk(commands):
    out = {}
    for cmd in commands:
        if hasattr(cmd, "subcommands"):
            out[cmd.name] = {"subcommands": walk(cmd.subcommands)}
        else:
            args = {}
            for arg in cmd.args:
                choices = arg.kwargs.get("choices")
                for flag in arg.flags:
                    args[flag] = list(choices) if choices else None
            out[cmd.name] = {"args": args}
    return out


tree = walk(cli_config.core_commands)
try:  # `airflow celery ...` comes from the Celery provider (not in requirements/lock.txt)
    from airflow.providers.celery.executors.celery_executor import CeleryExecutor
except ImportError:
    pass
else:
    tree.update(walk(CeleryExecutor.get_cli_commands()))
print(json.dumps({"tree": tree, "core_executors": sorted(CORE_EXECUTOR_NAMES)}))
"""


# --------------------------------------------------------------------------- helpers


def _default(value: Any) -> str:
    """A compose value as `docker compose` sees it with no variable set: defaults, `$$` -> `$`."""
    text = str(value)

    def repl(m: re.Match[str]) -> str:
        return m.group("default") if m.group("op") in (":-", "-") else ""

    return _VAR.sub(repl, text.replace("$$", "\0")).replace("\0", "$")


def _argv(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _volume_targets(service: dict[str, Any]) -> dict[str, str]:
    """Mount target -> source of a service's volumes (short and long syntax)."""
    out: dict[str, str] = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            out[str(vol["target"])] = str(vol.get("source", ""))
        else:
            parts = str(vol).split(":")
            if len(parts) == 1:
                out[parts[0]] = ""
            else:
                out[parts[1]] = parts[0]
    return out


def _published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> published host port (short `[ip:]host:container[/proto]` or long)."""
    out: dict[int, int] = {}
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                out[int(_default(port["target"]))] = int(_default(port["published"]))
            continue
        parts = _default(port).split("/")[0].split(":")
        if len(parts) >= 2:
            out[int(parts[-1])] = int(parts[-2])
    return out


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {k: (v or {}).get("condition", "service_started") for k, v in deps.items()}


def _check_airflow_command(argv: list[str], tree: dict[str, Any]) -> None:
    """Fail unless ``argv`` (``airflow ...``) is a command of the installed CLI with real flags."""
    assert argv and argv[0] == "airflow", f"not an airflow command: {argv}"
    node: dict[str, Any] = {"subcommands": tree}
    words = argv[1:]
    path = ["airflow"]
    while "subcommands" in node:
        assert words, f"`{' '.join(argv)}`: `{' '.join(path)}` is a group, no command given"
        name = words.pop(0)
        assert name in node["subcommands"], (
            f"`{' '.join(argv)}`: `{' '.join(path)}` has no subcommand {name!r} in the installed "
            f"Airflow CLI (has: {sorted(node['subcommands'])})"
        )
        node = node["subcommands"][name]
        path.append(name)
    args: dict[str, list[str] | None] = node["args"]
    while words:
        word = words.pop(0)
        if not word.startswith("-"):
            continue  # a positional argument
        flag, _, inline = word.partition("=")
        assert flag in args, f"`{' '.join(argv)}`: `{' '.join(path)}` has no option {flag}"
        choices = args[flag]
        if choices:
            value = inline or (words.pop(0) if words else "")
            assert value in choices, f"`{' '.join(argv)}`: {flag} {value!r} is not one of {choices}"


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        instr, _, rest = buf.partition(" ")
        out.append((instr.upper(), rest.strip()))
        buf = ""
    return out


def _copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY/ADD from the build context."""
    out = []
    for instr, rest in _dockerfile():
        if instr not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        if any(w.startswith("--from") for w in shlex.split(rest)):
            continue
        out.append((words[:-1], words[-1]))
    return out


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    rx = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            rx += "(?:.*/)?"
            i += 3
            continue
        if pattern.startswith("**", i):
            rx += ".*"
            i += 2
            continue
        if c == "*":
            rx += "[^/]*"
        elif c == "?":
            rx += "[^/]"
        elif c == "[":
            end = pattern.index("]", i)
            rx += pattern[i : end + 1]
            i = end
        else:
            rx += re.escape(c)
        i += 1
    return re.compile(rx)


def _dockerignored(path: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for negated, rx in patterns:
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def _context_files(path: Path) -> list[str]:
    """Files under ``path`` that belong to the project (git: tracked or not ignored)."""
    proc = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode == 0:
        return [line for line in proc.stdout.splitlines() if line]
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    rels = [f.relative_to(ROOT).as_posix() for f in files]
    return [r for r in rels if not re.search(r"__pycache__|\.pyc$|\.egg-info/", r)]


def _readme_compose_section() -> str | None:
    if not README.exists():
        return None
    text = README.read_text()
    m = re.search(r"^##[ \t]+Docker Compose[ \t]*$", text, re.MULTILINE | re.IGNORECASE)
    if m is None:
        return None
    rest = text[m.end() :]
    end = re.search(r"^#{1,2}[ \t]", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def _pg_url(value: str) -> Any:
    url = urlsplit(value)
    assert url.scheme in ("postgres", "postgresql", "postgresql+psycopg2"), value
    return url


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def shared_env(compose: dict[str, Any]) -> dict[str, str]:
    common = compose.get(COMMON_ANCHOR)
    assert isinstance(common, dict), f"docker-compose.yml has no `{COMMON_ANCHOR}` block"
    env = _env(common)
    assert env, f"`{COMMON_ANCHOR}` has no environment block"
    return env


@pytest.fixture(scope="module")
def airflow_cli(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(tmp_path_factory.mktemp("airflow_home"))
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_DUMP],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"cannot read the installed Airflow CLI:\n{proc.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def airflow_options() -> set[tuple[str, str]]:
    """(section, key) of every option the installed Airflow knows (config.yml + provider fallbacks)."""
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.origin is not None, "apache-airflow is not installed"
    templates = Path(spec.origin).parent / "config_templates"
    options = {
        (section, key)
        for section, body in yaml.safe_load((templates / "config.yml").read_text()).items()
        for key in (body or {}).get("options") or {}
    }
    fallback = configparser.ConfigParser(interpolation=None)
    fallback.read(templates / "provider_config_fallback_defaults.cfg")
    options |= {(s, k) for s in fallback.sections() for k in fallback.options(s)}
    # The options of the Celery provider, which the lock pins (its provider.yaml's config).
    from airflow.providers.celery.get_provider_info import get_provider_info

    for section, body in get_provider_info()["config"].items():
        options |= {(section, key) for key in body.get("options") or {}}
    return options


# --------------------------------------------------------------------------- tests


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    """docker-compose.yml defines api-server, scheduler, dag-processor, triggerer, postgres and
    airflow-init, none of them behind a profile (plain `docker compose up` starts them all)."""
    for name in (*COMPONENTS, POSTGRES, INIT):
        assert name in services, f"service {name!r} missing from docker-compose.yml"
        assert not services[name].get("profiles"), f"{name} must not be behind a profile"


def test_airflow_services_run_their_component(
    services: dict[str, dict[str, Any]], airflow_cli: dict[str, Any]
) -> None:
    """Each Airflow service runs `airflow <its service name>` through the image's entrypoint
    (no entrypoint override), and that command exists in the installed Airflow CLI."""
    for name in COMPONENTS:
        svc = services[name]
        assert "entrypoint" not in svc, f"{name} overrides the official image's entrypoint"
        argv = _argv(svc.get("command"))
        assert argv == ["airflow", name], f"{name} runs {argv}, expected ['airflow', '{name}']"
        _check_airflow_command(argv, airflow_cli["tree"])


def test_healthchecks_match_the_cli_and_api(
    services: dict[str, dict[str, Any]], airflow_cli: dict[str, Any]
) -> None:
    """api-server's healthcheck requests /api/v2/monitor/health (a path of the installed REST API)
    on its own container port; scheduler, dag-processor and triggerer run
    `airflow jobs check --job-type <their job type> --local`, valid in the installed CLI."""
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.origin is not None
    openapi = (
        Path(spec.origin).parent / "api_fastapi/core_api/openapi/v2-rest-api-generated.yaml"
    ).read_text()
    assert re.search(r"^  /api/v2/monitor/health:", openapi, re.MULTILINE)

    api = services["api-server"]
    test = " ".join(_argv(api.get("healthcheck", {}).get("test")))
    ports = _published_ports(api)
    assert ports, "api-server publishes no port"
    urls = re.findall(r"http://(?:localhost|127\.0\.0\.1):(\d+)(/\S*)", test)
    assert (str(next(iter(ports))), "/api/v2/monitor/health") in urls, (
        f"api-server healthcheck {test!r} does not request /api/v2/monitor/health on its port"
    )

    for name, job_type in JOB_TYPES.items():
        argv = _argv(services[name].get("healthcheck", {}).get("test"))
        if argv and argv[0] in ("CMD", "CMD-SHELL"):
            argv = argv[1:] if argv[0] == "CMD" else shlex.split(" ".join(argv[1:]))
        assert argv[:3] == ["airflow", "jobs", "check"], f"{name} healthcheck: {argv}"
        assert "--job-type" in argv and argv[argv.index("--job-type") + 1] == job_type, (
            f"{name} healthcheck must check --job-type {job_type}: {argv}"
        )
        _check_airflow_command(argv, airflow_cli["tree"])


def test_airflow_services_share_one_env_block(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], shared_env: dict[str, str]
) -> None:
    """Every Airflow service (components, airflow-init, worker) carries the whole
    `x-airflow-common` environment unchanged, so all components agree on databases, executor,
    auth secrets and folders; and it builds/uses the same image."""
    common = compose[COMMON_ANCHOR]
    for name in (*COMPONENTS, INIT, *WORKERS):
        svc = services[name]
        env = _env(svc)
        drift = {k: (v, env.get(k)) for k, v in shared_env.items() if env.get(k) != v}
        assert not drift, f"{name} environment differs from {COMMON_ANCHOR}: {drift}"
        assert svc.get("image") == common.get("image"), f"{name} uses another image"
        assert svc.get("build") == common.get("build"), f"{name} builds another image"


def test_ledger_connection_points_at_the_postgres_service(
    services: dict[str, dict[str, Any]], shared_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AIRFLOW_CONN_LEDGERFLOW_DB (the connection ledgerflow resolves, `ledgerflow_db`) is a
    postgresql:// URI on the compose `postgres` service (postgres:16, port 5432), in the database
    and role docker/postgres-init.sql creates (mounted into the service's initdb folder); the
    ledger code turns it into a Postgres SQLAlchemy URL (not the SQLite fallback)."""
    from ledgerflow.ledger.store import DEFAULT_CONN_ID, resolve_url

    var = f"AIRFLOW_CONN_{DEFAULT_CONN_ID.upper()}"
    assert var == "AIRFLOW_CONN_LEDGERFLOW_DB"
    assert var in shared_env, f"{var} is not in the shared Airflow environment"
    raw = _default(shared_env[var])
    url = _pg_url(raw)
    assert url.scheme in ("postgres", "postgresql"), f"{var} must be a postgresql:// URI: {raw}"
    assert url.hostname == POSTGRES and (url.port or 5432) == 5432, raw
    db = url.path.lstrip("/")

    pg = services[POSTGRES]
    assert str(pg.get("image", "")).split(":")[0] == "postgres"
    assert str(pg["image"]).split(":")[1].split(".")[0] == "16", pg["image"]
    mounts = _volume_targets(pg)
    init_mounts = {t: s for t, s in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")}
    assert any((ROOT / s).resolve() == PG_INIT for s in init_mounts.values()), (
        f"postgres does not mount {PG_INIT.relative_to(ROOT)} into /docker-entrypoint-initdb.d"
    )
    sql = PG_INIT.read_text()
    assert re.search(rf"CREATE\s+DATABASE\s+{re.escape(db)}\b", sql, re.I), f"{db} not created"
    role = re.search(
        rf"CREATE\s+(?:ROLE|USER)\s+{re.escape(url.username or '')}\b[^;]*PASSWORD\s+'([^']*)'",
        sql,
        re.I,
    )
    assert role and role.group(1) == url.password, f"{url.username} role/password not created"

    monkeypatch.setenv(var, raw)
    resolved = urlsplit(resolve_url())
    assert resolved.scheme == "postgresql+psycopg2", resolved
    assert (resolved.hostname, resolved.path) == (POSTGRES, f"/{db}")


def test_metadata_db_and_ledger_are_separate_databases(
    services: dict[str, dict[str, Any]], shared_env: dict[str, str]
) -> None:
    """The Airflow metadata DB (AIRFLOW__DATABASE__SQL_ALCHEMY_CONN) is POSTGRES_DB on the
    `postgres` service with POSTGRES_USER/POSTGRES_PASSWORD, and is not the ledger's database;
    postgres is health-checked with pg_isready."""
    pg = services[POSTGRES]
    pg_env = _env(pg)
    meta = _pg_url(_default(shared_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]))
    ledger = _pg_url(_default(shared_env["AIRFLOW_CONN_LEDGERFLOW_DB"]))
    assert meta.hostname == POSTGRES
    assert meta.path.lstrip("/") == pg_env["POSTGRES_DB"]
    assert (meta.username, meta.password) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
    assert meta.path != ledger.path, "the ledger must not share Airflow's metadata database"
    assert "pg_isready" in _argv(pg.get("healthcheck", {}).get("test"))


def test_init_service_migrates_both_databases_and_gates_the_rest(
    services: dict[str, dict[str, Any]], airflow_cli: dict[str, Any]
) -> None:
    """airflow-init runs `airflow db migrate` (a real CLI command) then `ledgerflow migrate` (a
    subcommand of the `ledgerflow` console script) and exits; every long-running Airflow service
    waits for it (service_completed_successfully) and for postgres (service_healthy)."""
    from ledgerflow.cli import build_parser

    init = services[INIT]
    script = "\n".join(_argv(init.get("command")))
    lines = [ln.strip() for ln in script.splitlines()]
    assert "airflow db migrate" in lines, f"airflow-init does not run `airflow db migrate`: {lines}"
    assert "ledgerflow migrate" in lines, f"airflow-init does not run `ledgerflow migrate`: {lines}"
    assert lines.index("airflow db migrate") < lines.index("ledgerflow migrate")
    _check_airflow_command(["airflow", "db", "migrate"], airflow_cli["tree"])

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^ledgerflow = "ledgerflow\.cli:main"$', pyproject, re.MULTILINE)
    assert build_parser().parse_args(["migrate"]).command == "migrate"

    assert str(init.get("restart", "no")) == "no", "airflow-init is a one-shot service"
    assert _depends_on(init).get(POSTGRES) == "service_healthy"
    for name in (*COMPONENTS, *WORKERS):
        deps = _depends_on(services[name])
        assert deps.get(INIT) == "service_completed_successfully", f"{name}: {deps}"
        assert deps.get(POSTGRES) == "service_healthy", f"{name}: {deps}"


def test_dags_and_plugins_folders_match_the_mounts_and_the_image(
    services: dict[str, dict[str, Any]], shared_env: dict[str, str]
) -> None:
    """AIRFLOW__CORE__DAGS_FOLDER is where every Airflow service bind-mounts ./dags and where the
    Dockerfile copies dags/; AIRFLOW__CORE__PLUGINS_FOLDER is where the Dockerfile copies plugins/;
    every bind-mount source exists in the repository."""
    dags_folder = _default(shared_env["AIRFLOW__CORE__DAGS_FOLDER"])
    plugins_folder = _default(shared_env["AIRFLOW__CORE__PLUGINS_FOLDER"])
    for name in (*COMPONENTS, *WORKERS):
        source = _volume_targets(services[name]).get(dags_folder)
        assert source is not None, f"{name} does not mount anything at {dags_folder}"
        assert (ROOT / source).resolve() == ROOT / "dags", (
            f"{name} mounts {source} at {dags_folder}"
        )
    for name, svc in services.items():
        for source in _volume_targets(svc).values():
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} bind-mounts missing {source}"

    copies = {Path(dest.rstrip("/")).as_posix(): srcs for srcs, dest in _copies()}
    assert copies.get(dags_folder) == ["dags/"], (
        f"the Dockerfile does not copy dags/ to {dags_folder}"
    )
    assert [s.replace("[s]", "s").rstrip("/") for s in copies.get(plugins_folder, [])] == [
        "plugins"
    ], f"the Dockerfile does not copy plugins/ to {plugins_folder}"


def test_dockerfile_base_image_is_the_locked_airflow() -> None:
    """The Dockerfile is FROM the official apache/airflow image whose tag's Airflow version equals
    the apache-airflow pin in requirements/lock.txt (and pyproject.toml), and whose Python version
    is the one the lock was compiled for."""
    froms = [rest.split()[0] for instr, rest in _dockerfile() if instr == "FROM"]
    assert froms, "the Dockerfile has no FROM"
    m = re.fullmatch(r"apache/airflow:(?P<airflow>\d+\.\d+\.\d+)-python(?P<py>\d+\.\d+)", froms[-1])
    assert m, f"final stage must be FROM apache/airflow:<version>-python<x.y>, got {froms[-1]}"
    lock = LOCK.read_text()
    pin = re.search(r"^apache-airflow==(\S+)", lock, re.MULTILINE)
    assert pin, "requirements/lock.txt pins no apache-airflow"
    assert m["airflow"] == pin.group(1), f"image {m['airflow']} != lock {pin.group(1)}"
    assert f'"apache-airflow=={m["airflow"]}"' in (ROOT / "pyproject.toml").read_text()
    py = re.search(r"--python-version[ =](\d+\.\d+)", lock)
    if py:
        assert m["py"] == py.group(1), f"image python {m['py']} != lock python {py.group(1)}"


def test_dockerfile_installs_the_lock_then_the_package_as_airflow() -> None:
    """The Dockerfile copies requirements/lock.txt and runs `pip install --no-cache-dir -r
    requirements/lock.txt`, then copies pyproject.toml and include/ and runs `pip install --no-deps
    .`, both as the `airflow` user (the official image's rule); any other pip install is the
    Celery provider, only for the CeleryExecutor build arg and constrained by the lock."""
    user = "airflow"  # the official image's default user
    copied: set[str] = set()
    lock_at = package_at = None
    for i, (instr, rest) in enumerate(_dockerfile()):
        if instr == "USER":
            user = rest.split(":")[0]
        elif instr in ("COPY", "ADD"):
            copied |= {Path(w).as_posix() for w in shlex.split(rest)[:-1] if not w.startswith("--")}
        elif instr == "RUN" and "pip install" in rest:
            assert user == "airflow", f"`{rest}` runs as {user}, not airflow"
            if "-r requirements/lock.txt" in rest:
                assert "--no-cache-dir" in rest
                assert "requirements/lock.txt" in copied, "lock.txt installed before it is copied"
                lock_at = i
            elif re.search(r"pip install (?:--no-cache-dir )?--no-deps \.(?:\s|$)", rest):
                assert {"pyproject.toml", "include"} <= copied, "package installed before copied"
                package_at = i
            else:
                assert "apache-airflow-providers-celery" in rest, f"unexpected pip install: {rest}"
                assert '"${AIRFLOW_EXECUTOR}" = "CeleryExecutor"' in rest, rest
                assert "-c requirements/lock.txt" in rest, "celery provider must respect the lock"
    assert lock_at is not None, "the Dockerfile does not `pip install -r requirements/lock.txt`"
    assert package_at is not None, "the Dockerfile does not `pip install --no-deps .`"
    assert lock_at < package_at


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """Every file under each COPY source of the Dockerfile passes .dockerignore, while .git, .venv,
    tests and bytecode stay out of the build context."""
    patterns: list[tuple[bool, re.Pattern[str]]] = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((negated, _dockerignore_regex(pattern)))

    checked = 0
    for sources, _ in _copies():
        for source in sources:
            for match in ROOT.glob(source.rstrip("/")):
                for rel in _context_files(match):
                    assert not _dockerignored(rel, patterns), f".dockerignore drops {rel}"
                    checked += 1
    assert checked, "no COPY source found"
    for junk in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/unit/test_compose.py",
        "include/ledgerflow/__pycache__/cli.cpython-311.pyc",
    ):
        assert _dockerignored(junk, patterns), f".dockerignore lets {junk} into the context"


def test_api_server_port_matches_the_readme(services: dict[str, dict[str, Any]]) -> None:
    """The README's "## Docker Compose" section says `docker compose up`, and every
    http://localhost URL in it is a port the compose file publishes, the api-server's among them;
    a `--profile` it mentions exists (the celery one together with AIRFLOW_EXECUTOR=CeleryExecutor)."""
    section = _readme_compose_section()
    if section is None:
        pytest.skip('README.md has no "## Docker Compose" section yet: nothing to compare')
    assert re.search(r"\bdocker compose up\b", section), "section lacks `docker compose up`"

    api_port = _published_ports(services["api-server"]).get(8080)
    assert api_port is not None, "api-server does not publish its container port 8080"
    published = {p for svc in services.values() for p in _published_ports(svc).values()}
    ports = [
        int(m.group(2) or (443 if m.group(1) == "https" else 80))
        for m in re.finditer(r"(https?)://(?:localhost|127\.0\.0\.1)(?::(\d+))?", section)
    ]
    assert ports, 'the "## Docker Compose" section names no http://localhost URL'
    assert api_port in ports, f"README never points at the api-server's port {api_port}: {ports}"
    assert set(ports) <= published, f"README URLs use unpublished ports {set(ports) - published}"

    profiles = {p for svc in services.values() for p in svc.get("profiles") or []}
    for line in section.splitlines():
        for profile in re.findall(r"--profile[ =](\S+)", line):
            assert profile in profiles, f"README uses unknown compose profile {profile!r}"
            if profile == CELERY_PROFILE:
                assert "AIRFLOW_EXECUTOR=CeleryExecutor" in line, (
                    f"README starts the celery profile without AIRFLOW_EXECUTOR=CeleryExecutor: {line}"
                )


def test_celery_profile_adds_rabbitmq_and_the_workers_of_the_tests(
    compose: dict[str, Any],
    services: dict[str, dict[str, Any]],
    shared_env: dict[str, str],
    airflow_cli: dict[str, Any],
) -> None:
    """The `celery` profile holds rabbitmq (the broker, as on the test machines) and the
    workers the tests' Celery stack runs (`ledgerflow.testing.celery_stack`): one serving the
    default and payments queues, one the default queue, each `airflow celery worker -q ...`
    (checked against the installed CLI: the lock pins the Celery provider); the executor is
    `${AIRFLOW_EXECUTOR:-LocalExecutor}`, the same variable the image build arg uses; the
    result backend is the metadata database; and no service outside the profile depends on
    one inside it (plain `docker compose up` would refuse to start)."""
    for name in (RABBITMQ, *WORKERS):
        assert name in services, f"service {name!r} missing"
        assert services[name].get("profiles") == [CELERY_PROFILE], f"{name} not in the profile"
    assert str(services[RABBITMQ]["image"]).startswith("rabbitmq:")

    assert "celery" in airflow_cli["tree"], "the Celery provider is not installed (it is locked)"
    for name, queues in WORKERS.items():
        argv = _argv(services[name].get("command"))
        assert argv == ["airflow", "celery", "worker", "-q", queues], argv
        _check_airflow_command(argv, airflow_cli["tree"])
        assert _depends_on(services[name]).get(RABBITMQ) == "service_healthy"

    executor = shared_env["AIRFLOW__CORE__EXECUTOR"]
    assert executor == "${AIRFLOW_EXECUTOR:-LocalExecutor}", executor
    assert {"LocalExecutor", "CeleryExecutor"} <= set(airflow_cli["core_executors"])
    build_args = compose[COMMON_ANCHOR]["build"]["args"]
    assert build_args.get("AIRFLOW_EXECUTOR") == executor, build_args
    assert any(i == "ARG" and r.startswith("AIRFLOW_EXECUTOR") for i, r in _dockerfile())
    assert "AIRFLOW_EXECUTOR=CeleryExecutor docker compose --profile celery up" in (
        COMPOSE_FILE.read_text()
    ), "docker-compose.yml no longer documents how to start the celery profile"

    broker = urlsplit(_default(shared_env["AIRFLOW__CELERY__BROKER_URL"]))
    assert (broker.scheme, broker.hostname, broker.port) == ("amqp", RABBITMQ, 5672)
    user = services[RABBITMQ]["environment"]
    assert (broker.username, broker.password) == (
        user["RABBITMQ_DEFAULT_USER"],
        user["RABBITMQ_DEFAULT_PASS"],
    ), "the broker URL's user is not the one rabbitmq creates (guest only works on localhost)"
    backend = _default(shared_env["AIRFLOW__CELERY__RESULT_BACKEND"])
    metadata = _default(shared_env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert urlsplit(backend.removeprefix("db+")).netloc == urlsplit(metadata).netloc, backend
    assert urlsplit(backend).path == urlsplit(metadata).path, backend

    for name, svc in services.items():
        if svc.get("profiles"):
            continue
        for dep in _depends_on(svc):
            assert not services[dep].get("profiles"), f"{name} depends on profiled {dep}"


def test_celery_workers_load_the_plugins_once_for_their_task_processes(
    services: dict[str, dict[str, Any]],
) -> None:
    """Each Celery worker carries the worker settings of the tests' Celery stack
    (`celery_stack.WORKER_ENV`: plugins loaded eagerly, so the task processes it forks
    inherit the plugin and the step code), and its healthcheck's `celery inspect ping`,
    which runs every interval in the same environment, turns the eager load off again."""
    from ledgerflow.testing.celery_stack import WORKER_ENV

    for name in WORKERS:
        env = services[name]["environment"]
        for key, value in WORKER_ENV.items():
            assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}, not {value!r}"
        probe = " ".join(services[name]["healthcheck"]["test"][1:])
        assert probe.startswith("AIRFLOW__CORE__LAZY_LOAD_PLUGINS=True celery "), probe


def test_components_agree_on_auth_and_the_execution_api(
    services: dict[str, dict[str, Any]], shared_env: dict[str, str]
) -> None:
    """The shared env sets one non-empty JWT secret, SimpleAuthManager (the class config.yml
    names as default) with user admin, a passwords file on a volume that airflow-init writes and
    api-server mounts, and AIRFLOW__CORE__EXECUTION_API_SERVER_URL = the api-server service on
    its container port, path /execution/."""
    spec = importlib.util.find_spec("airflow")
    assert spec is not None and spec.origin is not None
    config = yaml.safe_load((Path(spec.origin).parent / "config_templates/config.yml").read_text())

    assert _default(shared_env["AIRFLOW__API_AUTH__JWT_SECRET"]).strip(), "empty JWT secret"
    assert (
        shared_env["AIRFLOW__CORE__AUTH_MANAGER"]
        == config["core"]["options"]["auth_manager"]["default"]
    )
    assert shared_env["AIRFLOW__CORE__AUTH_MANAGER"].endswith(".SimpleAuthManager")
    users = [
        u.split(":")[0] for u in shared_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")
    ]
    assert "admin" in users

    passwords = shared_env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    folder = str(Path(passwords).parent)
    for name in ("api-server", INIT):
        assert folder in _volume_targets(services[name]), f"{name} does not mount {folder}"
    script = " ".join(_argv(services[INIT].get("command")))
    assert "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE" in script

    url = urlsplit(shared_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert url.hostname == "api-server" and url.hostname in services
    assert url.port in _published_ports(services["api-server"]), url
    assert url.path == "/execution/", url


def test_airflow_config_env_vars_are_real_options(airflow_options: set[tuple[str, str]]) -> None:
    """Every AIRFLOW__SECTION__KEY named in docker-compose.yml or the Dockerfile is an option of
    the installed Airflow (config.yml, or the provider fallbacks Airflow ships, e.g. celery
    broker_url), so a typo or a renamed option cannot silently do nothing."""
    names = set()
    for path in (COMPOSE_FILE, DOCKERFILE):
        names |= {m.group(0) for m in _AIRFLOW_OPTION_ENV.finditer(path.read_text())}
    assert names
    unknown = []
    for name in sorted(names):
        _, section, key = name.split("__", 2)
        section, key = section.lower(), key.lower()
        for suffix in ("_cmd", "_secret"):
            if (section, key) not in airflow_options and key.endswith(suffix):
                key = key.removesuffix(suffix)
        if (section, key) not in airflow_options:
            unknown.append(name)
    assert not unknown, f"not options of the installed Airflow: {unknown}"


def test_latency_settings_are_real_options_and_each_is_documented(
    airflow_options: set[tuple[str, str]],
) -> None:
    """The Airflow options scripts/demo.sh, the test stack and docs/latency.md name are
    options of the installed Airflow; every scheduler and dag-processor option the demo or
    the compose stack sets is explained (what it buys, what it costs) in docs/latency.md."""
    doc = (ROOT / "docs" / "latency.md").read_text()
    sources = {
        "demo": (ROOT / "scripts" / "demo.sh").read_text(),
        "stack": (ROOT / "include" / "ledgerflow" / "testing" / "airflow_stack.py").read_text(),
        "doc": doc,
    }
    unknown = []
    for where, text in sources.items():
        for match in _AIRFLOW_OPTION_ENV.finditer(text):
            if (match.group(1).lower(), match.group(2).lower()) not in airflow_options:
                unknown.append(f"{where}: {match.group(0)}")
    assert not unknown, f"not options of the installed Airflow: {unknown}"
    set_here = {
        m.group(0)
        for text in (sources["demo"], COMPOSE_FILE.read_text())
        for m in _AIRFLOW_OPTION_ENV.finditer(text)
        if m.group(1) in ("SCHEDULER", "DAG_PROCESSOR")
    }
    assert set_here
    undocumented = sorted(
        name
        for name in set_here
        if f"[{name.split('__')[1].lower()}] {name.split('__')[2].lower()}" not in doc
    )
    assert not undocumented, f"set by the demo or compose, not in docs/latency.md: {undocumented}"
