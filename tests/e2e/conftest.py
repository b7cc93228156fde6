"""One stack of real Airflow processes (Postgres metadata, Postgres ledger) per module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ledgerflow.cli import SHIM
from ledgerflow.ledger.store import Ledger
from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.echo_peer import EchoPeer
from ledgerflow.testing.http_peer import IdempotentPeer, SlackPeer
from ledgerflow.testing.mail import MailServer
from ledgerflow.testing.openai_peer import OpenAIPeer
from ledgerflow.testing.postgres import fresh_database
from ledgerflow.testing.statsd import StatsdListener

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

# A workflow whose only step calls a loopback HTTP service that answers 503 twice per key.
FLAKY = """
name: flaky_http
version: 1
description: Calls a service that is busy twice before it answers.
params:
  order_id: {{type: string, required: true}}
  path: {{type: string, default: charge}}
steps:
  - id: charge
    tool: http
    args: {{url: "{url}/{{{{ params.path }}}}", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "{{{{ params.order_id }}}}"}}
    retry: {{max_attempts: 4, backoff: {{initial: 1s, multiplier: 2, max: 4s}}}}
  - id: after
    needs: [charge]
    tool: demo.noop
    args: {{value: "{{{{ steps.charge.output.body.charge_id }}}}"}}
    idempotency: natural
"""

# Fan-out over a list, a skipped branch, and a join that still runs.
FANOUT = """
name: fanout
version: 1
params:
  skus: {type: array, default: [sku-book, sku-mug, sku-lamp]}
  express: {type: boolean, default: false}
steps:
  - id: reserve
    for_each: params.skus
    tool: demo.reserve_inventory
    args: {order_id: "fan-{{ run.id }}", sku: "{{ item }}", qty: 1}
    idempotency: {key: "{{ run.id }}-{{ item }}"}
  - id: express_label
    needs: [reserve]
    when: params.express
    tool: demo.noop
    args: {value: express}
  - id: express_notice
    needs: [express_label]
    tool: demo.noop
    args: {value: notice}
  - id: summary
    needs: [reserve, express_label]
    tool: demo.noop
    args: {value: "{{ steps.reserve.output | map(attribute='sku') | join(',') }}"}
"""

# A step whose first try outlives its timeout.
SLOW = """
name: slow
version: 1
steps:
  - id: wait
    tool: demo.sleep
    args: {seconds: 30, first_tries: 1}
    timeout: 2s
    retry: {max_attempts: 2, backoff: {initial: 1s}}
"""

# An HTTP step behind a circuit breaker (2 failures open it for 20 s).
BREAKER = """
name: breaker_demo
version: 1
params:
  order_id: {{type: string, required: true}}
steps:
  - id: call
    tool: http
    args: {{url: "{url}/down", json: {{order: "{{{{ params.order_id }}}}"}}}}
    idempotency: {{key: "{{{{ params.order_id }}}}"}}
    retry: {{max_attempts: 1}}
    breaker: {{name: down-api, failures: 2, cooldown: 20s}}
"""


# SimpleAuthManager users beside admin (name -> role); each one's password is its name.
TEST_USERS = {"manager": "user", "clerk": "op", "viewer": "viewer"}


def add_workflow(dags: Path, name: str, body: str) -> None:
    folder = dags / "workflows" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "v1.yaml").write_text(body)
    (folder / "v1.py").write_text(SHIM)


@pytest.fixture(scope="session")
def peer() -> Iterator[IdempotentPeer]:
    with IdempotentPeer(fail_first=2) as peer:
        yield peer


@pytest.fixture(scope="session")
def echo_peer() -> Iterator[EchoPeer]:
    """The peer of the stack's ``canary_http`` connection: it echoes the credentials."""
    with EchoPeer() as peer:
        yield peer


@pytest.fixture(scope="session")
def llm_peer() -> Iterator[OpenAIPeer]:
    """The model of the stack's ``ledgerflow_llm`` connection (OpenAI protocol, scripted)."""
    with OpenAIPeer() as peer:
        yield peer


@pytest.fixture(scope="session")
def statsd() -> Iterator[StatsdListener]:
    """A real UDP StatsD server that the stack's Airflow sends its metrics to (only
    Ledgerflow's are kept)."""
    with StatsdListener(keep=("airflow.ledgerflow.",)) as listener:
        yield listener


@pytest.fixture(scope="session")
def slack() -> Iterator[SlackPeer]:
    """A Slack incoming webhook on loopback: the stack's ``lf_e2e_slack`` connection."""
    with SlackPeer() as peer:
        yield peer


@pytest.fixture(scope="session")
def mail() -> Iterator[MailServer]:
    """A real SMTP server on loopback: the stack's ``lf_e2e_mail`` connection (notify:)."""
    with MailServer() as server:
        yield server


@pytest.fixture(scope="session")
def ledger_db() -> Iterator[str]:
    with fresh_database("lf_e2e_ledger") as url:
        yield url


@pytest.fixture(scope="session")
def ledger(ledger_db: str) -> Ledger:
    ledger = Ledger(ledger_db.replace("postgresql://", "postgresql+psycopg2://", 1))
    ledger.migrate()
    return ledger


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    ledger_db: str,
    peer: IdempotentPeer,
    llm_peer: OpenAIPeer,
    statsd: StatsdListener,
    echo_peer: EchoPeer,
    mail: MailServer,
    slack: SlackPeer,
) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("stack")
    dags = base / "dags"
    shutil.copytree(ROOT / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    add_workflow(dags, "flaky_http", FLAKY.format(url=peer.url))
    add_workflow(dags, "fanout", FANOUT)
    add_workflow(dags, "slow", SLOW)
    add_workflow(dags, "breaker_demo", BREAKER.format(url=peer.url))
    # More test workflows: tests/e2e/workflows/<name>.yaml ("{peer_url}" is replaced).
    extra = sorted((Path(__file__).parent / "workflows").glob("*.yaml"))
    for path in extra:
        add_workflow(dags, path.stem, path.read_text().replace("{peer_url}", peer.url))
    stack = AirflowStack(
        dags_folder=dags,
        home=base / "home",
        extra_env={
            "AIRFLOW_CONN_LEDGERFLOW_DB": ledger_db,
            "AIRFLOW_CONN_LEDGERFLOW_LLM": llm_peer.connection_uri(),
            "AIRFLOW_CONN_CANARY_HTTP": echo_peer.canary_connection(),
            "AIRFLOW_CONN_LF_E2E_MAIL": mail.conn_uri(),
            "AIRFLOW_CONN_LF_E2E_SLACK": slack.connection(),
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        },
        plugins_folder=ROOT / "plugins",
        users=TEST_USERS,
    )
    with stack:
        stack.wait_for_dags(
            [
                "flaky_http__v1",
                "fanout__v1",
                "slow__v1",
                "breaker_demo__v1",
                *(f"{path.stem}__v1" for path in extra),
                *(
                    f"{folder.name}__{shim.stem}"
                    for folder in (ROOT / "dags" / "workflows").iterdir()
                    for shim in folder.glob("v*.py")
                ),
            ],
            timeout=180,
        )
        yield stack


@pytest.fixture
def browser() -> Iterator[Any]:
    """A Playwright browser on Debian's headless chromium (``ledgerflow.testing.browser``)."""
    from ledgerflow.testing.browser import chromium

    with chromium() as browser:
        yield browser
