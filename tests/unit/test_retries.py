"""Retry runs without Airflow processes: retry-chain resolution through the step protocol on a
SQLite ledger, what a retry plans to reuse, and every refusal (CLI and plan)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from ledgerflow.cli import main
from ledgerflow.ledger import chains
from ledgerflow.ledger.store import Ledger
from ledgerflow.retries import RetryRefused, plan_retry
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.tools.demo import BlockedByFlag
from ledgerflow.workflow.validate import load_workflow

ROOT = Path(__file__).resolve().parents[2]
SIX = (ROOT / "tests" / "e2e" / "workflows" / "retry_six.yaml").read_text()
STEPS = ["s1", "s2", "s3", "s4", "s5", "s6"]


@pytest.fixture()
def dags(tmp_path: Path) -> Path:
    folder = tmp_path / "dags" / "workflows" / "retry_six"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(SIX, encoding="utf-8")
    return tmp_path / "dags"


@pytest.fixture()
def spec(dags: Path) -> WorkflowSpec:
    return load_workflow(dags / "workflows" / "retry_six" / "v1.yaml")


@pytest.fixture()
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture()
def ledger(url: str) -> Ledger:
    ledger = Ledger(url)
    ledger.migrate()
    return ledger


def run_steps(
    ledger: Ledger,
    spec: WorkflowSpec,
    name: str,
    flag: Path,
    *,
    retry_of: str | None = None,
    retry_from: str | None = None,
) -> tuple[str, dict[str, str]]:
    """Run the six steps in order like the DAG does, stopping at the first failure; the
    run's final status goes to the ledger as the deployment would write it."""
    run = RunRef(
        run_id=f"retry_six__v1/{name}",
        dag_id="retry_six__v1",
        retry_of=retry_of,
        retry_from=retry_from,
    )
    params = {"ref": name, "flag": str(flag)}
    if retry_of is not None:  # a retry run has the params of the run it retries
        params = {**(ledger.run(retry_of) or {})["params"], "flag": str(flag)}
    statuses: dict[str, str] = {}
    for step_id in STEPS:
        try:
            result = execute_step(ledger, spec, spec.tool_step(step_id), run, params=params)
        except BlockedByFlag:
            statuses[step_id] = "failed"
            ledger.finish_run(run.run_id, "failed")
            return run.run_id, statuses
        statuses[step_id] = result.status
    ledger.finish_run(run.run_id, "succeeded")
    return run.run_id, statuses


def emails(ledger: Ledger) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM demo_emails")).scalar_one())


def test_retry_run_reuses_completed_steps_and_runs_the_rest(
    ledger: Ledger, spec: WorkflowSpec, tmp_path: Path
) -> None:
    """A run failing at s4, then a retry: s1-s3 are reused (no email, no effect row, a
    checkpoint_reused_from event naming the original), s4-s6 run; the retry's own rows
    hold every output, and both runs link to each other."""
    flag = tmp_path / "broken"
    flag.touch()
    first, statuses = run_steps(ledger, spec, "a", flag)
    assert statuses == {"s1": "completed", "s2": "completed", "s3": "completed", "s4": "failed"}
    assert (emails(ledger), len(ledger.effects())) == (3, 3)
    flag.unlink()
    second, statuses = run_steps(ledger, spec, "b", flag, retry_of=first)
    assert statuses == dict.fromkeys(["s1", "s2", "s3"], "reused") | dict.fromkeys(
        ["s4", "s5", "s6"], "completed"
    )
    assert emails(ledger) == 5
    assert {e["step_key"] for e in ledger.effects(second)} == {"s5", "s6"}
    reused = [e for e in ledger.events(second) if e["kind"] == "checkpoint_reused_from"]
    assert [(e["step_key"], e["data"]["run_id"]) for e in reused] == [
        ("s1", first),
        ("s2", first),
        ("s3", first),
    ]
    outputs = ledger.outputs(second)
    assert outputs["s1"] == ledger.outputs(first)["s1"]
    assert (ledger.run(second) or {}).get("retry_of") == first
    assert [r["run_id"] for r in ledger.retries_of(first)] == [second]


def test_retry_chain_goes_back_through_every_retry_and_respects_from(
    ledger: Ledger, spec: WorkflowSpec, tmp_path: Path
) -> None:
    """A fails at s4; B retries A --from s2 and fails at s4 again; C retries B. C reuses
    s1 (from B's copy) and s2-s3 from B (B re-ran them), never A's stale s2/s3: only the
    newest completed checkpoint that no --from in between declared stale."""
    flag = tmp_path / "broken"
    flag.touch()
    a, _ = run_steps(ledger, spec, "a", flag)
    b, statuses = run_steps(ledger, spec, "b", flag, retry_of=a, retry_from="s2")
    assert statuses == {"s1": "reused", "s2": "completed", "s3": "completed", "s4": "failed"}
    flag.unlink()
    c, statuses = run_steps(ledger, spec, "c", flag, retry_of=b)
    assert [statuses[s] for s in STEPS] == ["reused"] * 3 + ["completed"] * 3
    sources = {
        e["step_key"]: e["data"]["run_id"]
        for e in ledger.events(c)
        if e["kind"] == "checkpoint_reused_from"
    }
    assert sources == {"s1": b, "s2": b, "s3": b}
    assert [r["run_id"] for r in chains.chain(ledger, c)] == [c, b, a]
    assert [r["run_id"] for r in chains.descendants(ledger, a)] == [b, c]
    with ledger.engine.connect() as conn:
        # Seen from a retry of B that re-runs from s3: s3 and below are never reusable.
        assert (
            chains.find_reusable(
                conn, spec, retry_of=b, retry_from="s3", step_key="s3", step_id="s3"
            )
            is None
        )
        found = chains.find_reusable(
            conn, spec, retry_of=b, retry_from="s3", step_key="s2", step_id="s2"
        )
        assert found is not None and found.run_id == b


def test_from_reruns_that_step_and_everything_downstream_with_fresh_effects(
    ledger: Ledger, spec: WorkflowSpec, tmp_path: Path
) -> None:
    """Retrying a succeeded run --from s2: s1 reused, s2-s6 run again under keys scoped
    by the new run (new emails), so their effects are not the old ones."""
    a, _ = run_steps(ledger, spec, "a", tmp_path / "no-flag")
    before = emails(ledger)
    b, statuses = run_steps(ledger, spec, "b", tmp_path / "no-flag", retry_of=a, retry_from="s2")
    assert statuses["s1"] == "reused"
    assert all(statuses[s] == "completed" for s in STEPS[1:])
    assert emails(ledger) == before + 4
    assert {e["step_key"] for e in ledger.effects(b)} == {"s2", "s3", "s5", "s6"}


def test_a_compensated_step_is_not_reused(
    ledger: Ledger, spec: WorkflowSpec, tmp_path: Path
) -> None:
    """A step whose effect the failed run's saga undid is run again by the retry."""
    flag = tmp_path / "broken"
    flag.touch()
    a, _ = run_steps(ledger, spec, "a", flag)
    ledger.record_compensation(a, "s2", "completed", tool="demo.noop")
    with ledger.engine.connect() as conn:
        assert (
            chains.find_reusable(
                conn, spec, retry_of=a, retry_from=None, step_key="s2", step_id="s2"
            )
            is None
        )
        assert (
            chains.find_reusable(
                conn, spec, retry_of=a, retry_from=None, step_key="s1", step_id="s1"
            )
            is not None
        )


def test_rerun_steps_is_the_step_and_its_downstream(spec: WorkflowSpec) -> None:
    """--from s4 re-runs s4, s5, s6 and nothing upstream; no --from re-runs nothing."""
    assert chains.rerun_steps(spec, "s4") == {"s4", "s5", "s6"}
    assert chains.rerun_steps(spec, None) == set()


def test_plan_reuses_the_completed_prefix(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, tmp_path: Path
) -> None:
    """The plan of a retry of a run failed at s4 reuses s1-s3 (no task) and runs s4-s6;
    with --from s2, only s1 is reused."""
    flag = tmp_path / "broken"
    flag.touch()
    a, _ = run_steps(ledger, spec, "a", flag)
    plan = plan_retry(ledger, a, dags_folder=dags)
    assert plan.reused == {"s1": a, "s2": a, "s3": a}
    assert plan.rerun == ["s4", "s5", "s6"]
    assert plan.dag_id == "retry_six__v1"
    assert plan_retry(ledger, a, "s2", dags_folder=dags).reused == {"s1": a}


def test_plan_refuses_unknown_run_unknown_step_running_and_succeeded(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, tmp_path: Path
) -> None:
    """Each refusal has its reason: unknown run (404), unknown step (422, listing the
    steps), a run still running (409), a succeeded run without --from (409)."""
    with pytest.raises(RetryRefused) as err:
        plan_retry(ledger, "retry_six__v1/nope", dags_folder=dags)
    assert (err.value.reason, err.value.http_status) == ("unknown_run", 404)
    done, _ = run_steps(ledger, spec, "done", tmp_path / "no-flag")
    with pytest.raises(RetryRefused) as err:
        plan_retry(ledger, done, "s9", dags_folder=dags)
    assert err.value.http_status == 422 and "s1, s2, s3, s4, s5, s6" in str(err.value)
    with pytest.raises(RetryRefused) as err:
        plan_retry(ledger, done, dags_folder=dags)
    assert err.value.reason == "succeeded" and "--from STEP" in str(err.value)
    assert plan_retry(ledger, done, "s5", dags_folder=dags).rerun == ["s5", "s6"]
    ledger.ensure_run(
        run_id="retry_six__v1/live",
        dag_id="retry_six__v1",
        workflow="retry_six",
        version=1,
        params={},
        trigger_kind="manual",
    )
    with pytest.raises(RetryRefused) as err:
        plan_retry(ledger, "retry_six__v1/live", dags_folder=dags)
    assert err.value.reason == "running" and "still running" in str(err.value)


def test_plan_refuses_a_workflow_file_other_than_the_one_the_run_started_on(
    ledger: Ledger, spec: WorkflowSpec, dags: Path, tmp_path: Path
) -> None:
    """A run records its spec hash; a retry against a file with other content is refused."""
    a, _ = run_steps(ledger, spec, "a", tmp_path / "broken-not-there")
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE lf_runs SET spec_hash = :h"), {"h": "0" * 64})
    with pytest.raises(RetryRefused) as err:
        plan_retry(ledger, a, "s2", dags_folder=dags)
    assert err.value.reason == "workflow_file"


def test_cli_refusals_exit_2_with_a_clear_message(
    ledger: Ledger, url: str, spec: WorkflowSpec, dags: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ledgerflow retry`` on an unknown run, an unknown step or a succeeded run exits 2
    and says why on stderr, before touching Airflow."""
    done, _ = run_steps(ledger, spec, "ok", dags / "no-flag")
    base = ["--url", url, "--dags-folder", str(dags)]
    capsys.readouterr()
    assert main(["retry", "retry_six__v1/ghost", *base]) == 2
    assert "cannot retry: no run 'retry_six__v1/ghost' in the ledger" in capsys.readouterr().err
    assert main(["retry", done, "--from", "nope", *base]) == 2
    assert "has no step 'nope'" in capsys.readouterr().err
    assert main(["retry", done, *base]) == 2
    assert "succeeded: nothing to resume" in capsys.readouterr().err


def test_show_prints_the_retry_chain_both_ways(
    ledger: Ledger, url: str, spec: WorkflowSpec, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``ledgerflow show`` of the middle run names the run it retries and its retry."""
    flag = tmp_path / "broken"
    flag.touch()
    a, _ = run_steps(ledger, spec, "a", flag)
    b, _ = run_steps(ledger, spec, "b", flag, retry_of=a)
    flag.unlink()
    c, _ = run_steps(ledger, spec, "c", flag, retry_of=b, retry_from="s2")
    capsys.readouterr()
    assert main(["show", b, "--url", url]) == 0
    out = capsys.readouterr().out
    assert "retry chain (oldest first):" in out
    assert out.index(a) < out.index(f"> {b}") < out.index(c)
    assert f"(retry of {b}, from s2)" in out
