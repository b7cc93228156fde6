"""The workflow format's JSON Schema (``ledgerflow schema``) and the editor and
pre-commit support built on it."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from ledgerflow.cli import build_parser, main
from ledgerflow.spec.jsonschema import SHIPPED, render, workflow_schema

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(
    [
        *ROOT.glob("dags/workflows/*/v*.yaml"),
        *ROOT.glob("tests/e2e/workflows/*.yaml"),
        *ROOT.glob("tests/integration/dags/workflows/*/v*.yaml"),
    ]
)
MODELINE = "# yaml-language-server: $schema="


def validator() -> jsonschema.Draft202012Validator:
    schema = workflow_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_shipped_schema_is_what_the_command_prints(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """schema/workflow.schema.json equals `ledgerflow schema` now: it cannot drift from
    the models (regenerate with `ledgerflow schema -o schema/workflow.schema.json`)."""
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert printed == render()
    assert (ROOT / SHIPPED).read_text(encoding="utf-8") == printed
    assert json.loads(printed)["$schema"].endswith("/draft/2020-12/schema")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_and_test_workflow_fits_the_schema_and_points_to_it(path: Path) -> None:
    """Each workflow file validates against the schema, and its first line is the
    modeline that points editors to the shipped schema file."""
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith(MODELINE), f"{path}: first line is not the schema modeline"
    assert (path.parent / first[len(MODELINE) :]).resolve() == (ROOT / SHIPPED).resolve()
    document = yaml.safe_load(text.replace("{peer_url}", "http://127.0.0.1:1"))
    errors = [f"{list(e.path)}: {e.message}" for e in validator().iter_errors(document)]
    assert errors == []


def test_the_schema_rejects_a_wrong_field() -> None:
    """A misspelt top-level field, an unknown step field and a bad kind are errors."""
    check = validator()
    step = {"id": "a", "tool": "demo.noop", "idempotency": "natural"}
    assert not list(check.iter_errors({"name": "x", "version": 1, "steps": [step]}))
    assert list(check.iter_errors({"name": "x", "version": 1, "stepz": [step]}))
    assert list(check.iter_errors({"name": "x", "version": 1, "steps": [{**step, "retries": 3}]}))
    assert list(check.iter_errors({"name": "x", "version": 1, "steps": [{**step, "kind": "nope"}]}))


def test_the_pre_commit_hook_runs_the_real_validate_command(tmp_path: Path) -> None:
    """.pre-commit-hooks.yaml defines `ledgerflow-validate`, whose entry is the CLI's
    validate command, matching workflow files and not their DAG files."""
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert hook["id"] == "ledgerflow-validate"
    program, *argv = shlex.split(hook["entry"])
    assert program == "ledgerflow"
    assert build_parser().parse_args([*argv, "x.yaml"]).command == "validate"
    files = re.compile(hook["files"])
    assert files.search("dags/workflows/checkout/v1.yaml")
    assert not files.search("dags/workflows/checkout/v1.py")
    # As pre-commit calls it: the entry with the changed files appended.
    good = tmp_path / "workflows" / "w" / "v1.yaml"
    good.parent.mkdir(parents=True)
    good.write_text(
        "name: w\nversion: 1\nsteps:\n  - {id: a, tool: demo.noop, idempotency: natural}\n"
    )
    assert main([*argv, str(good)]) == 0
