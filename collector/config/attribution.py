"""`[attribution]`: the dimensions kept per session beside agent, user, host and credential.

Organisations tag their agents' telemetry (`OTEL_RESOURCE_ATTRIBUTES=team.id=platform,...`)
with whatever their finance team slices by, so the dimensions are config, not code: each is a
name and the attributes it is read from, record first, then resource, first present wins.

Each dimension's values live in rows keyed by (session, dimension name), so adding, removing
or reordering dimensions needs no migration: a dimension added later is simply empty for the
sessions that came before it, and one removed keeps its rows (unread) until it is back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Names a dimension cannot take: the reports' and groups' own (a report of that name would be
# ambiguous), and the fleet view's query parameters (a dimension is a filter of its own name).
RESERVED_NAMES = frozenset({
    "agent", "user", "host", "credential", "model", "session", "hour", "fleet",
    "daily", "monthly", "status", "kind", "channel", "id", "q", "sort", "order", "limit",
    "cursor", "back", "field", "since", "until", "tz", "dimensions", "complete"})
# A dimension's name is a report kind, an /api/who path segment, a CSV column and a metric
# label: kept to identifier characters so that it is safe and the same in every one of them.
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Each dimension costs an attribute lookup per record and a row per session that has it.
MAX_DIMENSIONS = 16
MAX_ATTRIBUTES_PER_DIMENSION = 8
MAX_ATTRIBUTE_NAME_LENGTH = 256


@dataclass(frozen=True, slots=True)
class Dimension:
    """A dimension and the attributes it is read from, in the order they are tried."""

    name: str
    attributes: tuple[str, ...]


# The tags the agents' own monitoring guides tell organisations to set.
DEFAULT_DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("team", ("team.id", "team")),
    Dimension("department", ("department",)),
    Dimension("cost_center", ("cost_center",)),
    Dimension("project", ("project", "project.name", "repository")),
)


def parse_attribution(value: Any, *, source: str) -> tuple[Dimension, ...]:
    """`value`: the file's `attribution` table (absent: the defaults). `[attribution.dimensions]`
    maps each name to its attribute list and replaces the defaults whole, so the file says
    exactly which dimensions are kept. Raises collector.config.ConfigError naming the key."""
    from collector.config import ConfigError  # the package imports this module

    if value is None:
        return DEFAULT_DIMENSIONS
    if not isinstance(value, Mapping):
        raise ConfigError(source, "attribution", "must be a table")
    for key in value:
        if key != "dimensions":
            raise ConfigError(source, f"attribution.{key}", "unknown key")
    table = value.get("dimensions")
    if table is None:
        return DEFAULT_DIMENSIONS
    if not isinstance(table, Mapping):
        raise ConfigError(source, "attribution.dimensions",
                          'must be a table of name = ["attribute", ...]')
    if len(table) > MAX_DIMENSIONS:
        raise ConfigError(source, "attribution.dimensions",
                          f"at most {MAX_DIMENSIONS} dimensions; got {len(table)}")
    dimensions: list[Dimension] = []
    for name, attributes in table.items():
        key = f"attribution.dimensions.{name}"
        if not NAME_PATTERN.fullmatch(name):
            raise ConfigError(source, key, "a dimension name is a lowercase letter followed "
                              "by up to 31 lowercase letters, digits or underscores")
        if name in RESERVED_NAMES:
            raise ConfigError(source, key, f"{name!r} is built in; choose another name")
        if isinstance(attributes, str):
            attributes = [attributes]
        if (not isinstance(attributes, list) or not attributes
                or len(attributes) > MAX_ATTRIBUTES_PER_DIMENSION):
            raise ConfigError(source, key, f"must be a list of 1 to "
                              f"{MAX_ATTRIBUTES_PER_DIMENSION} attribute names")
        for attribute in attributes:
            if (not isinstance(attribute, str) or not attribute.strip()
                    or len(attribute) > MAX_ATTRIBUTE_NAME_LENGTH
                    or not attribute.isprintable()):
                raise ConfigError(source, key, f"attribute names must be non-empty printable "
                                  f"strings of at most {MAX_ATTRIBUTE_NAME_LENGTH} characters; "
                                  f"got {attribute!r}")
        if len(set(attributes)) != len(attributes):
            raise ConfigError(source, key, "names an attribute twice")
        dimensions.append(Dimension(name, tuple(attributes)))
    return tuple(dimensions)


def dimension_names(dimensions: tuple[Dimension, ...]) -> tuple[str, ...]:
    return tuple(d.name for d in dimensions)
