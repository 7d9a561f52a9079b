"""A configured model price: the one name the config (which parses `[pricing."MODEL"]`) and the
pricing (which applies it) both need, below both, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. Cache rates default to the input rate (no discount assumed)."""

    input: float
    output: float
    cache_read: float
    cache_write: float
