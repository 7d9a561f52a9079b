"""What a dialect is, and the one loader that validates built-in and configured dialects. Pure.

A dialect says how one agent's telemetry reads as usage: how its records are recognised, which
of them are model calls and which are turns (user prompts), the attribute names that hold the
session id, model, counts, cost, request id, prompt id and user, whether input includes cached
tokens, whether reasoning is inside output, and which signal is the source of truth when the
same call arrives as a log record, a span and a metric point without an id they share.

The built-in dialects (builtin.toml) and a config's ``[dialects.NAME]`` tables go through the
same `parse_dialects`, so a renamed attribute in an agent's next release is a config change.
This module imports only the signal names of the collector: config and the mapping both build
on it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

from collector.signals import Signal

TRACES = Signal.TRACES.value
LOGS = Signal.LOGS.value
METRICS = Signal.METRICS.value
SIGNALS = (TRACES, LOGS, METRICS)

# Token counts a dialect can name; the usage event's fields.
COUNTS = ("input", "output", "cache_read", "cache_write", "reasoning")
# Attribute roles: each names the attributes (first present wins, record before resource)
# that hold one value.
ATTRIBUTES = (
    "session_id", "model", *COUNTS, "cost_usd", "request_id", "prompt_id", "user",
)
# What one metric point can add: a token count or the cost in USD.
COST_USD = "cost_usd"
METRIC_FIELDS = (*COUNTS, COST_USD)
# The attribute holding a log record's event name (besides its event_name field and body).
EVENT_NAME = "event.name"
# Who spends, besides the dialect's user attribute: the resource's agent, its version, host.
SERVICE_NAME = "service.name"
SERVICE_VERSION = "service.version"
HOST_NAME = "host.name"
LABEL_ATTRIBUTES = (EVENT_NAME, SERVICE_NAME, SERVICE_VERSION, HOST_NAME)

_TOP_KEYS = ("service_names", "scope_names", "source", "input_includes_cache",
             "reasoning_in_output", "attributes", "calls", "turns", "metrics")
_METRIC_KEYS = ("type_attribute", "types", "field")


class DialectError(ValueError):
    """A dialect table that cannot be used; `key` is its dotted path in the config file."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Selector:
    """Records of one signal with one name, optionally with attributes of given values.

    The name is a span's name, a log record's event name (its ``event_name`` field, its
    ``event.name`` attribute or a string body: any of them may match) or a metric's name.
    """

    signal: str
    name: str
    where: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        cond = "".join(f"[{k}={v}]" for k, v in self.where)
        return f"{self.signal}:{self.name}{cond}"


@dataclass(frozen=True, slots=True)
class MetricRule:
    """How the points of one metric add to usage: each point adds its value to one field:
    `fixed` for every point (the `field` key), or the field that its `type_attribute`'s value
    maps to in `types` (points with other values add nothing)."""

    name: str
    fixed: str | None = None
    type_attribute: str | None = None
    types: Mapping[str, str] = dc_field(default_factory=dict)

    def field_for(self, attributes: Mapping[str, Any]) -> str | None:
        if self.fixed is not None:
            return self.fixed
        if self.type_attribute is None:
            return None
        value = attributes.get(self.type_attribute)
        return self.types.get(value) if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    service_names: tuple[str, ...] = ()
    scope_names: tuple[str, ...] = ()
    # The signal whose records count when a call carries no request id shared by the
    # signals; records of the others are then not usage (they repeat it).
    source: str = LOGS
    input_includes_cache: bool = True
    reasoning_in_output: bool = True
    attributes: Mapping[str, tuple[str, ...]] = dc_field(default_factory=dict)
    calls: tuple[Selector, ...] = ()
    turns: tuple[Selector, ...] = ()
    metrics: Mapping[str, MetricRule] = dc_field(default_factory=dict)
    # Every attribute name the dialect reads from a log record or span (its roles, its
    # selectors' conditions, the event name): the others need not be decoded.
    read_attributes: frozenset[str] = dc_field(init=False, compare=False, repr=False,
                                               default=frozenset())
    # Whether one call may arrive on several signals: only then is a request id its identity
    # (otherwise the record's own key serves, and it does not depend on the session).
    shared_calls: bool = dc_field(init=False, compare=False, repr=False, default=False)
    # Whether one turn may arrive on several signals: then the span context (else the prompt
    # id) is its identity, not the record's bytes.
    shared_turns: bool = dc_field(init=False, compare=False, repr=False, default=False)
    # Whether a metric carries the cost: then token points are not priced (metric source).
    metric_cost: bool = dc_field(init=False, compare=False, repr=False, default=False)

    def __post_init__(self) -> None:
        names = {name for role in self.attributes.values() for name in role}
        names.update(k for s in self.calls + self.turns for k, _ in s.where)
        names.update(LABEL_ATTRIBUTES)
        object.__setattr__(self, "read_attributes", frozenset(names))
        object.__setattr__(self, "shared_calls", len({c.signal for c in self.calls}) > 1)
        object.__setattr__(self, "shared_turns", len({t.signal for t in self.turns}) > 1)
        object.__setattr__(self, "metric_cost", any(
            r.fixed == COST_USD or COST_USD in r.types.values() for r in self.metrics.values()))

    def names_for(self, role: str) -> tuple[str, ...]:
        return self.attributes.get(role, ())


    def matches(self, service_name: str, scope_name: str) -> bool:
        """Recognised by the resource's service.name or the scope's name (glob patterns)."""
        return (any(fnmatch.fnmatchcase(service_name, p) for p in self.service_names)
                or any(fnmatch.fnmatchcase(scope_name, p) for p in self.scope_names))

    def summary(self) -> dict[str, Any]:
        """The effective dialect as plain data (what `collector check-config` prints)."""
        return {
            "service_names": list(self.service_names),
            "scope_names": list(self.scope_names),
            "source": self.source,
            "input_includes_cache": self.input_includes_cache,
            "reasoning_in_output": self.reasoning_in_output,
            "attributes": {k: list(v) for k, v in self.attributes.items()},
            "calls": [str(s) for s in self.calls],
            "turns": [str(s) for s in self.turns],
            "metrics": {name: _metric_summary(rule) for name, rule in self.metrics.items()},
        }


def _metric_summary(rule: MetricRule) -> dict[str, Any]:
    if rule.fixed is not None:
        return {"field": rule.fixed}
    return {"type_attribute": rule.type_attribute, "types": dict(rule.types)}


def merge_tables(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A configured dialect over a built-in one of the same name: each key given replaces the
    built-in's, and inside `attributes` and `metrics` each entry given replaces that entry
    only, so renaming one attribute takes one line."""
    merged = dict(base)
    for key, value in override.items():
        if key in ("attributes", "metrics") and isinstance(value, Mapping) \
                and isinstance(base.get(key), Mapping):
            merged[key] = {**base[key], **value}
        else:
            merged[key] = value
    return merged


def parse_dialects(tables: Mapping[str, Any], prefix: str = "dialects"
                   ) -> tuple[Dialect, ...]:
    """Validate dialect tables (name -> table); errors name the dotted key under `prefix`."""
    if not isinstance(tables, Mapping):
        raise DialectError(prefix, "must be a table of dialects")
    return tuple(parse_dialect(name, table, f"{prefix}.{name}")
                 for name, table in tables.items())


def parse_dialect(name: str, table: Any, key: str) -> Dialect:
    if not isinstance(table, Mapping):
        raise DialectError(key, "must be a table")
    if not name.strip():
        raise DialectError(key, "dialect name must not be empty")
    for item in table:
        if item not in _TOP_KEYS:
            raise DialectError(f"{key}.{item}", "unknown key")
    source = table.get("source", LOGS)
    if source not in SIGNALS:
        raise DialectError(f"{key}.source", f"must be one of {', '.join(SIGNALS)}; "
                                            f"got {source!r}")
    dialect = Dialect(
        name=name,
        service_names=_strings(table.get("service_names", []), f"{key}.service_names"),
        scope_names=_strings(table.get("scope_names", []), f"{key}.scope_names"),
        source=source,
        input_includes_cache=_bool(table.get("input_includes_cache", True),
                                   f"{key}.input_includes_cache"),
        reasoning_in_output=_bool(table.get("reasoning_in_output", True),
                                  f"{key}.reasoning_in_output"),
        attributes=_attributes(table.get("attributes", {}), f"{key}.attributes"),
        calls=_selectors(table.get("calls", []), f"{key}.calls"),
        turns=_selectors(table.get("turns", []), f"{key}.turns"),
        metrics=_metrics(table.get("metrics", {}), f"{key}.metrics"),
    )
    if not dialect.service_names and not dialect.scope_names:
        raise DialectError(key, "needs service_names or scope_names to recognise the agent")
    if not dialect.calls and not dialect.turns and not dialect.metrics:
        raise DialectError(key, "names no records: give calls, turns or metrics")
    if not dialect.names_for("session_id"):
        raise DialectError(f"{key}.attributes.session_id",
                           "missing: the attribute(s) holding the session id")
    for selector in dialect.calls + dialect.turns:
        if selector.signal == METRICS:
            raise DialectError(f"{key}.{'calls' if selector in dialect.calls else 'turns'}",
                               f"{selector}: metric points go in {key}.metrics")
    return dialect


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DialectError(key, f"must be a list of non-empty strings; got {value!r}")
    return tuple(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise DialectError(key, f"must be true or false; got {value!r}")
    return value


def _attributes(table: Any, key: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(table, Mapping):
        raise DialectError(key, "must be a table of role = [attribute names]")
    out: dict[str, tuple[str, ...]] = {}
    for role, names in table.items():
        if role not in ATTRIBUTES:
            raise DialectError(f"{key}.{role}",
                               f"unknown role; roles are {', '.join(ATTRIBUTES)}")
        out[role] = _strings(names, f"{key}.{role}") if names != [] else ()
    return out


def _selectors(value: Any, key: str) -> tuple[Selector, ...]:
    """Selectors are written `signal:name`, optionally followed by `[attribute=value]`s,
    e.g. "logs:codex.sse_event[event.kind=response.completed]"."""
    texts = _strings(value, key) if value != [] else ()
    return tuple(parse_selector(t, key) for t in texts)


def parse_selector(spec: str, key: str) -> Selector:
    signal, sep, rest = spec.partition(":")
    if not sep or signal not in SIGNALS:
        raise DialectError(key, f"{spec!r}: expected signal:name with signal one of "
                                f"{', '.join(SIGNALS)}")
    name, _, conds = rest.partition("[")
    name = name.strip()
    if not name:
        raise DialectError(key, f"{spec!r}: the record name is empty")
    where: list[tuple[str, str]] = []
    if conds:
        for part in ("[" + conds).split("["):
            if not part:
                continue
            if not part.endswith("]") or "=" not in part:
                raise DialectError(key, f"{spec!r}: conditions are [attribute=value]")
            attr, _, wanted = part[:-1].partition("=")
            if not attr.strip():
                raise DialectError(key, f"{spec!r}: a condition names no attribute")
            where.append((attr.strip(), wanted.strip()))
    return Selector(signal, name, tuple(where))


def _metrics(table: Any, key: str) -> dict[str, MetricRule]:
    if not isinstance(table, Mapping):
        raise DialectError(key, "must be a table of metric name = rule")
    rules: dict[str, MetricRule] = {}
    for name, rule in table.items():
        rkey = f'{key}."{name}"'
        if not isinstance(rule, Mapping):
            raise DialectError(rkey, "must be a table with field, or type_attribute and types")
        for item in rule:
            if item not in _METRIC_KEYS:
                raise DialectError(f"{rkey}.{item}", "unknown key")
        fixed = rule.get("field")
        if fixed is not None:
            if fixed not in METRIC_FIELDS:
                raise DialectError(f"{rkey}.field",
                                   f"must be one of {', '.join(METRIC_FIELDS)}; got {fixed!r}")
            if "types" in rule or "type_attribute" in rule:
                raise DialectError(rkey, "give either field or type_attribute and types")
            rules[name] = MetricRule(name, fixed=fixed)
            continue
        type_attribute = rule.get("type_attribute")
        types = rule.get("types")
        if not isinstance(type_attribute, str) or not type_attribute.strip():
            raise DialectError(f"{rkey}.type_attribute",
                               "missing: the point attribute naming the token type")
        if not isinstance(types, Mapping) or not types:
            raise DialectError(f"{rkey}.types", "must map attribute values to fields")
        for value, target in types.items():
            if target not in METRIC_FIELDS:
                raise DialectError(f"{rkey}.types.{value}",
                                   f"must be one of {', '.join(METRIC_FIELDS)}; got {target!r}")
        rules[name] = MetricRule(name, type_attribute=type_attribute, types=dict(types))
    return rules
