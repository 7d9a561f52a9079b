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
from collections.abc import Iterable, Mapping
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


def header() -> str:
    return _lines([CSV_COLUMNS])


def rows(sessions: Iterable[Mapping[str, Any]]) -> str:
    """The CSV lines of these sessions (as queries' session dicts), in CSV_COLUMNS order."""
    return _lines([cell(s[c]) for c in CSV_COLUMNS] for s in sessions)


def _lines(table: Iterable[Iterable[Any]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator=LINE_END).writerows(table)
    return out.getvalue()
