"""OTLP/gRPC (grpc.aio): TraceService, LogsService and MetricsService; raw bytes in and out,
decoded here and handed to the one export callable with their signal; every refusal is an
ExportError translated through collector.receivers.errors."""

from __future__ import annotations

import functools
import logging
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from collector.config import Endpoint
from collector.config.connections import ConnectionLimits
from collector.receivers.common import (
    STOP_GRACE_S,
    AnswerFn,
    ExportFn,
    ReceiverError,
    no_count,
    outcome_label,
)
from collector.receivers.errors import RETRY_AFTER_S, ExportError
from collector.receivers.otlp import (
    PROTOBUF,
    WIRES,
    decode_protobuf,
    encode_response,
    export_response,
)
from collector.security import Security
from collector.signals import Signal

log = logging.getLogger(__name__)


class GrpcReceiver:
    def __init__(self, endpoint: Endpoint, export: ExportFn, *, max_request_bytes: int,
                 security: Security | None = None, on_answer: AnswerFn = no_count,
                 limits: ConnectionLimits | None = None) -> None:
        self.endpoint = endpoint
        self._limits = limits or ConnectionLimits()
        self._export = export
        self._limit = max_request_bytes
        self._security = security or Security()
        self._on_answer = on_answer
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=server_options(self._limit, self._limits))
        # Raw bytes in and out: decoding is ours, so a bad body is INVALID_ARGUMENT with the
        # same message the HTTP receiver gives.
        server.add_generic_rpc_handlers(tuple(
            grpc.method_handlers_generic_handler(WIRES[signal].service, {
                "Export": grpc.unary_unary_rpc_method_handler(
                    functools.partial(self._handle, signal)),
            }) for signal in Signal))
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

    async def _handle(self, signal: Signal, body: bytes,
                      context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            credential = self._security.check(_metadata_value(context, "authorization"))
            # Inline, so no local holds the decoded request while the export awaits its commit.
            outcome = await self._export(signal, decode_protobuf(body, signal), body,
                                         credential)
        except ExportError as exc:
            answer = exc.answer
            self._on_answer(signal, answer.reason)
            if answer.retryable:
                info = error_details_pb2.RetryInfo(
                    retry_delay=duration_pb2.Duration(seconds=RETRY_AFTER_S))
                context.set_trailing_metadata(
                    (("google.rpc.retryinfo-bin", info.SerializeToString()),))
            await context.abort(answer.grpc_code, exc.message)
        self._on_answer(signal, outcome_label(outcome))
        return encode_response(export_response(signal, outcome.rejected, outcome.message),
                               PROTOBUF)


def server_options(max_request_bytes: int, limits: ConnectionLimits) -> list[tuple[str, int]]:
    """gRPC core's channel arguments for the server: the body limit, and the HTTP listeners'
    bounds in HTTP/2's terms (collector.config.connections). The handshake (HTTP/2 preface
    and settings, TLS included) gets the header deadline; the cap counts connections."""
    return [
        ("grpc.max_receive_message_length", max_request_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.server_handshake_timeout_ms", limits.header_timeout_ms),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_connection_idle_ms", limits.grpc_max_connection_idle_ms),
        ("grpc.max_connection_age_ms", limits.grpc_max_connection_age_ms),
        ("grpc.max_connection_age_grace_ms", limits.grpc_max_connection_age_grace_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", limits.grpc_min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", limits.grpc_max_ping_strikes),
        ("grpc.max_concurrent_streams", limits.grpc_max_concurrent_streams),
    ]


def _metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value.decode("latin-1") if isinstance(value, bytes) else str(value)
    return None
