"""What both OTLP transports share: the export callable they feed, answer counting, the
aiohttp serving helper and the start error. Network and status codes only."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from collector.config import Endpoint
from collector.pipeline import ExportOutcome
from collector.receivers.connections import ConnectionGuard, Connections, GuardedSite
from collector.signals import Signal

# The one export handler every service of both transports calls: (signal, decoded request,
# its protobuf bytes when the body was protobuf, the name of the token that carried it).
ExportFn = Callable[[Signal, Any, bytes | None, str | None], Awaitable[ExportOutcome]]
# Called once per answer with its signal (None when the path named none) and its outcome:
# "ok", "partial" or the refusal's reason (metrics).
AnswerFn = Callable[[Signal | None, str], None]

# Receivers wait this long for requests in flight when stopping; each of them needs at most
# two commits (shutdown does not wait out flush.interval_ms), so this is generous.
STOP_GRACE_S = 15.0
# Where an HTTP handler leaves its answer's outcome on the response, for the counting middleware.
OUTCOME_KEY = "collector.outcome"

def no_count(signal: Signal | None, outcome: str) -> None:
    pass


def outcome_label(outcome: ExportOutcome) -> str:
    return "partial" if outcome.rejected else "ok"


async def start_app(app: web.Application, endpoint: Endpoint, *,
                    ssl_context: ssl.SSLContext | None = None, listener: str = "http",
                    label: str = "HTTP", connections: Connections | None = None,
                    **server: Any) -> web.AppRunner:
    """Serve an aiohttp app on an endpoint, without access logs or signal handling (the
    daemon owns both), its connections bounded and counted as `listener` (see
    collector.receivers.connections). If it cannot listen, nothing is left running and the
    error is raised."""
    guard = ConnectionGuard(listener, label, connections or Connections())
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           keepalive_timeout=guard.idle_timeout_s, logger=guard.server_log,
                           **server)
    await runner.setup()
    assert runner.server is not None
    guard.attach(runner.server)
    try:
        site = GuardedSite(runner, endpoint, guard, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class ReceiverError(Exception):
    """A receiver could not start (address in use, bad address)."""
