"""The operators of every step kind share one base, and branch points can skip."""

from __future__ import annotations

import pytest
from airflow.sdk.bases.skipmixin import SkipMixin

from ledgerflow.steps.approval import ApprovalOperator
from ledgerflow.steps.llm import LlmOperator
from ledgerflow.steps.operator import LedgerflowOperator, StepOperator
from ledgerflow.steps.quality import QualityOperator
from ledgerflow.steps.saga import CompensationOperator


def test_every_step_kind_has_the_one_operator_base() -> None:
    """Tool, LLM, quality, approval and compensation steps run through LedgerflowOperator (the kernel's
    Airflow side), so the lifecycle around each kind's own work is written once."""
    for kind in (
        StepOperator,
        LlmOperator,
        QualityOperator,
        ApprovalOperator,
        CompensationOperator,
    ):
        assert issubclass(kind, LedgerflowOperator), kind


def test_branch_points_are_skip_mixins() -> None:
    """A branch point must be able to skip the branch not taken (skip_all_except) and be
    marked as one in the serialized DAG (inherits_from_skipmixin); a plain tool step is
    not a branch point."""
    for kind in (LlmOperator, QualityOperator, ApprovalOperator):
        assert issubclass(kind, SkipMixin) and kind.inherits_from_skipmixin is True, kind
    assert not issubclass(StepOperator, SkipMixin)


def test_a_parked_approval_logs_a_full_link_to_its_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """The log line of a parked approval carries a clickable link: Airflow's
    ``[api] base_url`` (as Airflow's own links use it) + the approval's page."""
    from ledgerflow.steps.approval import approval_page

    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    assert approval_page(42) == "https://airflow.example.com/ledgerflow/approvals/42"
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "")
    assert approval_page(42) == "/ledgerflow/approvals/42"
