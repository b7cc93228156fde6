"""Tests do not leak secrets into one another through Airflow's process-wide maskers.

The two tests run in this order in one process (pytest keeps a file's order, and
``--dist loadfile`` keeps a file on one worker): the first registers a secret, the second
stores text that holds it. Before the suite put the maskers back after each test, a
header token registered by an HTTP test ("Bearer nested") masked the run id
``notified__v1/nested`` in a later notification test, which then waited for a notice
that said ``notified__v1/***``.
"""

from __future__ import annotations

from ledgerflow.secrets import scrub

CANARY = "masker-isolation-canary"


def test_a_test_may_register_a_secret() -> None:
    """Registered, it is masked in what this test stores."""
    from airflow.sdk.log import mask_secret

    mask_secret(CANARY)
    assert scrub(f"run {CANARY}") == "run ***"


def test_a_later_test_does_not_inherit_it() -> None:
    """The next test's text keeps the word: the earlier test's secret was taken back."""
    assert scrub(f"run {CANARY}") == f"run {CANARY}"
