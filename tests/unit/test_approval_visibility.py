"""Approvals are shown only to users who may read their DAG.

Any logged-in user could list and read every approval's body and payload, across all
DAGs (the run pages filtered by readable DAGs; the approvals did not). The app's
helpers now take the caller, whose readable DAGs come from Airflow's auth manager
(``api._auth.current_user``); here two approvals of two DAGs sit in a SQLite ledger and
callers with different readable DAGs ask for them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fastapi import HTTPException

from ledgerflow.api._app import _approval, _decide, _listing, _workflows
from ledgerflow.api._auth import Caller
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger


def ask(ledger: Ledger, workflow: str) -> approvals.Approval:
    approval, _ = approvals.request(
        ledger,
        run_id=f"{workflow}__v1/manual__1",
        step_key="ok",
        dag_id=f"{workflow}__v1",
        task_id="ok",
        workflow=workflow,
        version=1,
        subject=f"{workflow} needs you",
        body="secret terms",
        payload={"limit": 5000},
        approvers={"users": ["ann"], "roles": []},
        deadline=datetime.now(timezone.utc) + timedelta(days=1),
        at_deadline="reject",
    )
    return approval


def test_listing_reading_and_deciding_follow_the_dags_a_caller_may_read(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.migrate()
    payroll, shop = ask(ledger, "payroll"), ask(ledger, "shop")
    shop_only = Caller("ann", frozenset(), dags=frozenset({"shop__v1"}))
    everyone = Caller("ann", frozenset(), dags=frozenset({"shop__v1", "payroll__v1"}))

    assert [a.id for a in _listing(ledger, "pending", None, None, shop_only)] == [shop.id]
    assert {a.id for a in _listing(ledger, "all", None, None, everyone)} == {shop.id, payroll.id}
    assert _workflows(ledger, shop_only) == ["shop"]
    assert _approval(ledger, shop.id, shop_only).id == shop.id
    # Not readable: the same answer as no such approval (nothing of it is revealed).
    for approval_id in (payroll.id, 999_999):
        with pytest.raises(HTTPException) as info:
            _approval(ledger, approval_id, shop_only)
        assert (info.value.status_code, info.value.detail) == (404, f"no approval {approval_id}")
    # An approver of it who may not read the DAG cannot decide it either.
    with pytest.raises(HTTPException) as info:
        _decide(ledger, payroll.id, shop_only, "approve", "", None)
    assert info.value.status_code == 404
    assert approvals.get(ledger, payroll.id).status == "pending"
