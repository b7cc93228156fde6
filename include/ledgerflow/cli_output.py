"""How the ``ledgerflow`` commands print rows: ``-o table|json|yaml|plain`` (Airflow's own
CLI convention). ``table`` is a rich table (colour on a terminal, none when ``NO_COLOR``
is set); ``plain`` is padded columns for ``grep``/``awk``; the default is ``table`` on a
terminal and ``plain`` when the output is piped."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

FORMATS = ("table", "json", "yaml", "plain")
WIDEST = 60  # characters of one cell in plain output
STATUS_STYLE = {
    "succeeded": "green",
    "completed": "green",
    "resolved": "green",
    "closed": "green",
    "running": "cyan",
    "pending": "yellow",
    "open": "red",
    "failed": "red",
    "compensated": "magenta",
}


def default_format() -> str:
    return "table" if sys.stdout.isatty() else "plain"


def jsonable(rows: Any) -> Any:
    return json.loads(json.dumps(rows, default=str))


def print_rows(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str]) -> None:
    if fmt == "json":
        print(json.dumps(rows, default=str, indent=2))
        return
    if fmt == "yaml":
        import yaml

        print(yaml.safe_dump(jsonable(rows), sort_keys=False).rstrip())
        return
    if not rows:
        print("(none)")
        return
    if fmt == "table":
        _table(rows, columns)
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))[:WIDEST]) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row.get(c, ""))[:WIDEST].ljust(widths[c]) for c in columns))


def _table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    # Ids are never wrapped or cut: a piped table is as wide as it needs to be.
    console = Console(width=None if sys.stdout.isatty() else 400)
    table = Table(header_style="bold", show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column.endswith("id"), overflow="fold")
    for row in rows:
        cells = []
        for column in columns:
            value = "" if row.get(column) is None else str(row.get(column))
            style = STATUS_STYLE.get(value) if column in ("status", "state", "saga") else None
            cells.append(f"[{style}]{value}[/{style}]" if style else value.replace("[", r"\["))
        table.add_row(*cells)
    console.print(table)
