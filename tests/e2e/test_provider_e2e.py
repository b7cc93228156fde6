"""Ledgerflow installed as a package only, and Airflow served under a sub-path.

One real stack: no plugins folder file (the plugin comes from the package's
``airflow.plugins`` entry point), ``[api] base_url = http://127.0.0.1:PORT/airflow``, and in
front of the api-server a proxy that serves only ``/airflow/...`` (as an ingress does), so a
link that forgets the sub-path is a 404 here as it would be in production. Pages are fetched
as the UI's browser fetches them (the ``_token`` cookie after logging in); every link, form
action, image and script URL on them must stay under the sub-path and answer (not 404).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit

import httpx
import pytest

from ledgerflow.testing.airflow_stack import AirflowStack
from ledgerflow.testing.postgres import fresh_database

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BASE = "/airflow"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AirflowStack]:
    base = tmp_path_factory.mktemp("subpath")
    dags = base / "dags"
    shutil.copytree(ROOT / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    with (
        fresh_database("lf_e2e_provider") as ledger_url,
        AirflowStack(
            dags_folder=dags,
            home=base / "home",  # plugins folder: home/plugins, empty
            extra_env={"AIRFLOW_CONN_LEDGERFLOW_DB": ledger_url},
            base_path=BASE,
        ) as stack,
    ):
        assert stack.base_url.endswith(f":{stack.port}{BASE}")
        stack.wait_for_dags(["onboarding__v1", "checkout__v1"], timeout=180)
        yield stack


@pytest.fixture(scope="module")
def browser(stack: AirflowStack) -> Iterator[httpx.Client]:
    """An HTTP client holding the UI's cookie after logging in, at the proxy's root."""
    origin = stack.base_url.removesuffix(BASE)
    with httpx.Client(base_url=origin, timeout=60) as client:
        resp = client.post(
            f"{BASE}/auth/token", json={"username": "admin", "password": stack.password()}
        )
        assert resp.status_code in (200, 201), resp.text
        client.cookies.set("_token", resp.json()["access_token"])
        yield client


@pytest.fixture(scope="module")
def runs(stack: AirflowStack, browser: httpx.Client) -> dict[str, str]:
    """A run parked at its approval (onboarding) and a failed run (checkout, card declined),
    so the pages carry approval, run, retry and Airflow task links."""
    parked = stack.trigger("onboarding__v1", {"customer_id": "c-subpath"})
    failed = stack.trigger("checkout__v1", {"order_id": "o-subpath", "decline_card": True})
    assert stack.wait_for_run("checkout__v1", failed, timeout=300) == "failed"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pending = browser.get(f"{BASE}/ledgerflow/api/approvals").json()["approvals"]
        if pending:
            break
        time.sleep(1)
    else:
        pytest.fail("the onboarding run never asked for its approval")
    return {"onboarding__v1": parked, "checkout__v1": failed}


def _component(value: str) -> str:
    return quote(value, safe="!~*'()")


class _Refs(HTMLParser):
    """Every URL an HTML page makes the browser load or follow, and its inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str, str]] = []  # tag, attribute, URL, method
        self.scripts: list[str] = []
        self._script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        method = (dict(attrs).get("method") or "get").upper()
        for key, value in attrs:
            if key in ("href", "src", "action") and value is not None:
                self.refs.append((tag, key, value, method))
        self._script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = False

    def handle_data(self, data: str) -> None:
        if self._script:
            self.scripts.append(data)


def test_the_plugin_comes_from_the_entry_point_without_the_plugins_file(
    stack: AirflowStack,
) -> None:
    """With an empty plugins folder Airflow still loads ``ledgerflow``, from the installed
    package's entry point, with its app, its three views and no plugin import error."""
    assert not any((stack.home / "plugins").iterdir())
    plugins = stack.api("GET", "/api/v2/plugins", params={"limit": 100})["plugins"]
    ours = [p for p in plugins if p["name"] == "ledgerflow"]
    assert len(ours) == 1
    assert "ledgerflow.plugin:LedgerflowPlugin" in ours[0]["source"]
    assert [a["url_prefix"] for a in ours[0]["fastapi_apps"]] == ["/ledgerflow"]
    assert {v["url_route"] for v in ours[0]["external_views"]} == {
        "ledgerflow-approvals",
        "ledgerflow-runs",
        "ledgerflow-run",
    }
    errors = stack.api("GET", "/api/v2/plugins/importErrors")
    assert errors["total_entries"] == 0, errors


def test_every_link_of_the_pages_stays_under_the_sub_path(
    stack: AirflowStack, browser: httpx.Client, runs: dict[str, str]
) -> None:
    """Starting from the menu entries and the run-page tab Airflow's UI shows (with their
    icons), every href, src and form action on Ledgerflow's pages, and every path in their
    scripts, starts with the sub-path and answers something other than 404 through the
    proxy; the pages themselves answer 200. The proxy refuses the same paths without the
    sub-path, so a root-relative link fails this test."""
    assert browser.get("/ledgerflow/runs").status_code == 404  # what the old links did
    ui = browser.get(f"{BASE}/")
    assert f'<base href="{BASE}/"' in ui.text  # how the UI resolves relative URLs
    plugin = next(
        p
        for p in stack.api("GET", "/api/v2/plugins", params={"limit": 100})["plugins"]
        if p["name"] == "ledgerflow"
    )
    pages: list[str] = []
    checked: dict[str, int] = {}

    def check(url: str, where: str, method: str = "GET") -> None:
        """``url`` is under the sub-path and answers. A POST form's action is posted empty
        (no CSRF token: refused, nothing changes): a GET there is another route's."""
        parts = urlsplit(url)
        assert parts.path.startswith(f"{BASE}/"), f"{where}: {url} leaves {BASE}"
        if url not in checked:
            checked[url] = browser.request(method, url).status_code
        assert checked[url] != 404, f"{where}: {method} {url} -> 404"

    ui_url = f"{stack.base_url}/"
    for view in plugin["external_views"]:
        for key in ("icon", "icon_dark_mode"):
            icon = urljoin(ui_url, view[key])
            check(icon, f"view {view['name']} {key}")
            assert browser.get(icon).headers["content-type"].startswith("image/svg+xml")
        href = view["href"]
        if view["destination"] == "dag_run":
            for dag_id, run_id in runs.items():
                # As the UI fills them in (encodeURIComponent).
                filled = href.format(DAG_ID=_component(dag_id), RUN_ID=_component(run_id))
                pages.append(urljoin(ui_url, filled))
        else:
            pages.append(urljoin(ui_url, href))

    seen: set[str] = set()
    followed = 0
    while pages and followed < 40:
        page = pages.pop(0)
        if page in seen:
            continue
        seen.add(page)
        followed += 1
        resp = browser.get(page, headers={"accept": "text/html"})
        assert resp.status_code == 200, (page, resp.status_code, resp.text[:300])
        assert urlsplit(str(resp.url)).path.startswith(f"{BASE}/ledgerflow/")
        refs = _Refs()
        refs.feed(resp.text)
        for tag, key, value, method in refs.refs:
            if value.startswith("#"):
                continue
            url = urljoin(page, value)
            check(url, f"{page} <{tag} {key}>", method if tag == "form" else "GET")
            parts = urlsplit(url)
            if tag == "a" and parts.path.startswith(f"{BASE}/ledgerflow/"):
                pages.append(url.split("#")[0])
        for script in refs.scripts:
            for path in re.findall(r"""["'`](/[A-Za-z0-9_./{}-]*)""", script):
                assert path.startswith(f"{BASE}/"), f"{page}: script path {path}"
    kinds = {urlsplit(u).path.split("/")[3] for u in seen if len(urlsplit(u).path.split("/")) > 3}
    assert {"approvals", "runs"} <= kinds, seen
    assert any("/approvals/" in u and u.rstrip("/").split("/")[-1].isdigit() for u in seen)
    assert any(f"{BASE}/dags/" in u for u in checked), "no link into Airflow's run grid"
    assert any(u.endswith("/retry") for u in checked), "no retry form on the failed run"
    assert any(u.endswith("/decide") for u in checked), "no decision form on the approval"


def test_redirects_and_the_login_link_keep_the_sub_path(
    stack: AirflowStack, browser: httpx.Client, runs: dict[str, str]
) -> None:
    """Deciding on the approval page redirects to the approval under the sub-path, and a
    page opened without a login links to Airflow's login page under the sub-path."""
    approval = browser.get(f"{BASE}/ledgerflow/api/approvals").json()["approvals"][0]
    page = browser.get(f"{BASE}/ledgerflow/approvals/{approval['id']}").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    seen = re.search(r'name="seen_hash" value="([^"]+)"', page)
    assert csrf and seen
    origin = stack.base_url.removesuffix(BASE)
    resp = browser.post(
        f"{BASE}/ledgerflow/approvals/{approval['id']}/decide",
        data={
            "decision": "approve",
            "comment": "fine",
            "csrf_token": csrf.group(1),
            "seen_hash": seen.group(1),
        },
        headers={"origin": origin},
    )
    assert resp.status_code == 303, resp.text
    location = resp.headers["location"]
    assert location.startswith(f"{BASE}/ledgerflow/approvals/{approval['id']}?msg="), location
    assert browser.get(location).status_code == 200
    with httpx.Client(base_url=origin, timeout=30) as anonymous:
        resp = anonymous.get(f"{BASE}/ledgerflow/runs", headers={"accept": "text/html"})
        assert resp.status_code == 401
        login = re.search(r'<a href="([^"]+)">Sign in to Airflow</a>', resp.text)
        assert login and login.group(1).startswith(f"{BASE}/auth/login"), resp.text
        assert anonymous.get(login.group(1).replace("&amp;", "&")).status_code != 404
