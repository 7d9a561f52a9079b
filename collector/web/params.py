"""The fleet view's query parameters, checked before any of them reaches a database. Pure.

Every value an /api/ request carries goes through one of these, so an out-of-range one is a
BadQuery (answered 400 with its message) and never an error inside SQLite or PostgreSQL:
text that cannot be stored (NUL, lone surrogates, which neither database can bind), integers
beyond 64 bits, dates whose day range leaves the calendar, unknown time zones.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# SQLite integers (and PostgreSQL's BIGINT) are signed 64-bit: a larger one cannot be bound.
MIN_INT64 = -(2**63)
MAX_INT64 = 2**63 - 1
# Dates the reports can bound: the rollup starts in 1970, and a day's upper bound is the next
# day's midnight in any UTC offset (to 14 h), which must still be a date.
FIRST_DAY = dt.date(1970, 1, 1)
LAST_DAY = dt.date(9999, 12, 29)
# A time-zone key longer than any in the tz database is refused before a file lookup.
MAX_ZONE_CHARS = 64


class BadQuery(ValueError):
    """A filter, sort, cursor or other parameter the API does not accept; answered 400 with
    this message."""


def storable(value: str, name: str) -> str:
    """`value` if both databases can bind it as text, else BadQuery naming the parameter."""
    if "\x00" in value:
        raise BadQuery(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadQuery(f"{name} is not valid Unicode text (lone surrogate)") from None
    return value


def text(params: Mapping[str, str], name: str) -> str | None:
    """A text parameter, stripped; None when absent or empty."""
    value = params.get(name, "").strip()
    return storable(value, name) if value else None


def integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer parameter from `low` to `high` (the default when absent or empty)."""
    raw = params.get(name, "").strip()
    if not raw:
        return default
    # int() accepts '1_000' and other digits than ASCII; the API takes plain decimals only.
    body = raw[1:] if raw[0] in "+-" else raw
    if not (body.isascii() and body.isdigit()) or len(body) > 20:
        raise BadQuery(f"{name} must be an integer from {low} to {high}")
    value = int(raw)
    if not low <= value <= high:
        raise BadQuery(f"{name} must be an integer from {low} to {high}")
    return value


def cursor_value(value: Any) -> str | int | float:
    """A sort value decoded from a cursor, if a database can compare with it."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadQuery("cursor is not one this API gave")
    if isinstance(value, int) and not MIN_INT64 <= value <= MAX_INT64:
        raise BadQuery("cursor is not one this API gave (integer beyond 64 bits)")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadQuery("cursor is not one this API gave")
    if isinstance(value, str):
        storable(value, "cursor")
    return value


def date(params: Mapping[str, str], name: str) -> dt.date | None:
    """A YYYY-MM-DD parameter whose day and the day after it are real dates in every zone
    (so that its hour bounds can be computed), None when absent."""
    raw = text(params, name)
    if raw is None:
        return None
    try:
        day = dt.date.fromisoformat(raw)
    except ValueError:
        raise BadQuery(f"{name} must be a date, YYYY-MM-DD") from None
    if not FIRST_DAY <= day <= LAST_DAY:
        raise BadQuery(f"{name} must be a date from {FIRST_DAY} to {LAST_DAY}")
    return day


def zone(params: Mapping[str, str], name: str, default: str) -> tuple[str, ZoneInfo]:
    """A time-zone parameter (IANA name, e.g. Europe/Paris): its name and its zone."""
    key = text(params, name) or default
    if len(key) > MAX_ZONE_CHARS:
        raise BadQuery(f"{name} is not a known time zone")
    try:
        return key, ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise BadQuery(f"{name} is not a known time zone") from None


def choice(params: Mapping[str, str], name: str, options: tuple[str, ...] | Mapping[str, Any],
           default: str) -> str:
    """One of `options` (the default when absent)."""
    value = text(params, name) or default
    if value not in options:
        raise BadQuery(f"{name} must be one of {', '.join(options)}")
    return value
