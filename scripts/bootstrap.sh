#!/usr/bin/env bash
# Create .venv and install the pinned dependencies (requirements/lock.txt) + ledgerflow.
# Needs only python3 (3.10-3.13) with venv and pip. Re-running is cheap: nothing is
# reinstalled unless the lock file or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.ledgerflow-installed
WANT=$(cat requirements/lock.txt pyproject.toml | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
  echo "bootstrap: .venv is up to date" >&2
  exit 0
fi
if [[ ! -x $VENV/bin/python ]]; then
  echo "bootstrap: creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
echo "bootstrap: installing uv (pinned) and the locked dependencies..." >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==0.13.8"
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --quiet -r requirements/lock.txt
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --quiet --no-deps -e .
echo "$WANT" > "$STAMP"
echo "bootstrap: done ($("$VENV/bin/airflow" version 2>/dev/null | tail -1) )" >&2
