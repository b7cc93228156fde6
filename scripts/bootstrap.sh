#!/usr/bin/env bash
# Create .venv and install the pinned dependencies + ledgerflow: requirements/lock.txt (what
# Ledgerflow needs at run time, all the Docker image installs) and requirements/dev-lock.txt
# (the same versions plus the tests' and checks' tools). Needs only python3 (3.10-3.13) with
# venv and pip. Re-running is cheap: nothing is reinstalled unless a lock file,
# pyproject.toml or this script changed.
#
# Everything is installed with its bytecode compiled (uv does not compile by default, pip
# does), and ledgerflow's own sources (include/, an editable install) are compiled on every
# run: with PYTHONDONTWRITEBYTECODE set, as on our CI machines, Python would otherwise
# compile Airflow from source in every process it starts - each Airflow task process
# included (importing Airflow's task runner took ~5 s instead of ~2 s here).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.ledgerflow-installed
WANT=$(cat requirements/lock.txt requirements/dev-lock.txt pyproject.toml "$0" | sha256sum | cut -d' ' -f1)

compile_own_sources() {
  # Only what changed since the last run is compiled (a fraction of a second otherwise).
  "$VENV/bin/python" -m compileall -q -j 0 include >/dev/null
}

if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
  compile_own_sources
  echo "bootstrap: .venv is up to date" >&2
  exit 0
fi
if [[ ! -x $VENV/bin/python ]]; then
  echo "bootstrap: creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
echo "bootstrap: installing uv (pinned) and the locked dependencies..." >&2
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv==0.13.8"
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --quiet --compile-bytecode \
  -r requirements/lock.txt -r requirements/dev-lock.txt
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --quiet --no-deps -e .
# The example of a team's own tool package (README, "Your own tools"): its entry point puts
# acme.* on the allow-list; examples/acme_tools/workflows/ship_order uses them.
"$VENV/bin/uv" pip install --python "$VENV/bin/python" --quiet --no-deps -e examples/acme_tools
compile_own_sources
echo "$WANT" > "$STAMP"
echo "bootstrap: done ($("$VENV/bin/airflow" version 2>/dev/null | tail -1) )" >&2
