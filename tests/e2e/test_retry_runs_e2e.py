"""Retry as a new run on real Airflow processes (Postgres metadata and ledger).

``retry_six`` (tests/e2e/workflows/retry_six.yaml): six steps in a row; s1, s2, s3, s5 and
s6 send an email (a ``demo_emails`` row and an ``lf_effects`` row under a key scoped by the
run), s4 fails at once while the run's flag file exists. A re-executed step would write
new rows, so counting rows in the effect tables shows what ran.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DAG = "retry_six__v1"
CLI = str(ROOT / ".venv" / "bin" / "ledgerflow")


def emails(ledger: Ledger, ref: str) -> list[str]:
    with ledger.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT subject FROM demo_emails WHERE recipient = :r ORDER BY id"), {"r": ref}
        )
        return [r[0] for r in rows]


def effect_steps(ledger: Ledger, run_id: str) -> list[str]:
    return sorted(e["step_key"] for e in ledger.effects(run_id))


def attempted(ledger: Ledger, run_id: str) -> list[str]:
    return sorted({a["step_key"] for a in ledger.attempts(run_id)})


def reused_from(ledger: Ledger, run_id: str) -> dict[str, str]:
    return {
        e["step_key"]: e["data"]["run_id"]
        for e in ledger.events(run_id)
        if e["kind"] == "checkpoint_reused_from"
    }


def ti_states(stack: AirflowStack, ledger_run_id: str) -> dict[str, tuple[str, int]]:
    dag_id, run_id = ledger_run_id.split("/", 1)
    return {
        t["task_id"]: (t["state"], t["try_number"]) for t in stack.task_instances(dag_id, run_id)
    }


def finished(stack: AirflowStack, ledger: Ledger, ledger_run_id: str) -> str:
    """Airflow's final state, once the ledger also has the run's final status."""
    dag_id, run_id = ledger_run_id.split("/", 1)
    state = stack.wait_for_run(dag_id, run_id, timeout=300)
    wait_for(
        lambda: (ledger.run(ledger_run_id) or {}).get("status") not in (None, "running"),
        60,
        f"{ledger_run_id} final status in the ledger",
    )
    return state


def row(ledger: Ledger, run_id: str) -> dict[str, Any]:
    found = ledger.run(run_id)
    assert found is not None, run_id
    return found


def cli(stack: AirflowStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=stack.env, capture_output=True, text=True, timeout=180, check=False
    )


def failed_run(stack: AirflowStack, ledger: Ledger, flag: Path, ref: str) -> str:
    flag.touch()
    run_id = stack.trigger(DAG, {"ref": ref, "flag": str(flag)})
    original = f"{DAG}/{run_id}"
    assert finished(stack, ledger, original) == "failed"
    return original


def test_retry_skips_completed_steps_runs_the_rest_and_links_both_ways(
    stack: AirflowStack, ledger: Ledger, tmp_path: Path
) -> None:
    """A run fails at s4 of 6. ``ledgerflow retry`` starts a new run of the same DAG that
    reuses s1-s3 (no task runs for them, no new email or effect row, a
    checkpoint_reused_from event naming the original) and runs s4-s6 to success; the
    original stays failed and untouched; the ledger links both ways and ``show`` prints
    the chain. Then ``POST .../retry {"from": "s2"}`` on the succeeded retry re-runs
    s2-s6 with fresh effects and reuses only s1."""
    ref = f"rt-{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "s4-broken"
    original = failed_run(stack, ledger, flag, ref)
    assert emails(ledger, ref) == ["s1", "s2", "s3"]
    assert effect_steps(ledger, original) == ["s1", "s2", "s3"]
    before = ti_states(stack, original)
    assert before["s4"][0] == "failed" and before["s5"][0] == "upstream_failed"

    flag.unlink()  # the cause is fixed; the retry keeps the original params (and flag path)
    done = cli(stack, "retry", original)
    assert done.returncode == 0, done.stderr + done.stdout
    assert "reuse  s1" in done.stdout and "run    s4" in done.stdout
    retry = next(
        line.split()[1] for line in done.stdout.splitlines() if line.startswith("started ")
    )
    assert retry.startswith(f"{DAG}/retry__")
    assert finished(stack, ledger, retry) == "success"

    # Nothing of s1-s3 happened again; s4-s6 ran in the retry run.
    assert emails(ledger, ref) == ["s1", "s2", "s3", "s5", "s6"]
    assert effect_steps(ledger, retry) == ["s5", "s6"]
    assert attempted(ledger, retry) == ["s4", "s5", "s6"]
    assert reused_from(ledger, retry) == {"s1": original, "s2": original, "s3": original}
    states = ti_states(stack, retry)
    assert all(states[s] == ("success", 0) for s in ("s1", "s2", "s3")), states
    assert all(states[s][0] == "success" and states[s][1] >= 1 for s in ("s4", "s5", "s6"))
    assert ledger.outputs(retry)["s3"] == ledger.outputs(original)["s3"]

    # The original is as it was; the links go both ways.
    assert ti_states(stack, original) == before
    assert row(ledger, original)["status"] == "failed"
    assert row(ledger, retry)["retry_of"] == original
    assert [r["run_id"] for r in ledger.retries_of(original)] == [retry]
    shown = cli(stack, "show", original)
    assert shown.returncode == 0 and f"{retry}  succeeded  (retry of {original})" in shown.stdout
    conf = stack.run(*retry.split("/", 1))["conf"]
    assert conf["ledgerflow_retry_of"] == original and conf["ref"] == ref

    # --from s2 on the succeeded retry (over the REST endpoint): s2-s6 again, s1 reused.
    third: dict[str, Any] = stack.api(
        "POST", f"/ledgerflow/api/runs/{retry}/retry", json={"from": "s2"}
    )
    assert third["retry_of"] == retry and third["from"] == "s2"
    assert third["reused"] == {"s1": retry}
    assert finished(stack, ledger, third["run_id"]) == "success"
    assert emails(ledger, ref) == ["s1", "s2", "s3", "s5", "s6", "s2", "s3", "s5", "s6"]
    assert effect_steps(ledger, third["run_id"]) == ["s2", "s3", "s5", "s6"]
    assert attempted(ledger, third["run_id"]) == ["s2", "s3", "s4", "s5", "s6"]
    assert reused_from(ledger, third["run_id"]) == {"s1": retry}
    assert row(ledger, third["run_id"])["retry_from"] == "s2"


def test_a_retry_of_a_fused_run_reuses_the_steps_before_the_failure_inside_its_task(
    stack: AirflowStack, ledger: Ledger, tmp_path: Path
) -> None:
    """The six steps fused in one task; s4 fails for good (its flag file exists). The
    retry run starts the segment's task again: s1-s3 are reused from the original inside
    it (no new email, no attempt), s4-s6 run, and the task succeeds."""
    fused = "retry_six_fused__v1"
    ref = f"rf-{uuid.uuid4().hex[:8]}"
    flag = tmp_path / "s4-broken"
    flag.touch()
    run_id = stack.trigger(fused, {"ref": ref, "flag": str(flag)})
    original = f"{fused}/{run_id}"
    assert finished(stack, ledger, original) == "failed"
    assert emails(ledger, ref) == ["s1", "s2", "s3"]
    assert row(ledger, original)["failed_step"] == "s4"
    assert ti_states(stack, original)["fused__s1__s6"] == ("failed", 1)

    flag.unlink()
    done = cli(stack, "retry", original)
    assert done.returncode == 0, done.stderr + done.stdout
    retry = next(
        line.split()[1] for line in done.stdout.splitlines() if line.startswith("started ")
    )
    assert finished(stack, ledger, retry) == "success"
    assert emails(ledger, ref) == ["s1", "s2", "s3", "s5", "s6"]
    assert attempted(ledger, retry) == ["s4", "s5", "s6"]
    assert reused_from(ledger, retry) == {"s1": original, "s2": original, "s3": original}
    assert ti_states(stack, retry)["fused__s1__s6"][0] == "success"
    assert row(ledger, retry)["retry_of"] == original


def test_retry_refusals_over_rest_and_cli(stack: AirflowStack, ledger: Ledger) -> None:
    """Refused with a clear message and nothing started: an unknown run (404), an
    unknown step (422), a succeeded run without ``from`` (409, CLI exit 2), a user who
    may not trigger the DAG (403), no login (401). (A run still running: the versioning
    test, on a run parked on an approval.)"""
    ref = f"rf-{uuid.uuid4().hex[:8]}"
    ok_run = stack.trigger(DAG, {"ref": ref})
    succeeded = f"{DAG}/{ok_run}"
    assert finished(stack, ledger, succeeded) == "success"
    url = f"{stack.base_url}/ledgerflow/api/runs"
    admin = {"Authorization": f"Bearer {stack.token()}"}
    with httpx.Client(timeout=60) as http:
        resp = http.post(f"{url}/{DAG}/nope/retry", headers=admin)
        assert resp.status_code == 404 and "no run" in resp.json()["detail"]
        resp = http.post(f"{url}/{succeeded}/retry", headers=admin, json={"from": "zz"})
        assert resp.status_code == 422 and "has no step 'zz'" in resp.json()["detail"]
        resp = http.post(f"{url}/{succeeded}/retry", headers=admin)
        assert resp.status_code == 409 and "succeeded" in resp.json()["detail"]
        viewer = {"Authorization": f"Bearer {stack.token('viewer')}"}
        resp = http.post(f"{url}/{succeeded}/retry", headers=viewer, json={"from": "s2"})
        assert resp.status_code == 403
        # Without ``from`` the plan is refused (409 "succeeded" above): the viewer gets 403
        # first, and learns nothing of the run's state.
        resp = http.post(f"{url}/{succeeded}/retry", headers=viewer)
        assert resp.status_code == 403 and "succeeded" not in resp.text
        assert http.post(f"{url}/{succeeded}/retry", json={"from": "s2"}).status_code == 401
    refused = cli(stack, "retry", succeeded)
    assert refused.returncode == 2 and "succeeded: nothing to resume" in refused.stderr
    assert ledger.retries_of(succeeded) == []
