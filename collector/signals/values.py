"""Attribute values as the accounting needs them: bounded counts, costs, ids and text. Pure.

Every signal reads its numbers through these, so a log record, a metric point and a span are
held to the same bounds: counts are integers from 0 to MAX_TOKEN_COUNT (integral doubles and
digit strings accepted, as agents send all three), costs are USD from 0 to MAX_COST_USD, and
anything else rejects the record with a message naming the attribute.
"""

from __future__ import annotations

import math
from typing import Any

# Bounds that keep every stored number exact: SQLite integers are signed 64-bit, and a sum that
# passes 2**63 silently becomes a float. No call uses a trillion tokens or costs a billion USD;
# with these caps a session needs millions of absurd records before its sums could overflow.
MAX_TOKEN_COUNT = 10**12
MAX_COST_USD = 1e9
MAX_TIME_NS = 2**63 - 1  # year 2262, the end of signed 64-bit nanoseconds
# Error messages returned to the exporter are capped so one bad request cannot make a huge
# answer; the count of rejected records is always exact.
MAX_ERROR_MESSAGES = 5
MAX_VALUE_IN_MESSAGE = 64


class InvalidRecord(Exception):
    """A record whose values break the conventions; it is rejected, its request is not."""


def show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= MAX_VALUE_IN_MESSAGE else shown[:MAX_VALUE_IN_MESSAGE] + "..."


def text(value: Any) -> str:
    """A string attribute as text; integers are accepted for ids. Anything else is ''."""
    if value.__class__ is str:
        result: str = value
        return result
    if value.__class__ is int:  # not bool: bool is a subclass of int, not int itself
        return str(value)
    return ""


def count(value: Any, name: str, ref: str) -> int:
    """A token count: an integer up to MAX_TOKEN_COUNT (integral doubles and digit strings
    accepted); `name` is the attribute and `ref` the record, for the error message."""
    number: int | None = None
    if value.__class__ is int:
        number = value
    elif value.__class__ is float:
        if math.isfinite(value) and value.is_integer():
            number = int(value)
    elif value.__class__ is str:
        digits = value.strip()
        if digits.isascii() and digits.isdigit():
            number = int(digits)
    if number is not None and 0 <= number <= MAX_TOKEN_COUNT:
        return number
    raise InvalidRecord(f"{ref}: {name} must be an integer from 0 to {MAX_TOKEN_COUNT}, "
                        f"got {show(value)}")


def cost_usd(value: Any, name: str, ref: str) -> float:
    """A cost in USD from 0 to MAX_COST_USD (numbers or numeric strings)."""
    number: float | None = None
    if value.__class__ is float:
        number = value
    elif value.__class__ is int:
        number = float(value)
    elif value.__class__ is str:
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not 0 <= number <= MAX_COST_USD:  # also rejects NaN
        raise InvalidRecord(f"{ref}: {name} must be a number of USD from 0 to "
                            f"{MAX_COST_USD:g}, got {show(value)}")
    return number


def bounded(value: str, name: str, ref: str, limit: int) -> str:
    """A stored text value within the byte limit, else the record is rejected."""
    if len(value) > limit or (not value.isascii() and len(value.encode()) > limit):
        raise InvalidRecord(f"{ref}: {name} is longer than {limit} bytes")
    return value


def bounded_text(value: Any, name: str, ref: str, limit: int) -> str | None:
    """A stored text value from an attribute (text or an integer id): None when absent, empty
    or of another type; longer than the byte limit rejects the record."""
    return bounded(text(value), name, ref, limit) or None


def session_id(value: str, ref: str, max_length: int) -> str:
    """A session id as stored; too long or with control characters rejects the record."""
    if len(value) > max_length:
        raise InvalidRecord(f"{ref}: session id longer than {max_length} characters")
    if not value.isprintable():
        raise InvalidRecord(f"{ref}: session id contains control characters")
    return value
