"""OTLP receivers: HTTP (aiohttp) and gRPC (grpc.aio). Network and status codes only.

Each decodes its body and hands the request to the same export callable; every refusal is an
ExportError translated through collector.errors, so both transports answer alike.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from collector.config import Endpoint
from collector.errors import RETRY_AFTER_S, ExportError, Refusal
from collector.otlp import (
    DEFLATE_WBITS,
    JSON,
    PROTOBUF,
    BoundedGunzip,
    decode,
    decode_protobuf,
    encode_response,
    encode_status,
    export_response,
)
from collector.pipeline import ExportOutcome
from collector.security import Security

log = logging.getLogger(__name__)

ExportFn = Callable[[Any, bytes | None], Awaitable[ExportOutcome]]
# Called once per answer with its outcome: "ok", "partial" or the refusal's reason (metrics).
AnswerFn = Callable[[str], None]

TRACES_PATH = "/v1/traces"
GRPC_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
# Receivers wait this long for requests in flight when stopping; each of them needs at most
# a flush interval plus a commit, so this is generous.
STOP_GRACE_S = 15.0
# Where an HTTP handler leaves its answer's outcome on the response, for the counting middleware.
OUTCOME_KEY = "collector.outcome"


def _no_count(outcome: str) -> None:
    pass


def _outcome(outcome: ExportOutcome) -> str:
    return "partial" if outcome.rejected else "ok"


async def start_app(app: web.Application, endpoint: Endpoint, *,
                    ssl_context: ssl.SSLContext | None = None, **server: Any) -> web.AppRunner:
    """Serve an aiohttp app on an endpoint, without access logs or signal handling (the
    daemon owns both). If it cannot listen, nothing is left running and the error is raised."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, **server)
    await runner.setup()
    try:
        site = web.TCPSite(runner, endpoint.host, endpoint.port, reuse_address=True,
                           ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class ReceiverError(Exception):
    """A receiver could not start (address in use, bad address)."""


class HttpReceiver:
    def __init__(self, endpoint: Endpoint, export: ExportFn, *, max_request_bytes: int,
                 security: Security | None = None, on_answer: AnswerFn = _no_count) -> None:
        self.endpoint = endpoint
        self._export = export
        self._limit = max_request_bytes
        self._security = security or Security()
        self._on_answer = on_answer
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=self._limit, middlewares=[self._count])
        app.router.add_route("*", TRACES_PATH, self._handle)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        try:
            ssl_context = self._security.server_ssl_context()
            # auto_decompress off: decompression is ours, bounded by the limit (gzip bombs).
            self._runner = await start_app(app, self.endpoint, ssl_context=ssl_context,
                                           shutdown_timeout=STOP_GRACE_S,
                                           auto_decompress=False)
        except (OSError, ssl.SSLError) as exc:
            raise ReceiverError(f"cannot listen for OTLP/HTTP on {self.endpoint}: "
                                f"{exc.strerror or exc}") from None
        log.info("OTLP/HTTP%s listening on %s", "S" if ssl_context else "", self.endpoint)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Count every answer once, by outcome, whichever of the many exits produced it."""
        try:
            response: web.StreamResponse = await handler(request)
        except BaseException:
            self._on_answer("error")
            raise
        self._on_answer(response.get(OUTCOME_KEY, "error"))
        return response

    async def _not_found(self, request: web.Request) -> web.Response:
        return _refusal(ExportError(Refusal.NOT_FOUND,
                                    f"no route {request.path}; OTLP traces go to {TRACES_PATH}"),
                        None)

    async def _handle(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            response = _refusal(ExportError(Refusal.METHOD_NOT_ALLOWED,
                                            f"{request.method} not allowed; use POST"), None)
            response.headers["Allow"] = "POST"
            return response
        try:
            self._security.check(request.headers.get("Authorization"))
        except ExportError as exc:
            response = _refusal(exc, None)
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
            outcome = await self._export(*decode(await self._read_body(request), content_type))
        except ExportError as exc:
            return _refusal(exc, content_type)
        payload = encode_response(export_response(outcome.rejected, outcome.message),
                                  content_type)
        response = web.Response(body=payload, status=200, content_type=content_type)
        response[OUTCOME_KEY] = _outcome(outcome)
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


class GrpcReceiver:
    def __init__(self, endpoint: Endpoint, export: ExportFn, *, max_request_bytes: int,
                 security: Security | None = None, on_answer: AnswerFn = _no_count) -> None:
        self.endpoint = endpoint
        self._export = export
        self._limit = max_request_bytes
        self._security = security or Security()
        self._on_answer = on_answer
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", self._limit),
            ("grpc.so_reuseport", 0),
        ])
        handler = grpc.method_handlers_generic_handler(GRPC_SERVICE, {
            # Raw bytes in and out: decoding is ours, so a bad body is INVALID_ARGUMENT with
            # the same message the HTTP receiver gives.
            "Export": grpc.unary_unary_rpc_method_handler(self._handle),
        })
        server.add_generic_rpc_handlers((handler,))
        material = self._security.grpc_material()
        try:
            if material is None:
                port = server.add_insecure_port(str(self.endpoint))
            else:
                key, chain, client_ca = material
                credentials = grpc.ssl_server_credentials(
                    [(key, chain)], root_certificates=client_ca,
                    require_client_auth=client_ca is not None)
                port = server.add_secure_port(str(self.endpoint), credentials)
        except RuntimeError as exc:
            raise ReceiverError(f"cannot listen for OTLP/gRPC on {self.endpoint}: {exc}") from None
        if port == 0:
            raise ReceiverError(f"cannot listen for OTLP/gRPC on {self.endpoint}")
        await server.start()
        self._server = server
        log.info("OTLP/gRPC%s listening on %s", " (TLS)" if material else "", self.endpoint)

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop(STOP_GRACE_S)

    async def _handle(self, body: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            self._security.check(_metadata_value(context, "authorization"))
            # Inline, so no local holds the decoded request while the export awaits its commit.
            outcome = await self._export(decode_protobuf(body), body)
        except ExportError as exc:
            answer = exc.answer
            self._on_answer(answer.reason)
            if answer.retryable:
                info = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(seconds=RETRY_AFTER_S))
                context.set_trailing_metadata(
                    (("google.rpc.retryinfo-bin", info.SerializeToString()),))
            await context.abort(answer.grpc_code, exc.message)
        self._on_answer(_outcome(outcome))
        return encode_response(export_response(outcome.rejected, outcome.message), PROTOBUF)


def _metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None
