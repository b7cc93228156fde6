"""The package's own output models and checks (used by the ticket triage example)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ledgerflow.llm.registry import check, output_model


@output_model("demo.ticket_triage")
class TicketTriage(BaseModel):
    """A support ticket, classified."""

    model_config = ConfigDict(extra="forbid")

    category: Literal["billing", "technical", "account", "other"]
    priority: Literal["low", "normal", "high", "urgent"]
    summary: str = Field(min_length=1, max_length=300)
    confidence: float = Field(ge=0.0, le=1.0)


@check("demo.summary_is_not_the_ticket")
def summary_is_not_the_ticket(output: Any) -> bool | str:
    """A summary that merely repeats a long ticket is not a summary."""
    summary = str((output or {}).get("summary", ""))
    return len(summary) <= 200 or f"summary too long ({len(summary)} characters)"
