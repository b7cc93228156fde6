"""Kept for deployments that copy this file into Airflow's plugins folder.

The Ledgerflow plugin lives in the installed package (``ledgerflow.plugin``), and Airflow
loads it through the package's ``airflow.plugins`` entry point: installing the package and
restarting Airflow is enough. Airflow registers a plugin name once and records a second
``ledgerflow`` as an import error, so this file exposes the class only where no installed
distribution declares that entry point. Importing ``ledgerflow.plugin`` preloads the step
code either way (``ledgerflow.preload``).
"""

from __future__ import annotations

from ledgerflow.plugin import registered_by_entry_point

if not registered_by_entry_point():
    from ledgerflow.plugin import LedgerflowPlugin as LedgerflowPlugin
