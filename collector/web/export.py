"""The sessions table as CSV, a chunk at a time, with cells a spreadsheet would run defused. Pure.

Agents choose their session ids, models and user names; a spreadsheet that opens the export
evaluates a cell starting with `=`, `+`, `-` or `@` (and some with a leading tab or carriage
return) as a formula, which can run commands or send the sheet's data away. Such text cells
are written with a leading single quote, which spreadsheets show as text and do not evaluate
(the OWASP "CSV injection" advice). Numbers are written as numbers.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from collector.web.queries import CSV_COLUMNS

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
LINE_END = "\r\n"


def cell(value: Any) -> str | int | float:
    """A value as its CSV cell: None empty, text starting like a formula quoted."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    if isinstance(value, bool | int | float):
        return value
    return str(value)


def header(dimensions: Sequence[str] = ()) -> str:
    """CSV_COLUMNS, then a column per configured dimension (named as the dimension)."""
    return _lines([(*CSV_COLUMNS, *dimensions)])


def rows(sessions: Iterable[Mapping[str, Any]], dimensions: Sequence[str] = ()) -> str:
    """The CSV lines of these sessions (as queries' session dicts), in header()'s order."""
    return _lines([*(cell(s[c]) for c in CSV_COLUMNS),
                   *(cell(s["dimensions"].get(d)) for d in dimensions)] for s in sessions)


def _lines(table: Iterable[Iterable[Any]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator=LINE_END).writerows(table)
    return out.getvalue()
