"""Ledgerflow's web app (approvals REST API and pages), mounted by the Airflow plugin."""

from ledgerflow.api._app import DecisionBody, create_app

__all__ = ["DecisionBody", "create_app"]
