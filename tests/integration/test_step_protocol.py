"""The step protocol against real databases (SQLite and Postgres) and a real HTTP peer."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.errors import InjectedFault, NonRetryableError
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.protocol import RunRef, StepSkipped, execute_step
from ledgerflow.testing.http_peer import IdempotentPeer
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHECKOUT = ROOT / "dags" / "workflows" / "checkout" / "v1.yaml"


def params_for(spec: WorkflowSpec, **overrides: Any) -> dict[str, Any]:
    params = {name: p.default for name, p in spec.params.items()}
    params.update(overrides)
    return params


def count(ledger: Ledger, sql: str, **binds: Any) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(text(sql), binds).scalar_one())


@pytest.fixture
def checkout() -> WorkflowSpec:
    return load_workflow(CHECKOUT)


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def run_ref(name: str) -> RunRef:
    return RunRef(run_id=f"checkout__v1/{name}", dag_id="checkout__v1")


def test_completed_step_is_reused_not_repeated(ledger: Ledger, checkout: WorkflowSpec) -> None:
    """A step whose checkpoint is completed returns its recorded output; the effect is not redone."""
    params = params_for(checkout, order_id="o-reuse")
    run = run_ref("r1")
    first = execute_step(ledger, checkout, checkout.step("reserve_inventory"), run, params=params)
    second = execute_step(
        ledger, checkout, checkout.step("reserve_inventory"), run, params=params, try_number=2
    )
    assert first.status == "completed" and second.status == "reused"
    assert second.output == first.output
    assert count(ledger, "SELECT COUNT(*) FROM demo_reservations WHERE order_id='o-reuse'") == 1
    assert count(ledger, "SELECT reserved FROM demo_inventory WHERE sku='sku-book'") == 1


def test_same_idempotency_key_twice_gives_one_effect(
    ledger: Ledger, checkout: WorkflowSpec
) -> None:
    """Two runs charging the same order (same key) produce one payment; the second reuses it."""
    params = params_for(checkout, order_id="o-dup", amount=12.5)
    step = checkout.step("charge_payment")
    one = execute_step(ledger, checkout, step, run_ref("a"), params=params)
    two = execute_step(ledger, checkout, step, run_ref("b"), params=params)
    assert one.status == two.status == "completed"
    assert two.effect_reused and not one.effect_reused
    assert two.output == one.output
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id='o-dup'") == 1
    assert count(ledger, "SELECT COUNT(*) FROM lf_effects") == 1


def _step_in_subprocess(url: str, order_id: str, fault: str, run: str = "crash") -> int:
    code = f"""
import json
from ledgerflow.ledger.store import Ledger
from ledgerflow.workflow.validate import load_workflow
from ledgerflow.steps.protocol import RunRef, execute_step
spec = load_workflow({str(CHECKOUT)!r})
params = {{n: p.default for n, p in spec.params.items()}}
params["order_id"] = {order_id!r}
execute_step(Ledger({url!r}), spec, spec.step("charge_payment"),
             RunRef(run_id="checkout__v1/{run}", dag_id="checkout__v1"), params=params)
"""
    env = {**os.environ, "LEDGERFLOW_FAULT": fault}
    return subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode


@pytest.mark.parametrize("point", ["after_effect", "before_commit"])
def test_crash_between_effect_and_checkpoint_gives_no_second_effect(
    ledger: Ledger, checkout: WorkflowSpec, point: str
) -> None:
    """A process that dies after the effect but before the commit leaves no effect behind;
    the retry performs it exactly once."""
    assert _step_in_subprocess(ledger.url, "o-crash", f"{point}:exit") == 137
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id='o-crash'") == 0
    attempts = ledger.attempts("checkout__v1/crash", "charge_payment")
    assert [a["status"] for a in attempts] == ["running"]  # the dead attempt stays visible
    retry = execute_step(
        ledger,
        checkout,
        checkout.step("charge_payment"),
        run_ref("crash"),
        params=params_for(checkout, order_id="o-crash"),
        try_number=2,
    )
    assert retry.status == "completed"
    attempts = ledger.attempts("checkout__v1/crash", "charge_payment")
    assert [a["status"] for a in attempts] == ["lost", "completed"]
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id='o-crash'") == 1


def test_commit_succeeded_but_caller_saw_an_error(ledger: Ledger, checkout: WorkflowSpec) -> None:
    """'Committed, then the connection dropped' 100 times over: each retry finds the checkpoint,
    and every order is charged exactly once."""
    os.environ["LEDGERFLOW_FAULT"] = "after_commit:raise"
    try:
        for i in range(100):
            params = params_for(checkout, order_id=f"o-ac-{i}")
            with pytest.raises(InjectedFault):
                execute_step(
                    ledger,
                    checkout,
                    checkout.step("charge_payment"),
                    run_ref(f"ac{i}"),
                    params=params,
                )
            os.environ.pop("LEDGERFLOW_FAULT")
            again = execute_step(
                ledger,
                checkout,
                checkout.step("charge_payment"),
                run_ref(f"ac{i}"),
                params=params,
                try_number=2,
            )
            os.environ["LEDGERFLOW_FAULT"] = "after_commit:raise"
            assert again.status == "reused"
    finally:
        os.environ.pop("LEDGERFLOW_FAULT", None)
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id LIKE 'o-ac-%'") == 100
    assert (
        count(
            ledger,
            "SELECT COUNT(DISTINCT order_id) FROM demo_payments WHERE order_id LIKE 'o-ac-%'",
        )
        == 100
    )


def test_failures_are_recorded_and_the_last_one_is_dead_lettered(
    ledger: Ledger, checkout: WorkflowSpec
) -> None:
    """Each failed attempt is a ledger row; the final one leaves a dead letter with args, error and key."""
    params = params_for(checkout, order_id="o-declined", decline_card=True)
    step = checkout.step("charge_payment")
    with pytest.raises(NonRetryableError):
        execute_step(
            ledger,
            checkout,
            step,
            run_ref("dl"),
            params=params,
            try_number=1,
            max_attempts=4,
            is_final_attempt=lambda e: isinstance(e, NonRetryableError),
        )
    attempts = ledger.attempts("checkout__v1/dl", "charge_payment")
    assert len(attempts) == 1 and attempts[0]["status"] == "failed"
    assert attempts[0]["error_type"].endswith("PaymentDeclined")
    letters = ledger.dead_letters()
    assert len(letters) == 1
    letter = letters[0]
    assert letter["step_key"] == "charge_payment" and letter["attempts"] == 1
    assert letter["args"]["order_id"] == "o-declined"
    assert letter["idempotency_key"] == "checkout:charge_payment:o-declined"
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id='o-declined'") == 0
    assert ledger.checkpoint("checkout__v1/dl", "charge_payment").status == "failed"  # type: ignore[union-attr]


def test_retryable_failure_is_not_dead_lettered_before_the_last_attempt(
    ledger: Ledger, tmp_path: Path
) -> None:
    """A failing attempt that will be retried is recorded, but only exhaustion dead-letters it."""
    spec = _spec(
        tmp_path,
        """
name: flaky
version: 1
steps:
  - id: ship
    tool: demo.create_shipment
    args: {order_id: x, address: y, fail: true}
    idempotency: {key: "x"}
""",
    )
    run = RunRef(run_id="flaky__v1/r", dag_id="flaky__v1")
    for attempt in (1, 2, 3):
        with pytest.raises(Exception, match="carrier refused"):
            execute_step(
                ledger, spec, spec.steps[0], run, params={}, try_number=attempt, max_attempts=3
            )
        assert len(ledger.dead_letters()) == (1 if attempt == 3 else 0)
    assert [a["try_number"] for a in ledger.attempts(run.run_id)] == [1, 2, 3]


def _spec(tmp_path: Path, body: str) -> WorkflowSpec:
    path = tmp_path / "wf.yaml"
    path.write_text(body)
    return load_workflow(path)


def test_when_false_skips_and_records_it(ledger: Ledger, tmp_path: Path) -> None:
    """A step whose `when` is false is skipped, and the skip is a ledger row, not a silence."""
    spec = _spec(
        tmp_path,
        """
name: cond
version: 1
params:
  express: {type: boolean, default: false}
steps:
  - id: fast_lane
    when: params.express
    tool: demo.noop
    idempotency: natural
""",
    )
    run = RunRef(run_id="cond__v1/r", dag_id="cond__v1")
    with pytest.raises(StepSkipped):
        execute_step(ledger, spec, spec.steps[0], run, params={"express": False})
    assert ledger.checkpoint(run.run_id, "fast_lane").status == "skipped"  # type: ignore[union-attr]
    assert any(e["kind"] == "step_skipped" for e in ledger.events(run.run_id))


def test_for_each_items_are_checkpointed_under_their_own_keys(
    ledger: Ledger, tmp_path: Path
) -> None:
    """Each item of a for_each step has its own checkpoint and effect; downstream sees a list."""
    spec = _spec(
        tmp_path,
        """
name: fan
version: 1
params:
  skus: {type: array, default: [sku-book, sku-mug]}
steps:
  - id: reserve
    for_each: params.skus
    tool: demo.reserve_inventory
    args: {order_id: fan-1, sku: "{{ item }}", qty: 2}
    idempotency: {key: "fan-1-{{ item }}"}
  - id: total
    needs: [reserve]
    tool: demo.noop
    args: {value: "{{ steps.reserve.output | map(attribute='qty') | sum }}"}
    idempotency: natural
""",
    )
    run = RunRef(run_id="fan__v1/r", dag_id="fan__v1")
    params = {"skus": ["sku-book", "sku-mug"]}
    for index, sku in enumerate(params["skus"]):
        execute_step(ledger, spec, spec.steps[0], run, params=params, map_index=index, item=sku)
    execute_step(
        ledger, spec, spec.steps[0], run, params=params, map_index=1, item="sku-mug"
    )  # a retry
    total = execute_step(ledger, spec, spec.steps[1], run, params=params)
    assert total.output == {"value": 4}
    assert sorted(c.step_key for c in ledger.checkpoints(run.run_id)) == [
        "reserve[0]",
        "reserve[1]",
        "total",
    ]
    assert count(ledger, "SELECT COUNT(*) FROM demo_reservations WHERE order_id='fan-1'") == 2


# -- a real HTTP peer -----------------------------------------------------------


@pytest.fixture
def peer() -> Iterator[tuple[IdempotentPeer, str]]:
    with IdempotentPeer() as state:
        yield state, state.url


def _http_spec(tmp_path: Path, base: str, path: str = "/charge") -> WorkflowSpec:
    return _spec(
        tmp_path,
        f"""
name: pay
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: charge
    tool: http
    args: {{url: "{base}{path}", json: {{order: "{{{{ params.order_id }}}}", amount: 10}}}}
    idempotency: {{key: "{{{{ params.order_id }}}}"}}
""",
    )


def test_http_step_sends_the_key_and_a_completed_effect_is_not_resent(
    ledger: Ledger, tmp_path: Path, peer: tuple[IdempotentPeer, str]
) -> None:
    """The http tool sends Idempotency-Key; once recorded, the effect is reused without a call."""
    state, base = peer
    spec = _http_spec(tmp_path, base)
    first = execute_step(
        ledger, spec, spec.steps[0], RunRef("pay__v1/a", "pay__v1"), params={"order_id": "h1"}
    )
    second = execute_step(
        ledger, spec, spec.steps[0], RunRef("pay__v1/b", "pay__v1"), params={"order_id": "h1"}
    )
    assert state.requests == ["pay:charge:h1"]
    assert first.output["body"]["charge_id"] == second.output["body"]["charge_id"] == 1
    assert second.effect_reused


def test_http_crash_after_the_call_retries_with_the_same_key(
    ledger: Ledger, tmp_path: Path, peer: tuple[IdempotentPeer, str]
) -> None:
    """A crash after the remote call but before the checkpoint: the retry sends the SAME key,
    so the peer performs one effect."""
    state, base = peer
    spec = _http_spec(tmp_path, base)
    wf = tmp_path / "wf.yaml"
    code = f"""
from ledgerflow.ledger.store import Ledger
from ledgerflow.workflow.validate import load_workflow
from ledgerflow.steps.protocol import RunRef, execute_step
spec = load_workflow({str(wf)!r})
execute_step(Ledger({ledger.url!r}), spec, spec.steps[0], RunRef("pay__v1/c", "pay__v1"),
             params={{"order_id": "h2"}})
"""
    env = {**os.environ, "LEDGERFLOW_FAULT": "after_effect:exit"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 137
    assert ledger.effect("pay:charge:h2").status == "pending"  # type: ignore[union-attr]
    result = execute_step(
        ledger,
        spec,
        spec.steps[0],
        RunRef("pay__v1/c", "pay__v1"),
        params={"order_id": "h2"},
        try_number=2,
    )
    assert state.requests == ["pay:charge:h2", "pay:charge:h2"]
    assert len(state.effects) == 1
    assert result.output["body"]["charge_id"] == 1
    assert ledger.effect("pay:charge:h2").status == "done"  # type: ignore[union-attr]


def test_http_4xx_is_non_retryable_and_5xx_is_retryable(
    ledger: Ledger, tmp_path: Path, peer: tuple[IdempotentPeer, str]
) -> None:
    """A 400 is the request's fault (non-retryable); a 503 is worth another try."""
    from ledgerflow.steps.retry import is_non_retryable
    from ledgerflow.tools.registry import get_tool

    state, base = peer
    tool_errors = get_tool("http").non_retryable
    bad = _http_spec(tmp_path, base, "/bad")
    with pytest.raises(NonRetryableError) as client_error:
        execute_step(
            ledger, bad, bad.steps[0], RunRef("pay__v1/d", "pay__v1"), params={"order_id": "h3"}
        )
    assert is_non_retryable(client_error.value, bad.retry_for(bad.steps[0]), tool_errors)
    state.fail_next = 1
    spec = _http_spec(tmp_path, base)
    with pytest.raises(Exception, match="HTTP 503") as server_error:
        execute_step(
            ledger, spec, spec.steps[0], RunRef("pay__v1/e", "pay__v1"), params={"order_id": "h4"}
        )
    assert not is_non_retryable(server_error.value, spec.retry_for(spec.steps[0]), tool_errors)
    ok = execute_step(
        ledger,
        spec,
        spec.steps[0],
        RunRef("pay__v1/e", "pay__v1"),
        params={"order_id": "h4"},
        try_number=2,
    )
    assert ok.status == "completed" and len(state.effects) == 1


def test_migrations_are_idempotent_and_concurrent_safe(ledger_url: str) -> None:
    """Four processes migrating the same empty ledger at once end at the latest version, once."""
    code = f"from ledgerflow.ledger.store import Ledger; print(Ledger({ledger_url!r}).migrate())"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE) for _ in range(4)
    ]
    outputs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ledger = Ledger(ledger_url)
    from ledgerflow.ledger.schema import LATEST

    assert ledger.schema_version() == LATEST
    # One row per branch (the ledger's, and the demo's: the suite has the demo tools on)
    assert count(ledger, "SELECT COUNT(*) FROM lf_alembic_version") == 2


def test_concurrent_runs_with_one_key_make_one_effect(
    ledger: Ledger, checkout: WorkflowSpec
) -> None:
    """Eight runs charging the same order at the same moment: one payment. The runs that
    lose the race fail their attempt (the unique key rolls their effect back) and their
    retry reuses the winner's effect."""
    from concurrent.futures import ThreadPoolExecutor

    params = params_for(checkout, order_id="o-race")
    step = checkout.step("charge_payment")

    def attempt(n: int) -> str:
        for try_number in (1, 2, 3):
            try:
                result = execute_step(
                    ledger,
                    checkout,
                    step,
                    run_ref(f"race{n}"),
                    params=params,
                    try_number=try_number,
                    max_attempts=3,
                )
                return "reused" if result.effect_reused else "charged"
            except Exception:
                continue
        return "failed"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(attempt, range(8)))
    assert sorted(outcomes) == ["charged"] + ["reused"] * 7
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id='o-race'") == 1


def test_a_template_that_cannot_render_is_a_recorded_non_retryable_failure(
    ledger: Ledger, tmp_path: Path
) -> None:
    """A template reading a field the upstream output does not have fails the step at once
    (non-retryable: rendering again gives the same result), with an attempt row naming the
    problem and a dead letter; no tool is called."""
    from ledgerflow.steps.protocol import TemplateRenderError

    spec = _spec(
        tmp_path,
        """
name: tmpl
version: 1
steps:
  - id: a
    tool: demo.noop
    args: {value: 1}
  - id: b
    needs: [a]
    tool: demo.send_email
    args: {to: "{{ steps.a.output.no_such_field }}", subject: s, body: b}
    idempotency: natural
""",
    )
    run = RunRef(run_id="tmpl__v1/r", dag_id="tmpl__v1")
    execute_step(ledger, spec, spec.steps[0], run, params={})
    with pytest.raises(TemplateRenderError, match="no_such_field"):
        execute_step(ledger, spec, spec.steps[1], run, params={}, max_attempts=3)
    attempts = ledger.attempts(run.run_id, "b")
    assert [(a["status"], a["error_type"].rsplit(".", 1)[-1]) for a in attempts] == [
        ("failed", "TemplateRenderError")
    ]
    assert [d["step_key"] for d in ledger.dead_letters()] == ["b"]
    assert count(ledger, "SELECT COUNT(*) FROM demo_emails") == 0


def test_a_timeout_is_a_recorded_retryable_failure(ledger: Ledger, tmp_path: Path) -> None:
    """Airflow's timeout (AirflowTaskTimeout, a BaseException) raised inside the tool is
    recorded as a failed attempt of its own type, not left running; it is retryable."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    from ledgerflow.steps.retry import is_non_retryable
    from ledgerflow.tools.registry import tool

    @tool("test.times_out", behaviour="natural")
    def times_out(ctx: Any) -> None:
        raise AirflowTaskTimeout("Timeout, PID: 1")

    spec = _spec(
        tmp_path,
        """
name: to
version: 1
steps:
  - id: wait
    tool: test.times_out
""",
    )
    run = RunRef(run_id="to__v1/r", dag_id="to__v1")
    with pytest.raises(AirflowTaskTimeout) as raised:
        execute_step(ledger, spec, spec.steps[0], run, params={}, max_attempts=2)
    attempts = ledger.attempts(run.run_id, "wait")
    assert [(a["status"], a["error_type"].rsplit(".", 1)[-1]) for a in attempts] == [
        ("failed", "AirflowTaskTimeout")
    ]
    assert not is_non_retryable(raised.value, spec.retry_for(spec.steps[0]))
    assert ledger.dead_letters() == []


def test_a_dead_letter_can_be_re_run_from_the_cli(ledger: Ledger, tmp_path: Path) -> None:
    """`ledgerflow dead-letters --retry ID` runs the step again under the same key; when the
    cause is gone it completes once and the letter is resolved; a second retry is refused."""
    import shutil

    from ledgerflow.cli import main

    dags = tmp_path / "dags"
    shutil.copytree(ROOT / "dags" / "workflows" / "checkout", dags / "workflows" / "checkout")
    spec = load_workflow(dags / "workflows" / "checkout" / "v1.yaml")
    params = params_for(spec, order_id="o-dl-retry", decline_card=True)
    run = run_ref("dlr")
    ledger.ensure_run(
        run_id=run.run_id,
        dag_id=run.dag_id,
        workflow="checkout",
        version=1,
        params={**params, "decline_card": False},
        trigger_kind="manual",
    )
    with pytest.raises(NonRetryableError):
        execute_step(ledger, spec, spec.step("charge_payment"), run, params=params, max_attempts=1)
    (letter,) = ledger.dead_letters()
    argv = [
        "dead-letters",
        "--url",
        ledger.url,
        "--dags-folder",
        str(dags),
        "--retry",
        str(letter["id"]),
    ]
    assert main(argv) == 0
    assert count(ledger, "SELECT COUNT(*) FROM demo_payments WHERE order_id='o-dl-retry'") == 1
    assert ledger.dead_letters() == []
    assert ledger.checkpoint(run.run_id, "charge_payment").status == "completed"  # type: ignore[union-attr]
    assert main(argv) == 2  # resolved: not open any more


def test_sql_step_on_the_ledger_commits_with_its_checkpoint(ledger: Ledger, tmp_path: Path) -> None:
    """The sql tool on the ledger's own database runs in the checkpoint's transaction: a
    crash after the statement leaves no row; the retry writes it once; a third call
    reuses the checkpoint."""
    wf = tmp_path / "wf.yaml"
    wf.write_text("""
name: sqlwf
version: 1
params:
  to: {type: string, default: ops@example.com}
steps:
  - id: note
    tool: sql
    args:
      statement: "INSERT INTO demo_emails (recipient, subject, body) VALUES (:to, 'note', :idempotency_key)"
      parameters: {to: "{{ params.to }}"}
    idempotency: {key: "{{ params.to }}"}
""")
    code = f"""
from ledgerflow.ledger.store import Ledger
from ledgerflow.workflow.validate import load_workflow
from ledgerflow.steps.protocol import RunRef, execute_step
spec = load_workflow({str(wf)!r})
execute_step(Ledger({ledger.url!r}), spec, spec.steps[0], RunRef("sqlwf__v1/r", "sqlwf__v1"),
             params={{"to": "ops@example.com"}})
"""
    env = {**os.environ, "LEDGERFLOW_FAULT": "after_effect:exit"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 137
    assert count(ledger, "SELECT COUNT(*) FROM demo_emails WHERE subject = 'note'") == 0
    spec = load_workflow(wf)
    run = RunRef("sqlwf__v1/r", "sqlwf__v1")
    first = execute_step(
        ledger, spec, spec.steps[0], run, params={"to": "ops@example.com"}, try_number=2
    )
    again = execute_step(
        ledger, spec, spec.steps[0], run, params={"to": "ops@example.com"}, try_number=3
    )
    assert first.output["rowcount"] == 1 and again.status == "reused"
    rows = count(
        ledger,
        "SELECT COUNT(*) FROM demo_emails WHERE subject = 'note' AND body = 'sqlwf:note:ops@example.com'",
    )
    assert rows == 1
