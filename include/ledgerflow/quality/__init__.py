"""Data-quality checks: the expectation catalog and suite files (``catalog``, no heavy
imports) and the Great Expectations runner (``runner``, imports GX when it runs)."""
