"""The approvals list pages instead of stopping at 200.

A workflow may park 500 approvals; the list was capped at the newest 200 (the REST API's
``total`` said 200, the pages showed 200 and nothing said more were waiting), and the
readable-DAG filter ran after the cap, so a caller could see fewer than exist for them.
Here a SQLite ledger holds 260 pending approvals across two DAGs; the app's own route
(``create_app``, over ASGI) is asked with Airflow's authentication replaced by a fixed
caller (the route's paging is what is tested; who may read what is
``test_approval_visibility``)."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest

from ledgerflow.api import create_app
from ledgerflow.api._auth import Caller, current_user
from ledgerflow.ledger import approvals
from ledgerflow.ledger.store import Ledger

SHOP, PAYROLL = 230, 30


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path_factory.mktemp('paging') / 'ledger.db'}")
    ledger.migrate()
    for n in range(SHOP + PAYROLL):
        workflow = "shop" if n % 9 else "payroll"
        if workflow == "payroll" and n // 9 >= PAYROLL:
            workflow = "shop"
        approvals.request(
            ledger,
            run_id=f"{workflow}__v1/manual__{n}",
            step_key="ok",
            dag_id=f"{workflow}__v1",
            task_id="ok",
            workflow=workflow,
            version=1,
            subject=f"request {n}",
            body="",
            payload={"n": n},
            approvers={"users": ["ann"] if n % 2 else ["bob"], "roles": []},
            deadline=datetime.now(timezone.utc) + timedelta(days=1),
            at_deadline="reject",
        )
    return ledger


def get(ledger: Ledger, caller: Caller, path: str, **params: Any) -> httpx.Response:
    app = create_app(ledger)
    app.dependency_overrides[current_user] = lambda: caller

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get(path, params=params)

    return asyncio.run(go())


def counts(ledger: Ledger) -> dict[str, int]:
    rows = approvals.listing(ledger, status=None, limit=None)
    return {w: sum(a.workflow == w for a in rows) for w in ("shop", "payroll")}


def test_the_rest_api_pages_through_every_approval_the_caller_may_read(ledger: Ledger) -> None:
    shop_only = Caller("ann", frozenset(), dags=frozenset({"shop__v1"}))
    shop = counts(ledger)["shop"]
    assert shop > 200
    seen: list[int] = []
    offset = 0
    while True:
        body = get(ledger, shop_only, "/api/approvals", limit=100, offset=offset).json()
        assert body["total"] == shop and (body["limit"], body["offset"]) == (100, offset)
        assert len(body["approvals"]) == min(100, shop - offset)
        seen += [a["id"] for a in body["approvals"]]
        assert {a["workflow"] for a in body["approvals"]} <= {"shop"}
        offset += 100
        if offset >= shop:
            break
    assert len(seen) == len(set(seen)) == shop
    assert seen == sorted(seen, reverse=True)  # newest first, no gap between pages


def test_paging_with_an_assignee_filter_counts_only_theirs(ledger: Ledger) -> None:
    everyone = Caller("ann", frozenset(), dags=None)
    mine = [
        a.id
        for a in approvals.listing(ledger, status="pending", limit=None)
        if a.may_decide("bob", set())
    ]
    first = get(ledger, everyone, "/api/approvals", assignee="bob", limit=50).json()
    rest = get(ledger, everyone, "/api/approvals", assignee="bob", limit=1000, offset=50).json()
    assert first["total"] == rest["total"] == len(mine)
    assert [a["id"] for a in first["approvals"] + rest["approvals"]] == mine


def test_limits_outside_the_range_are_422(ledger: Ledger) -> None:
    everyone = Caller("ann", frozenset(), dags=None)
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        assert get(ledger, everyone, "/api/approvals", **params).status_code == 422


def test_the_pages_link_to_the_next_and_previous_page_keeping_the_filter(ledger: Ledger) -> None:
    shop_only = Caller("ann", frozenset(), dags=frozenset({"shop__v1"}))
    shop = counts(ledger)["shop"]
    first = get(ledger, shop_only, "/approvals", workflow="shop").text
    assert f"Page 1 of 3 ({shop} in all)" in first
    assert 'rel="next" href="?workflow=shop&amp;page=2"' in first
    assert 'rel="prev"' not in first
    last = get(ledger, shop_only, "/approvals", workflow="shop", page=3).text
    assert len(re.findall(r'<a href="/approvals/\d+">', last)) == shop - 200
    assert 'rel="prev" href="?workflow=shop&amp;page=2"' in last and 'rel="next"' not in last
    # One page only: no pager at all.
    payroll_only = Caller("ann", frozenset(), dags=frozenset({"payroll__v1"}))
    assert 'class="pager"' not in get(ledger, payroll_only, "/approvals").text
