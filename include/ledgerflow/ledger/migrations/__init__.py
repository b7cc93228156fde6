"""The ledger's Alembic environment: ``env.py`` and the revisions in ``versions/``.

Two branches share the version table ``lf_alembic_version`` (never Airflow's
``alembic_version``, so the ledger may live in Airflow's own database):

* ``ledger``: the ``lf_*`` tables. Revision ids are numbers (``0001``, ``0003``...) that
  continue the versions of the ``lf_schema_version`` era, so a ledger created before
  Alembic is adopted at the revision of its version. ``0002`` was the demo tables.
* ``demo``: the tables of the example workflows (``demo_*``), applied only where the
  demo's tools are on (``LEDGERFLOW_DEMO_TOOLS=1``) or ``ledgerflow migrate --demo``.

A new revision: a file ``versions/NNNN_what.py`` with ``down_revision`` the previous head,
written out explicitly (``op.create_table``, ``op.add_column``...) with a ``downgrade``;
then raise ``schema.LATEST`` to NNNN (a unit test checks the two agree, and that the
upgraded database matches ``schema.metadata``). Nothing here is imported outside
``ledgerflow migrate`` and the first task that finds the ledger behind.
"""
