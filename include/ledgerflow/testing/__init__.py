"""Test and benchmark helpers for Ledgerflow (real Airflow processes, no mocks)."""
