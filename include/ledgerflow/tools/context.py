"""What a tool receives besides its arguments."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection


@dataclass
class ToolContext:
    """Handed to every tool call as its first argument.

    ``idempotency_key`` is stable across retries of the same effect: pass it on to the
    system you call (the ``http`` tool sends it as ``Idempotency-Key``). ``db`` is the
    open transaction on the ledger's own database, given only to tools registered with
    ``transactional=True``; what they write there commits together with the checkpoint.
    """

    run_id: str
    step_key: str
    workflow: str
    version: int
    try_number: int
    idempotency_key: str
    db: Connection | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("ledgerflow.tool"))
    extra: dict[str, Any] = field(default_factory=dict)

    def require_db(self) -> Connection:
        if self.db is None:
            from ledgerflow.errors import LedgerflowError

            raise LedgerflowError(
                f"step {self.step_key!r}: this tool needs the ledger transaction "
                "(register it with transactional=True)"
            )
        return self.db
