"""Built-in connectors: ``http`` and ``sql``. Credentials come from Airflow connections."""

from __future__ import annotations

from typing import Any

from ledgerflow.errors import HttpClientError, HttpStatusError, ToolError
from ledgerflow.ledger._engine import DEFAULT_CONN_ID  # not store: parsed with every DAG
from ledgerflow.tools.context import ToolContext
from ledgerflow.tools.registry import tool

RETRYABLE_4XX = frozenset({408, 425, 429})


@tool("http", non_retryable=(HttpClientError,))
def http(
    ctx: ToolContext,
    url: str,
    method: str = "POST",
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float | None = None,
    conn_id: str | None = None,
) -> dict[str, Any]:
    """Call an HTTP endpoint, sending the step's idempotency key as ``Idempotency-Key``.

    With ``conn_id``, an Airflow ``http`` connection is read as the http provider's
    ``HttpHook`` reads it (``tools/_http_conn.py``): the base URL (``url`` is then a
    path), Basic auth from login/password, every top-level extra a header, and the
    extras ``verify``, ``cert``, ``proxies``, ``timeout``, ``allow_redirects``,
    ``max_redirects``, ``trust_env`` and ``check_response``. The step's ``headers`` win
    over the connection's. ``timeout`` (seconds) defaults to the connection's, else 30.
    """
    from urllib.parse import urlsplit

    import httpx

    from ledgerflow.tools._http_conn import (
        DEFAULT_TIMEOUT_S,
        client_options,
        default_tls,
        read_connection,
    )

    options: dict[str, Any] = {
        "timeout": timeout if timeout is not None else DEFAULT_TIMEOUT_S,
        "verify": default_tls(),
    }
    send_headers = httpx.Headers()
    check = True
    if conn_id:
        from airflow.sdk import BaseHook

        raw = BaseHook.get_connection(conn_id)
        conn = read_connection(conn_id, raw)
        # What a peer may echo back (the encoded Basic value too) is masked wherever
        # Ledgerflow stores or logs it.
        from ledgerflow.secrets import mask_http_credentials

        mask_http_credentials(login=raw.login, password=raw.password, headers=conn.headers)
        for proxy in conn.proxies.values():  # a proxy's credentials, as in http://u:p@proxy
            mask_http_credentials(login=None, password=urlsplit(proxy).password, headers=None)
        url = conn.url(url)
        options = client_options(conn, timeout)
        send_headers.update(conn.headers)
        check = conn.check_response
    send_headers["Idempotency-Key"] = ctx.idempotency_key
    send_headers.update(headers or {})
    client = httpx.Client(**options)
    try:
        with client:
            response = client.request(method.upper(), url, json=json, headers=send_headers)
    except httpx.TimeoutException as exc:
        raise ToolError(f"HTTP timeout after {client.timeout.read}s: {url}") from exc
    except httpx.TransportError as exc:
        raise ToolError(f"HTTP transport error: {exc}") from exc
    if check and (response.status_code >= 500 or response.status_code in RETRYABLE_4XX):
        raise HttpStatusError(response.status_code, response.text)
    if check and response.status_code >= 400:
        raise HttpClientError(response.status_code, response.text)
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return {"status": response.status_code, "body": body}


def _on_ledger(args: dict[str, Any]) -> bool:
    return args.get("conn_id", DEFAULT_CONN_ID) == DEFAULT_CONN_ID


@tool("sql", transactional=_on_ledger)
def sql(
    ctx: ToolContext,
    statement: str,
    parameters: dict[str, Any] | None = None,
    conn_id: str = DEFAULT_CONN_ID,
    fetch: bool = False,
) -> dict[str, Any]:
    """Run one SQL statement with bound ``:name`` parameters.

    On the ledger's own database (``conn_id: ledgerflow_db``, the default) it runs in
    the checkpoint's transaction: the effect and the checkpoint commit together, exactly
    once. On any other connection it runs through that connection's Airflow hook and is
    at-least-once: make the statement idempotent (an upsert keyed by the idempotency key).
    On Postgres, the tables it reads and writes go to Airflow's hook lineage collector.
    """
    params = dict(parameters or {})
    params.setdefault("idempotency_key", ctx.idempotency_key)
    if conn_id == DEFAULT_CONN_ID:
        from sqlalchemy import text

        from ledgerflow.tools.lineage import report_sql_on_ledger

        db = ctx.require_db()
        result = db.execute(text(statement), params)
        rows = [dict(r) for r in result.mappings()] if fetch and result.returns_rows else []
        output = {"rowcount": result.rowcount, "rows": rows}
        report_sql_on_ledger(db, statement, conn_id)
        return output
    from airflow.sdk import BaseHook

    from ledgerflow.tools.lineage import report_sql_on_hook

    conn = BaseHook.get_connection(conn_id)
    hook: Any = conn.get_hook()
    if fetch:
        records = hook.get_records(statement, parameters=params)
        report_sql_on_hook(hook, conn, statement)
        return {"rowcount": len(records), "rows": [list(r) for r in records]}
    hook.run(statement, parameters=params)
    report_sql_on_hook(hook, conn, statement)
    return {"rowcount": None, "rows": []}
