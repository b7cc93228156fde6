# Ledgerflow on the official Apache Airflow image. Built by docker-compose.yml; standalone:
#   docker build -t ledgerflow-airflow .
#   docker build --build-arg AIRFLOW_EXECUTOR=CeleryExecutor -t ledgerflow-airflow:celery .
# The tag's Airflow version must equal the apache-airflow pin in requirements/lock.txt
# (tests/unit/test_compose.py checks it).
FROM apache/airflow:3.3.2-python3.11

# The official image's rule: install Python packages as the `airflow` user (pip --user), not root.
USER airflow

# Created by `airflow` (not by WORKDIR, which may create it root-owned): pip builds in place here.
RUN mkdir -p /opt/airflow/ledgerflow-src
WORKDIR /opt/airflow/ledgerflow-src

# Dependencies first (cached while only the code changes): exactly the runtime lock, which holds
# no test or development tool (those are in requirements/dev-lock.txt, never installed here).
COPY --chown=airflow:root requirements/lock.txt requirements/lock.txt
RUN pip install --no-cache-dir -r requirements/lock.txt

# The ledgerflow package (CLI `ledgerflow` included); its dependencies came from the lock above.
# README.md is the package's `readme` in pyproject.toml.
COPY --chown=airflow:root pyproject.toml README.md ./
COPY --chown=airflow:root include/ include/
RUN pip install --no-cache-dir --no-deps . \
    && ledgerflow --help > /dev/null

# CeleryExecutor (compose profile `celery`) needs apache-airflow-providers-celery: the lock pins
# it, so the install above brought it; the Celery image checks that the executor imports.
ARG AIRFLOW_EXECUTOR=LocalExecutor
RUN if [ "${AIRFLOW_EXECUTOR}" = "CeleryExecutor" ]; then \
        python -c "import airflow.providers.celery.executors.celery_executor"; \
    fi

WORKDIR /opt/airflow

# Workflows and plugins baked in (compose also bind-mounts ./dags over /opt/airflow/dags).
# `plugin[s]` is a pattern so that a checkout without the (empty, untracked) plugins/ folder builds.
COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugin[s] /opt/airflow/plugins/
# Mount point of compose's `airflow-auth` volume (a new named volume inherits this ownership).
RUN mkdir -p -m 0775 /opt/airflow/plugins /opt/airflow/auth
