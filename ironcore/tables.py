"""Tables people would rather look at than read: one self-contained HTML page of rows.

GRPO's completions and held-out samples, and an evaluation's per-item samples, are written with it, so
every such page looks the same and escapes its text the same way (a completion may hold any markup).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

STYLE = ("<style>body{font-family:sans-serif}table{border-collapse:collapse}"
         "td,th{vertical-align:top;border-bottom:1px solid #ddd;padding:2px 6px;text-align:left}"
         "pre{margin:0;white-space:pre-wrap;max-width:60em}</style>")


def cell(value: Any) -> str:
    """One cell: text as preformatted (escaped), numbers to 3 decimals, None as '-', anything else (chat
    messages) as JSON."""
    if value is None:
        return "<td>-</td>"
    if isinstance(value, bool | int):
        return f"<td>{value}</td>"
    if isinstance(value, float):
        return f"<td>{value:.3f}</td>"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"<td><pre>{html.escape(text)}</pre></td>"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One ``<table>``, a row per mapping (the columns: every key, in first-seen order), for a page of its own."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "".join("<tr>" + "".join(cell(row.get(name)) for name in columns) + "</tr>\n" for row in rows)
    return f"<table><tr>{head}</tr>\n{body}</table>"


def html_table(title: str, summary: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """A whole HTML page: ``title`` as its heading, a line of ``summary``, and :func:`table` of ``rows``."""
    return (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>{STYLE}"
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>{table(rows)}\n")
