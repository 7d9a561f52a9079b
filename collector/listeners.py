"""Every listener's address checked before `collector serve` starts anything.

Two collectors on one host with the same listener (two default configs take 4317, 4318, 8888
and 8889) used to clash halfway through start: the second had opened and migrated its
database and started its ops listener before the fleet view failed to bind. Here every
configured address is bound and listened on at once, then released, before the store is
opened; a clash is one error naming each config key to change and the file that sets it.

This is a check, not a hand-over: each server binds its own socket right after. A program
that takes a port in the few milliseconds between still makes that server fail to start, as
before, only no longer silently racing a second collector with the same config.
"""

from __future__ import annotations

import errno
import socket
from contextlib import ExitStack
from dataclasses import dataclass

from collector.config import DEFAULTS_SOURCE, Config, Endpoint

# The config key of each listener, in the order serve starts them.
LISTENER_KEYS = ("receivers.otlp.grpc_endpoint", "receivers.otlp.http_endpoint",
                 "ops.endpoint", "web.endpoint")


class ListenerError(Exception):
    """A listener that cannot be had; the message names the key, the file and what to do."""


@dataclass(frozen=True, slots=True)
class Listener:
    key: str
    endpoint: Endpoint


def configured_listeners(config: Config) -> list[Listener]:
    """The listeners `config` turns on, each with the key that sets its address."""
    endpoints = (config.receivers.grpc_endpoint, config.receivers.http_endpoint,
                 config.ops_endpoint, config.web_endpoint)
    return [Listener(key, endpoint) for key, endpoint in zip(LISTENER_KEYS, endpoints,
                                                             strict=True)
            if endpoint is not None]


def check_listeners(config: Config) -> None:
    """Bind and listen on every configured address together (so one config's own overlaps,
    `localhost:4318` beside `127.0.0.1:4318`, show too), then close them. Raises
    ListenerError naming every listener that could not be had."""
    problems: list[str] = []
    with ExitStack() as held:
        for listener in configured_listeners(config):
            problem = _take(listener.endpoint, held)
            if problem is not None:
                problems.append(f"{listener.key} = \"{listener.endpoint}\": {problem}")
    if not problems:
        return
    if config.source == DEFAULTS_SOURCE:
        where = ("no --config was given, so these are the defaults: write a config file that "
                 "sets them and pass it with --config")
    else:
        where = f"set them in {config.source}"
    raise ListenerError(
        f"cannot listen, nothing started: {'; '.join(problems)}. Each collector on a host "
        f"needs listeners of its own: {where} (\"\" turns ops.endpoint or web.endpoint off; "
        "see \"Several collectors on one host\" in README.md)")


def _take(endpoint: Endpoint, held: ExitStack) -> str | None:
    """Bind every address `endpoint` resolves to, as the servers do (SO_REUSEADDR, so a
    restart is not refused over connections in TIME_WAIT; IPv6 sockets IPv6-only); None when
    all were had, else why not."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot resolve {endpoint.host!r}: {exc.strerror}"
    for family, kind, proto, _, address in infos:
        sock = held.enter_context(socket.socket(family, kind, proto))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
            sock.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return ("address already in use (by another collector on this host, or "
                        "another program)")
            if exc.errno == errno.EACCES:
                return "permission denied (a port below 1024 needs privileges)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{endpoint.host} is not an address of this host"
            return exc.strerror or str(exc)
    return None
