"""The kernel's contract, the same for every kind of step (a keyed tool, an LLM step, a
quality step, an approval, a compensation), on SQLite and Postgres: a completed
checkpoint is reused; `when` false skips and stays skipped; a retry run reuses its
chain's checkpoint; a render error is final on the first try with a dead letter; an
error named in `retry.non_retryable` is final at once; a crash at any fault point
followed by the next try leaves exactly one effect (one shipment, one recorded answer,
one quality result, one request with one notice, one refund).

A kind that cannot meet a clause says why in its skip (a compensation has no `when`
and never reuses a retry chain's work: a retry run undoes its own effects)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from ledgerflow.errors import InjectedFault
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import WorkflowSpec
from ledgerflow.steps.approval import ask
from ledgerflow.steps.kernel import StepSkipped, TemplateRenderError
from ledgerflow.steps.llm import execute_llm_step
from ledgerflow.steps.protocol import RunRef, execute_step
from ledgerflow.steps.quality import run_quality
from ledgerflow.steps.saga import NothingToUndo, compensate_step
from ledgerflow.testing.openai_peer import OpenAIPeer
from ledgerflow.workflow.validate import load_workflow

pytestmark = pytest.mark.integration

POINTS = ["before_effect", "after_effect", "before_commit", "after_commit"]
GOOD = json.dumps({"label": "ok"})

STEPS = {
    "tool": """
  - id: s
    when: params.go
    tool: demo.create_shipment
    args: {order_id: "{{ params.order }}", address: "{{ params.address }}", fail: "{{ params.fail }}"}
    idempotency: {key: "{{ params.order }}"}
    retry: {max_attempts: 3, non_retryable: [ShipmentUnavailable]}
""",
    "llm": """
  - id: s
    kind: llm
    when: params.go
    conn_id: ledgerflow_llm
    retry: {max_attempts: 3, non_retryable: [LlmCallFailed]}
    prompt: "Label {{ params.order }} at {{ params.address }}."
    output_schema:
      type: object
      properties: {label: {type: string}}
      required: [label]
""",
    "quality": """
  - id: s
    kind: quality
    when: params.go
    dataset: {expression: "params.rows if params.order else []"}
    expectations:
      - row_count_between: {min: 1}
    on_failure: warn
""",
    "approval": """
  - id: s
    kind: approval
    when: params.go
    subject: "Ship {{ params.order }}?"
    body: "To {{ params.address }}."
    payload: {order: "{{ params.order }}"}
    approvers: {users: [manager]}
    deadline: 1h
""",
    "compensation": """
  - id: s
    tool: demo.charge_payment
    args: {order_id: "{{ params.order }}", amount: 5}
    idempotency: {key: "{{ params.order }}"}
    compensate:
      tool: demo.refund_payment
      args:
        payment_id: "{{ steps.s.output.payment_id }}"
        fail_times: "{{ params.refund_failures }}"
      retry: {max_attempts: 3, non_retryable: [ToolError]}
""",
}

# What each kind cannot do, with the reason (the clause is skipped for it).
NOT_FOR = {
    ("compensation", "skip"): "a compensation has no `when`: it undoes what completed",
    ("compensation", "chain"): "a compensation never reuses the chain: a retry undoes its own",
    ("quality", "named"): "a quality step has no retryable error of its own to name",
    ("approval", "named"): "an approval is not retried: every failure is final",
}


def unless(kind: Kind, clause: str) -> None:
    if (kind.name, clause) in NOT_FOR:
        pytest.skip(NOT_FOR[kind.name, clause])


@dataclass
class Kind:
    name: str
    spec: WorkflowSpec
    run: Callable[..., Any]
    effects: Callable[[Ledger, str, str], int]  # (ledger, run id, order) -> effect count
    key: str = "s"  # the step key its attempts and dead letters are recorded under
    done: str = "completed"  # the status of step `s` once the kind's work is done


@pytest.fixture
def peer() -> Iterator[OpenAIPeer]:
    with OpenAIPeer() as peer:
        yield peer


@pytest.fixture
def ledger(ledger_url: str) -> Ledger:
    ledger = Ledger(ledger_url)
    ledger.migrate()
    return ledger


def make_kind(name: str, tmp_path: Path, peer: OpenAIPeer, monkeypatch: pytest.MonkeyPatch) -> Kind:
    path = tmp_path / "workflows" / f"c_{name}" / "v1.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(
        f"name: c_{name}\nversion: 1\nparams:\n"
        "  go: {type: boolean, default: true}\n"
        "  order: {type: string, default: o}\n"
        "  address: {type: string, default: here}\n"
        "  rows: {type: array, default: [{a: 1}]}\n"
        "  fail: {type: boolean, default: false}\n"
        "  refund_failures: {type: integer, default: 0}\n"
        "steps:" + STEPS[name]
    )
    spec = load_workflow(path)
    step = spec.step("s")

    def count(ledger: Ledger, sql: str, **binds: Any) -> int:
        with ledger.engine.connect() as conn:
            return int(conn.execute(text(sql), binds).scalar_one())

    if name == "tool":

        def run(ledger: Ledger, ref: RunRef, params: dict[str, Any], **kw: Any) -> Any:
            return execute_step(ledger, spec, step, ref, params=params, **kw)

        def effects(ledger: Ledger, run_id: str, order: str) -> int:
            return count(ledger, "SELECT count(*) FROM demo_shipments WHERE order_id=:o", o=order)

    elif name == "llm":
        monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_LLM", peer.connection_uri())

        def run(ledger: Ledger, ref: RunRef, params: dict[str, Any], **kw: Any) -> Any:
            reply: Any = GOOD
            if params.get("fail"):  # the provider refuses: LlmCallFailed
                reply = (400, {"error": {"message": "refused", "type": "x"}})
            peer.script(f"Label {params.get('order')}", reply)
            return execute_llm_step(ledger, spec, step, ref, params=params, **kw)

        def effects(ledger: Ledger, run_id: str, order: str) -> int:
            # The recorded answer: a crash before the commit may ask the model again
            # (an answer is not a side effect), but only one answer is ever recorded.
            return count(ledger, "SELECT count(*) FROM lf_llm_calls WHERE run_id = :r", r=run_id)

    elif name == "approval":

        def run(ledger: Ledger, ref: RunRef, params: dict[str, Any], **kw: Any) -> Any:
            # Ask; a pending request is decided (approved) and its outcome recorded, as
            # the api-server or the trigger does; a later try finds the decision.
            kw.pop("max_attempts", None)
            asked = ask(ledger, spec, step, ref, params=params, **kw)
            if asked.skipped:
                raise StepSkipped("when is false")
            if asked.reused is not None:
                return ledger.checkpoint(ref.run_id, "s")
            approval = asked.approval
            if approval.pending:
                approvals.decide(ledger, approval.id, decision="approved", by="manager")
            approvals.complete(ledger, approval.id, "test")
            return ledger.checkpoint(ref.run_id, "s")

        def effects(ledger: Ledger, run_id: str, order: str) -> int:
            # The request is one row per (run, step); its notice is the side effect.
            return count(
                ledger,
                "SELECT count(*) FROM lf_events WHERE run_id = :r AND kind = 'approval_notified'",
                r=run_id,
            )

    elif name == "compensation":

        def run(ledger: Ledger, ref: RunRef, params: dict[str, Any], **kw: Any) -> Any:
            # The forward step once (its own, not under test), then the run failed and
            # its saga undoes it: the compensation is the step under test.
            if ledger.checkpoint(ref.run_id, "s") is None:
                fault = os.environ.pop("LEDGERFLOW_FAULT", None)  # armed for the undo only
                try:
                    execute_step(ledger, spec, step, ref, params={**PARAMS, **params})
                finally:
                    if fault is not None:
                        os.environ["LEDGERFLOW_FAULT"] = fault
                ledger.start_saga(ref.run_id, "later")
            if params.get("fail"):  # the refund API refuses (ToolError, named)
                params = {**params, "refund_failures": 9}
            tries = kw.pop("try_number", 1)
            retries = kw.pop("max_attempts", 1) - 1
            try:
                output = compensate_step(
                    ledger, spec, ref, "s", params=params, try_number=tries, retries=retries
                )
            except NothingToUndo:  # undone already: the recorded undo
                output = ledger.checkpoint(ref.run_id, "compensate__s").output  # type: ignore[union-attr]
            return type("Undone", (), {"output": output})()

        def effects(ledger: Ledger, run_id: str, order: str) -> int:
            # The refunds the ledger records as performed (the undo's own effect rows).
            return count(
                ledger,
                "SELECT count(*) FROM lf_effects WHERE tool = 'demo.refund_payment' "
                "AND status = 'done' AND idempotency_key LIKE :k",
                k=f"%:{order}%",
            )

    else:

        def run(ledger: Ledger, ref: RunRef, params: dict[str, Any], **kw: Any) -> Any:
            return run_quality(ledger, spec, step, ref, params=params, **kw)

        def effects(ledger: Ledger, run_id: str, order: str) -> int:
            return count(
                ledger, "SELECT count(*) FROM lf_quality_results WHERE run_id = :r", r=run_id
            )

    if name == "compensation":
        return Kind(name, spec, run, effects, key="compensate__s", done="compensated")
    return Kind(name, spec, run, effects)


@pytest.fixture(params=["tool", "llm", "quality", "approval", "compensation"])
def kind(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    peer: OpenAIPeer,
    monkeypatch: pytest.MonkeyPatch,
) -> Kind:
    return make_kind(request.param, tmp_path, peer, monkeypatch)


def ref(kind: Kind, name: str, retry_of: str | None = None) -> RunRef:
    dag = f"c_{kind.name}__v1"
    return RunRef(run_id=f"{dag}/{name}", dag_id=dag, retry_of=retry_of)


PARAMS = {"go": True, "address": "here", "rows": [{"a": 1}], "fail": False, "refund_failures": 0}
# The param each kind's templates read, removed to make rendering fail.
READS = {"compensation": "refund_failures"}


def params(order: str, **kw: Any) -> dict[str, Any]:
    return {**PARAMS, "order": order, **kw}


def test_a_completed_checkpoint_is_reused(ledger: Ledger, kind: Kind) -> None:
    """The same step of the same run twice: the second returns the recorded output and
    performs nothing."""
    r = ref(kind, "reuse")
    first = kind.run(ledger, r, params("o-reuse"))
    second = kind.run(ledger, r, params("o-reuse"))
    assert second.output == first.output
    assert kind.effects(ledger, r.run_id, "o-reuse") == 1


def test_when_false_skips_and_stays_skipped(ledger: Ledger, kind: Kind) -> None:
    """`when` false records a skip; the next try of the task (even with `when` now true)
    finds the skip and performs nothing."""
    unless(kind, "skip")
    r = ref(kind, "skip")
    with pytest.raises(StepSkipped):
        kind.run(ledger, r, params("o-skip", go=False))
    with pytest.raises(StepSkipped):
        kind.run(ledger, r, params("o-skip"), try_number=2)
    assert ledger.checkpoint(r.run_id, "s").status == "skipped"  # type: ignore[union-attr]
    assert kind.effects(ledger, r.run_id, "o-skip") == 0


def test_a_retry_run_reuses_its_chains_checkpoint(ledger: Ledger, kind: Kind) -> None:
    """A retry run (its chain recorded in the ledger) reuses the completed checkpoint of
    the run it retries, with the same inputs: the same output, no second effect."""
    unless(kind, "chain")
    first = ref(kind, "orig")
    done = kind.run(ledger, first, params("o-chain"))
    retry = ref(kind, "retry", retry_of=first.run_id)
    again = kind.run(ledger, retry, params("o-chain"))
    assert again.output == done.output
    total = kind.effects(ledger, first.run_id, "o-chain")
    if kind.name == "quality":  # counted per run; the others per order
        total += kind.effects(ledger, retry.run_id, "o-chain")
    assert total == 1


def test_a_render_error_is_final_with_a_dead_letter(ledger: Ledger, kind: Kind) -> None:
    """An input that cannot be rendered (a param its templates read is missing) fails on
    try 1 of 3 as the last attempt: the step is `failed`, a dead letter holds it, and
    nothing was performed."""
    r = ref(kind, "render")
    bad = params("o-render")
    missing = READS.get(kind.name, "order")
    bad.pop(missing)  # a param the kind's templates read is undefined
    with pytest.raises(TemplateRenderError, match=missing):
        kind.run(ledger, r, bad, try_number=1, max_attempts=3)
    assert ledger.checkpoint(r.run_id, kind.key).status == "failed"  # type: ignore[union-attr]
    letters = [d["step_key"] for d in ledger.dead_letters() if d["run_id"] == r.run_id]
    assert letters == [kind.key]
    assert kind.effects(ledger, r.run_id, "o-render") == 0


@pytest.mark.parametrize("point", POINTS)
def test_a_crash_at_any_fault_point_leaves_one_effect(
    ledger: Ledger, kind: Kind, point: str
) -> None:
    """A crash at each named fault point, then the next try of the task: exactly one
    effect, and a completed checkpoint."""
    r = ref(kind, f"crash-{point}")
    order = f"o-crash-{point}"
    os.environ["LEDGERFLOW_FAULT"] = f"{point}:raise"
    try:
        with pytest.raises(InjectedFault):
            kind.run(ledger, r, params(order), try_number=1, max_attempts=3)
    finally:
        del os.environ["LEDGERFLOW_FAULT"]
    kind.run(ledger, r, params(order), try_number=2, max_attempts=3)
    assert ledger.checkpoint(r.run_id, "s").status == kind.done  # type: ignore[union-attr]
    assert kind.effects(ledger, r.run_id, order) == 1


def test_an_error_named_non_retryable_is_final_at_once(ledger: Ledger, kind: Kind) -> None:
    """Finding 4, for every kind with a retryable error of its own: an error class that
    the step's `retry.non_retryable` names is the last attempt on try 1 of 3, exactly as
    Airflow's retry policy decides: the step is `failed` and a dead letter holds it."""
    unless(kind, "named")
    r = ref(kind, "named")
    with pytest.raises(Exception, match=r"refused|carrier|unavailable"):
        kind.run(ledger, r, params("o-named", fail=True), try_number=1, max_attempts=3)
    assert ledger.checkpoint(r.run_id, kind.key).status == "failed"  # type: ignore[union-attr]
    letters = [d["step_key"] for d in ledger.dead_letters() if d["run_id"] == r.run_id]
    assert letters == [kind.key]
