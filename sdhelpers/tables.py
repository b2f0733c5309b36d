"""Tables for the book's pages: rows of dicts as Markdown, which the HTML book renders as tables.

A chapter shows a table with ``display(Markdown(markdown_table(rows)))``. The book parses a cell's
Markdown output as MyST, so the pipes become an HTML ``<table>``; in Jupyter it renders the same
way. A printed text table would be cut off at the code box's edge instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows with the same keys as a Markdown table: one column per key, in the first row's order.

    Integers get thousands separators and booleans read "yes"/"no"; a ``|`` inside a value is
    escaped so it cannot split a cell.
    """
    rows = list(rows)
    if not rows or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"rows: expected a non-empty list of dicts, got {rows!r:.80}")
    columns = list(rows[0])
    for index, row in enumerate(rows):
        if list(row) != columns:
            raise ValueError(f"rows[{index}]: keys {list(row)} differ from the first row's {columns}")
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
