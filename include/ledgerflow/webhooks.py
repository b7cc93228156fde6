"""Signed webhook deliveries: a timestamp signed with the body, stale and replayed
deliveries refused.

A delivery to ``POST /ledgerflow/hooks/{name}`` carries::

    X-Ledgerflow-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<key>.<body>">

keyed by the workflow's secret (its connection's password), where ``<key>`` is the
delivery's ``Idempotency-Key`` (or ``X-Ledgerflow-Delivery``) header, empty when it has
none, and ``<body>`` the raw body. So neither the time, the key nor the body can be
changed without the secret. A timestamp further than ``[ledgerflow] webhook_tolerance``
(300 s) from the server's clock is refused (401): a captured delivery cannot be sent
again later. Within that window a resend is the same delivery: a delivery without a key
is keyed by its signature, so sending it again returns the run it started instead of
starting another (a key of the sender's own does the same, for as long as the run
exists). The older ``sha256=<hex of the body>`` form signed no time and is refused with a
message naming this one.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

HEADER = "X-Ledgerflow-Signature"
FORMAT = "t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<idempotency key>.<body>'>"


def sign(secret: bytes, body: bytes, *, key: str | None = None, at: int | None = None) -> str:
    """The signature header of a delivery of ``body`` (with idempotency ``key``) at ``at``
    (unix seconds; now by default): what a sender computes."""
    stamp = int(time.time()) if at is None else at
    return f"t={stamp},v1={_mac(secret, stamp, key, body)}"


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    """Why a delivery is refused (for the 401's detail)."""
    delivery_key: str | None = None
    """The key the run is started under: the sender's, else one made from the signature."""


def verify(
    secret: bytes,
    body: bytes,
    header: str | None,
    *,
    key: str | None,
    tolerance: int,
    now: float | None = None,
) -> Verdict:
    """Whether ``header`` signs this delivery with ``secret`` within ``tolerance`` seconds
    of ``now`` (constant-time comparison)."""
    if not secret:
        return Verdict(False, "the webhook has no secret")
    if not header:
        return Verdict(False, f"missing {HEADER} ({FORMAT})")
    fields = dict(part.strip().partition("=")[::2] for part in header.split(","))
    stamp, mac = fields.get("t", ""), fields.get("v1", "")
    if not stamp.isdigit() or not mac:
        return Verdict(False, f"{HEADER} must be {FORMAT}; the untimed sha256= form is refused")
    if not hmac.compare_digest(_mac(secret, int(stamp), key, body).encode(), mac.encode()):
        return Verdict(False, f"bad {HEADER} ({FORMAT})")
    skew = abs((time.time() if now is None else now) - int(stamp))
    if skew > tolerance:
        return Verdict(
            False, f"stale {HEADER}: signed {int(skew)} s from now, more than {tolerance} s"
        )
    return Verdict(True, delivery_key=key if key is not None else f"sig-{mac[:48]}")


def _mac(secret: bytes, stamp: int, key: str | None, body: bytes) -> str:
    message = f"{stamp}.{key or ''}.".encode() + body
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def secret_of(conn_id: str) -> bytes | None:
    """A webhook's secret: the Airflow connection's password, else its ``extra.secret``."""
    try:
        from airflow.models.connection import Connection

        conn = Connection.get_connection_from_secrets(conn_id)
    except Exception:
        return None
    value = conn.password or conn.extra_dejson.get("secret")
    return value.encode() if isinstance(value, str) and value else None
