"""Bounded connections for every aiohttp listener (OTLP/HTTP, the fleet view, ops endpoint).

aiohttp holds a connection that never finishes its headers until its keep-alive timer fires,
has no bound on how many are open, and logs each malformed request as an ERROR with its
traceback and its bytes (an `Authorization` line included). So every listener is served
through a ConnectionGuard instead of aiohttp's TCPSite:

- each accepted connection is a _Connection: a thin protocol in front of aiohttp's own
  RequestHandler, which it creates only once the connection is admitted;
- headers: a request's line and headers must arrive within `header_timeout_ms` of the
  connection opening (or of the first byte of a later request on a kept-alive connection);
- bodies: a request's body must arrive within `body_timeout_ms` of its headers, and never
  stall longer than `body_chunk_timeout_ms`;
- idle: aiohttp's keep-alive timer, set to `idle_timeout_ms`;
- a cap of `max_connections` per listener. At the cap, the oldest connection that has not yet
  sent a whole request is closed to make room (a slow client cannot outwait a real one);
  when every connection has sent one, the new connection is answered 503 with Retry-After
  and closed. Connections that already sent a valid request are never closed for a newcomer;
- aiohttp's server log goes through _ServerLog: a malformed request is counted per listener
  (collector_http_malformed_requests_total) and summarised like the pipeline's failures,
  logged once and then once per period with a count, never with its traceback or a byte of
  it, so no header value reaches the log.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from collector.config import Endpoint
from collector.config.connections import ConnectionLimits
from collector.pipeline import FAILURE_LOG_PERIOD_S

log = logging.getLogger(__name__)

# What an over-the-cap connection is told before it is closed: retry later, as OTLP's retry
# rules ask of a 503. Written before its request is read, so it is the same for every path.
REFUSED_BODY = b"too many connections; retry later\n"
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\n"
           b"Retry-After: 1\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"Content-Length: " + str(len(REFUSED_BODY)).encode() + b"\r\n"
           b"Connection: close\r\n\r\n" + REFUSED_BODY)
# A refused connection is kept this long (reading and dropping what it sends) so that its
# request, if already sent, does not turn the close into a reset that loses the 503.
REFUSED_LINGER_S = 1.0
# At most this many refused connections linger per listener; beyond, they are cut at once.
MAX_LINGERING_REFUSED = 64
# Descriptors kept free for everything that is not a listener's connection: the database and
# its WAL, log files, the gRPC server's own, a reader thread's.
RESERVED_DESCRIPTORS = 128
# Why a connection was closed by the guard (collector_http_connections_closed_total{reason}).
HEADER_TIMEOUT = "header_timeout"
BODY_TIMEOUT = "body_timeout"
EVICTED = "evicted"
CLOSE_REASONS = (HEADER_TIMEOUT, BODY_TIMEOUT, EVICTED)


@dataclass(slots=True)
class ListenerStats:
    """One listener's counters, read at scrape time."""

    open: int = 0
    refused: int = 0  # answered 503 at the cap
    malformed: int = 0  # refused 400 by aiohttp's parser
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))


class ConnectionStats:
    """Every listener's counters, by listener name (otlp_http, web, ops)."""

    def __init__(self) -> None:
        self.listeners: dict[str, ListenerStats] = {}

    def listener(self, name: str) -> ListenerStats:
        return self.listeners.setdefault(name, ListenerStats())


@dataclass(frozen=True, slots=True)
class Connections:
    """What a listener is started with: the configured limits and where to count."""

    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    stats: ConnectionStats = field(default_factory=ConnectionStats)


def raise_descriptor_limit(listeners: int, limits: ConnectionLimits) -> None:
    """Lift the soft descriptor limit (up to the hard one) to what the caps may hold, as Go's
    runtime does at start; the default soft limit of 1,024 is below four full listeners."""
    needed = listeners * (limits.max_connections + MAX_LINGERING_REFUSED) + RESERVED_DESCRIPTORS
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # not on this platform
        return
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open file limit is %d, below the %d that %d listeners at "
                    "connections.max_connections = %d may hold; lower that key or raise the "
                    "limit (LimitNOFILE= in the systemd unit)", soft, needed, listeners,
                    limits.max_connections)


class ConnectionGuard:
    """Admits, times and counts one listener's connections (see the module docstring)."""

    def __init__(self, name: str, label: str, connections: Connections) -> None:
        self.name = name
        self.label = label  # for people: "OTLP/HTTP", "fleet view"
        limits = connections.limits
        self.header_timeout_s = limits.header_timeout_ms / 1000
        self.body_timeout_s = limits.body_timeout_ms / 1000
        self.chunk_timeout_s = limits.body_chunk_timeout_ms / 1000
        self.idle_timeout_s = limits.idle_timeout_ms / 1000
        self._cap = limits.max_connections
        self.stats = connections.stats.listener(name)
        self.server_log = _ServerLog(self)
        self._server: web.Server | None = None
        self._inner_handler: Any = None
        # Admitted connections; those that have not yet sent a whole request, oldest first.
        self._open: set[_Connection] = set()
        self._waiting: dict[_Connection, None] = {}
        self._by_handler: dict[RequestHandler, _Connection] = {}
        self._lingering: set[_Connection] = set()
        self._malformed_logged_at: float | None = None
        self._malformed_unlogged = 0
        self._malformed_last = ""

    def attach(self, server: web.Server) -> None:
        """Serve `server`'s requests through this guard, which learns when each starts."""
        self._server = server
        self._inner_handler = server.request_handler
        server.request_handler = self._handle

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory handed to loop.create_server."""
        return _Connection(self)

    # -- admission --------------------------------------------------------------------------

    def admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self._cap:
            victim = next(iter(self._waiting), None)
            if victim is None:
                return False
            victim.close(EVICTED)
        self._open.add(conn)
        self._waiting[conn] = None
        self.stats.open = len(self._open)
        return True

    def new_handler(self, conn: _Connection) -> RequestHandler:
        assert self._server is not None
        handler = self._server()
        self._by_handler[handler] = conn
        return handler

    def started(self, conn: _Connection) -> None:
        self._waiting.pop(conn, None)

    def release(self, conn: _Connection) -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)
        self.stats.open = len(self._open)

    def forget(self, conn: _Connection, handler: RequestHandler | None) -> None:
        self.release(conn)
        self._lingering.discard(conn)
        if handler is not None:
            self._by_handler.pop(handler, None)

    def linger(self, conn: _Connection) -> bool:
        """May this refused connection linger to deliver its 503?"""
        self.stats.refused += 1
        if len(self._lingering) >= MAX_LINGERING_REFUSED:
            return False
        self._lingering.add(conn)
        return True

    def close_refused(self) -> None:
        """At stop: cut the refused connections still lingering."""
        for conn in list(self._lingering):
            conn.abort()
        self._lingering.clear()
        self.summarise_malformed()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = self._by_handler.get(request.protocol)
        if conn is not None:
            conn.request_started(request)
        try:
            response: web.StreamResponse = await self._inner_handler(request)
            return response
        finally:
            if conn is not None:
                conn.request_finished()

    # -- malformed requests -----------------------------------------------------------------

    def malformed(self, exc: BaseException) -> None:
        """Count a request aiohttp's parser refused; log the first, then a count per period.
        Only the error's class is ever named: its message quotes the request's bytes."""
        self.stats.malformed += 1
        kind = type(exc).__name__
        now = time.monotonic()
        if self._malformed_logged_at is None:
            self._malformed_logged_at = now
            log.warning("%s: malformed HTTP request refused with 400 (%s); later ones are "
                        "counted in collector_http_malformed_requests_total{listener=\"%s\"} "
                        "and logged with their count every %.0f s", self.label, kind,
                        self.name, FAILURE_LOG_PERIOD_S)
            return
        self._malformed_unlogged += 1
        self._malformed_last = kind
        if now - self._malformed_logged_at >= FAILURE_LOG_PERIOD_S:
            self.summarise_malformed()

    def summarise_malformed(self) -> None:
        if self._malformed_unlogged and self._malformed_logged_at is not None:
            now = time.monotonic()
            log.warning("%s: %d more malformed HTTP requests refused with 400 in the last "
                        "%.0f s (latest: %s)", self.label, self._malformed_unlogged,
                        now - self._malformed_logged_at, self._malformed_last)
            self._malformed_logged_at = now
            self._malformed_unlogged = 0


class _Connection(asyncio.Protocol):
    """One accepted connection: admitted (aiohttp's RequestHandler behind it, timed) or
    refused (a 503 written, what it sends dropped, closed soon)."""

    __slots__ = ("_body_deadline", "_body_timer", "_evictable", "_guard", "_handler",
                 "_header_timer", "_in_request", "_last_data", "_linger", "_loop", "_payload",
                 "_tail", "_transport")

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._handler: RequestHandler | None = None
        self._in_request = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_deadline = 0.0
        self._last_data = 0.0
        self._payload: Any = None
        self._linger: asyncio.TimerHandle | None = None
        self._evictable = True  # until its first request's headers are all in
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        guard = self._guard
        if not guard.admit(self):
            transport.write(REFUSAL)
            if guard.linger(self):
                self._linger = self._loop.call_later(REFUSED_LINGER_S, transport.close)
            else:
                transport.close()
            return
        self._header_timer = self._loop.call_later(guard.header_timeout_s, self._header_late)
        handler = self._handler = guard.new_handler(self)
        handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        handler = self._handler
        if handler is None:
            return  # refused: dropped
        if self._in_request:
            self._last_data = self._loop.time()
        elif self._evictable:
            # Whole headers are in (aiohttp starts the request soon): no longer evictable,
            # even if the event loop is too busy to have started it yet.
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._evictable = False
                self._guard.started(self)
            else:
                self._tail = seen[-3:]
        elif self._header_timer is None:
            # The first byte of a later request on a kept-alive connection.
            self._header_timer = self._loop.call_later(self._guard.header_timeout_s,
                                                       self._header_late)
        handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self._handler is None:
            return None  # refused: the client read its 503 and closed; close too
        self._handler.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._linger):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._linger = None
        self._payload = None
        handler, self._handler = self._handler, None
        self._guard.forget(self, handler)
        if handler is not None:
            handler.connection_lost(exc)

    # -- the guard's view -------------------------------------------------------------------

    def request_started(self, request: web.BaseRequest) -> None:
        """The request's headers are all in: no header deadline now; its body is timed."""
        self._in_request = True
        self._evictable = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._guard.started(self)
        payload = request.content
        if not payload.is_eof():
            guard = self._guard
            now = self._loop.time()
            self._payload = payload
            self._last_data = now
            self._body_deadline = now + guard.body_timeout_s
            self._body_timer = self._loop.call_at(
                min(now + guard.chunk_timeout_s, self._body_deadline), self._body_check)

    def request_finished(self) -> None:
        self._in_request = False
        self._payload = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _header_late(self) -> None:
        self._header_timer = None
        if not self._in_request:
            self.close(HEADER_TIMEOUT)

    def _body_check(self) -> None:
        self._body_timer = None
        payload = self._payload
        if payload is None or payload.is_eof() or not self._in_request:
            return
        now = self._loop.time()
        stalled_until = self._last_data + self._guard.chunk_timeout_s
        if now >= self._body_deadline or now >= stalled_until:
            self.close(BODY_TIMEOUT)
            return
        self._body_timer = self._loop.call_at(min(stalled_until, self._body_deadline),
                                              self._body_check)

    def close(self, reason: str) -> None:
        """Close an admitted connection for `reason`; it no longer counts towards the cap."""
        guard = self._guard
        guard.stats.closed[reason] += 1
        guard.release(self)
        if self._handler is not None:
            self._handler.force_close()
        elif self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """What aiohttp's RequestHandler logs through. A request its parser refused (the 400 it
    answers) goes to the guard's count; a client that went away mid-request is a debug line;
    anything else (a handler's bug) is logged as aiohttp would."""

    def __init__(self, guard: ConnectionGuard) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self._guard = guard

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        exc: object = kwargs.get("exc_info")
        if exc is True:
            exc = sys.exc_info()[1]
        elif isinstance(exc, tuple):
            exc = exc[1]
        if isinstance(exc, HttpProcessingError):
            self._guard.malformed(exc)
            return
        if isinstance(exc, ConnectionError):
            log.debug("%s: client went away during a request", self._guard.label)
            return
        super().log(level, msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        return msg, kwargs


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, with the guard's protocol in front of every connection."""

    __slots__ = ("_endpoint", "_guard")

    def __init__(self, runner: web.BaseRunner, endpoint: Endpoint, guard: ConnectionGuard, *,
                 ssl_context: Any = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._endpoint = endpoint
        self._guard = guard

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._endpoint}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            # A TLS handshake is part of "the headers": it gets the same deadline.
            extra["ssl_handshake_timeout"] = self._guard.header_timeout_s
        self._server = await loop.create_server(
            self._guard.protocol, self._endpoint.host, self._endpoint.port,
            ssl=self._ssl_context, backlog=self._backlog, reuse_address=True, **extra)

    async def stop(self) -> None:
        await super().stop()
        self._guard.close_refused()
