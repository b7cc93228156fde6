"""The rules of the deterministic local rule-based model (``ledgerflow:rules``).

Pure Python and cheap to import: the demo's rules-based classifier tool (the fallback
branch of the ticket triage example) uses the same rules without pydantic-ai.
"""

from __future__ import annotations

import re
from typing import Any

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "billing": ("refund", "invoice", "charged", "charge", "payment", "bill", "price", "paid"),
    "technical": ("error", "crash", "bug", "broken", "fails", "failing", "timeout", "slow"),
    "account": ("password", "login", "log in", "sign in", "account", "locked", "2fa"),
}
PRIORITY_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("urgent", ("urgent", "asap", "immediately", "outage", "is down", "all users")),
    ("high", ("cannot", "can't", "blocked", "twice", "not working")),
    ("low", ("question", "wondering", "feature", "suggestion", "when you have time")),
)


def classify(prompt: str, schema: dict[str, Any]) -> Any:
    """The rule-based answer to ``prompt`` in the shape of ``schema`` (deterministic)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", prompt) if p.strip()]
    text = paragraphs[-1] if paragraphs else ""
    lower = text.lower()
    hits = {c: sum(lower.count(w) for w in words) for c, words in CATEGORY_WORDS.items()}
    best = max(hits, key=lambda c: hits[c])
    ranked = sorted(hits.values(), reverse=True)
    if ranked[0] == 0:
        category, confidence = "other", 0.3
    elif ranked[0] == ranked[1]:
        category, confidence = best, 0.5  # two categories fit equally well
    else:
        category, confidence = best, 0.75 if ranked[0] == 1 else 0.9
    priority = next(
        (level for level, words in PRIORITY_WORDS if any(w in lower for w in words)), "normal"
    )
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""
    summary = sentence if len(sentence) <= 120 else sentence[:117].rstrip() + "..."
    known = {
        "category": category,
        "priority": priority,
        "summary": summary or "(empty ticket)",
        "confidence": confidence,
    }
    return _fill(schema, known, lower)


def _fill(schema: dict[str, Any], known: dict[str, Any], text: str, name: str = "") -> Any:
    if name in known and _fits(schema, known[name]):
        return known[name]
    if "enum" in schema:
        values = list(schema["enum"])
        return next((v for v in values if str(v).lower() in text), values[0])
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {key: _fill(sub, known, text, key) for key, sub in properties.items()}
    if kind == "array":
        return []
    if kind in ("number", "integer"):
        low = schema.get("minimum", 0)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return known["summary"]


def _fits(schema: dict[str, Any], value: Any) -> bool:
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    if isinstance(value, str):
        return "string" in kinds or kind is None
    if isinstance(value, float):
        return "number" in kinds or kind is None
    return True
