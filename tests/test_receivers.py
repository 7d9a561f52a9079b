"""Both transports against a real daemon: encodings, answers, and every bad-input status."""

from __future__ import annotations

import gzip
import http.client
import json
import random
from typing import Any

import grpc
import pytest
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import MS, T0, Daemon, make_span, module_daemon

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def new_trace() -> int:
    return random.getrandbits(127) + 1


def usage(session: str, **extra: Any) -> dict[str, Any]:
    return {"gen_ai.conversation.id": session, "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "test-model", "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 10, **extra}


def post(daemon: Daemon, body: bytes, *, content_type: str = "application/x-protobuf",
         headers: dict[str, str] | None = None, path: str = "/v1/traces",
         method: str = "POST", chunked: bool = False) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=20)
    try:
        all_headers = {"Content-Type": content_type, **(headers or {})}
        if chunked:
            conn.request(method, path, body=iter([body[: len(body) // 2], body[len(body) // 2:]]),
                         headers=all_headers, encode_chunked=True)
        else:
            conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def grpc_call(daemon: Daemon, body: bytes, **kwargs: Any) -> bytes:
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        result: bytes = call(body, timeout=20, **kwargs)
        return result


def request_bytes(*spans: Any) -> bytes:
    data: bytes = encode_spans(list(spans)).SerializeToString()
    return data


# -- success paths ------------------------------------------------------------------------------

@pytest.mark.parametrize("gzip_body", [False, True])
def test_sdk_http_exporter_protobuf(shared_daemon: Daemon, gzip_body: bool) -> None:
    session = f"http-pb-{gzip_body}"
    shared_daemon.export_http([make_span(trace_id=new_trace(), attrs=usage(session))],
                              gzip=gzip_body)
    row = shared_daemon.row(session)
    assert (row["turns"], row["prompt_tokens"], row["completion_tokens"]) == (1, 100, 10)


@pytest.mark.parametrize("gzip_body", [False, True])
def test_sdk_grpc_exporter(shared_daemon: Daemon, gzip_body: bool) -> None:
    session = f"grpc-{gzip_body}"
    shared_daemon.export_grpc([make_span(trace_id=new_trace(), attrs=usage(session))],
                              gzip=gzip_body)
    row = shared_daemon.row(session)
    assert (row["turns"], row["prompt_tokens"], row["completion_tokens"]) == (1, 100, 10)


def test_sdk_http_exporter_deflate(shared_daemon: Daemon) -> None:
    from opentelemetry.exporter.otlp.proto.http import Compression

    exporter = shared_daemon.http_exporter(compression=Compression.Deflate)
    try:
        exporter.export([make_span(trace_id=new_trace(), attrs=usage("deflate"))])
    finally:
        exporter.shutdown()
    assert shared_daemon.row("deflate")["prompt_tokens"] == 100


def otlp_json(session: str, trace_hex: str, *, tokens: Any = "250") -> dict[str, Any]:
    """OTLP/JSON as the spec writes it: hex ids, lowerCamelCase, int64 as strings."""
    return {
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "agent"}}]},
            "scopeSpans": [{
                "scope": {"name": "agent"},
                "spans": [{
                    "traceId": trace_hex,
                    "spanId": "00f067aa0ba902b7",
                    "name": "turn",
                    "kind": 1,
                    "startTimeUnixNano": str(T0),
                    "endTimeUnixNano": T0 + 3 * MS,
                    "attributes": [
                        {"key": "session.id", "value": {"stringValue": session}},
                        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": tokens}},
                        {"key": "gen_ai.usage.output_tokens", "value": {"intValue": 5}},
                        {"key": "gen_ai.response.model", "value": {"stringValue": "test-model"}},
                    ],
                    "someFutureField": {"ignored": True},
                }],
            }],
        }],
    }


@pytest.mark.parametrize("chunked", [False, True])
def test_raw_otlp_json_with_hex_ids_and_string_int64(shared_daemon: Daemon,
                                                     chunked: bool) -> None:
    session = f"json-{chunked}"
    body = json.dumps(otlp_json(session, f"{new_trace():032x}")).encode()
    status, headers, payload = post(shared_daemon, body, content_type="application/json",
                                    chunked=chunked)
    assert status == 200, payload
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(payload) == {}  # full success: partialSuccess unset
    row = shared_daemon.row(session)
    assert (row["turns"], row["prompt_tokens"], row["completion_tokens"]) == (1, 250, 5)
    assert row["created_at"] == "2026-01-01T00:00:00.000Z"
    assert row["last_active_at"] == "2026-01-01T00:00:00.003Z"


def test_gzip_json_request(shared_daemon: Daemon) -> None:
    body = gzip.compress(json.dumps(otlp_json("json-gz", f"{new_trace():032x}")).encode())
    status, _, payload = post(shared_daemon, body, content_type="application/json",
                              headers={"Content-Encoding": "gzip"})
    assert status == 200, payload
    assert shared_daemon.row("json-gz")["prompt_tokens"] == 250


def test_protobuf_full_success_leaves_partial_success_unset(shared_daemon: Daemon) -> None:
    status, headers, payload = post(shared_daemon, request_bytes(
        make_span(trace_id=new_trace(), attrs=usage("pb-full"))))
    assert status == 200
    assert headers["Content-Type"] == "application/x-protobuf"
    response = ExportTraceServiceResponse.FromString(payload)
    assert not response.HasField("partial_success")


# -- partial success ----------------------------------------------------------------------------

def test_http_partial_success_accounts_valid_spans(shared_daemon: Daemon) -> None:
    trace = new_trace()
    body = request_bytes(
        make_span(trace_id=trace, span_id=1, attrs=usage("partial-http")),
        make_span(trace_id=trace, span_id=2,
                  attrs=usage("partial-http", **{"gen_ai.usage.input_tokens": -5})),
        make_span(trace_id=trace, span_id=3,
                  attrs=usage("partial-http", **{"gen_ai.usage.output_tokens": "lots"})),
    )
    status, _, payload = post(shared_daemon, body)
    assert status == 200
    response = ExportTraceServiceResponse.FromString(payload)
    assert response.partial_success.rejected_spans == 2
    assert "gen_ai.usage.input_tokens" in response.partial_success.error_message
    assert "gen_ai.usage.output_tokens" in response.partial_success.error_message
    row = shared_daemon.row("partial-http")
    assert (row["turns"], row["prompt_tokens"]) == (1, 100)


def test_grpc_partial_success(shared_daemon: Daemon) -> None:
    trace = new_trace()
    payload = grpc_call(shared_daemon, request_bytes(
        make_span(trace_id=trace, span_id=1, attrs=usage("partial-grpc")),
        make_span(trace_id=trace, span_id=2,
                  attrs=usage("partial-grpc", **{"gen_ai.usage.input_tokens": -1})),
    ))
    response = ExportTraceServiceResponse.FromString(payload)
    assert response.partial_success.rejected_spans == 1
    assert shared_daemon.row("partial-grpc")["turns"] == 1


def test_json_partial_success_is_answered_in_json(shared_daemon: Daemon) -> None:
    body = json.dumps(otlp_json("json-partial", f"{new_trace():032x}", tokens="-3")).encode()
    status, _, payload = post(shared_daemon, body, content_type="application/json")
    assert status == 200
    answer = json.loads(payload)
    assert answer["partialSuccess"]["rejectedSpans"] == "1"
    assert "must be an integer from 0" in answer["partialSuccess"]["errorMessage"]
    assert "json-partial" not in shared_daemon.rows()


# -- refusals -----------------------------------------------------------------------------------

def status_message(payload: bytes) -> str:
    message: str = status_pb2.Status.FromString(payload).message
    return message


def test_undecodable_protobuf_is_400_with_a_status_body(shared_daemon: Daemon) -> None:
    status, headers, payload = post(shared_daemon, b"\xff\xff\xff\xff not protobuf")
    assert status == 400
    assert headers["Content-Type"] == "application/x-protobuf"
    assert "cannot decode" in status_message(payload)


def test_invalid_json_is_400_with_a_json_status(shared_daemon: Daemon) -> None:
    status, _, payload = post(shared_daemon, b"{not json", content_type="application/json")
    assert status == 400
    assert "invalid JSON" in json.loads(payload)["message"]


def test_json_with_bad_hex_id_is_400(shared_daemon: Daemon) -> None:
    body = json.dumps(otlp_json("bad-hex", "zz" * 16)).encode()
    status, _, payload = post(shared_daemon, body, content_type="application/json")
    assert status == 400
    assert "traceId must be hex" in json.loads(payload)["message"]
    assert "bad-hex" not in shared_daemon.rows()


def test_unsupported_content_type_is_415(shared_daemon: Daemon) -> None:
    status, _, payload = post(shared_daemon, b"hello", content_type="text/plain")
    assert status == 415
    assert b"unsupported Content-Type" in payload


def test_unsupported_content_encoding_is_415(shared_daemon: Daemon) -> None:
    status, _, payload = post(shared_daemon, b"x", headers={"Content-Encoding": "br"})
    assert status == 415
    assert "Content-Encoding" in status_message(payload)


def test_broken_gzip_is_400(shared_daemon: Daemon) -> None:
    status, _, payload = post(shared_daemon, b"\x1f\x8b\x08garbage",
                              headers={"Content-Encoding": "gzip"})
    assert status == 400
    assert "compressed body" in status_message(payload)


def test_wrong_path_is_404_and_wrong_method_405(shared_daemon: Daemon) -> None:
    status, _, payload = post(shared_daemon, b"", path="/v1/profiles")
    assert status == 404
    assert payload.decode() == ("no route /v1/profiles; OTLP traces to /v1/traces, logs to "
                                "/v1/logs, metrics to /v1/metrics\n")
    for path in ("/v1/traces", "/v1/logs", "/v1/metrics"):
        status, headers, _ = post(shared_daemon, b"", method="GET", path=path)
        assert status == 405 and headers["Allow"] == "POST"


def test_grpc_undecodable_is_invalid_argument(shared_daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(shared_daemon, b"\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot decode" in (info.value.details() or "")


LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_limit_daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from module_daemon(tmp_path_factory, "limits",
                             f"[receivers.otlp]\nmax_request_bytes = {LIMIT}\n")


def big_request(session: str, n: int = 400) -> bytes:
    trace = new_trace()
    return request_bytes(*(make_span(trace_id=trace, span_id=i + 1,
                                     attrs=usage(session, padding="p" * 300))
                           for i in range(n)))


def test_body_over_limit_is_413(small_limit_daemon: Daemon) -> None:
    body = big_request("too-big")
    assert len(body) > LIMIT
    status, _, payload = post(small_limit_daemon, body)
    assert status == 413
    assert "exceeds the limit" in status_message(payload)
    status, _, _ = post(small_limit_daemon, body, chunked=True)  # no Content-Length
    assert status == 413
    assert "too-big" not in small_limit_daemon.rows()


def test_gzip_bomb_is_413_after_decompression(small_limit_daemon: Daemon) -> None:
    body = big_request("bomb")
    compressed = gzip.compress(body)
    assert len(compressed) < LIMIT < len(body)
    status, _, payload = post(small_limit_daemon, compressed,
                              headers={"Content-Encoding": "gzip"})
    assert status == 413
    assert "decompressed body exceeds" in status_message(payload)
    # The daemon still serves, and a small request is accepted.
    small_limit_daemon.export_http([make_span(trace_id=new_trace(), attrs=usage("after-bomb"))])
    assert small_limit_daemon.row("after-bomb")["turns"] == 1


def test_grpc_over_limit_is_resource_exhausted(small_limit_daemon: Daemon) -> None:
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(small_limit_daemon, big_request("grpc-too-big"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(small_limit_daemon, big_request("grpc-bomb"),
                  compression=grpc.Compression.Gzip)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not {"grpc-too-big", "grpc-bomb"} & set(small_limit_daemon.rows())


def test_requests_without_usage_are_answered_at_once(shared_daemon: Daemon) -> None:
    status, _, payload = post(shared_daemon, request_bytes(
        make_span(trace_id=new_trace(), attrs={"http.method": "GET"})))
    assert status == 200
    assert not ExportTraceServiceResponse.FromString(payload).HasField("partial_success")
    assert ExportTraceServiceRequest().SerializeToString() == b""
    status, _, _ = post(shared_daemon, b"")  # an empty request is a valid, empty export
    assert status == 200


@pytest.fixture(scope="module")
def bounded_daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from module_daemon(tmp_path_factory, "bounded",
                             "[limits]\nmax_spans_per_request = 10\nmax_attributes_per_span = 12\n"
                             "max_attribute_value_bytes = 64\nmax_value_depth = 2\n")


def test_limits_answer_413_or_reject_spans_with_a_message(bounded_daemon: Daemon) -> None:
    trace = new_trace()
    status, _, payload = post(bounded_daemon, request_bytes(
        *(make_span(trace_id=trace, span_id=i + 1, attrs=usage("limits")) for i in range(11))))
    assert status == 413 and "11 spans; the limit is 10" in status_message(payload)
    with pytest.raises(grpc.RpcError) as info:
        grpc_call(bounded_daemon, request_bytes(
            *(make_span(trace_id=trace, span_id=i + 1, attrs=usage("limits"))
              for i in range(11))))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    status, _, payload = post(bounded_daemon, request_bytes(
        make_span(trace_id=trace, span_id=1, attrs=usage("limits")),
        make_span(trace_id=trace, span_id=2, attrs=usage("limits", **{
            f"x.{i}": i for i in range(10)})),
        make_span(trace_id=trace, span_id=3, attrs=usage("limits", **{
            "gen_ai.response.model": "m" * 65})),
        make_span(trace_id=trace, span_id=4, attrs=usage("limits", nested=[1, 2])),
    ))
    assert status == 200
    partial = ExportTraceServiceResponse.FromString(payload).partial_success
    assert partial.rejected_spans == 2
    assert "exceed the limit of 12" in partial.error_message
    assert "longer than 64 bytes" in partial.error_message
    assert bounded_daemon.row("limits")["turns"] == 2
