"""Metrics and traces of Ledgerflow, through Airflow's own pipeline.

Metrics go through the Task SDK's ``Stats`` (``airflow.sdk.observability.stats``): StatsD,
Datadog or OpenTelemetry, whichever ``[metrics]`` configures, with Airflow's prefix
(``airflow.`` by default), allow/block lists and name validation. Every metric is sent
twice, as Airflow does with its legacy names: ``ledgerflow.<name>`` with tags (workflow,
...) for backends that keep tags, and ``ledgerflow.<name>.<workflow>`` for plain StatsD,
which drops tags.

Counters: ``runs.started``, ``runs.succeeded``, ``runs.failed``, ``runs.cancelled``, ``runs.compensated``,
``runs.compensation_failed``, ``step.attempts``, ``step.retries`` (attempts after the
first), ``dead_letters``, ``llm.fallbacks``; ``breaker.opened`` (suffixed by the breaker's
name), ``auth.failures`` (suffixed by 401 or 403), ``slo.burning`` and ``slo.breached``
(an objective's alert, once per breach). Timer: ``approval.wait`` (request to decision,
milliseconds). Gauges: ``slo.<indicator>`` (``ledgerflow.slo``, from the maintenance DAG),
``orphaned_runs`` (from the doctor's maintenance DAG).

Traces: one span per step attempt (``ledgerflow.step <step>``, attributes
``ledgerflow.run_id``, ``ledgerflow.workflow``, ``ledgerflow.step``,
``ledgerflow.try_number``), a child of Airflow's ``worker.<task>`` span when Airflow's
``[traces] otel_on`` is set; without a configured tracer provider the spans are no-ops.

Nothing here may fail the caller: a metrics backend that cannot be reached is logged once
and ignored. Imports are lazy (DAG files import the ledger at parse time).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import Any

PREFIX = "ledgerflow"
RUN_OUTCOMES = {
    "succeeded": "runs.succeeded",
    "failed": "runs.failed",
    "cancelled": "runs.cancelled",
    "compensated": "runs.compensated",
    "compensation_failed": "runs.compensation_failed",
}

log = logging.getLogger(__name__)
_lock = threading.Lock()
_spans: dict[int, Any] = {}  # attempt id -> its open span (this process's attempts)
_warned = False


def workflow_of(run_id: str) -> str:
    """``checkout__v1/manual__...`` -> ``checkout`` (the DAG id is ``<workflow>__v<N>``)."""
    dag_id = run_id.split("/", 1)[0]
    name, sep, version = dag_id.rpartition("__v")
    return name if sep and version.isdigit() else dag_id


def _stats() -> Any:
    """The Task SDK's Stats module, initialized from Airflow's config in processes that did
    not do it (the dag-processor runs DAG callbacks with core's copy initialized, a CLI
    with none)."""
    from airflow.sdk._shared.observability.metrics import stats

    with _lock:
        if getattr(stats, "_factory", None) is None:
            from airflow.sdk.configuration import conf
            from airflow.sdk.observability.metrics import stats_utils

            stats.initialize(
                factory=stats_utils.get_stats_factory(),
                export_legacy_names=conf.getboolean("metrics", "legacy_names_on", fallback=True),
            )
    return stats


def _name(*parts: str) -> str:
    from airflow.sdk.observability.stats import normalize_name_for_stats

    return normalize_name_for_stats(".".join((PREFIX, *parts)), log_warning=False)


def _emit(kind: str, metric: str, suffix: str, tags: dict[str, Any], value: Any = 1) -> None:
    global _warned
    try:
        stats = _stats()
        clean = {k: str(v) for k, v in tags.items() if v is not None}
        for name, with_tags in ((_name(metric), clean), (_name(metric, suffix), None)):
            if kind == "incr":
                stats.incr(name, count=value, tags=with_tags)
            elif kind == "gauge":
                stats.gauge(name, value, tags=with_tags)
            else:
                stats.timing(name, value, tags=with_tags)
    except Exception:  # metrics must never fail a step
        if not _warned:
            _warned = True
            log.warning("ledgerflow metrics are not sent", exc_info=True)


def count(metric: str, workflow: str, n: int = 1, **tags: Any) -> None:
    _emit("incr", metric, workflow, {"workflow": workflow, **tags}, n)


# -- the facts (called by the ledger where it records them) -----------------------------


def run_started(workflow: str, version: int, trigger_kind: str) -> None:
    count("runs.started", workflow, version=version, trigger=trigger_kind)


def run_finished(run_id: str, outcome: str | None) -> None:
    """``succeeded`` / ``failed`` / ``cancelled`` (the DAG run), ``compensated`` / ``compensation_failed``
    (the saga)."""
    metric = RUN_OUTCOMES.get(outcome or "")
    if metric is not None:
        count(metric, workflow_of(run_id))


def dead_lettered(workflow: str, step_key: str) -> None:
    count("dead_letters", workflow, step=step_key)


def approval_waited(workflow: str, waited: timedelta, decision: str) -> None:
    _emit("timing", "approval.wait", workflow, {"workflow": workflow, "decision": decision}, waited)


def llm_fallback(run_id: str, step_key: str) -> None:
    count("llm.fallbacks", workflow_of(run_id), step=step_key)


def breaker_opened(name: str) -> None:
    _emit("incr", "breaker.opened", name, {"breaker": name})


def auth_failure(status: int) -> None:
    """The plugin answered 401 (no login) or 403 (not allowed)."""
    _emit("incr", "auth.failures", str(status), {"status": status})


def indicator(name: str, workflow: str, value: float) -> None:
    """An SLO indicator's current value (``ledgerflow.slo.<name>``, a gauge)."""
    _emit("gauge", f"slo.{name}", workflow, {"workflow": workflow}, value)


def orphaned_runs(value: int) -> None:
    """Runs the ledger and Airflow disagree about (``ledgerflow doctor``), a gauge:
    ``ledgerflow.orphaned_runs`` (``.all`` for plain StatsD)."""
    _emit("gauge", "orphaned_runs", "all", {}, value)


def slo_alert(workflow: str, objective: str, state: str) -> None:
    """An objective entered ``burning`` or ``breached`` (once per breach)."""
    _emit("incr", f"slo.{state}", workflow, {"workflow": workflow, "objective": objective})


def attempt_started(run_id: str, step_key: str, try_number: int, attempt_id: int) -> None:
    """A step attempt was recorded: count it (and a retry), and open its span."""
    workflow = workflow_of(run_id)
    count("step.attempts", workflow, step=step_key)
    if try_number > 1:
        count("step.retries", workflow, step=step_key)
    try:
        from opentelemetry import trace

        span = trace.get_tracer("ledgerflow").start_span(
            f"ledgerflow.step {step_key}",
            attributes={
                "ledgerflow.run_id": run_id,
                "ledgerflow.workflow": workflow,
                "ledgerflow.step": step_key,
                "ledgerflow.try_number": try_number,
                "ledgerflow.attempt_id": attempt_id,
            },
        )
    except Exception:
        return
    with _lock:
        _spans[attempt_id] = span


def attempt_ended(attempt_id: int, error: BaseException | None = None) -> None:
    """Close the attempt's span (completed, or failed with ``error``)."""
    with _lock:
        span = _spans.pop(attempt_id, None)
    if span is None:
        return
    try:
        if error is not None:
            import traceback

            from opentelemetry.trace import Status, StatusCode

            from ledgerflow.secrets import scrub

            # The message and the traceback without registered secrets.
            trace = "".join(traceback.format_exception(error))
            span.record_exception(
                error,
                attributes={
                    "exception.message": scrub(str(error)),
                    "exception.stacktrace": scrub(trace),
                },
            )
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}"))
        span.end()
    except Exception:
        pass
