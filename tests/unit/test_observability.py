"""Metrics and traces of the ledger's facts, in-process: Airflow's StatsD client sending to a
real UDP socket, and OpenTelemetry's SDK recording spans in memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ledgerflow import observability
from ledgerflow.ledger import approvals, breakers
from ledgerflow.ledger import llm as llm_calls
from ledgerflow.ledger.store import Ledger
from ledgerflow.spec.models import BreakerSpec
from ledgerflow.testing.statsd import StatsdListener

RUN = "triage__v2/manual__2026-01-31T12:00:00+00:00"


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    return ledger


@pytest.fixture
def statsd(monkeypatch: pytest.MonkeyPatch) -> Iterator[StatsdListener]:
    """Airflow's Task SDK Stats configured for StatsD on a listener of this test."""
    from airflow.sdk._shared.observability.metrics import stats
    from airflow.sdk.observability.metrics import stats_utils

    with StatsdListener(keep=("lftest.",)) as listener:
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_ON", "True")
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_HOST", "127.0.0.1")
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PORT", str(listener.port))
        monkeypatch.setenv("AIRFLOW__METRICS__STATSD_PREFIX", "lftest")
        stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)
        try:
            yield listener
        finally:
            monkeypatch.undo()
            stats.initialize(factory=stats_utils.get_stats_factory(), export_legacy_names=False)


def settle(listener: StatsdListener, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        snap = listener.snapshot("lftest.ledgerflow.")
        names = set(snap["counters"]) | set(snap["timings"])
        if wanted <= names or time.monotonic() > deadline:
            return snap
        time.sleep(0.05)


def test_workflow_of_reads_the_dag_id() -> None:
    """The workflow of a ledger run id is its DAG id without ``__v<N>``."""
    assert observability.workflow_of(RUN) == "triage"
    assert observability.workflow_of("plain_dag/run") == "plain_dag"


def test_approval_wait_breaker_opening_and_llm_fallback_reach_statsd(
    ledger: Ledger, statsd: StatsdListener
) -> None:
    """A decided approval sends its wait as a timer (tagged and per workflow), a breaker
    that opens sends breaker.opened.<name>, an LLM call stored on the fallback path sends
    llm.fallbacks, each once, through Airflow's StatsD client to a real UDP socket."""
    approval, _ = approvals.request(
        ledger,
        run_id=RUN,
        step_key="ask",
        dag_id="triage__v2",
        task_id="ask",
        workflow="triage",
        version=2,
        subject="s",
        body="b",
        payload={},
        approvers={"users": ["ann"], "roles": []},
        deadline=datetime.now(timezone.utc) + timedelta(days=1),
        at_deadline="reject",
    )
    approvals.decide(ledger, approval.id, decision="approved", by="ann")
    breakers.record(ledger, "crm", BreakerSpec(failures=1), success=False, trial=False)
    outcome = SimpleNamespace(
        model="m",
        responses=["{}"],
        status="invalid",
        output=None,
        errors=["missing field"],
        requests=2,
        input_tokens=1,
        output_tokens=1,
        latency_ms=5,
    )
    llm_calls.record(
        ledger,
        key="k1",
        run_id=RUN,
        step_key="classify",
        system_prompt="",
        prompt="p",
        outcome=outcome,
        path="fallback",
        reason="invalid",
    )
    p = "lftest.ledgerflow."
    wanted = {
        f"{p}approval.wait",
        f"{p}approval.wait.triage",
        f"{p}breaker.opened.crm",
        f"{p}llm.fallbacks.triage",
    }
    snap = settle(statsd, wanted)
    assert len(snap["timings"][f"{p}approval.wait.triage"]) == 1
    assert snap["timings"][f"{p}approval.wait.triage"][0] >= 0
    assert snap["counters"][f"{p}breaker.opened.crm"] == 1
    assert snap["counters"][f"{p}breaker.opened"] == 1
    assert snap["counters"][f"{p}llm.fallbacks.triage"] == 1
    assert snap["counters"][f"{p}llm.fallbacks"] == 1


def test_a_step_attempt_is_a_span_under_the_current_airflow_span(ledger: Ledger) -> None:
    """With a tracer provider installed (Airflow's [traces] otel_on does it in a task), each
    recorded attempt is a span, child of the span current at the time (Airflow's
    ``worker.<task>``), carrying the run id, workflow, step and try; a failed attempt's span
    has an error status."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was installed in this process first")
    worker = provider.get_tracer("airflow").start_as_current_span("worker.charge")
    with worker as parent:
        first = ledger.begin_attempt(
            run_id=RUN,
            step_key="charge",
            step_id="charge",
            map_index=-1,
            try_number=1,
            args={},
            idempotency_key="k",
            first=True,
        )
        ledger.fail_attempt(
            run_id=RUN, step_key="charge", attempt_id=first, error=OSError("down"), final=False
        )
        second = ledger.begin_attempt(
            run_id=RUN,
            step_key="charge",
            step_id="charge",
            map_index=-1,
            try_number=2,
            args={},
            idempotency_key="k",
        )
        with ledger.begin() as conn:
            ledger.complete_step(
                conn, run_id=RUN, step_key="charge", attempt_id=second, output={}, reused=False
            )
    spans = [s for s in exporter.get_finished_spans() if s.name == "ledgerflow.step charge"]
    assert [s.attributes["ledgerflow.try_number"] for s in spans] == [1, 2]
    for span in spans:
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
        assert span.attributes["ledgerflow.run_id"] == RUN
        assert span.attributes["ledgerflow.workflow"] == "triage"
    assert [s.status.status_code.name for s in spans] == ["ERROR", "UNSET"]
