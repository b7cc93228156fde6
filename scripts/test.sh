#!/usr/bin/env bash
# The whole suite: lint, format check, type check, unit, integration, end-to-end.
# Integration and end-to-end tests use PostgreSQL on 127.0.0.1:5432 (trust auth) for
# both Airflow's metadata and the ledger (override with LEDGERFLOW_TEST_PG).
# Extra arguments go to pytest (e.g. scripts/test.sh -k checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"
if [[ ! -x /usr/bin/chromium ]]; then
  # The browser test drives Debian's chromium through Playwright (which cannot download
  # its own browsers here); CI machines start without it.
  echo "== installing chromium (Debian package) for the browser test" >&2
  SUDO=$([[ $(id -u) -eq 0 ]] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

echo "== ruff (lint)" >&2
ruff check .
echo "== ruff (format)" >&2
ruff format --check .
echo "== mypy" >&2
mypy
echo "== pytest: unit, integration, e2e" >&2
mkdir -p test-output
# Two pytest-xdist workers (LEDGERFLOW_TEST_WORKERS, 0 = none), one test file each at a
# time: the end-to-end files share one Airflow stack per worker (its session fixture), and
# most of their time is spent waiting on Airflow, so two of them overlap well.
# --durations=10: the ten slowest tests at the end of the run.
WORKERS=${LEDGERFLOW_TEST_WORKERS:-2}
python -m pytest -p no:cacheprovider -n "$WORKERS" --dist loadfile --durations=10 \
  --junitxml=test-output/junit.xml "$@"
