#!/usr/bin/env bash
# Run the demo on the embedded default: Airflow standalone (SQLite metadata, LocalExecutor)
# with the ledger in a SQLite file, all under .airflow/ (gitignored). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"

export AIRFLOW_HOME="$PWD/.airflow"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags"
export AIRFLOW__CORE__PLUGINS_FOLDER="$PWD/plugins"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
# The demo's workflows use the demo's tools (demo.*): on the allow-list for the demo only
export LEDGERFLOW_DEMO_TOOLS=1
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__CORE__PARALLELISM=${AIRFLOW__CORE__PARALLELISM:-4}
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin"
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE="$AIRFLOW_HOME/passwords.json"
# Latency (docs/latency.md: what each setting buys and what it costs). An idle scheduler
# loop sleeps 50 ms (default 1 s): the next task of a run is queued within 50 ms.
export AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME=0.05
# Recovery: a task whose worker died is retried after 60 s, orphaned tasks are reset
# within 15 s (defaults: 5 min each).
export AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=60
export AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL=15
# New workflow files show up within 10 s (default 5 min).
export AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL=10
# The model of the LLM steps (ticket_triage): the offline, deterministic rule-based model.
# Point the same workflow at a real model by changing only this connection, e.g.
#   {"conn_type": "pydanticai", "password": "sk-...", "extra": {"model": "openai:gpt-4o-mini"}}
#   {"conn_type": "pydanticai", "host": "http://localhost:11434/v1", "extra": {"model": "ollama:llama3.2"}}
export AIRFLOW_CONN_LEDGERFLOW_LLM=${AIRFLOW_CONN_LEDGERFLOW_LLM:-'{"conn_type": "pydanticai", "extra": {"model": "ledgerflow:rules"}}'}
PORT=${LEDGERFLOW_DEMO_PORT:-8080}
export AIRFLOW__API__PORT=$PORT
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="http://localhost:$PORT/execution/"
mkdir -p "$AIRFLOW_HOME"
[[ -f $AIRFLOW_HOME/passwords.json ]] || echo '{"admin": "admin"}' > "$AIRFLOW_HOME/passwords.json"

echo "demo: checking the workflow files..." >&2
ledgerflow validate dags/workflows
echo "demo: preparing the ledger (SQLite: $AIRFLOW_HOME/ledgerflow.db)..." >&2
ledgerflow migrate --demo   # the ledger and the example workflows' tables (demo_*)

cat >&2 <<MSG

  Starting Airflow (standalone: api-server, scheduler, dag-processor, triggerer).
  When it is up (about 30-60 s):

    UI:     http://localhost:$PORT
    Login:  admin / admin

  DAGs: checkout__v1 (Trigger -> order_id, optional demo switches), nightly_report__v1.
        ticket_triage__v1 (Trigger -> ticket_id, ticket: an LLM step with a fallback branch).
  Ledger: .venv/bin/ledgerflow runs   |   .venv/bin/ledgerflow show <run id>
          (run these with AIRFLOW_HOME=$AIRFLOW_HOME)
  Logs of the components: $AIRFLOW_HOME/logs

MSG
exec airflow standalone
