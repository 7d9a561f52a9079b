"""Configuration: read once at the edge, validated, then passed down as frozen values.

Every key either works and is tested or does not exist; an unknown key is an error that names
the key and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.accounting.prices import ModelPrice
from collector.config.attribution import DEFAULT_DIMENSIONS, Dimension, parse_attribution
from collector.config.auth import (
    AuthConfig,
    WebAccess,
    parse_allowed_hosts,
    parse_auth,
    parse_web_access,
    read_token_file,
)
from collector.config.budgets import (
    BUILTIN_DIMENSIONS,
    AlertSink,
    Budget,
    parse_budgets,
    parse_sinks,
)
from collector.config.connections import SCHEMA as CONNECTIONS_SCHEMA
from collector.config.connections import ConnectionLimits, parse_connections
from collector.dialects import effective_dialects
from collector.dialects.model import Dialect, DialectError
from collector.signals.slots import ATTRIBUTE_SLOTS

DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024
DEFAULT_SQLITE_PATH = "data/agent_sessions.db"
STORAGE_BACKENDS = ("sqlite", "postgres")
DEFAULT_STORAGE_BACKEND = "sqlite"
# libpq waits at least 2 s for a connection whatever it is told (a smaller value means 2).
DEFAULT_POSTGRES_CONNECT_TIMEOUT_S = 2
MIN_POSTGRES_CONNECT_TIMEOUT_S = 2
# A flush that has no answer from PostgreSQL within this is abandoned (its connection cut) and
# answered retryably. With the connect timeout after it and the pipeline's first retry, an
# export waiting on a hung or unreachable server is answered 503 in about 7 s at most: inside
# an OTLP exporter's 10 s timeout, so it hears "retry" rather than timing out.
DEFAULT_POSTGRES_COMMIT_TIMEOUT_S = 4
MAX_PASSWORD_FILE_BYTES = 4096
# flush.interval_ms: the most a batch may wait for more requests before its commit starts.
# 0: commit as soon as the writer is free (group commit: requests arriving during a commit
# form the next one), so an idle collector answers after one commit; only the pipeline's
# adaptive wait (collector.pipeline.ADAPTIVE_GATHER_COMMITS) holds a batch back, for requests
# that were in flight around the last commit and are expected back. A larger value trades
# answer latency for fewer, larger commits (fewer fsyncs: worth it on a slow disk). Before
# group commit this key was a fixed flush period (200 ms by default); such configs keep working,
# with each batch then waiting at most that long.
DEFAULT_FLUSH_INTERVAL_MS = 0
DEFAULT_MAX_PENDING_SPANS = 200_000
DEFAULT_STALE_AFTER_S = 3600
# How long usage without a session id waits for a span of its trace to name one.
DEFAULT_RESOLVE_WINDOW_S = 600
DEFAULT_DEDUPE_RETENTION_S = 24 * 3600
MIN_DEDUPE_RETENTION_S = 24 * 3600  # the exactly-once promise: at least a day
DEFAULT_AGENT_SPAN_TOKENS = False
DEFAULT_LOG_LEVEL = "info"
DEFAULT_MAX_SESSION_ID_LENGTH = 256
DEFAULT_MAX_SPANS_PER_REQUEST = 10_000
DEFAULT_MAX_ATTRIBUTES_PER_SPAN = 256
DEFAULT_MAX_ATTRIBUTE_VALUE_BYTES = 8192
DEFAULT_MAX_VALUE_DEPTH = 8
# The operations listener (/metrics, /healthz, /readyz); 8888 is where the OpenTelemetry
# Collector serves its own metrics, so dashboards and scrape configs expect it.
DEFAULT_OPS_ENDPOINT = "127.0.0.1:8888"
DEFAULT_WEB_ENDPOINT = "127.0.0.1:8889"  # the fleet view; beside the ops listener
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
LOG_LEVELS = ("debug", "info", "warning", "error")
PRICE_KEYS = ("input", "output", "cache_read", "cache_write")


# Config.source when no file was given: error messages name this instead of a file.
DEFAULTS_SOURCE = "<defaults: no --config given>"


class ConfigError(Exception):
    """A configuration problem, worded for the person who edits the file."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ReceiverConfig:
    grpc_endpoint: Endpoint | None = Endpoint("127.0.0.1", 4317)
    http_endpoint: Endpoint | None = Endpoint("127.0.0.1", 4318)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on everything an exporter controls (the body size is in ReceiverConfig)."""

    max_spans_per_request: int = DEFAULT_MAX_SPANS_PER_REQUEST
    max_attributes_per_span: int = DEFAULT_MAX_ATTRIBUTES_PER_SPAN
    max_attribute_value_bytes: int = DEFAULT_MAX_ATTRIBUTE_VALUE_BYTES
    max_value_depth: int = DEFAULT_MAX_VALUE_DEPTH


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None


@dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Where and how the postgres backend connects. `url` never holds a password: it comes
    from `password` (postgres_password_file), else libpq's PGPASSWORD or .pgpass."""

    url: str
    password: str | None = field(default=None, repr=False)
    connect_timeout_s: int = DEFAULT_POSTGRES_CONNECT_TIMEOUT_S
    commit_timeout_s: int = DEFAULT_POSTGRES_COMMIT_TIMEOUT_S


@dataclass(frozen=True, slots=True)
class Config:
    source: str = "<defaults>"
    receivers: ReceiverConfig = field(default_factory=ReceiverConfig)
    storage_backend: str = DEFAULT_STORAGE_BACKEND
    sqlite_path: Path = Path(DEFAULT_SQLITE_PATH)
    postgres: PostgresConfig | None = None  # set when storage_backend is "postgres"
    flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS
    max_pending_spans: int = DEFAULT_MAX_PENDING_SPANS
    stale_after_s: int = DEFAULT_STALE_AFTER_S
    dedupe_retention_s: int = DEFAULT_DEDUPE_RETENTION_S
    resolve_window_s: int = DEFAULT_RESOLVE_WINDOW_S
    agent_span_tokens: bool = DEFAULT_AGENT_SPAN_TOKENS
    max_session_id_length: int = DEFAULT_MAX_SESSION_ID_LENGTH
    log_level: str = DEFAULT_LOG_LEVEL
    pricing: Mapping[str, ModelPrice] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    # Extra attribute names read as if they were a known one: alias -> known attribute.
    aliases: Mapping[str, str] = field(default_factory=dict)
    auth_token: str | None = field(default=None, repr=False)
    # Named tokens and their roles (collector.config.auth); reloaded without restart.
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig | None = None
    # The web listener's TLS, plaintext opt-in and Host names; the OTLP/HTTP receiver's.
    web_access: WebAccess = field(default_factory=WebAccess)
    otlp_allowed_hosts: tuple[str, ...] = ()
    ops_endpoint: Endpoint | None = Endpoint("127.0.0.1", 8888)
    web_endpoint: Endpoint | None = Endpoint("127.0.0.1", 8889)
    # The agents' dialects in effect: the built-ins with the file's [dialects.NAME] over them.
    dialects: tuple[Dialect, ...] = field(default_factory=effective_dialects)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    # Who spends beyond agent, user, host and credential ([attribution]).
    dimensions: tuple[Dimension, ...] = DEFAULT_DIMENSIONS
    budgets: tuple[Budget, ...] = ()
    alert_sinks: tuple[AlertSink, ...] = ()


# The schema of the file: section -> key -> expected kind. Tables of arbitrary names (pricing)
# are handled separately.
_SCHEMA: dict[str, dict[str, type]] = {
    "receivers.otlp": {"grpc_endpoint": str, "http_endpoint": str, "max_request_bytes": int,
                       "allowed_hosts": list},
    "storage": {"backend": str, "sqlite_path": str, "postgres_url": str,
                "postgres_password_file": str, "postgres_connect_timeout_s": int,
                "postgres_commit_timeout_s": int},
    "flush": {"interval_ms": int, "max_pending_spans": int},
    "sessions": {"stale_after_s": int, "max_id_length": int, "resolve_window_s": int},
    "dedupe": {"retention_s": int},
    "mapping": {"agent_span_tokens": bool, "aliases": dict},
    "log": {"level": str},
    "limits": {"max_spans_per_request": int, "max_attributes_per_span": int,
               "max_attribute_value_bytes": int, "max_value_depth": int},
    "auth": {"token_file": str, "tokens": list},
    "tls": {"cert_file": str, "key_file": str, "client_ca_file": str},
    "ops": {"endpoint": str},
    "web": {"endpoint": str, "tls": dict, "allow_plaintext": bool, "allowed_hosts": list},
    "connections": CONNECTIONS_SCHEMA,
}


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; every failure is a ConfigError naming the file."""
    p = Path(path)
    source = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(source, "", "is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"invalid TOML: {exc}") from None
    return parse_config(doc, source=source, base_dir=p.resolve().parent)


def default_config(cwd: Path | None = None) -> Config:
    """The documented defaults, as every command runs without --config: relative paths (the
    database, data/agent_sessions.db) resolved under the working directory, so `serve`,
    `sessions` and `report` started in one directory agree on one database."""
    return parse_config({}, source=DEFAULTS_SOURCE, base_dir=Path.cwd() if cwd is None else cwd)


def parse_config(doc: Mapping[str, Any], *, source: str, base_dir: Path) -> Config:
    """Validate a parsed document. Relative paths are resolved against `base_dir`."""
    values = _flatten(doc, source)
    dimensions = parse_attribution(doc.get("attribution"), source=source)
    budgets = parse_budgets(doc.get("budgets", []), source=source,
                            dimensions=(*BUILTIN_DIMENSIONS, *(d.name for d in dimensions)))
    alerts = doc.get("alerts", {})
    if not isinstance(alerts, dict):
        raise ConfigError(source, "alerts", "must be a table")
    for key in alerts:
        if key != "sinks":
            raise ConfigError(source, f"alerts.{key}", "unknown key")
    sinks = parse_sinks(alerts.get("sinks", []), source=source, base_dir=base_dir)
    pricing = _parse_pricing(doc.get("pricing", {}), source)
    try:
        dialects = effective_dialects(doc.get("dialects", {}))
    except DialectError as exc:
        raise ConfigError(source, exc.key, exc.problem) from None

    def get(key: str, default: Any) -> Any:
        return values.get(key, default)

    defaults = ReceiverConfig()
    grpc = _parse_endpoint(source, "receivers.otlp.grpc_endpoint",
                           get("receivers.otlp.grpc_endpoint", str(defaults.grpc_endpoint)))
    http = _parse_endpoint(source, "receivers.otlp.http_endpoint",
                           get("receivers.otlp.http_endpoint", str(defaults.http_endpoint)))
    if grpc is None and http is None:
        raise ConfigError(source, "receivers.otlp",
                          "both grpc_endpoint and http_endpoint are disabled; enable at least one")
    if grpc is not None and http is not None and grpc == http:
        raise ConfigError(source, "receivers.otlp.http_endpoint",
                          f"same address as grpc_endpoint ({grpc})")

    ops = _parse_endpoint(source, "ops.endpoint", get("ops.endpoint", DEFAULT_OPS_ENDPOINT))
    if ops is not None and ops in (grpc, http):
        raise ConfigError(source, "ops.endpoint", f"same address as an OTLP receiver ({ops})")

    web = _parse_endpoint(source, "web.endpoint", get("web.endpoint", DEFAULT_WEB_ENDPOINT))
    if web is not None and web in (grpc, http, ops):
        raise ConfigError(source, "web.endpoint", f"same address as another listener ({web})")
    auth_token = _read_token(source, base_dir, get("auth.token_file", ""))
    auth = parse_auth(values, source=source, base_dir=base_dir)
    tls = _parse_tls(source, base_dir, values)
    web_access = parse_web_access(values, source=source, base_dir=base_dir, tls=tls)
    if web is not None and not auth.enabled and not _is_loopback(web.host):
        # Spend, users and hosts of a whole fleet are not for everyone on the network.
        raise ConfigError(source, "web.endpoint",
                          f"{web} is not a loopback address; set auth.token_file (or "
                          "[[auth.tokens]]) to serve the fleet view beyond this machine")
    if (web is not None and web_access.tls is None and not web_access.allow_plaintext
            and not _is_loopback(web.host)):
        # The sign-in form carries a token: not in clear text over a network.
        raise ConfigError(source, "web.endpoint",
                          f"{web} is not a loopback address and the fleet view has no TLS; "
                          "set [tls] (or [web.tls]), or web.allow_plaintext = true if a "
                          "TLS-terminating proxy is in front")

    sqlite_path = get("storage.sqlite_path", DEFAULT_SQLITE_PATH)
    if not sqlite_path.strip():
        raise ConfigError(source, "storage.sqlite_path", "must not be empty")
    path = Path(sqlite_path).expanduser()
    if not path.is_absolute():
        path = base_dir / path

    backend = get("storage.backend", DEFAULT_STORAGE_BACKEND)
    if backend not in STORAGE_BACKENDS:
        raise ConfigError(source, "storage.backend",
                          f"must be one of {', '.join(STORAGE_BACKENDS)}; got {backend!r}")
    postgres = _parse_postgres(source, base_dir, values, backend)

    level = get("log.level", DEFAULT_LOG_LEVEL).lower()
    if level not in LOG_LEVELS:
        raise ConfigError(source, "log.level",
                          f"must be one of {', '.join(LOG_LEVELS)}; got {level!r}")

    return Config(
        source=source,
        receivers=ReceiverConfig(
            grpc_endpoint=grpc,
            http_endpoint=http,
            max_request_bytes=_positive(source, "receivers.otlp.max_request_bytes",
                                        get("receivers.otlp.max_request_bytes",
                                            DEFAULT_MAX_REQUEST_BYTES)),
        ),
        storage_backend=backend,
        sqlite_path=path,
        postgres=postgres,
        flush_interval_ms=_at_least(source, "flush.interval_ms",
                                    get("flush.interval_ms", DEFAULT_FLUSH_INTERVAL_MS), 0),
        max_pending_spans=_positive(source, "flush.max_pending_spans",
                                    get("flush.max_pending_spans", DEFAULT_MAX_PENDING_SPANS)),
        stale_after_s=_positive(source, "sessions.stale_after_s",
                                get("sessions.stale_after_s", DEFAULT_STALE_AFTER_S)),
        max_session_id_length=_positive(source, "sessions.max_id_length",
                                        get("sessions.max_id_length",
                                            DEFAULT_MAX_SESSION_ID_LENGTH)),
        dedupe_retention_s=_at_least(source, "dedupe.retention_s",
                                     get("dedupe.retention_s", DEFAULT_DEDUPE_RETENTION_S),
                                     MIN_DEDUPE_RETENTION_S),
        resolve_window_s=_resolve_window(source, get("sessions.resolve_window_s",
                                                     DEFAULT_RESOLVE_WINDOW_S),
                                         get("dedupe.retention_s", DEFAULT_DEDUPE_RETENTION_S)),
        agent_span_tokens=get("mapping.agent_span_tokens", DEFAULT_AGENT_SPAN_TOKENS),
        log_level=level,
        pricing=pricing,
        limits=Limits(**{
            name: _positive(source, f"limits.{name}", get(f"limits.{name}", default))
            for name, default in (
                ("max_spans_per_request", DEFAULT_MAX_SPANS_PER_REQUEST),
                ("max_attributes_per_span", DEFAULT_MAX_ATTRIBUTES_PER_SPAN),
                ("max_attribute_value_bytes", DEFAULT_MAX_ATTRIBUTE_VALUE_BYTES),
                ("max_value_depth", DEFAULT_MAX_VALUE_DEPTH),
            )
        }),
        aliases=_parse_aliases(source, get("mapping.aliases", {})),
        auth_token=auth_token,
        auth=auth,
        tls=tls,
        web_access=web_access,
        otlp_allowed_hosts=parse_allowed_hosts(source, "receivers.otlp.allowed_hosts",
                                               get("receivers.otlp.allowed_hosts", [])),
        ops_endpoint=ops,
        web_endpoint=web,
        dialects=dialects,
        connections=parse_connections(values, source),
        dimensions=dimensions,
        budgets=budgets,
        alert_sinks=sinks,
    )


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_aliases(source: str, table: Mapping[str, Any]) -> dict[str, str]:
    """Aliases let agents with their own attribute names be read without code changes."""
    aliases: dict[str, str] = {}
    for alias, target in table.items():
        key = f'mapping.aliases."{alias}"'
        if not isinstance(target, str):
            raise ConfigError(source, key, f"must name a known attribute; got {target!r}")
        if alias in ATTRIBUTE_SLOTS:
            raise ConfigError(source, key, "is already a known attribute")
        if target not in ATTRIBUTE_SLOTS:
            raise ConfigError(source, key, f"{target!r} is not an attribute the collector reads")
        aliases[alias] = target
    return aliases


def _resolve(base_dir: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def _readable(source: str, key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(source, key, f"cannot read {path}: {exc.strerror or exc}") from None


def _read_token(source: str, base_dir: Path, value: str) -> str | None:
    """The legacy single token's text, read once at start. Never logged or printed."""
    if not value.strip():
        return None
    return read_token_file(source, "auth.token_file", _resolve(base_dir, value))


def _parse_postgres(source: str, base_dir: Path, values: Mapping[str, Any],
                    backend: str) -> PostgresConfig | None:
    keys = [k for k in values if k.startswith("storage.postgres_")]
    if backend != "postgres":
        if keys:
            raise ConfigError(source, keys[0], 'only used with storage.backend = "postgres"')
        return None
    url = values.get("storage.postgres_url", "").strip()
    if not url:
        raise ConfigError(source, "storage.postgres_url",
                          'required with storage.backend = "postgres" '
                          '(e.g. "postgresql://user@host:5432/dbname")')
    # libpq's own parser (no connection is made), so what is accepted here is what connects.
    from psycopg import conninfo

    try:
        parts = conninfo.conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError
        # libpq quotes the URL, which may hold a password: the message names the key instead.
        problem = " ".join(str(exc).replace(url, "<postgres_url>").split())
        raise ConfigError(source, "storage.postgres_url",
                          f"not a PostgreSQL connection URL: {problem}") from None
    if parts.get("password"):
        raise ConfigError(source, "storage.postgres_url",
                          "must not contain a password; use storage.postgres_password_file, "
                          "PGPASSWORD or ~/.pgpass")
    password = None
    file_value = values.get("storage.postgres_password_file", "")
    if file_value.strip():
        path = _resolve(base_dir, file_value)
        raw = _readable(source, "storage.postgres_password_file", path)
        if len(raw) > MAX_PASSWORD_FILE_BYTES:
            raise ConfigError(source, "storage.postgres_password_file",
                              f"{path} is too large for a password")
        try:
            password = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise ConfigError(source, "storage.postgres_password_file",
                              f"{path}: not UTF-8 text") from None
        if not password or "\n" in password:
            raise ConfigError(source, "storage.postgres_password_file",
                              f"{path}: must hold the password on one line")
    return PostgresConfig(
        url=url,
        password=password,
        connect_timeout_s=_at_least(source, "storage.postgres_connect_timeout_s", values.get(
            "storage.postgres_connect_timeout_s", DEFAULT_POSTGRES_CONNECT_TIMEOUT_S),
            MIN_POSTGRES_CONNECT_TIMEOUT_S),
        commit_timeout_s=_positive(source, "storage.postgres_commit_timeout_s", values.get(
            "storage.postgres_commit_timeout_s", DEFAULT_POSTGRES_COMMIT_TIMEOUT_S)),
    )


def _parse_tls(source: str, base_dir: Path, values: Mapping[str, Any], *,
               prefix: str = "tls") -> TlsConfig | None:
    """[tls], or another section of the same keys (`prefix`: [web.tls])."""
    cert = values.get(f"{prefix}.cert_file", "").strip()
    key = values.get(f"{prefix}.key_file", "").strip()
    ca = values.get(f"{prefix}.client_ca_file", "").strip()
    if not cert and not key:
        if ca:
            raise ConfigError(source, f"{prefix}.client_ca_file",
                              f"needs {prefix}.cert_file and key_file")
        return None
    if not cert or not key:
        missing = f"{prefix}.cert_file" if not cert else f"{prefix}.key_file"
        raise ConfigError(source, missing, "TLS needs both cert_file and key_file")
    paths = {"cert_file": _resolve(base_dir, cert), "key_file": _resolve(base_dir, key)}
    if ca:
        paths["client_ca_file"] = _resolve(base_dir, ca)
    for name, path in paths.items():
        if b"-----BEGIN" not in _readable(source, f"{prefix}.{name}", path):
            raise ConfigError(source, f"{prefix}.{name}", f"{path} is not a PEM file")
    return TlsConfig(cert_file=paths["cert_file"], key_file=paths["key_file"],
                     client_ca_file=paths.get("client_ca_file"))


def _flatten(doc: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check every key against the schema and return dotted key -> value."""
    out: dict[str, Any] = {}
    for top, value in doc.items():
        if top in ("pricing", "dialects", "attribution", "budgets", "alerts"):
            continue
        if top == "receivers":
            if not isinstance(value, dict):
                raise ConfigError(source, top, "must be a table")
            for sub, subval in value.items():
                if sub != "otlp":
                    raise ConfigError(source, f"receivers.{sub}", "unknown key")
                _check_section(source, "receivers.otlp", subval, out)
            continue
        if top not in _SCHEMA:
            raise ConfigError(source, top, "unknown key")
        _check_section(source, top, value, out)
    return out


def _check_section(source: str, section: str, value: Any, out: dict[str, Any]) -> None:
    if not isinstance(value, dict):
        raise ConfigError(source, section, "must be a table")
    schema = _SCHEMA[section]
    for key, item in value.items():
        dotted = f"{section}.{key}"
        expected = schema.get(key)
        if expected is None:
            raise ConfigError(source, dotted, "unknown key")
        # bool is a subclass of int in Python; TOML keeps them apart, so do we.
        if expected is int and (isinstance(item, bool) or not isinstance(item, int)):
            raise ConfigError(source, dotted, f"must be an integer; got {item!r}")
        if not isinstance(item, expected):
            raise ConfigError(source, dotted, f"must be a {expected.__name__}; got {item!r}")
        out[dotted] = item


def _parse_pricing(table: Any, source: str) -> dict[str, ModelPrice]:
    if not isinstance(table, dict):
        raise ConfigError(source, "pricing", "must be a table of models")
    prices: dict[str, ModelPrice] = {}
    for model, rates in table.items():
        prefix = f'pricing."{model}"'
        if not model.strip():
            raise ConfigError(source, prefix, "model name must not be empty")
        if not isinstance(rates, dict):
            raise ConfigError(source, prefix, "must be a table with input and output")
        for key in rates:
            if key not in PRICE_KEYS:
                raise ConfigError(source, f"{prefix}.{key}", "unknown key")
        parsed: dict[str, float] = {}
        for key, item in rates.items():
            if isinstance(item, bool) or not isinstance(item, int | float):
                raise ConfigError(source, f"{prefix}.{key}", f"must be a number; got {item!r}")
            if not math.isfinite(item) or item < 0:
                raise ConfigError(source, f"{prefix}.{key}",
                                  f"must be a finite number >= 0; got {item!r}")
            parsed[key] = float(item)
        for required in ("input", "output"):
            if required not in parsed:
                raise ConfigError(source, f"{prefix}.{required}",
                                  "missing (USD per million tokens)")
        prices[model] = ModelPrice(
            input=parsed["input"],
            output=parsed["output"],
            cache_read=parsed.get("cache_read", parsed["input"]),
            cache_write=parsed.get("cache_write", parsed["input"]),
        )
    return prices


def _parse_endpoint(source: str, key: str, value: str) -> Endpoint | None:
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigError(source, key, f"expected [ipv6]:port; got {value!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ConfigError(source, key, f"expected host:port; got {value!r}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(source, key, f"port must be 1-65535; got {port_text!r}")
    return Endpoint(host=host, port=int(port_text))


def _resolve_window(source: str, value: int, retention_s: int) -> int:
    """A held span's dedupe record must outlive its wait, or a retry after the window could
    be held (and counted) again."""
    window = _positive(source, "sessions.resolve_window_s", value)
    if window > retention_s:
        raise ConfigError(source, "sessions.resolve_window_s",
                          f"must be at most dedupe.retention_s ({retention_s}); got {window}")
    return window


def _positive(source: str, key: str, value: int) -> int:
    return _at_least(source, key, value, 1)


def _at_least(source: str, key: str, value: int, minimum: int) -> int:
    if value < minimum:
        raise ConfigError(source, key, f"must be >= {minimum}; got {value}")
    return value
