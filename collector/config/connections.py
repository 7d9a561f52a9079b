"""`[connections]`: how long a client may take and how many may be connected, per listener.

Every listener (OTLP/HTTP, OTLP/gRPC, the fleet view, the operations endpoint) is reachable by
anyone who can open a socket to it, token or not. Without bounds, a few hundred connections
that never finish their headers hold every descriptor the process has and lock real exporters
out. These values bound what such a client can hold; the defaults leave any real exporter,
browser or scraper untouched (an OTLP exporter sends a whole request within milliseconds and
exports every few seconds while its agent works).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# A request's line and headers must all arrive within this after the connection opens (or,
# on a kept-alive connection, after its first byte). Real clients need milliseconds.
DEFAULT_HEADER_TIMEOUT_MS = 10_000
# A request's body must arrive whole within this after its headers: the largest body
# (receivers.otlp.max_request_bytes, 16 MiB) over a 1 Mbit/s uplink takes about 130 s.
DEFAULT_BODY_TIMEOUT_MS = 180_000
# And the body may not stall longer than this between two chunks.
DEFAULT_BODY_CHUNK_TIMEOUT_MS = 15_000
# A kept-alive connection with no request in progress is closed after this. Exporters reopen
# one transparently; 60 s keeps an agent exporting every few seconds on one connection.
DEFAULT_IDLE_TIMEOUT_MS = 60_000
# Open connections per listener. Beyond it, the oldest connection that has not yet sent a
# whole request is closed to make room; when every one has, a new connection gets 503 with
# Retry-After. Four listeners at this cap stay well inside a default descriptor limit of
# 1,024 once the daemon raises its soft limit (see collector.receivers.connections).
DEFAULT_MAX_CONNECTIONS = 512
# gRPC (HTTP/2): a connection without any call for this long is sent GOAWAY.
DEFAULT_GRPC_MAX_CONNECTION_IDLE_MS = 300_000
# Every gRPC connection is asked to go away after this (clients reconnect transparently), so
# no connection holds its resources for ever; calls in flight get the grace below to finish.
DEFAULT_GRPC_MAX_CONNECTION_AGE_MS = 1_800_000
DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_MS = 30_000
# Keepalive enforcement: a client pinging more often than this (without calls in between)
# earns a strike; after max_ping_strikes the connection is closed. gRPC's own defaults.
DEFAULT_GRPC_MIN_PING_INTERVAL_MS = 300_000
DEFAULT_GRPC_MAX_PING_STRIKES = 2
# Calls in flight on one gRPC connection (an OTLP exporter has one at a time).
DEFAULT_GRPC_MAX_CONCURRENT_STREAMS = 100

SCHEMA: dict[str, type] = {
    "header_timeout_ms": int,
    "body_timeout_ms": int,
    "body_chunk_timeout_ms": int,
    "idle_timeout_ms": int,
    "max_connections": int,
    "grpc_max_connection_idle_ms": int,
    "grpc_max_connection_age_ms": int,
    "grpc_max_connection_age_grace_ms": int,
    "grpc_min_ping_interval_ms": int,
    "grpc_max_ping_strikes": int,
    "grpc_max_concurrent_streams": int,
}


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Per listener; the HTTP ones apply to OTLP/HTTP, the fleet view and the ops endpoint,
    header_timeout_ms and max_connections to OTLP/gRPC too (its handshake and its cap)."""

    header_timeout_ms: int = DEFAULT_HEADER_TIMEOUT_MS
    body_timeout_ms: int = DEFAULT_BODY_TIMEOUT_MS
    body_chunk_timeout_ms: int = DEFAULT_BODY_CHUNK_TIMEOUT_MS
    idle_timeout_ms: int = DEFAULT_IDLE_TIMEOUT_MS
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    grpc_max_connection_idle_ms: int = DEFAULT_GRPC_MAX_CONNECTION_IDLE_MS
    grpc_max_connection_age_ms: int = DEFAULT_GRPC_MAX_CONNECTION_AGE_MS
    grpc_max_connection_age_grace_ms: int = DEFAULT_GRPC_MAX_CONNECTION_AGE_GRACE_MS
    grpc_min_ping_interval_ms: int = DEFAULT_GRPC_MIN_PING_INTERVAL_MS
    grpc_max_ping_strikes: int = DEFAULT_GRPC_MAX_PING_STRIKES
    grpc_max_concurrent_streams: int = DEFAULT_GRPC_MAX_CONCURRENT_STREAMS


def parse_connections(values: Mapping[str, Any], source: str) -> ConnectionLimits:
    """`values`: the file's dotted keys, already checked against SCHEMA (integers).
    Raises collector.config.ConfigError naming the key."""
    from collector.config import ConfigError  # the package imports this module

    defaults = ConnectionLimits()
    parsed: dict[str, int] = {}
    for name in SCHEMA:
        key = f"connections.{name}"
        value: int = values.get(key, getattr(defaults, name))
        # Strikes may be 0 (the first ping too many closes); everything else is at least 1.
        minimum = 0 if name == "grpc_max_ping_strikes" else 1
        if value < minimum:
            raise ConfigError(source, key, f"must be >= {minimum}; got {value}")
        parsed[name] = value
    limits = ConnectionLimits(**parsed)
    if limits.body_chunk_timeout_ms > limits.body_timeout_ms:
        raise ConfigError(source, "connections.body_chunk_timeout_ms",
                          f"must be at most connections.body_timeout_ms "
                          f"({limits.body_timeout_ms}); got {limits.body_chunk_timeout_ms}")
    return limits
