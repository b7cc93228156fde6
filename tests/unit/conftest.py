"""Unit-tier fixtures: a throw-away AIRFLOW_HOME, so no unit test reads or writes ~/airflow."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

if "airflow" not in sys.modules:
    # Airflow reads its home when it is first imported; point it at an empty folder so the
    # unit tier never depends on, or leaves files in, a developer's real Airflow home.
    _HOME = tempfile.mkdtemp(prefix="lf-unit-airflow-home-")
    os.environ["AIRFLOW_HOME"] = _HOME
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
