"""Workflow versions: the latest one is scheduled, older ones are not; a published
version (its hash in ``v<N>.lock``) refuses to load once its file changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ledgerflow import versions
from ledgerflow.cli import SHIM, main

V1 = """\
name: shop
version: 1
schedule: "0 3 * * *"
steps:
  - id: a
    tool: demo.noop
    idempotency: natural
"""

V2 = (
    V1.replace("version: 1", "version: 2")
    + """\
  - id: b
    needs: [a]
    tool: demo.noop
    idempotency: natural
"""
)


def dagbag(folder: Path) -> Any:
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=str(folder), bundle_path=folder, bundle_name="dags-folder")


def publish(dags: Path, version: int, text: str) -> Path:
    folder = dags / "workflows" / "shop"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"v{version}.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["sync", str(path)]) == 0
    return path


def test_version_selection_picks_the_highest_number_not_the_newest_name(tmp_path: Path) -> None:
    """v10 is newer than v9 and v2 (numeric, not lexical order); files that are not
    ``v<N>.yaml`` are ignored; an older version is superseded, the latest is not."""
    folder = tmp_path / "wf"
    folder.mkdir()
    for name in ("v2.yaml", "v9.yaml", "v10.yaml", "v1.py", "v11.yaml.bak", "notes.yaml"):
        (folder / name).write_text("x")
    assert sorted(versions.version_files(folder)) == [2, 9, 10]
    assert versions.latest_version(folder) == 10
    assert versions.is_superseded(folder / "v9.yaml")
    assert not versions.is_superseded(folder / "v10.yaml")
    assert versions.latest_version(tmp_path / "missing") is None


def test_older_version_has_no_schedule_and_is_tagged_superseded(tmp_path: Path) -> None:
    """With v1 and v2 beside each other, v2 keeps the cron and v1 is built without a
    schedule, tagged ``superseded`` (still a DAG: its runs can finish and be retried)."""
    dags = tmp_path / "dags"
    publish(dags, 1, V1)
    only = dagbag(dags)
    assert only.dags["shop__v1"].timetable.summary == "0 3 * * *"
    publish(dags, 2, V2)
    bag = dagbag(dags)
    assert not bag.import_errors
    old, new = bag.dags["shop__v1"], bag.dags["shop__v2"]
    assert type(old.timetable).__name__ == "NullTimetable"
    assert "superseded" in old.tags and "superseded" not in new.tags
    assert new.timetable.summary == "0 3 * * *"
    assert [t.task_id for t in old.tasks] == ["a"]


def test_a_changed_published_version_is_one_import_error_naming_file_and_remedy(
    tmp_path: Path,
) -> None:
    """``sync`` records the hash; editing the YAML afterwards makes its DAG file fail to
    import with "published version changed; ... publish a new version v2", naming the
    file; restoring the content loads it again."""
    dags = tmp_path / "dags"
    path = publish(dags, 1, V1)
    assert versions.recorded_hash(path) == versions.content_hash(path)
    path.write_text(V1.replace("0 3 * * *", "0 4 * * *"), encoding="utf-8")
    bag = dagbag(dags)
    assert "shop__v1" not in bag.dag_ids
    (key, text), *_ = bag.import_errors.items()
    assert str(key).endswith("workflows/shop/v1.py")
    assert "workflows/shop/v1.yaml: published version changed" in text
    assert "publish a new version v2" in text
    path.write_text(V1, encoding="utf-8")
    assert "shop__v1" in dagbag(dags).dag_ids


def test_sync_refuses_to_rehash_a_changed_version_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second ``sync`` over a changed published file exits 1 with FAIL and keeps the old
    hash; ``--rehash`` (for a version that never ran) records the new one."""
    dags = tmp_path / "dags"
    path = publish(dags, 1, V1)
    recorded = versions.recorded_hash(path)
    path.write_text(V1 + "# edited\n", encoding="utf-8")
    capsys.readouterr()
    assert main(["sync", str(path)]) == 1
    assert "published version changed; publish a new version v2" in capsys.readouterr().err
    assert versions.recorded_hash(path) == recorded
    assert main(["sync", "--rehash", str(path)]) == 0
    assert versions.recorded_hash(path) == versions.content_hash(path) != recorded


def test_an_unpublished_version_loads_without_a_lock(tmp_path: Path) -> None:
    """A version without a lock (never synced) is not checked: it loads, and has no hash
    recorded; ``check_published`` still returns its content hash."""
    folder = tmp_path / "dags" / "workflows" / "shop"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(V1, encoding="utf-8")
    (folder / "v1.py").write_text(SHIM, encoding="utf-8")
    assert versions.recorded_hash(folder / "v1.yaml") is None
    assert versions.check_published(folder / "v1.yaml") == versions.content_hash(folder / "v1.yaml")
    assert "shop__v1" in dagbag(tmp_path / "dags").dag_ids


def test_versions_command_shows_latest_unfinished_and_retirable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ledgerflow versions``: v1 with an unfinished run is live, not retirable; once the
    run finished, v1 is retirable; v2 is the latest and never retirable."""
    from ledgerflow.ledger.store import Ledger

    dags = tmp_path / "dags"
    publish(dags, 1, V1)
    publish(dags, 2, V2)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.migrate()
    ledger.ensure_run(
        run_id="shop__v1/r1",
        dag_id="shop__v1",
        workflow="shop",
        version=1,
        params={},
        trigger_kind="manual",
    )
    args = ["versions", "shop", "--dags-folder", str(dags), "--url", url, "--json"]
    capsys.readouterr()
    assert main(args) == 0
    import json

    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["v1"]["latest"] == "no" and rows["v1"]["unfinished_runs"] == 1
    assert rows["v1"]["retirable"] == "no"
    assert rows["v2"]["latest"] == "yes" and rows["v2"]["retirable"] == "no"
    ledger.finish_run("shop__v1/r1", "succeeded")
    assert main(args) == 0
    rows = {r["version"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["v1"]["retirable"] == "yes"
    assert main(["versions", "nope", "--dags-folder", str(dags), "--url", url]) == 2
