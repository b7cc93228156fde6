"""The ``ledgerflow`` command line: validate, sync, help, and reading an empty ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ledgerflow.cli import SHIM, main

GOOD = """\
name: good
version: 1
steps:
  - id: a
    tool: demo.noop
    idempotency: natural
"""

BAD = """\
name: bad
version: 1
steps:
  - id: a
    tool: demo.noop
    idempotency: natural
    timeout: 5 parsecs
  - id: b
    tool: demo.noop
    idempotency: natural
"""
BAD_LINE = 7

SUBCOMMANDS = [
    "validate",
    "sync",
    "migrate",
    "runs",
    "show",
    "effects",
    "dead-letters",
    "new",
    "run",
]


def workflows(tmp_path: Path, *, valid_only: bool = False) -> Path:
    """``workflows/good/v1.yaml`` and ``workflows/bad/v1.yaml`` (invalid at BAD_LINE; with
    ``valid_only``, a valid workflow named bad: `sync` publishes only valid files)."""
    root = tmp_path / "workflows"
    bad = GOOD.replace("name: good", "name: bad") if valid_only else BAD
    for name, text in {"good": GOOD, "bad": bad}.items():
        (root / name).mkdir(parents=True)
        (root / name / "v1.yaml").write_text(text, encoding="utf-8")
    return root


def test_validate_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One bad file among good ones: exit 1, ``FAIL <file>:<line>`` for it, ``ok`` for the other."""
    root = workflows(tmp_path)
    assert main(["validate", str(root)]) == 1
    out = capsys.readouterr()
    bad = root / "bad" / "v1.yaml"
    assert f"FAIL {bad}:{BAD_LINE}: steps[0].timeout: " in out.err
    assert "'5 parsecs' is not a duration" in out.err
    assert f"ok   {root / 'good' / 'v1.yaml'}: good__v1, 1 steps" in out.out
    assert "1 valid, 1 invalid" in out.err


def test_validate_single_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A good file passed by path exits 0 and notes that its DAG file is missing."""
    good = workflows(tmp_path) / "good" / "v1.yaml"
    assert main(["validate", str(good)]) == 0
    out = capsys.readouterr().out
    assert "good__v1" in out
    # The hint names the file as it was given: run as printed, it works from here.
    assert f"no DAG file: run `ledgerflow sync {good}`" in out


def test_validate_nothing_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder without workflow files exits 2 (a usage problem, not a valid result)."""
    assert main(["validate", str(tmp_path)]) == 2
    assert "no workflow files found" in capsys.readouterr().err


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path that does not exist is a FAIL line (exit 1), not a traceback."""
    missing = tmp_path / "workflows" / "nope" / "v1.yaml"
    assert main(["validate", str(missing)]) == 1
    assert f"FAIL {missing}: cannot read" in capsys.readouterr().err


def test_sync_writes_missing_shims_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sync`` writes ``vN.py`` == SHIM beside each ``vN.yaml``; a second run writes nothing."""
    root = workflows(tmp_path, valid_only=True)
    assert main(["sync", str(root)]) == 0
    first = capsys.readouterr()
    shims = sorted(root.rglob("v1.py"))
    assert [s.parent.name for s in shims] == ["bad", "good"]
    assert all(s.read_text(encoding="utf-8") == SHIM for s in shims)
    assert "2 DAG file(s) written" in first.err

    before = {s: s.stat().st_mtime_ns for s in shims}
    assert main(["sync", str(root)]) == 0
    second = capsys.readouterr()
    assert "0 DAG file(s) written" in second.err
    assert "wrote" not in second.out
    assert {s: s.stat().st_mtime_ns for s in shims} == before


def test_sync_keeps_foreign_dag_files_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``vN.py`` with other content is kept (and reported) unless ``--force`` is given."""
    root = workflows(tmp_path, valid_only=True)
    custom = root / "good" / "v1.py"
    custom.write_text("# hand written\n", encoding="utf-8")
    assert main(["sync", str(root)]) == 0
    assert custom.read_text(encoding="utf-8") == "# hand written\n"
    assert f"skip {custom}: exists with other content" in capsys.readouterr().err
    assert main(["sync", "--force", str(root)]) == 0
    assert custom.read_text(encoding="utf-8") == SHIM


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """``ledgerflow --help`` exits 0 and lists every subcommand."""
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in SUBCOMMANDS:
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help_exits_zero(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``ledgerflow <command> --help`` exits 0 with a usage line for that command."""
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: ledgerflow {command}" in capsys.readouterr().out


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """No subcommand is a usage error (exit 2), not a traceback."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_runs_on_an_empty_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``runs --url sqlite:///...`` creates the ledger and lists no runs, as text and as JSON."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["runs", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "(none)"
    assert (tmp_path / "l.db").is_file()
    assert main(["runs", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_other_ledger_commands_on_an_empty_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """migrate/effects/dead-letters work on an empty ledger; ``show`` of no run exits 1."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["migrate", "--url", url]) == 0
    assert "schema v" in capsys.readouterr().out
    assert main(["effects", "--url", url]) == 0
    assert capsys.readouterr().out.strip() == "(none)"
    assert main(["dead-letters", "--url", url, "--all"]) == 0
    assert capsys.readouterr().out.strip() == "(none)"
    assert main(["show", "--url", url, "wf__v1/none"]) == 1
    assert "no run 'wf__v1/none' in the ledger" in capsys.readouterr().err


def test_version_names_ledgerflow_and_airflow(capsys: pytest.CaptureFixture[str]) -> None:
    """`ledgerflow --version` prints both versions (from package metadata) and exits 0."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"ledgerflow {version('ledgerflow')} (Apache Airflow {version('apache-airflow')})"


def test_sync_refuses_an_invalid_file_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sync` of a file `validate` rejects publishes nothing (no DAG file, no lock),
    names the file and line, and exits 1; a good file beside it is published."""
    root = workflows(tmp_path)
    assert main(["sync", str(root)]) == 1
    err = capsys.readouterr().err
    bad = root / "bad" / "v1.yaml"
    assert f"FAIL {bad}:{BAD_LINE}: steps[0].timeout: " in err
    assert "not published: nothing written" in err
    assert not bad.with_suffix(".py").exists()
    assert not bad.with_suffix(".lock").exists()
    assert (root / "good" / "v1.py").read_text() == SHIM
    assert (root / "good" / "v1.lock").exists()


def test_validate_reports_a_published_file_that_no_longer_matches_its_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After `sync` locked v1, an edit makes `validate` fail (exit 1) with what to do:
    publish the change as v2, with the command to run; `sync` agrees (exit 1)."""
    good = workflows(tmp_path) / "good" / "v1.yaml"
    assert main(["sync", str(good)]) == 0
    good.write_text(GOOD.replace("tool: demo.noop", "tool: demo.noop  # edited"), encoding="utf-8")
    capsys.readouterr()
    assert main(["validate", str(good)]) == 1
    err = capsys.readouterr().err
    assert f"FAIL {good}: published version changed (v1 is locked in v1.lock)" in err
    assert f"`ledgerflow sync {good.with_name('v2.yaml')}`" in err
    assert main(["sync", str(good)]) == 1


def test_a_path_that_does_not_exist_is_a_clear_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The hint of an older release, run from the wrong folder: `sync` of a path that is
    not there exits 2 with one line naming it (it ended in a FileNotFoundError traceback)."""
    monkeypatch.chdir(tmp_path)
    assert main(["sync", "workflows/good/v1.yaml"]) == 2
    err = capsys.readouterr().err
    assert "FAIL workflows/good/v1.yaml: no such file or folder" in err
    assert not (tmp_path / "workflows").exists()


def test_output_formats_of_the_ledger_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`-o json|yaml|plain|table` (Airflow's convention) print the same rows; `--json` is
    `-o json`; piped, the default is plain (padded columns)."""
    import yaml

    from ledgerflow.ledger.store import Ledger

    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = Ledger(url)
    ledger.migrate()
    ledger.ensure_run(
        run_id="wf__v1/r-1",
        dag_id="wf__v1",
        workflow="wf",
        version=1,
        params={},
        trigger_kind="manual",
    )
    assert main(["runs", "--url", url, "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run_id"] for r in rows] == ["wf__v1/r-1"]
    assert main(["runs", "--url", url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == rows
    assert main(["runs", "--url", url, "-o", "yaml"]) == 0
    assert [r["run_id"] for r in yaml.safe_load(capsys.readouterr().out)] == ["wf__v1/r-1"]
    assert main(["runs", "--url", url]) == 0  # piped: plain
    plain = capsys.readouterr().out.splitlines()
    assert plain[0].split()[:2] == ["run_id", "workflow"] and plain[1].startswith("wf__v1/r-1 ")
    assert main(["runs", "--url", url, "-o", "table"]) == 0
    table = capsys.readouterr().out
    assert "run_id" in table and "wf__v1/r-1" in table and "running" in table
    assert main(["show", "--url", url, "-o", "yaml", "wf__v1/r-1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["run_id"] == "wf__v1/r-1"


def test_retry_wait_follows_the_run_to_its_end(tmp_path: Path) -> None:
    """`retry --wait`'s loop: a line per ended step and the run's end (exit 0 when it
    succeeded); a run still running at the deadline says so (exit 1)."""
    from ledgerflow.cli_retry import _wait_for
    from ledgerflow.ledger.store import Ledger

    ledger = Ledger(f"sqlite:///{tmp_path / 'l.db'}")
    ledger.migrate()
    for run_id in ("wf__v1/done", "wf__v1/busy"):
        ledger.ensure_run(
            run_id=run_id,
            dag_id="wf__v1",
            workflow="wf",
            version=1,
            params={},
            trigger_kind="manual",
        )
    ledger.mark_step(
        run_id="wf__v1/done", step_key="a", step_id="a", map_index=-1, status="skipped"
    )
    ledger.finish_run("wf__v1/done", "succeeded")
    said: list[str] = []
    assert _wait_for(ledger, "wf__v1/done", 5, said.append) == 0
    assert said == ["  skipped    a", "wf__v1/done: succeeded"]
    said.clear()
    assert _wait_for(ledger, "wf__v1/busy", 0, said.append) == 1
    assert said == ["wf__v1/busy: still running after 0 s"]


def test_shell_completion_completes_commands(tmp_path: Path) -> None:
    """The installed `ledgerflow` completes through argcomplete (as the shell calls it
    after `eval "$(register-python-argcomplete ledgerflow)"`)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "completions"
    env = {
        **os.environ,
        "_ARGCOMPLETE": "1",
        "COMP_LINE": "ledgerflow va",
        "COMP_POINT": "13",
        "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
    }
    program = Path(sys.executable).with_name("ledgerflow")
    done = subprocess.run([str(program)], env=env, cwd=tmp_path, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert out.read_text().split() == ["validate"]


def test_new_writes_a_published_workflow_that_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``new NAME``: the workflow file, its DAG file and its lock; validate accepts it, the
    params are described, and the printed next step is a command that works from here."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "schema").mkdir()
    (tmp_path / "schema" / "workflow.schema.json").write_text("{}")
    assert main(["new", "greetings"]) == 0
    out = capsys.readouterr().out
    folder = Path("dags/workflows/greetings")
    text = (folder / "v1.yaml").read_text()
    assert text.startswith("# yaml-language-server: $schema=../../../schema/workflow.schema.json\n")
    assert (folder / "v1.py").read_text() == SHIM
    assert (folder / "v1.lock").exists()
    assert "description: Who is greeted" in text
    assert f"ledgerflow run {folder / 'v1.yaml'} --param who=" in out
    assert main(["validate", str(folder / "v1.yaml")]) == 0
    assert "greetings__v1, 2 steps" in capsys.readouterr().out


def test_new_refuses_a_bad_name_and_an_existing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dags = str(tmp_path / "dags")
    assert main(["new", "Bad Name", "--dags-folder", dags]) == 2
    assert "'Bad Name' is not a workflow name" in capsys.readouterr().err
    assert not (tmp_path / "dags").exists()
    assert main(["new", "twice", "--dags-folder", dags]) == 0
    before = (tmp_path / "dags/workflows/twice/v1.yaml").read_text()
    assert main(["new", "twice", "--dags-folder", dags]) == 2
    assert "exists already; nothing written" in capsys.readouterr().err
    assert (tmp_path / "dags/workflows/twice/v1.yaml").read_text() == before


def test_run_refuses_bad_input_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid file, params that do not fit, a --decide of no approval step: exit 2
    with the reason, and no Airflow started (no throwaway folder)."""
    root = workflows(tmp_path)
    workdir = tmp_path / "work"
    bad = root / "bad" / "v1.yaml"
    assert main(["run", str(bad), "--workdir", str(workdir)]) == 2
    assert f"{bad}:{BAD_LINE}: steps[0].timeout" in capsys.readouterr().err
    good = root / "good" / "v1.yaml"
    assert main(["run", str(good), "--param", "n=1", "--workdir", str(workdir)]) == 2
    assert "n: unknown param" in capsys.readouterr().err
    assert main(["run", str(good), "--decide", "a=approve", "--workdir", str(workdir)]) == 2
    assert "--decide ['a']: no approval step of that id" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: no such file" in capsys.readouterr().err
    assert not workdir.exists()


def test_migrate_says_which_migrations_it_applies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``migrate`` names each migration (Alembic revision) as it applies it, once: run
    again, it applies none. ``--no-demo``: the ledger's revisions only."""
    from ledgerflow.ledger._migrate import revisions, title
    from ledgerflow.ledger.schema import LATEST

    url = f"sqlite:///{tmp_path / 'l.db'}"
    assert main(["migrate", "--url", url, "--no-demo"]) == 0
    out = capsys.readouterr()
    lines = [x for x in out.err.splitlines() if "applying migration" in x]
    expected = [(int(s.revision), title(s)) for s in revisions()]
    assert [v for v, _ in expected] == [1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17]
    assert lines == [f"  applying migration {v}/{LATEST}: {t}" for v, t in expected]
    assert f"schema v{LATEST}" in out.out
    assert main(["migrate", "--url", url, "--no-demo"]) == 0
    assert "applying" not in capsys.readouterr().err
    # The suite has the demo's tools on: by default the demo's tables come too, once.
    assert main(["migrate", "--url", url]) == 0
    assert [x for x in capsys.readouterr().err.splitlines() if x.startswith("  applying")] == [
        "  applying migration demo01: demo tables of the example workflows"
    ]
