"""The ticket triage workflow on real Airflow processes, its model a loopback OpenAI server.

The stack's ``ledgerflow_llm`` connection points at the session's ``llm_peer``; each test
scripts the answers for its own ticket id (the prompt names it) and counts the requests
that reached the server.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ledgerflow.ledger import llm as calls
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing import wait_for
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.openai_peer import OpenAIPeer

pytestmark = pytest.mark.e2e

DAG = "ticket_triage__v1"
GOOD = json.dumps(
    {"category": "technical", "priority": "urgent", "summary": "Site down.", "confidence": 0.92}
)
UNSURE = json.dumps(
    {"category": "account", "priority": "low", "summary": "Unclear.", "confidence": 0.4}
)


def states(stack: AirflowStack, run_id: str) -> dict[str, str]:
    return {ti["task_id"]: ti["state"] for ti in stack.task_instances(DAG, run_id)}


def tries(stack: AirflowStack, run_id: str) -> dict[str, int]:
    return {ti["task_id"]: ti["try_number"] for ti in stack.task_instances(DAG, run_id)}


def trigger(stack: AirflowStack, ticket_id: str) -> str:
    return stack.trigger(
        DAG, {"ticket_id": ticket_id, "ticket": "The checkout page fails with an error."}
    )


def outputs(ledger: Ledger, run_id: str) -> dict[str, Any]:
    return {k: v["output"] for k, v in ledger.outputs(f"{DAG}/{run_id}").items()}


def test_triage_takes_each_path_and_the_grid_shows_the_skipped_branch(
    stack: AirflowStack, ledger: Ledger, llm_peer: OpenAIPeer
) -> None:
    """Valid answer: route runs, the rules classifier is skipped. Malformed twice, or a
    confident-less answer: the rules classifier runs, route is skipped. The join runs
    on every path, and every answer was asked for exactly as often as the repairs say."""
    llm_peer.script("E2E-valid", GOOD)
    llm_peer.script("E2E-malformed", "{oops", "still not json")
    llm_peer.script("E2E-unsure", UNSURE)
    runs = {name: trigger(stack, f"E2E-{name}") for name in ("valid", "malformed", "unsure")}
    for run_id in runs.values():
        assert stack.wait_for_run(DAG, run_id, timeout=240) == "success"

    main_path = {"classify": "success", "route": "success", "classify_rules": "skipped"}
    fallback = {"classify": "success", "route": "skipped", "classify_rules": "success"}
    assert states(stack, runs["valid"]) == {**main_path, "close": "success"}
    assert states(stack, runs["malformed"]) == {**fallback, "close": "success"}
    assert states(stack, runs["unsure"]) == {**fallback, "close": "success"}
    assert (
        llm_peer.calls("E2E-valid"),
        llm_peer.calls("E2E-malformed"),
        llm_peer.calls("E2E-unsure"),
    ) == (1, 2, 1)

    valid = outputs(ledger, runs["valid"])
    assert valid["classify"] == json.loads(GOOD)
    assert valid["route"]["queue"] == "technical-urgent"
    assert valid["close"] == {"value": "technical-urgent"}

    malformed = outputs(ledger, runs["malformed"])
    assert malformed["classify"]["fallback"] is True
    assert len(malformed["classify"]["errors"]) == 2
    assert malformed["classify_rules"]["by"] == "rules"
    assert "repair attempt" in malformed["classify_rules"]["llm_reason"]
    (row,) = calls.calls(ledger, f"{DAG}/{runs['malformed']}")
    assert row.status == "invalid" and row.path == "fallback"
    assert row.responses == ["{oops", "still not json"]

    unsure = outputs(ledger, runs["unsure"])
    assert unsure["classify_rules"]["llm_reason"] == "check failed: confidence below 0.7"
    assert unsure["close"]["value"] == unsure["classify_rules"]["queue"]


def test_cleared_llm_task_runs_again_without_a_second_request(
    stack: AirflowStack, ledger: Ledger, llm_peer: OpenAIPeer
) -> None:
    """Clearing the finished LLM task (and what follows) makes Airflow run it again as a
    new try: it takes the same path from the ledger and the server sees no new request."""
    llm_peer.script("E2E-clear", GOOD)
    run_id = trigger(stack, "E2E-clear")
    assert stack.wait_for_run(DAG, run_id, timeout=240) == "success"
    assert llm_peer.calls("E2E-clear") == 1
    stack.api(
        "POST",
        f"/api/v2/dags/{DAG}/clearTaskInstances",
        json={
            "dag_run_id": run_id,
            "task_ids": ["classify"],
            "include_downstream": True,
            "only_failed": False,
            "dry_run": False,
        },
    )
    wait_for(lambda: tries(stack, run_id)["classify"] >= 2, timeout=60, what="classify re-queued")
    assert stack.wait_for_run(DAG, run_id, timeout=240) == "success"
    assert tries(stack, run_id)["classify"] == 2
    assert states(stack, run_id) == {
        "classify": "success",
        "route": "success",
        "classify_rules": "skipped",
        "close": "success",
    }
    assert llm_peer.calls("E2E-clear") == 1
