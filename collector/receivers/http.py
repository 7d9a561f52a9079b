"""OTLP/HTTP (aiohttp): POST /v1/traces, /v1/logs and /v1/metrics; decodes bodies and hands
requests to the one export callable with their signal; every refusal is an ExportError
translated through collector.receivers.errors."""

from __future__ import annotations

import functools
import logging
import ssl
from typing import Any

from aiohttp import web

from collector.config import Endpoint
from collector.receivers.common import (
    OUTCOME_KEY,
    STOP_GRACE_S,
    AnswerFn,
    ExportFn,
    ReceiverError,
    no_count,
    outcome_label,
    start_app,
)
from collector.receivers.connections import Connections
from collector.receivers.decoding import Decoder, DecodeStats
from collector.receivers.errors import RETRY_AFTER_S, ExportError, Refusal
from collector.receivers.otlp import (
    DEFLATE_WBITS,
    JSON,
    PROTOBUF,
    WIRES,
    BoundedGunzip,
    encode_response,
    encode_status,
    export_response,
)
from collector.security import Security
from collector.signals import Signal

log = logging.getLogger(__name__)

SIGNAL_PATHS = {WIRES[signal].path: signal for signal in Signal}


class HttpReceiver:
    def __init__(self, endpoint: Endpoint, export: ExportFn, *, max_request_bytes: int,
                 security: Security | None = None, on_answer: AnswerFn = no_count,
                 connections: Connections | None = None,
                 decoding: DecodeStats | None = None) -> None:
        self.endpoint = endpoint
        self._connections = connections
        self._decoder = Decoder(decoding)
        self._export = export
        self._limit = max_request_bytes
        self._security = security or Security()
        self._on_answer = on_answer
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self._limit, middlewares=[self._count])
        for path, signal in SIGNAL_PATHS.items():
            app.router.add_route("*", path, functools.partial(self._handle, signal))
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        try:
            ssl_context = self._security.server_ssl_context()
            # auto_decompress off: decompression is ours, bounded by the limit (gzip bombs).
            self._runner = await start_app(app, self.endpoint, ssl_context=ssl_context,
                                           shutdown_timeout=STOP_GRACE_S,
                                           auto_decompress=False, listener="otlp_http",
                                           label="OTLP/HTTP", connections=self._connections)
        except (OSError, ssl.SSLError) as exc:
            raise ReceiverError(f"cannot listen for OTLP/HTTP on {self.endpoint}: "
                                f"{exc.strerror or exc}") from None
        log.info("OTLP/HTTP%s listening on %s", "S" if ssl_context else "", self.endpoint)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self._decoder.close()

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Count every answer once, by outcome, whichever of the many exits produced it."""
        signal = SIGNAL_PATHS.get(request.path)
        try:
            response: web.StreamResponse = await handler(request)
        except BaseException:
            self._on_answer(signal, "error")
            raise
        self._on_answer(signal, response.get(OUTCOME_KEY, "error"))
        return response

    async def _not_found(self, request: web.Request) -> web.Response:
        routes = ", ".join(f"{signal.value} to {WIRES[signal].path}" for signal in Signal)
        return _refusal(ExportError(Refusal.NOT_FOUND,
                                    f"no route {request.path}; OTLP {routes}"), None)

    async def _handle(self, signal: Signal, request: web.Request) -> web.Response:
        if request.method != "POST":
            response = _refusal(ExportError(Refusal.METHOD_NOT_ALLOWED,
                                            f"{request.method} not allowed; use POST"), None)
            response.headers["Allow"] = "POST"
            return response
        try:
            self._security.check_host(request.headers.get("Host"))
            credential = self._security.check(request.headers.get("Authorization"))
        except ExportError as exc:
            response = _refusal(exc, None)
            if exc.refusal is Refusal.UNAUTHENTICATED:
                response.headers["WWW-Authenticate"] = "Bearer"
            return response
        content_type = request.content_type.lower()
        if content_type not in (PROTOBUF, JSON):
            return _refusal(ExportError(
                Refusal.UNSUPPORTED_MEDIA,
                f"unsupported Content-Type {content_type!r}; use {PROTOBUF} or {JSON}"), None)
        try:
            # No local keeps the body or the decoded request: both are large and the export
            # waits for a commit, so holding them would multiply memory by requests in flight.
            outcome = await self._export(signal, *await self._decoder.decode(
                await self._read_body(request), content_type, signal), credential)
        except ExportError as exc:
            return _refusal(exc, content_type)
        payload = encode_response(export_response(signal, outcome.rejected, outcome.message),
                                  content_type)
        response = web.Response(body=payload, status=200, content_type=content_type)
        response[OUTCOME_KEY] = outcome_label(outcome)
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        """Read at most the limit (after decompression too), never the whole of a large body."""
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "deflate", ""):
            raise ExportError(Refusal.UNSUPPORTED_MEDIA,
                              f"unsupported Content-Encoding {encoding!r}; use gzip, deflate "
                              f"or none")
        limit = self._limit
        length = request.content_length
        if length is not None and length > limit:
            raise ExportError(Refusal.TOO_LARGE,
                              f"body of {length} bytes exceeds the limit of {limit} bytes")
        inflater = None
        if encoding == "gzip":
            inflater = BoundedGunzip(limit)
        elif encoding == "deflate":
            inflater = BoundedGunzip(limit, DEFLATE_WBITS)
        received = 0
        chunks: list[bytes] = []
        stream = request.content
        while True:
            chunk = await stream.readany()
            if not chunk:
                break
            received += len(chunk)
            if received > limit:
                raise ExportError(Refusal.TOO_LARGE,
                                  f"body exceeds the limit of {limit} bytes")
            if inflater is not None:
                inflater.feed(chunk)
            else:
                chunks.append(chunk)
        if inflater is not None:
            return inflater.finish()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _refusal(exc: ExportError, content_type: str | None) -> web.Response:
    answer = exc.answer
    headers = {}
    if answer.retryable:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if content_type is None:
        response = web.Response(status=answer.http_status, text=exc.message + "\n",
                                headers=headers)
    else:
        body = encode_status(answer.grpc_code.value[0], exc.message, content_type)
        response = web.Response(status=answer.http_status, body=body,
                                content_type=content_type, headers=headers)
    if answer.http_status == 413:
        # The rest of the body was not read; closing is cheaper than draining it.
        response.force_close()
    response[OUTCOME_KEY] = answer.reason
    return response
