"""Airflow DAG of the Ledgerflow workflow file beside this one (written by `ledgerflow sync`)."""

from ledgerflow import dag_for_spec_file

dag = dag_for_spec_file(__file__)
