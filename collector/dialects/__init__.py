"""What each agent's telemetry names mean, as data: built-in dialects plus a config's own.

`effective_dialects` merges a config's ``[dialects.NAME]`` tables over the built-ins (see
model.merge_tables) and validates the result with the same loader, so a built-in and a user's
dialect cannot differ in what is checked. `DialectSet` answers, per resource and scope, which
dialect (if any) reads their records; no I/O beyond reading builtin.toml from the package.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from collector.dialects.model import Dialect, merge_tables, parse_dialect

BUILTIN_FILE = "builtin.toml"
# Distinct (service.name, scope name) pairs remembered; both come from the network.
MAX_CACHED_MATCHES = 4096


@cache
def builtin_tables() -> dict[str, Any]:
    text = resources.files(__package__).joinpath(BUILTIN_FILE).read_text(encoding="utf-8")
    return tomllib.loads(text)


def effective_dialects(configured: Mapping[str, Any] | None = None,
                       prefix: str = "dialects") -> tuple[Dialect, ...]:
    """Built-ins overridden key by key by configured tables of the same name, then the
    configured new ones; raises model.DialectError naming the configured key."""
    configured = configured or {}
    out: list[Dialect] = []
    for name, table in builtin_tables().items():
        if name in configured:
            override = configured[name]
            key = f"{prefix}.{name}"
            if not isinstance(override, Mapping):
                return (parse_dialect(name, override, key),)  # raises: not a table
            out.append(parse_dialect(name, merge_tables(table, override), key))
        else:
            out.append(parse_dialect(name, table, f"(built-in) {name}"))
    for name, table in configured.items():
        if name not in builtin_tables():
            out.append(parse_dialect(name, table, f"{prefix}.{name}"))
    return tuple(out)


class DialectSet:
    """Finds the dialect for a (service.name, scope name) pair; the first that matches wins."""

    def __init__(self, dialects: tuple[Dialect, ...]) -> None:
        self.dialects = dialects
        self._matches: dict[tuple[str, str], Dialect | None] = {}

    def __bool__(self) -> bool:
        return bool(self.dialects)

    def find(self, service_name: str, scope_name: str) -> Dialect | None:
        key = (service_name, scope_name)
        try:
            return self._matches[key]
        except KeyError:
            pass
        found = next((d for d in self.dialects if d.matches(service_name, scope_name)), None)
        if len(self._matches) < MAX_CACHED_MATCHES:
            self._matches[key] = found
        return found
