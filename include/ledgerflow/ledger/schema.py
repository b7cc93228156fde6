"""Tables of the ledger (SQLAlchemy Core); their migrations are Alembic revisions in
``ledger/migrations``.

JSON values are stored as text so the same schema runs on SQLite and Postgres and users
can read it with any client. Every table is prefixed ``lf_``.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

_ID = BigInteger().with_variant(Integer, "sqlite")

runs = Table(
    "lf_runs",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("dag_id", String(250), nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("params", Text, nullable=False, server_default="{}"),
    Column("trigger_kind", String(40), nullable=False, server_default="manual"),
    Column("retry_of", String(250)),
    Column("status", String(40), nullable=False, server_default="running"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # The saga: none, compensating, compensated or compensation_failed (migration 3).
    Column("saga", String(40)),
    Column("failed_step", String(250)),
    # A retry run: the step it re-runs from (None: resume where the retry chain stopped), and
    # the SHA-256 of the workflow file the run started on (migration 8).
    Column("retry_from", String(100)),
    Column("spec_hash", String(64)),
    # A cancelled run: who, when, why, and whether its saga was asked for (migration 12).
    Column("cancelled_by", String(250)),
    Column("cancelled_at", DateTime(timezone=True)),
    Column("cancel_reason", Text),
    Column("cancel_compensate", Boolean),
    Index("lf_runs_workflow", "workflow", "version"),
    Index("lf_runs_retry_of", "retry_of"),
)

# One row per step (or per item of a for_each step): the checkpoint.
steps = Table(
    "lf_steps",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("step_key", String(250), primary_key=True),
    Column("step_id", String(100), nullable=False),
    Column("map_index", Integer, nullable=False, server_default="-1"),
    Column("status", String(40), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("idempotency_key", String(500)),
    Column("args", Text),
    Column("output", Text),
    Column("error", Text),
    Column("started_at", DateTime(timezone=True)),
    Column("completed_at", DateTime(timezone=True)),
    # The outputs a step reads, by step id (``Ledger.run_and_steps``).
    Index("lf_steps_step_id", "run_id", "step_id"),
)

attempts = Table(
    "lf_attempts",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("try_number", Integer, nullable=False),
    Column("status", String(40), nullable=False),
    Column("error_type", String(250)),
    Column("error", Text),
    Column("pid", Integer),
    Column("hostname", String(250)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("ended_at", DateTime(timezone=True)),
    Index("lf_attempts_step", "run_id", "step_key"),
)

# The world-changing calls. The unique key is what makes a retry harmless.
effects = Table(
    "lf_effects",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(500), nullable=False),
    Column("tool", String(200), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("status", String(40), nullable=False),
    Column("result", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("completed_at", DateTime(timezone=True)),
    UniqueConstraint("idempotency_key", name="lf_effects_key"),
)

dead_letters = Table(
    "lf_dead_letters",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("error_type", String(250), nullable=False),
    Column("error", Text, nullable=False),
    Column("args", Text),
    Column("idempotency_key", String(500)),
    Column("status", String(40), nullable=False, server_default="open"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("run_id", "step_key", name="lf_dead_letters_step"),
    Index("lf_dead_letters_open", "step_key", "status"),
)

# Append-only: rows are inserted, never updated; only a prune of old finished runs
# (`ledgerflow prune`, `ledger.retention`) deletes them.
events = Table(
    "lf_events",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250)),
    Column("kind", String(60), nullable=False),
    Column("data", Text),
    Column("at", DateTime(timezone=True), nullable=False),
    Index("lf_events_run", "run_id", "id"),
)

# One row per forward step of a failed run: what the saga did about it.
compensations = Table(
    "lf_compensations",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("step_key", String(250), primary_key=True),
    Column("tool", String(200)),
    Column("status", String(40), nullable=False),
    Column("detail", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Circuit breakers, shared by every worker.
breakers = Table(
    "lf_breakers",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("state", String(20), nullable=False),
    Column("failures", Integer, nullable=False),
    Column("open_until", DateTime(timezone=True)),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# One row per approval step of a run: the request, what the approver saw, the decision.
approvals = Table(
    "lf_approvals",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("dag_id", String(250), nullable=False),
    Column("task_id", String(250), nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("payload_hash", String(64), nullable=False),
    # The approvers and deadline of the current escalation level; the rest of the chain.
    Column("approvers", Text, nullable=False),
    Column("level", Integer, nullable=False, server_default="0"),
    Column("deadline", DateTime(timezone=True), nullable=False),
    Column("at_deadline", Text, nullable=False),
    # Task ids to follow after each decision ({"approved": [...], "rejected": [...] | null}):
    # lets the decision end the Airflow task directly, without a worker.
    Column("follow", Text),
    # pending -> approved | rejected | expired (the deadline's outcome, by "deadline")
    Column("status", String(20), nullable=False),
    Column("decided_by", String(250)),
    Column("decided_at", DateTime(timezone=True)),
    Column("comment", Text),
    Column("seen_hash", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # How many approvals end it approved (M of the approvers; 1 before quorums existed).
    Column("required", Integer, nullable=False, server_default="1"),
    UniqueConstraint("run_id", "step_key", name="lf_approvals_step"),
    Index("lf_approvals_status", "status", "workflow"),
)

# One row per person's decision on an approval (a person decides once: unique), with
# what that person was shown (``seen``: subject, body and payload; ``seen_hash``: the
# payload's hash). The approval's own status changes when the quorum is met or on a
# reject; the decisions before it stay here.
approval_decisions = Table(
    "lf_approval_decisions",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("approval_id", _ID, nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("level", Integer, nullable=False),
    Column("decided_by", String(250), nullable=False),
    Column("decision", String(20), nullable=False),
    Column("comment", Text),
    Column("source", String(40), nullable=False),
    Column("seen_hash", String(64), nullable=False),
    Column("seen", Text, nullable=False),
    Column("decided_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("approval_id", "decided_by", name="lf_approval_decisions_once"),
)

# One row per LLM call, keyed by the step's idempotency key: the prompt, the model, every
# raw response (repairs included), the validated output or the validation errors, tokens,
# latency and the path the step took. A retry finds the row and makes no second call.
llm_calls = Table(
    "lf_llm_calls",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(500), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("model", String(250)),
    Column("system_prompt", Text),
    Column("prompt", Text, nullable=False),
    Column("responses", Text, nullable=False),
    # valid | invalid (still not fitting the schema after the repairs)
    Column("status", String(20), nullable=False),
    Column("output", Text),
    Column("errors", Text),
    Column("requests", Integer, nullable=False, server_default="0"),
    Column("input_tokens", Integer, nullable=False, server_default="0"),
    Column("output_tokens", Integer, nullable=False, server_default="0"),
    Column("latency_ms", Integer, nullable=False, server_default="0"),
    # main | fallback, and why (validation errors or the failed check)
    Column("path", String(20), nullable=False),
    Column("reason", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("idempotency_key", name="lf_llm_calls_key"),
    Index("lf_llm_calls_run", "run_id", "step_key"),
)

# One row per validation a quality step ran (a retried task adds a row): the outcome,
# GX's statistics, and each failed expectation with a sample of the unexpected values.
quality_results = Table(
    "lf_quality_results",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("try_number", Integer, nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("dataset", Text, nullable=False),
    Column("success", Boolean, nullable=False),
    # passed | failed (on_failure: fail) | warned | branched
    Column("outcome", String(20), nullable=False),
    Column("row_count", BigInteger),
    Column("evaluated", Integer, nullable=False),
    Column("failed_count", Integer, nullable=False),
    Column("statistics", Text, nullable=False),
    Column("failed", Text, nullable=False),
    Column("results", Text, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("lf_quality_results_step", "run_id", "step_key"),
)

# Authorization failures of the plugin's routes (401, 403), counted per minute: the
# api-server adds up its own and writes a row now and then (migration 10).
auth_failures = Table(
    "lf_auth_failures",
    metadata,
    Column("minute", DateTime(timezone=True), primary_key=True),
    Column("status", Integer, primary_key=True),
    Column("count", Integer, nullable=False),
)

# Each SLO objective's alert state, so that a breach notifies once, not once per check
# (migration 10): ok, burning (half the error budget spent) or breached.
slo_alerts = Table(
    "lf_slo_alerts",
    metadata,
    Column("workflow", String(100), primary_key=True),
    Column("objective", String(60), primary_key=True),
    Column("state", String(20), nullable=False),
    Column("since", DateTime(timezone=True), nullable=False),
    Column("detail", Text),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# Notifications (migration 14): each run's notify targets, written when the run is
# registered, so that whoever records an event (a worker, the triggerer, the api-server)
# knows whom to tell without the workflow file; and the outbox, one row per (event,
# target), written in the event's transaction and sent after it commits (lifecycle
# NOTIFICATION: pending -> sending -> sent | failed -> ... -> gave_up).
notify_routes = Table(
    "lf_notify_routes",
    metadata,
    Column("run_id", String(250), primary_key=True),
    Column("routes", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
notifications = Table(
    "lf_notifications",
    metadata,
    Column("id", String(400), primary_key=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250)),
    Column("event", String(40), nullable=False),
    Column("target", String(300), nullable=False),
    Column("spec", Text, nullable=False),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("link", Text, nullable=False),
    Column("status", String(20), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("next_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True)),
)
Index("lf_notifications_due", notifications.c.status, notifications.c.next_at)
Index("lf_notifications_run", notifications.c.run_id)
# Rate limits (migration 16): each limited tool or step's token bucket, as the time its
# next call may start ("theoretical arrival time", epoch seconds); ``ledger.rates``.
rate_buckets = Table(
    "lf_rate_buckets",
    metadata,
    Column("name", String(300), primary_key=True),
    Column("tat", Float, nullable=False),
)

# Indexes for the indicators, the dashboard, the export and the prune (migration 10).
Index("lf_runs_created", runs.c.created_at)
Index("lf_runs_ended", runs.c.status, runs.c.updated_at)
Index("lf_events_at", events.c.at)
Index("lf_effects_created", effects.c.created_at)
Index("lf_dead_letters_created", dead_letters.c.created_at)
Index("lf_llm_calls_created", llm_calls.c.created_at)

# Event steps (``kind: event``): one wait per (run, step), and every delivery once per
# event id. A delivery that came before its wait is kept until ``expires_at`` and taken
# by exactly one wait (``consumed_by_*``); the lifecycles are in ``lifecycle.py``.
event_waits = Table(
    "lf_event_waits",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),
    Column("step_key", String(250), nullable=False),
    Column("dag_id", String(250), nullable=False),
    Column("task_id", String(250), nullable=False),
    Column("workflow", String(100), nullable=False),
    Column("name", String(128), nullable=False),
    Column("key", String(500), nullable=False),
    Column("payload_schema", Text),
    Column("deadline", DateTime(timezone=True), nullable=False),
    # "fail" | "continue" | {"branch": step}; "default": the output of "continue".
    Column("on_deadline", Text, nullable=False),
    Column("default_payload", Text),
    # Task ids to follow ({"received": [...], "expired": [...] | null}), as approvals keep.
    Column("follow", Text),
    # waiting -> received | expired | withdrawn
    Column("status", String(20), nullable=False),
    Column("delivery_id", BigInteger().with_variant(Integer, "sqlite")),
    Column("payload", Text),
    Column("resolved_by", String(40)),
    Column("resolved_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("run_id", "step_key", name="lf_event_waits_step"),
    Index("lf_event_waits_match", "name", "key", "status"),
    Index("lf_event_waits_run", "run_id", "status"),
)

event_deliveries = Table(
    "lf_event_deliveries",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("key", String(500), nullable=False),
    Column("event_id", String(250), nullable=False),
    Column("payload", Text, nullable=False),
    Column("source", String(40), nullable=False),  # api | webhook
    Column("received_by", String(250)),
    Column("received_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # kept -> consumed | expired | rejected; consumed at once when waits were parked
    Column("status", String(20), nullable=False),
    Column("consumed_by_run", String(250)),
    Column("consumed_by_step", String(250)),
    Column("consumed_at", DateTime(timezone=True)),
    Column("detail", Text),  # why it was rejected
    # A kept delivery's sender's reach: the DAGs (JSON list) whose runs it may wake; NULL
    # for any (the signed webhook, an in-process delivery).
    Column("allowed_dags", Text),
    UniqueConstraint("event_id", name="lf_event_deliveries_event_id"),
    Index("lf_event_deliveries_match", "name", "key", "status"),
)

# The schema's version lives in Alembic's table, named for us so that it never meets
# Airflow's own ``alembic_version`` when the ledger shares Airflow's database. The
# revisions are in ``ledger/migrations/versions``, written out; these constants let a task
# check the ledger's version with one query and without importing Alembic.
VERSION_TABLE = "lf_alembic_version"
# The newest revision of the ``ledger`` branch ("0016"), as a number.
LATEST = 17
# The only revision of the ``demo`` branch: the example workflows' tables (``demo_*``).
DEMO_HEAD = "demo01"
# Before Alembic: one row per applied migration 1..8 (2 was the demo tables).
LEGACY_VERSION_TABLE = "lf_schema_version"
