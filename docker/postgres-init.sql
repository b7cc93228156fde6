-- Runs once, when the compose `postgres` service initialises an empty data volume
-- (/docker-entrypoint-initdb.d), as POSTGRES_USER (airflow) in POSTGRES_DB (airflow).
-- The Airflow metadata database `airflow` comes from POSTGRES_DB; this adds the Ledgerflow ledger,
-- a separate database with its own role, addressed by AIRFLOW_CONN_LEDGERFLOW_DB.
-- Demo credentials: they must match docker-compose.yml (tests/unit/test_compose.py checks it).
CREATE ROLE ledgerflow WITH LOGIN PASSWORD 'ledgerflow';
CREATE DATABASE ledgerflow OWNER ledgerflow;
