"""Traces: with Airflow's ``[traces] otel_on``, each step attempt is a span in Airflow's trace.

This module runs its own small stack (OpenTelemetry on, exporting OTLP/HTTP to a real
collector of the test, ``ledgerflow.testing.otlp``) with one two-step workflow.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ledgerflow.cli import SHIM
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.otlp import OtlpCollector

pytestmark = pytest.mark.e2e

TRACED = """
name: traced
version: 1
params:
  ref: {type: string, required: true}
steps:
  - id: first
    tool: demo.noop
    args: {value: "{{ params.ref }}"}
    idempotency: natural
  - id: second
    needs: [first]
    tool: demo.noop
    args: {value: "{{ steps.first.output.value }}"}
    idempotency: natural
"""
DAG_ID = "traced__v1"


@pytest.fixture(scope="module")
def collector() -> Iterator[OtlpCollector]:
    with OtlpCollector() as collector:
        yield collector


@pytest.fixture(scope="module")
def traced_stack(
    tmp_path_factory: pytest.TempPathFactory, ledger_db: str, collector: OtlpCollector
) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("traced")
    folder = base / "dags" / "workflows" / "traced"
    folder.mkdir(parents=True)
    (folder / "v1.yaml").write_text(TRACED)
    (folder / "v1.py").write_text(SHIM)
    stack = AirflowStack(
        dags_folder=base / "dags",
        home=base / "home",
        extra_env={
            "AIRFLOW_CONN_LEDGERFLOW_DB": ledger_db,
            "AIRFLOW__TRACES__OTEL_ON": "True",
            "OTEL_TRACES_EXPORTER": "otlp_proto_http",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.url,
        },
        parallelism=2,
    )
    with stack:
        stack.wait_for_dags([DAG_ID], timeout=180)
        yield stack


def spans_of(collector: OtlpCollector, name: str, timeout: float = 90.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = collector.named(name)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_each_step_attempt_is_a_child_of_airflows_task_span(
    traced_stack: AirflowStack, collector: OtlpCollector
) -> None:
    """Each step's attempt arrives at the collector as a span ``ledgerflow.step <step>``
    carrying the ledger run id and the workflow, whose parent is Airflow's own
    ``worker.<task>`` span of that task (same trace), exported by Airflow's tracer setup."""
    traced_stack.unpause(DAG_ID)
    run = traced_stack.trigger(DAG_ID, {"ref": f"t-{secrets.token_hex(3)}"})
    assert traced_stack.wait_for_run(DAG_ID, run, timeout=300) == "success"
    for step in ("first", "second"):
        ours = [
            s
            for s in spans_of(collector, f"ledgerflow.step {step}")
            if s["attributes"].get("ledgerflow.run_id") == f"{DAG_ID}/{run}"
        ]
        assert len(ours) == 1, collector.spans
        (span,) = ours
        assert span["attributes"]["ledgerflow.workflow"] == "traced"
        assert span["attributes"]["ledgerflow.try_number"] == 1
        workers = [
            w
            for w in spans_of(collector, f"worker.{step}")
            if w["attributes"].get("airflow.dag_run.run_id") == run
        ]
        assert len(workers) == 1, [s["name"] for s in collector.spans]
        assert span["parent_span_id"] == workers[0]["span_id"]
        assert span["trace_id"] == workers[0]["trace_id"]


def test_the_collector_is_real(collector: OtlpCollector) -> None:
    """The collector decodes what OpenTelemetry's own OTLP/HTTP exporter sends (so the test
    above can fail on a span that is missing, not only on a collector that hears nothing)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector.url)))
    with provider.get_tracer("probe").start_as_current_span("probe.parent"):
        provider.get_tracer("probe").start_span("probe.child", attributes={"k": "v"}).end()
    provider.shutdown()
    (child,) = collector.named("probe.child")
    (parent,) = collector.named("probe.parent")
    assert child["parent_span_id"] == parent["span_id"] and child["attributes"] == {"k": "v"}
