"""Triggers: params checked field by field, keyed run ids, webhook signatures, asset schedules.

Pure helpers and the DAG factory (no Airflow processes); the endpoints themselves are
tested end to end in tests/e2e/test_triggers_e2e.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.errors import NonRetryableError, SpecError
from ledgerflow.factory import build_dag
from ledgerflow.launch import KEY_PATTERN, Launched, keyed_run_id
from ledgerflow.spec.models import ParamSpec, RetryPolicySpec, WorkflowSpec
from ledgerflow.spec.params import (
    InvalidParams,
    check_params,
    param_problems,
    resolved_params,
)
from ledgerflow.steps.retry import is_non_retryable
from ledgerflow.webhooks import sign, verify
from ledgerflow.workflow.validate import load_workflow

SPECS = {
    "order_id": ParamSpec(type="string", required=True),
    "amount": ParamSpec(type="number", default=1.5),
    "qty": ParamSpec(type="integer", default=1),
    "plan": ParamSpec(type="string", enum=("free", "pro"), default="free"),
    "express": ParamSpec(type="boolean"),
}


def fields(given: dict[str, Any], **kw: Any) -> dict[str, str]:
    return {p.field: p.message for p in param_problems(SPECS, given, **kw)}


def test_fitting_params_have_no_problems() -> None:
    """Declared params of the declared types (numbers for number, null for an optional
    param, an enum member) fit; only the required param is needed."""
    assert fields({"order_id": "o-1"}) == {}
    assert fields({"order_id": "o", "amount": 3, "qty": 2, "plan": "pro", "express": None}) == {}


def test_each_bad_field_is_named_with_what_is_wrong() -> None:
    """Every problem names its field: an undeclared key (listing the declared ones), a
    wrong type (expected vs got, a bool is not an integer), a value outside the enum, a
    required param missing or null."""
    problems = fields({"ammount": 3, "qty": True, "plan": "gold", "amount": "10"})
    assert set(problems) == {"ammount", "qty", "plan", "amount", "order_id"}
    assert problems["ammount"].startswith("unknown param (declared: amount, express, order_id")
    assert problems["qty"] == "expected integer, got boolean"
    assert problems["amount"] == "expected number, got string"
    assert "'gold' is not one of 'free', 'pro'" in problems["plan"]
    assert problems["order_id"] == "is required"
    assert fields({"order_id": None}) == {"order_id": "is required and may not be null"}


def test_engine_keys_pass_in_a_task_and_are_refused_in_a_request() -> None:
    """``ledgerflow_*`` keys (a retry run's ``ledgerflow_retry_of``) are the engine's: a
    task's params may carry them, a trigger request may not set them."""
    given = {"order_id": "o", "ledgerflow_retry_of": "x/y"}
    assert fields(given, engine_keys=True) == {}
    assert fields(given) == {"ledgerflow_retry_of": "ledgerflow_* params are reserved"}


def test_check_params_raises_a_non_retryable_error_naming_the_fields() -> None:
    """A misfit is InvalidParams: a NonRetryableError (the step's retry policy fails it at
    once) whose message names the workflow and each bad field."""
    with pytest.raises(InvalidParams) as info:
        check_params("shop", 2, SPECS, {"order_id": "o", "qyt": 3})
    error = info.value
    assert isinstance(error, NonRetryableError)
    assert is_non_retryable(error, RetryPolicySpec())
    assert [p.field for p in error.problems] == ["qyt"]
    assert str(error).startswith("params of shop v2 do not fit its params schema: qyt: unknown")
    check_params("shop", 2, SPECS, {"order_id": "o"})  # fits: no error


def test_resolved_params_are_defaults_overridden_by_the_request() -> None:
    """The params a run sees: every declared param's default, the request's values on top."""
    assert resolved_params(SPECS, {"order_id": "o", "qty": 3}) == {
        "order_id": "o",
        "amount": 1.5,
        "qty": 3,
        "plan": "free",
        "express": None,
    }


def test_keyed_run_id_is_stable_per_workflow_and_key_and_a_manual_run_id() -> None:
    """The same (workflow, key) always maps to the same Airflow run id, another key or
    another workflow to another one; the id passes Airflow's run id pattern and is a
    manual run's (not one reserved for scheduled or asset runs)."""
    from airflow.configuration import conf
    from airflow.utils.types import DagRunType

    rid = keyed_run_id("checkout", "order-42")
    assert rid == keyed_run_id("checkout", "order-42")
    assert rid != keyed_run_id("checkout", "order-43")
    assert rid != keyed_run_id("refunds", "order-42")
    assert re.match(conf.get("scheduler", "allowed_run_id_pattern"), rid)
    assert DagRunType.from_run_id(rid) == DagRunType.MANUAL
    assert "order-42" not in rid


def test_idempotency_keys_are_printable_ascii_up_to_200() -> None:
    """Keys and delivery ids: 1-200 printable ASCII characters without spaces."""
    assert re.match(KEY_PATTERN, "delivery:2b7e-44f1_x.y")
    for bad in ("", "a b", "k" * 201, "naïve", "line\nbreak"):
        assert not re.match(KEY_PATTERN, bad), bad


def test_webhook_signature_is_an_hmac_of_the_exact_body() -> None:
    """``t=<time>,v1=<hex>``: HMAC-SHA256 of the time, the key and the raw body: accepted
    with the right secret; refused for another secret, a changed body, a missing or bare
    header, an empty secret."""
    secret, body = b"s3cret", b'{"order_id": "o-1"}'
    header = sign(secret, body)
    mac = header.partition("v1=")[2]
    assert header.startswith("t=") and len(mac) == 64

    def ok(secret: bytes, body: bytes, header: str | None) -> bool:
        return verify(secret, body, header, key=None, tolerance=300).ok

    assert ok(secret, body, header)
    assert ok(secret, body, f" {header} ")
    assert not ok(b"other", body, header)
    assert not ok(secret, body + b" ", header)
    assert not ok(secret, body, None)
    assert not ok(secret, body, mac)
    assert not ok(b"", body, sign(b"", body))


def test_webhook_signature_signs_the_time_and_the_key() -> None:
    """A time outside the tolerance (past or future) is stale; the key is signed, so the
    same signature under another key is refused; without a key the delivery is keyed by
    its signature (a resend within the window is the same delivery)."""
    secret, body, now = b"s3cret", b"{}", 1_800_000_000
    at = sign(secret, body, at=now - 299)
    assert verify(secret, body, at, key=None, tolerance=300, now=now).ok
    for off in (-301, 301):
        late = verify(
            secret, body, sign(secret, body, at=now + off), key=None, tolerance=300, now=now
        )
        assert not late.ok and late.reason.startswith("stale")
    keyed = sign(secret, body, key="k-1", at=now)
    assert verify(secret, body, keyed, key="k-1", tolerance=300, now=now).delivery_key == "k-1"
    assert not verify(secret, body, keyed, key="k-2", tolerance=300, now=now).ok
    assert not verify(secret, body, keyed, key=None, tolerance=300, now=now).ok
    unkeyed = verify(secret, body, sign(secret, body, at=now), key=None, tolerance=300, now=now)
    again = verify(secret, body, sign(secret, body, at=now), key=None, tolerance=300, now=now)
    assert unkeyed.delivery_key == again.delivery_key and re.match(
        KEY_PATTERN, again.delivery_key or ""
    )
    untimed = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert "untimed" in verify(secret, body, untimed, key=None, tolerance=300, now=now).reason


def test_launched_links_to_the_run_page_and_the_grid() -> None:
    """The response names the Airflow run, the ledger's run id and both links."""
    out = Launched("shop", 3, "shop__v3", "key__abc", True, "k1").as_dict()
    assert out["ledger_run_id"] == "shop__v3/key__abc"
    assert out["links"] == {
        "run_page": "/ledgerflow/runs/shop__v3/key__abc",
        "grid": "/dags/shop__v3/runs/key__abc",
    }


def _spec(tmp_path: Path, extra: str, params: str = "") -> WorkflowSpec:
    folder = tmp_path / "workflows" / "hooked"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "v1.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: hooked
            version: 1
            {params}
            {extra}
            steps:
              - id: a
                tool: demo.noop
                idempotency: natural
            """
        ).format(params=params, extra=extra)
    )
    return load_workflow(path)


def test_triggers_are_optional_and_a_webhook_names_its_secret_connection(tmp_path: Path) -> None:
    """Without ``triggers`` a workflow has no webhook and no assets; a webhook needs
    ``secret_conn_id``; an unknown trigger key is refused."""
    plain = _spec(tmp_path, "")
    assert plain.triggers.webhook is None and plain.triggers.assets == ()
    hooked = _spec(tmp_path, "triggers: {webhook: {secret_conn_id: hooked_secret}}")
    assert hooked.triggers.webhook is not None
    assert hooked.triggers.webhook.secret_conn_id == "hooked_secret"
    with pytest.raises(SpecError, match="secret_conn_id"):
        _spec(tmp_path, "triggers: {webhook: {}}")
    with pytest.raises(SpecError, match="kafka"):
        _spec(tmp_path, "triggers: {kafka: {topic: x}}")


def test_asset_triggers_need_defaults_for_required_params(tmp_path: Path) -> None:
    """An asset-triggered run carries no conf, so a required param without a default is a
    spec error naming it; ``@once`` cannot be combined with assets."""
    with pytest.raises(SpecError, match="ref is required without a default"):
        _spec(
            tmp_path,
            "triggers: {assets: ['s3://bucket/orders']}",
            "params: {ref: {type: string, required: true}}",
        )
    with pytest.raises(SpecError, match="@once"):
        _spec(tmp_path, "schedule: '@once'\ntriggers: {assets: ['s3://bucket/orders']}")


def test_asset_triggers_schedule_the_dag_on_any_of_the_assets(tmp_path: Path) -> None:
    """``triggers.assets`` alone: the DAG runs when any listed asset gets an event; with a
    cron schedule: on either; a superseded version keeps no schedule at all."""
    from airflow.serialization.serialized_objects import DagSerialization

    only = build_dag(_spec(tmp_path, "triggers: {assets: ['s3://b/orders', 's3://b/refunds']}"))
    assert type(only.timetable).__name__ == "AssetTriggeredTimetable"
    condition = only.timetable.asset_condition
    assert type(condition).__name__ == "AssetAny"
    assert sorted(a.uri for a in condition.objects) == ["s3://b/orders", "s3://b/refunds"]
    DagSerialization.to_dict(only)  # what the scheduler reads

    both = build_dag(
        _spec(tmp_path, "schedule: '0 3 * * *'\ntriggers: {assets: ['s3://b/orders']}")
    )
    assert type(both.timetable).__name__ == "AssetOrTimeSchedule"
    assert both.timetable.can_be_scheduled
    DagSerialization.to_dict(both)

    old = build_dag(_spec(tmp_path, "triggers: {assets: ['s3://b/orders']}"), superseded=True)
    assert type(old.timetable).__name__ == "NullTimetable"
