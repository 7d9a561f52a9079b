"""OTLP wire formats of every signal: decode requests, encode answers. No network here, only
bytes.

OTLP/JSON is proto3 JSON with two differences the protobuf library does not know: trace and
span ids are hex (not base64), also in log records, span links and exemplars, and enum values
may be integers (the library takes those, and names, as they are). Ids are rewritten before
parsing; unknown fields are ignored as the specification requires.
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from collector.receivers.errors import ExportError, Refusal
from collector.signals import Signal

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
MAX_JSON_DEPTH = 64  # deeper than any real OTLP document; stops recursion bombs early




@dataclass(frozen=True, slots=True)
class Wire:
    """What differs between the signals on the wire; everything else is shared."""

    path: str  # OTLP/HTTP
    service: str  # OTLP/gRPC, fully qualified; the method is Export
    request: type[Message]
    response: type[Message]
    rejected_field: str  # the count in the response's partial_success


WIRES: dict[Signal, Wire] = {
    Signal.TRACES: Wire("/v1/traces", "opentelemetry.proto.collector.trace.v1.TraceService",
                        ExportTraceServiceRequest, ExportTraceServiceResponse,
                        "rejected_spans"),
    Signal.LOGS: Wire("/v1/logs", "opentelemetry.proto.collector.logs.v1.LogsService",
                      ExportLogsServiceRequest, ExportLogsServiceResponse,
                      "rejected_log_records"),
    Signal.METRICS: Wire("/v1/metrics", "opentelemetry.proto.collector.metrics.v1.MetricsService",
                         ExportMetricsServiceRequest, ExportMetricsServiceResponse,
                         "rejected_data_points"),
}


def decode_protobuf(body: bytes, signal: Signal) -> Any:
    request_type = WIRES[signal].request
    request = request_type()
    try:
        request.ParseFromString(body)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ExportError(Refusal.INVALID, f"cannot decode protobuf {request_type.__name__}: "
                                           f"{exc}") from None
    return request


def decode(body: bytes, content_type: str, signal: Signal) -> tuple[Any, bytes | None]:
    """The request, and its protobuf encoding when the body is one (the mapping reads it)."""
    if content_type == JSON:
        return decode_json(body, signal), None
    return decode_protobuf(body, signal), body


def decode_json(body: bytes, signal: Signal) -> Any:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportError(Refusal.INVALID, f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ExportError(Refusal.INVALID, "invalid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise ExportError(Refusal.INVALID, "OTLP/JSON body must be an object")
    request_type = WIRES[signal].request
    try:
        _hex_ids_to_base64(doc, 0)
        request = request_type()
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
        return request
    except ExportError:
        raise
    except (json_format.ParseError, ValueError, TypeError, RecursionError, SystemError) as exc:
        raise ExportError(Refusal.INVALID, f"not an OTLP/JSON {request_type.__name__}: "
                                           f"{exc}") from None


def _hex_ids_to_base64(node: Any, depth: int) -> None:
    """OTLP/JSON writes ids as hex; proto3 JSON expects base64. Rewrite them in place."""
    if depth > MAX_JSON_DEPTH:
        raise ExportError(Refusal.INVALID, "OTLP/JSON document nested too deeply")
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ID_FIELDS and isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
                except ValueError:
                    raise ExportError(Refusal.INVALID,
                                      f"{key} must be hex, got {value[:40]!r}") from None
            elif isinstance(value, dict | list):
                _hex_ids_to_base64(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, dict | list):
                _hex_ids_to_base64(item, depth + 1)


GZIP_WBITS = 16 + zlib.MAX_WBITS
DEFLATE_WBITS = zlib.MAX_WBITS  # HTTP "deflate" is the zlib format


class BoundedGunzip:
    """Incremental gzip (or deflate) decoding that refuses to produce more than `limit` bytes.

    Bounding the output, not the input, is what stops a gzip bomb: a few kilobytes can
    expand to gigabytes.
    """

    def __init__(self, limit: int, wbits: int = GZIP_WBITS) -> None:
        self._limit = limit
        self._out = bytearray()
        self._inflater = zlib.decompressobj(wbits)

    def feed(self, chunk: bytes) -> None:
        room = self._limit - len(self._out) + 1
        try:
            data = self._inflater.decompress(chunk, room)
        except zlib.error as exc:
            raise ExportError(Refusal.INVALID, f"invalid compressed body: {exc}") from None
        self._out += data
        if len(self._out) > self._limit or self._inflater.unconsumed_tail:
            raise ExportError(Refusal.TOO_LARGE,
                              f"decompressed body exceeds {self._limit} bytes")

    def finish(self) -> bytes:
        try:
            rest = self._inflater.flush()
        except zlib.error as exc:
            raise ExportError(Refusal.INVALID, f"invalid compressed body: {exc}") from None
        self._out += rest
        if len(self._out) > self._limit:
            raise ExportError(Refusal.TOO_LARGE,
                              f"decompressed body exceeds {self._limit} bytes")
        if not self._inflater.eof:
            raise ExportError(Refusal.INVALID, "invalid compressed body: truncated stream")
        return bytes(self._out)


def gunzip_bounded(body: bytes, limit: int) -> bytes:
    inflater = BoundedGunzip(limit)
    inflater.feed(body)
    return inflater.finish()


def export_response(signal: Signal, rejected: int, message: str) -> Message:
    """Full success leaves partial_success unset, as the specification asks."""
    wire = WIRES[signal]
    response = wire.response()
    if rejected or message:
        partial = response.partial_success
        setattr(partial, wire.rejected_field, rejected)
        partial.error_message = message
    return response


def encode_response(response: Message, content_type: str) -> bytes:
    if content_type == JSON:
        text: str = json_format.MessageToJson(response, indent=None)
        return text.encode("utf-8")
    data: bytes = response.SerializeToString()
    return data


def encode_status(code: int, message: str, content_type: str) -> bytes:
    """An error body: a google.rpc.Status in the request's encoding."""
    status = status_pb2.Status(code=code, message=message.encode("utf-8", "replace").decode())
    if content_type == JSON:
        text: str = json_format.MessageToJson(status, indent=None)
        return text.encode("utf-8")
    data: bytes = status.SerializeToString()
    return data


__all__ = ["JSON", "PROTOBUF", "WIRES", "BoundedGunzip", "Wire", "decode", "decode_json",
           "decode_protobuf", "encode_response", "encode_status", "export_response",
           "gunzip_bounded"]
