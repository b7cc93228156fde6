"""Notifications of a whole run under Airflow (``ledgerflow run``: a real ``dag.test()`` in
a child process, SQLite ledger): a fused segment whose step fails for good, and a saga whose
refund cannot be undone, with one notifier up (a real SMTP server on loopback) and one down
(a webhook on a closed port)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from ledgerflow.testing.mail import MailServer, html_text

pytestmark = pytest.mark.integration

WORKFLOW = """\
name: nz
version: 1
execution: fused
params:
  order_id: {type: string, required: true}
defaults:
  retry: {max_attempts: 2, backoff: {initial: 0.2s, multiplier: 1, max: 0.2s}, jitter: none}
notify:
  - kind: smtp
    conn_id: lf_mail
    to: [ops@example.com]
    on: [dead_letter, compensation_failed]
  - kind: slack_webhook
    conn_id: lf_down
steps:
  - id: reserve
    tool: demo.reserve_inventory
    args: {order_id: "{{ params.order_id }}", sku: sku-mug}
    idempotency: {key: "{{ params.order_id }}"}
  - id: charge
    needs: [reserve]
    tool: demo.charge_payment
    args: {order_id: "{{ params.order_id }}", amount: 5}
    idempotency: {key: "{{ params.order_id }}"}
    compensate:
      tool: demo.refund_payment
      args: {payment_id: "{{ steps.charge.output.payment_id }}", fail_times: 9}
      retry: {max_attempts: 1}
  - id: again
    needs: [charge]
    tool: demo.charge_payment
    args: {order_id: "{{ params.order_id }}-2", amount: 5, decline: true}
    idempotency: {key: "{{ params.order_id }}-2"}
    retry: {max_attempts: 3, non_retryable: [PaymentDeclined]}
"""


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def test_a_failed_run_is_told_once_per_event_and_a_down_notifier_changes_nothing(
    tmp_path: Path,
) -> None:
    """The run ends as it would without notify (the declined step dead-lettered inside the
    fused task; the saga's refund fails and is dead-lettered too: ``compensation_failed``);
    ops get exactly one mail per event (two dead letters, one failed saga), with the error
    and the run page's link; the down webhook's notices of the same events are ``failed``
    with the refusal, recorded, not lost, and never made a task fail."""
    (tmp_path / "dags" / "workflows" / "nz").mkdir(parents=True)
    (tmp_path / "dags" / "workflows" / "nz" / "v1.yaml").write_text(WORKFLOW)
    with MailServer() as mail:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
        env["LEDGERFLOW_DEMO_TOOLS"] = "1"
        env["AIRFLOW_CONN_LF_MAIL"] = mail.conn_uri()
        env["AIRFLOW_CONN_LF_DOWN"] = json.dumps(
            {"conn_type": "slackwebhook", "password": f"http://127.0.0.1:{closed_port()}/h"}
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ledgerflow.cli",
                "run",
                "dags/workflows/nz/v1.yaml",
                "--param",
                "order_id=n-1",
                "--workdir",
                "work",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        db = tmp_path / "work" / "ledger.db"
        assert db.exists(), done.stderr[-3000:]
        ((run_id, status, saga, failed_step),) = rows(
            db, "SELECT run_id, status, saga, failed_step FROM lf_runs"
        )
        assert (status, saga, failed_step) == ("failed", "compensation_failed", "again"), (
            done.stderr[-3000:]
        )
        # The declined step, and the refund that could not be undone.
        assert rows(db, "SELECT step_key FROM lf_dead_letters ORDER BY step_key") == [
            ("again",),
            ("compensate__charge",),
        ]
        messages = mail.wait_for(3)
        time.sleep(0.5)  # nothing more comes
        subjects = sorted(str(m["Subject"]) for m in mail.messages)
    assert subjects == [
        f"Compensation failed: nz v1, run {run_id}",
        "Dead letter: nz v1, step again failed for good",
        "Dead letter: nz v1, step compensate__charge failed for good",
    ]
    told = rows(
        db,
        "SELECT event, target, status, attempts, last_error FROM lf_notifications "
        "ORDER BY event, target, step_key",
    )
    by_target: dict[str, list[tuple[object, ...]]] = {}
    for event, target, st, attempts, error in told:
        by_target.setdefault(str(target), []).append((event, st, attempts, error))
    mailed = by_target["smtp:lf_mail"]
    assert [(e, s, a) for e, s, a, _ in mailed] == [(e, "sent", 1) for e, *_ in mailed] and len(
        mailed
    ) == len(messages)
    assert {e for e, *_ in mailed} == {"dead_letter", "compensation_failed"}
    down = by_target["slack_webhook:lf_down"]
    assert len(down) == len(mailed)  # the same events, every one recorded
    assert all(
        s == "failed" and a == 1 and "Connection refused" in str(err) for _, s, a, err in down
    )
    declined = next(m for m in messages if "step again" in str(m["Subject"]))
    body = html_text(declined)
    assert "PaymentDeclined: card declined for order n-1-2" in body
    # ``ledgerflow run`` keeps no [api] base_url (its Airflow is its own): the page's path.
    assert f'href="/ledgerflow/runs/{quote(run_id, safe="/")}"' in body
