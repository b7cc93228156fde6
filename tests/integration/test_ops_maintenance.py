"""The maintenance DAGs' tasks (``ledgerflow.maintenance``), run as a task runs them: the
ledger from the Airflow connection, the objectives from the dags folder."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from ledgerflow.ledger.store import Ledger
from ledgerflow.maintenance import check_slos, prune_ledger
from ledgerflow.testing.ledger_runs import Step, ledger_clock, record_run

SHOP = """name: shop
version: 1
slo: {success_rate: 99%}
steps:
  - id: a
    tool: demo.noop
    idempotency: natural
"""


def test_the_alert_task_alerts_once_and_the_prune_task_prunes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With one failed run of two, ``shop``'s 99% success rate is breached: the first
    check alerts, the second does not; the prune task removes the run that ended 100 days
    ago (``[ledgerflow] retention`` 90d) and prints so."""
    (tmp_path / "dags" / "workflows" / "shop").mkdir(parents=True)
    (tmp_path / "dags" / "workflows" / "shop" / "v1.yaml").write_text(SHOP)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    monkeypatch.setenv("AIRFLOW_CONN_LEDGERFLOW_DB", url)
    monkeypatch.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(tmp_path / "dags"))
    monkeypatch.setenv("AIRFLOW__LEDGERFLOW__RETENTION", "90d")
    ledger = Ledger(url)
    ledger.migrate()
    now = datetime.now(timezone.utc)
    with ledger_clock(now - timedelta(days=100)) as clock:
        record_run(ledger, clock, workflow="shop", run="old", steps=[Step("a")])
        clock.at(now - timedelta(hours=1))
        record_run(ledger, clock, workflow="shop", run="ok", steps=[Step("a")])
        record_run(ledger, clock, workflow="shop", run="bad", steps=[Step("a", tries=("fail",))])

    first = check_slos()
    assert [(o["objective"], o["state"]) for o in first["alerted"]] == [
        ("success_rate", "breached")
    ]
    assert check_slos()["alerted"] == []
    assert "shop success_rate: 50.00% (target 99.00%)" in capsys.readouterr().out

    pruned = prune_ledger()
    assert pruned["runs"] == 1 and ledger.run("shop__v1/old") is None
    assert "removed 1 finished runs" in capsys.readouterr().out
