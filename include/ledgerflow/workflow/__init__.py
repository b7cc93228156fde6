"""A workflow file checked against what is installed, and the specs built from them.

``ledgerflow.spec`` is the format alone (models, YAML with line numbers, templates,
params) and imports nothing else of the package; ``validate`` adds what needs the
installed tools, LLM output models and quality suites; ``loaded`` keeps the specs this
process built, by DAG id. Kept apart so that the ledger, the tools and the LLM and
quality steps can use the format without importing the checks that use them.
"""
