"""`[[budgets]]` and `[[alerts.sinks]]`: what the fleet may spend and whom to tell.

A budget's `name` is its durable identity: spend and recorded crossings are stored under it,
so renaming a budget starts it afresh, and two budgets of one name would share (and corrupt)
one another's rows. Hence names are required and unique. Everything an alert needs to be
delivered is checked here, at start, so a typo in a sink is a config error rather than a
crossing recorded for a sink that can never answer.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

PERIODS = ("day", "week", "month")
DEFAULT_PERIOD = "month"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_THRESHOLDS = (0.8, 1.0)
# A threshold is a share of the amount; ten times is far past any useful warning and bounds typos
# such as 80 meant as 80 %.
MAX_THRESHOLD = 10.0
FLEET_SCOPE = "fleet"
# The dimensions every session has without [attribution] (collector_session_labels).
BUILTIN_DIMENSIONS = ("agent", "user", "host", "credential")
SINK_KINDS = ("webhook", "slack")
URL_SCHEMES = ("http", "https")
MAX_SECRET_FILE_BYTES = 4096

_BUDGET_KEYS = frozenset({"name", "scope", "dimension", "value", "period", "timezone",
                          "amount_usd", "thresholds"})
_SINK_KEYS = frozenset({"name", "kind", "url", "headers", "secret_file"})


@dataclass(frozen=True, slots=True)
class Budget:
    """One `[[budgets]]` entry. `dimension` None: the whole fleet. `value` may be a glob
    (fnmatch), in which case every matching value is its own budget instance."""

    name: str
    amount_usd: float
    dimension: str | None = None
    value: str = "*"
    period: str = DEFAULT_PERIOD
    timezone: str = DEFAULT_TIMEZONE
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS

    @property
    def is_glob(self) -> bool:
        return self.dimension is not None and any(c in self.value for c in "*?[")


@dataclass(frozen=True, slots=True)
class AlertSink:
    """A `[[alerts.sinks]]` entry. `secret` (read from secret_file) signs deliveries; neither
    it nor header values are ever logged or printed."""

    name: str
    kind: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    secret: str | None = field(default=None, repr=False)


def _named_tables(items: Any, source: str, key: str, keys: frozenset[str], what: str
                  ) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(key prefix, table, name) of each table of an array of tables whose names are its
    identity: unknown keys, a missing name and a name given twice are errors."""
    from collector.config import ConfigError

    if not isinstance(items, list):
        raise ConfigError(source, key, f"must be an array of tables ([[{key}]])")
    seen: set[str] = set()
    for index, item in enumerate(items):
        prefix = f"{key}[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(source, prefix, "must be a table")
        for name in item:
            if name not in keys:
                raise ConfigError(source, f"{prefix}.{name}", "unknown key")
        name = _text(source, f"{prefix}.name", item.get("name"), required=True)
        if name in seen:
            raise ConfigError(source, f"{prefix}.name", f"{name!r} names another {what} too")
        seen.add(name)
        yield prefix, item, name


def parse_budgets(items: Any, *, source: str, dimensions: Sequence[str]) -> tuple[Budget, ...]:
    """`items`: the file's `budgets` value. `dimensions`: every dimension a budget may name
    (built-in and configured). Raises collector.config.ConfigError naming the key."""
    from collector.config import ConfigError  # the package imports this module

    budgets: list[Budget] = []
    for prefix, item, name in _named_tables(items, source, "budgets", _BUDGET_KEYS, "budget"):
        dimension: str | None
        if "scope" in item:
            if item["scope"] != FLEET_SCOPE:
                raise ConfigError(source, f"{prefix}.scope",
                                  f'must be "{FLEET_SCOPE}" (or use dimension and value); '
                                  f"got {item['scope']!r}")
            if "dimension" in item or "value" in item:
                raise ConfigError(source, f"{prefix}.scope",
                                  "a fleet budget takes no dimension or value")
            dimension, value = None, "*"
        else:
            dimension = _text(source, f"{prefix}.dimension", item.get("dimension"),
                              required=True, hint='(or scope = "fleet")')
            if dimension not in dimensions:
                raise ConfigError(source, f"{prefix}.dimension",
                                  f"unknown dimension {dimension!r}; known: "
                                  f"{', '.join(dimensions)}")
            value = _text(source, f"{prefix}.value", item.get("value", "*"), required=True)
        period = item.get("period", DEFAULT_PERIOD)
        if period not in PERIODS:
            raise ConfigError(source, f"{prefix}.period",
                              f"must be one of {', '.join(PERIODS)}; got {period!r}")
        tz = item.get("timezone", DEFAULT_TIMEZONE)
        if not isinstance(tz, str) or not _known_zone(tz):
            raise ConfigError(source, f"{prefix}.timezone",
                              f"not an IANA time zone (e.g. Europe/Berlin); got {tz!r}")
        amount = item.get("amount_usd")
        if amount is None:
            raise ConfigError(source, f"{prefix}.amount_usd", "missing (USD per period)")
        if (isinstance(amount, bool) or not isinstance(amount, int | float)
                or not math.isfinite(amount) or amount <= 0):
            raise ConfigError(source, f"{prefix}.amount_usd",
                              f"must be a number > 0; got {amount!r}")
        budgets.append(Budget(name=name, amount_usd=float(amount), dimension=dimension,
                              value=value, period=period, timezone=tz,
                              thresholds=_thresholds(source, f"{prefix}.thresholds",
                                                     item.get("thresholds",
                                                              list(DEFAULT_THRESHOLDS)))))
    return tuple(budgets)


def parse_sinks(items: Any, *, source: str, base_dir: Path) -> tuple[AlertSink, ...]:
    """`items`: the file's `alerts.sinks` value."""
    from collector.config import ConfigError

    sinks: list[AlertSink] = []
    for prefix, item, name in _named_tables(items, source, "alerts.sinks", _SINK_KEYS, "sink"):
        kind = item.get("kind")
        if kind not in SINK_KINDS:
            raise ConfigError(source, f"{prefix}.kind",
                              f"must be one of {', '.join(SINK_KINDS)}; got {kind!r}")
        url = _text(source, f"{prefix}.url", item.get("url"), required=True)
        parts = urlsplit(url)
        if parts.scheme not in URL_SCHEMES or not parts.hostname:
            # Quote only the scheme: a URL may carry a token (Slack's do).
            raise ConfigError(source, f"{prefix}.url",
                              f"must be an http:// or https:// URL with a host; "
                              f"got scheme {parts.scheme!r}")
        headers = item.get("headers", {})
        if not isinstance(headers, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ConfigError(source, f"{prefix}.headers", "must be a table of strings")
        secret = None
        secret_file = item.get("secret_file")
        if secret_file is not None:
            secret = _read_secret(source, f"{prefix}.secret_file", base_dir, secret_file)
        sinks.append(AlertSink(name=name, kind=kind, url=url, headers=dict(headers),
                               secret=secret))
    return tuple(sinks)


def _text(source: str, key: str, value: Any, *, required: bool, hint: str = "") -> str:
    from collector.config import ConfigError

    if value is None and required:
        raise ConfigError(source, key, f"missing {hint}".rstrip())
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, f"must be a non-empty string; got {value!r}")
    return value


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _thresholds(source: str, key: str, value: Any) -> tuple[float, ...]:
    from collector.config import ConfigError

    if not isinstance(value, list) or not value:
        raise ConfigError(source, key, "must be a non-empty array of fractions, e.g. [0.8, 1.0]")
    out: set[float] = set()
    for item in value:
        if (isinstance(item, bool) or not isinstance(item, int | float)
                or not math.isfinite(item) or not 0 < item <= MAX_THRESHOLD):
            raise ConfigError(source, key,
                              f"every threshold must be in (0, {MAX_THRESHOLD:g}]; got {item!r}")
        out.add(float(item))
    return tuple(sorted(out))


def _read_secret(source: str, key: str, base_dir: Path, value: Any) -> str:
    from collector.config import ConfigError

    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, "must name a file")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise ConfigError(source, key, f"{path} is too large for a secret")
    try:
        secret = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(source, key, f"{path}: not UTF-8 text") from None
    if not secret or "\n" in secret:
        raise ConfigError(source, key, f"{path}: must hold the secret on one line")
    return secret
