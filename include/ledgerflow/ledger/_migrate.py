"""Alembic, driven for the ledger: upgrade (adopting a ledger from before Alembic),
downgrade, and the SQL of either for a DBA. Imported only when migrating: a task that
finds the ledger at its version never imports this module (``Ledger.migrate``).

Every online change runs in one transaction that first takes the migration lock (an
advisory lock on Postgres, ``BEGIN IMMEDIATE`` on SQLite), so many processes may migrate
at once: the first applies the revisions, the others then find nothing to do.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url

from ledgerflow.errors import LedgerError
from ledgerflow.ledger import schema

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# The key of the advisory lock; the same as before Alembic, so that a process of an older
# release and one of this release never migrate at the same time.
LOCK_KEY = 4242001
# A ledger from before Alembic is adopted at the revision of its highest version.
LEGACY_REVISIONS = {
    1: "0001",
    2: "0001",
    3: "0003",
    4: "0004",
    5: "0005",
    6: "0006",
    7: "0007",
    8: "0008",
}

Progress = Callable[[str, str, bool], None]
"""``progress(revision, title, upgrade)``: called for each revision about to be applied."""


def _config(
    *, connection: Connection | None = None, url: str | None = None, stdout: TextIO | None = None
) -> Config:
    cfg = Config(stdout=stdout or sys.stdout)
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url)
    cfg.attributes["connection"] = connection
    return cfg


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def title(script: Script) -> str:
    """The first line of a revision's docstring."""
    return (script.doc or "").strip().splitlines()[0] if script.doc else script.revision


def revisions(branch: str = "ledger") -> list[Script]:
    """The revisions of ``branch``, oldest first."""
    found = scripts().iterate_revisions(f"{branch}@head", "base")
    return list(reversed([s for s in found if s is not None]))


def heads(conn: Connection) -> tuple[str, ...]:
    """The revisions the ledger is at (one per branch)."""
    return MigrationContext.configure(
        conn, opts={"version_table": schema.VERSION_TABLE}
    ).get_current_heads()


def upgrade(engine: Engine, *, demo: bool, progress: Progress | None = None) -> None:
    """Bring the ledger (and with ``demo``, the demo tables) to the newest revision."""
    with engine.begin() as conn:
        _lock(conn)
        adopt_legacy(conn)
        _run(conn, "ledger@head", progress)
        if demo:
            _run(conn, "demo@head", progress)


def migrate_to(engine: Engine, target: str, progress: Progress | None = None) -> None:
    """Upgrade or downgrade to ``target`` (``0005``, ``base``, ``demo@base``, ``heads``...)."""
    with engine.begin() as conn:
        _lock(conn)
        adopt_legacy(conn)
        _run(conn, target, progress)


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})


def _run(conn: Connection, target: str, progress: Progress | None) -> None:
    cfg = _config(connection=conn)
    script = ScriptDirectory.from_config(cfg)

    def plan(current: Any, _context: MigrationContext) -> Iterable[Any]:
        steps = _steps(script, target, current)
        for step in steps:
            if progress is not None:
                progress(step.revision.revision, title(step.revision), step.is_upgrade)
        return steps

    with EnvironmentContext(cfg, script, fn=plan, destination_rev=target):
        script.run_env()


def _steps(script: ScriptDirectory, target: str, current: Any) -> list[Any]:
    """The revisions between ``current`` and ``target``, up or down, whichever leads there."""
    error: CommandError | None = None
    try:
        steps = list(script._upgrade_revs(target, current))
    except CommandError as exc:
        error = exc
    else:
        if steps:
            return steps
    try:
        return list(script._downgrade_revs(target, current))
    except CommandError as exc:
        if error is None and not _is_unknown(exc):
            return []  # already there
        raise LedgerError(f"cannot migrate the ledger to {target!r}: {error or exc}") from None


def _is_unknown(exc: CommandError) -> bool:
    return "locate revision" in str(exc) or "No such revision" in str(exc)


def adopt_legacy(conn: Connection) -> tuple[str, ...]:
    """Stamp a ledger made before Alembic with the revisions it already has.

    Its ``lf_schema_version`` lists the migrations applied (1..8); the tables are those of
    the revision with the same number, so the version table is written and nothing else:
    no table is touched, no row lost. With migration 2 and its tables there, the demo
    branch is stamped too. ``lf_schema_version`` stays (an older release pointed at this
    ledger still finds its version there). Returns the revisions stamped.
    """
    if heads(conn) or not inspect(conn).has_table(schema.LEGACY_VERSION_TABLE):
        return ()
    applied = set(
        conn.execute(text(f"SELECT version FROM {schema.LEGACY_VERSION_TABLE}")).scalars()
    )
    version = 0  # the highest N with 1..N applied (2, the demo tables, may be missing)
    while version + 1 in applied or (version + 1 == 2 and 1 in applied):
        version += 1
    missing = sorted(v for v in applied if v > version)
    if missing or (version and version not in LEGACY_REVISIONS):
        raise LedgerError(
            f"ledger {schema.LEGACY_VERSION_TABLE} lists migrations {sorted(applied)}: "
            f"{missing or version} cannot be matched to a revision; run `ledgerflow migrate` "
            "of the release that created this ledger first"
        )
    stamped = []
    if version:
        stamped.append(LEGACY_REVISIONS[version])
    if 2 in applied and inspect(conn).has_table("demo_inventory"):
        stamped.append(schema.DEMO_HEAD)
    context = MigrationContext.configure(conn, opts={"version_table": schema.VERSION_TABLE})
    script = scripts()
    for revision in stamped:
        context.stamp(script, revision)
    log.info(
        "ledger from before Alembic (%s at %d) stamped at %s",
        schema.LEGACY_VERSION_TABLE,
        version,
        stamped,
    )
    return tuple(stamped)


def offline_sql(url: str, *, target: str, start: str | None, stdout: TextIO) -> None:
    """Write the SQL that takes a ledger from ``start`` (default: an empty database) to
    ``target`` for the dialect of ``url``, without connecting: only the dialect's name is
    taken from the URL (no host, no credentials)."""
    backend = make_url(url).get_backend_name()
    cfg = _config(url=f"{backend}://", stdout=stdout)
    script = ScriptDirectory.from_config(cfg)
    upgrade = True  # down when ``target`` is below ``start``
    if start is not None and start != target:
        try:
            upgrade = not list(script.iterate_revisions(start, target))
        except RevisionError:  # not below ``start``
            upgrade = True
    destination = f"{start}:{target}" if start is not None else target

    def plan(current: Any, _context: MigrationContext) -> Iterable[Any]:
        if upgrade:
            return script._upgrade_revs(target, current)
        return script._downgrade_revs(target, current)

    try:
        with EnvironmentContext(
            cfg,
            script,
            fn=plan,
            as_sql=True,
            starting_rev=start,
            destination_rev=target,
            tag=None,
        ):
            script.run_env()
    except CommandError as exc:
        raise LedgerError(f"cannot write the SQL for {destination!r}: {exc}") from None
