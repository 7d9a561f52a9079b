"""Logs and metrics on both transports: the SDK exporters, raw bodies in every encoding,
captured agent payloads, and every refusal, against a real daemon over real sockets.

These tests check the transport half (answers, encodings, limits, counting): the records they
send belong to no dialect, so they are received and ignored. What the dialects read as usage is
tested in test_dialects.py.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import signal as signals
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.exporter.otlp.proto.grpc._log_exporter import (
    OTLPLogExporter as GrpcLogExporter,
)
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
    OTLPMetricExporter as GrpcMetricExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http._log_exporter import (
    OTLPLogExporter as HttpLogExporter,
)
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.sdk._logs import LoggerProvider, ReadableLogRecord
from opentelemetry.sdk._logs.export import (
    InMemoryLogRecordExporter,
    LogRecordExportResult,
    SimpleLogRecordProcessor,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricExportResult, MetricsData
from opentelemetry.sdk.resources import Resource

from collector.accounting.pricing import Pricer
from collector.config import Endpoint
from collector.pipeline import ExportOutcome, Pipeline
from collector.receivers.grpc import GrpcReceiver
from collector.receivers.http import HttpReceiver
from collector.signals import Signal, count_items
from collector.signals.traces import MappingOptions
from collector.store.sqlite import SQLiteStore
from tests.conftest import T0, Daemon, free_port, make_span, module_daemon
from tests.test_daemon import post_in_flight
from tests.test_ops import Samples, metric, scrape
from tests.test_receivers import new_trace, post, request_bytes, status_message, usage

CAPTURES = Path(__file__).parent / "captures"
PATHS = {Signal.LOGS: "/v1/logs", Signal.METRICS: "/v1/metrics"}
METHODS = {Signal.LOGS: "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
           Signal.METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"}
STEMS = {Signal.TRACES: "collector_spans", Signal.LOGS: "collector_log_records",
         Signal.METRICS: "collector_data_points"}
RESPONSES: dict[Signal, type[Message]] = {Signal.LOGS: ExportLogsServiceResponse,
                                          Signal.METRICS: ExportMetricsServiceResponse}
REJECTED = {Signal.LOGS: "rejected_log_records", Signal.METRICS: "rejected_data_points"}
BOTH = [Signal.LOGS, Signal.METRICS]


# -- what agents send, made with the SDK -------------------------------------------------------

def sdk_log_records(session: str, count: int) -> tuple[ReadableLogRecord, ...]:
    """Log records as an agent's LoggerProvider hands them to its exporter: events with a
    session id, counts as attributes and, on one, a trace context."""
    memory = InMemoryLogRecordExporter()
    provider = LoggerProvider(resource=Resource({"service.name": "agent-cli"}))
    provider.add_log_record_processor(SimpleLogRecordProcessor(memory))
    logger = provider.get_logger("agent-cli")
    for i in range(count):
        logger.emit(timestamp=T0 + i, body=f"event {i}", event_name="agent.api_response",
                    attributes={"session.id": session, "input_token_count": 1234,
                                "output_token_count": "77", "model": "test-model"})
    records = memory.get_finished_logs()
    provider.shutdown()
    return records


def sdk_metrics(session: str) -> MetricsData:
    """A counter over two attribute sets, a histogram and a gauge: four data points."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader],
                             resource=Resource({"service.name": "agent-cli"}))
    meter = provider.get_meter("agent-cli")
    tokens = meter.create_counter("agent.token.usage", unit="{token}")
    tokens.add(1234, {"session.id": session, "type": "input"})
    tokens.add(77, {"session.id": session, "type": "output"})
    meter.create_histogram("agent.api.latency", unit="ms").record(12.5, {"session.id": session})
    meter.create_gauge("agent.sessions.open").set(1)
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None
    return data


def points_in(data: MetricsData) -> int:
    return sum(len(m.data.data_points) for rm in data.resource_metrics
               for sm in rm.scope_metrics for m in sm.metrics)


def raw_body(signal: Signal, session: str) -> bytes:
    if signal is Signal.LOGS:
        data: bytes = encode_logs(list(sdk_log_records(session, 3))).SerializeToString()
    else:
        data = encode_metrics(sdk_metrics(session)).SerializeToString()
    return data


ITEMS_IN_RAW_BODY = {Signal.LOGS: 3, Signal.METRICS: 4}


def to_otlp_json(message: Message) -> bytes:
    """OTLP/JSON as exporters write it: lowerCamelCase, hex ids, int64 as strings."""
    doc = json_format.MessageToDict(message)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId") and isinstance(value, str):
                    node[key] = base64.b64decode(value).hex()
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return json.dumps(doc).encode()


def captured_protobuf(doc: dict[str, Any], request_type: type[Message]) -> bytes:
    """A captured body (MessageToDict, ids as hex) back to the protobuf bytes the agent sent."""

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId") and isinstance(value, str):
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    data: bytes = json_format.ParseDict(doc, request_type()).SerializeToString()
    return data


def call(daemon: Daemon, signal: Signal, body: bytes, **kwargs: Any) -> bytes:
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        method = channel.unary_unary(METHODS[signal], request_serializer=None,
                                     response_deserializer=None)
        result: bytes = method(body, timeout=20, **kwargs)
        return result


def grpc_code(daemon: Daemon, signal: Signal, body: bytes, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(daemon, signal, body, **kwargs)
    return info.value


def received(samples: Samples, signal: Signal) -> float:
    return metric(samples, f"{STEMS[signal]}_received_total")


def answered(samples: Samples, signal: Signal, transport: str, outcome: str = "ok") -> float:
    return metric(samples, "collector_requests_total", signal=signal.value, transport=transport,
                  outcome=outcome)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(tmp_path_factory, "signals", "")


# -- the SDK exporters ---------------------------------------------------------------------------

@pytest.mark.parametrize("compressed", [False, True])
def test_sdk_log_exporters_over_both_transports(daemon: Daemon, compressed: bool) -> None:
    before = scrape(daemon)
    http_exporter = HttpLogExporter(
        endpoint=f"http://127.0.0.1:{daemon.http_port}/v1/logs", timeout=20,
        compression=HttpCompression.Gzip if compressed else HttpCompression.NoCompression)
    grpc_exporter = GrpcLogExporter(
        endpoint=daemon.grpc_endpoint, insecure=True, timeout=20,
        compression=grpc.Compression.Gzip if compressed else grpc.Compression.NoCompression)
    try:
        assert http_exporter.export(sdk_log_records("logs-http", 5)) == \
            LogRecordExportResult.SUCCESS, daemon.log
        assert grpc_exporter.export(sdk_log_records("logs-grpc", 7)) == \
            LogRecordExportResult.SUCCESS, daemon.log
    finally:
        http_exporter.shutdown()
        grpc_exporter.shutdown()
    after = scrape(daemon)
    assert received(after, Signal.LOGS) - received(before, Signal.LOGS) == 12
    ignored = f"{STEMS[Signal.LOGS]}_ignored_total"
    assert metric(after, ignored) - metric(before, ignored) == 12  # received, not usage
    for transport in ("http", "grpc"):
        assert answered(after, Signal.LOGS, transport) - answered(
            before, Signal.LOGS, transport) == 1
    assert received(after, Signal.TRACES) == received(before, Signal.TRACES)
    assert not {"logs-http", "logs-grpc"} & set(daemon.rows())


@pytest.mark.parametrize("compressed", [False, True])
def test_sdk_metric_exporters_over_both_transports(daemon: Daemon, compressed: bool) -> None:
    before = scrape(daemon)
    http_exporter = HttpMetricExporter(
        endpoint=f"http://127.0.0.1:{daemon.http_port}/v1/metrics", timeout=20,
        compression=HttpCompression.Gzip if compressed else HttpCompression.NoCompression)
    grpc_exporter = GrpcMetricExporter(
        endpoint=daemon.grpc_endpoint, insecure=True, timeout=20,
        compression=grpc.Compression.Gzip if compressed else grpc.Compression.NoCompression)
    data = sdk_metrics("metrics")
    assert points_in(data) == 4
    try:
        assert http_exporter.export(data) == MetricExportResult.SUCCESS, daemon.log
        assert grpc_exporter.export(data) == MetricExportResult.SUCCESS, daemon.log
    finally:
        http_exporter.shutdown()
        grpc_exporter.shutdown()
    after = scrape(daemon)
    assert received(after, Signal.METRICS) - received(before, Signal.METRICS) == 8
    for transport in ("http", "grpc"):
        assert answered(after, Signal.METRICS, transport) - answered(
            before, Signal.METRICS, transport) == 1


# -- raw bodies: every encoding, answered in kind ----------------------------------------------

ENCODINGS = ["protobuf", "protobuf-gzip", "protobuf-deflate", "protobuf-chunked", "json",
             "json-gzip", "json-chunked"]


@pytest.mark.parametrize("signal", BOTH)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_raw_bodies_in_every_encoding(daemon: Daemon, signal: Signal, encoding: str) -> None:
    message = RESPONSES[signal]
    body = raw_body(signal, f"raw-{encoding}")
    content_type = "application/x-protobuf"
    if encoding.startswith("json"):
        request_type = (ExportLogsServiceRequest if signal is Signal.LOGS
                        else ExportMetricsServiceRequest)
        body = to_otlp_json(request_type.FromString(body))
        content_type = "application/json"
    headers = {}
    if encoding.endswith("gzip"):
        body, headers = gzip.compress(body), {"Content-Encoding": "gzip"}
    elif encoding.endswith("deflate"):
        body, headers = zlib.compress(body), {"Content-Encoding": "deflate"}
    before = received(scrape(daemon), signal)
    status, answer_headers, payload = post(daemon, body, content_type=content_type,
                                           headers=headers, path=PATHS[signal],
                                           chunked=encoding.endswith("chunked"))
    assert status == 200, payload
    assert answer_headers["Content-Type"].startswith(content_type)
    if content_type == "application/json":
        assert json.loads(payload) == {}  # full success: partialSuccess unset
    else:
        assert not message.FromString(payload).HasField("partial_success")
    assert received(scrape(daemon), signal) - before == ITEMS_IN_RAW_BODY[signal]


def test_a_log_record_with_a_span_context_keeps_its_ids_through_json(daemon: Daemon) -> None:
    """OTLP/JSON's hex ids inside log records and exemplars decode (a base64 reading of
    "13fb...bf" would be 24 bytes, not a trace id); a bad one is 400 with the field named."""
    doc = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{
        "timeUnixNano": str(T0), "severityNumber": "SEVERITY_NUMBER_INFO",
        "traceId": "13fb412035c59c3f8e70eb50e428bebf", "spanId": "ba6c9d753981c182",
        "body": {"stringValue": "x"}}]}]}]}
    assert post(daemon, json.dumps(doc).encode(), content_type="application/json",
                path="/v1/logs")[0] == 200
    record = doc["resourceLogs"][0]["scopeLogs"][0]["logRecords"][0]
    record["spanId"] = "not-hex"
    status, _, payload = post(daemon, json.dumps(doc).encode(), content_type="application/json",
                              path="/v1/logs")
    assert status == 400 and "spanId must be hex" in json.loads(payload)["message"]
    exemplar = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{"name": "m", "gauge": {
        "dataPoints": [{"asDouble": 1, "exemplars": [{"traceId": "zz", "asInt": "1"}]}]}}]}]}]}
    status, _, payload = post(daemon, json.dumps(exemplar).encode(),
                              content_type="application/json", path="/v1/metrics")
    assert status == 400 and "traceId must be hex" in json.loads(payload)["message"]


# -- captured payloads: Gemini CLI's default gRPC export is no longer UNIMPLEMENTED ---------

def test_gemini_cli_grpc_logs_and_metrics_are_answered_ok(daemon: Daemon) -> None:
    folder = CAPTURES / "gemini-cli-0.61.0-grpc"
    before = scrape(daemon)
    expected = {}
    for signal, request_type in ((Signal.LOGS, ExportLogsServiceRequest),
                                 (Signal.METRICS, ExportMetricsServiceRequest)):
        (captured,) = json.loads(
            (folder / f"run2_default-traces-off_{signal.value}_grpc_decoded.json").read_text())
        assert captured["method"] == METHODS[signal]
        body = captured_protobuf(captured["body"], request_type)
        # The CLI's own bytes, except strings the capture elided (over 500 characters).
        assert 0 < len(body) <= captured["body_len"]
        expected[signal] = count_items(signal, request_type.FromString(body))
        response = RESPONSES[signal].FromString(call(daemon, signal, body))
        assert not response.HasField("partial_success")
    after = scrape(daemon)
    assert expected[Signal.LOGS] > 0 and expected[Signal.METRICS] > 0
    for signal, count in expected.items():
        assert received(after, signal) - received(before, signal) == count
        assert answered(after, signal, "grpc") - answered(before, signal, "grpc") == 1


def test_gemini_cli_http_json_bodies_are_answered_ok(daemon: Daemon) -> None:
    """Replayed as the CLI sent them: raw OTLP/JSON, chunked."""
    folder = CAPTURES / "gemini-cli-0.61.0"
    before = scrape(daemon)
    for signal in BOTH:
        body = (folder / f"{signal.value}.json").read_bytes()
        status, _, payload = post(daemon, body, content_type="application/json",
                                  path=PATHS[signal], chunked=True)
        assert (status, json.loads(payload)) == (200, {})
    after = scrape(daemon)
    assert received(after, Signal.LOGS) - received(before, Signal.LOGS) == 10
    metrics_doc = json.loads((folder / "metrics.json").read_bytes())
    points = sum(len(next(v for k, v in m.items() if k in (
        "sum", "gauge", "histogram", "exponentialHistogram", "summary"))["dataPoints"])
        for rm in metrics_doc["resourceMetrics"] for sm in rm["scopeMetrics"]
        for m in sm["metrics"])
    assert received(after, Signal.METRICS) - received(before, Signal.METRICS) == points


# -- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("signal", BOTH)
def test_bad_bodies_are_400_and_invalid_argument_with_a_message(daemon: Daemon,
                                                                signal: Signal) -> None:
    name = {Signal.LOGS: "ExportLogsServiceRequest",
            Signal.METRICS: "ExportMetricsServiceRequest"}[signal]
    path = PATHS[signal]
    status, headers, payload = post(daemon, b"\xff\xff\xff\xff not protobuf", path=path)
    assert (status, headers["Content-Type"]) == (400, "application/x-protobuf")
    assert f"cannot decode protobuf {name}" in status_message(payload)
    status, _, payload = post(daemon, b"{not json", content_type="application/json", path=path)
    assert status == 400 and "invalid JSON" in json.loads(payload)["message"]
    status, _, payload = post(daemon, b'{"resourceLogs": 3, "resourceMetrics": 3}',
                              content_type="application/json", path=path)
    assert status == 400 and f"not an OTLP/JSON {name}" in json.loads(payload)["message"]
    status, _, payload = post(daemon, b"\x1f\x8b\x08garbage", path=path,
                              headers={"Content-Encoding": "gzip"})
    assert status == 400 and "compressed body" in status_message(payload)
    assert post(daemon, b"x", content_type="text/plain", path=path)[0] == 415
    error = grpc_code(daemon, signal, b"\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"cannot decode protobuf {name}" in (error.details() or "")


LIMIT = 64 * 1024
MAX_ITEMS = 10


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    yield from module_daemon(tmp_path_factory, "signal-limits",
                             f"[receivers.otlp]\nmax_request_bytes = {LIMIT}\n"
                             f"[limits]\nmax_spans_per_request = {MAX_ITEMS}\n")


def many_logs(count: int, padding: int = 0) -> bytes:
    records = [record for i in range(count // 5 + 1)
               for record in sdk_log_records(f"many-{i}" + "p" * padding, 5)][:count]
    data: bytes = encode_logs(list(records)).SerializeToString()
    return data


def many_points(count: int) -> bytes:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counter = provider.get_meter("m").create_counter("c")
    for i in range(count):
        counter.add(1, {"i": i})
    data = reader.get_metrics_data()
    provider.shutdown()
    assert data is not None and points_in(data) == count
    body: bytes = encode_metrics(data).SerializeToString()
    return body


@pytest.mark.parametrize("signal", BOTH)
def test_limits_answer_413_and_resource_exhausted(limited: Daemon, signal: Signal) -> None:
    """One limit, limits.max_spans_per_request, bounds the items of a request of any signal;
    the body limit and the gzip bound are the same as for traces."""
    path = PATHS[signal]
    too_many = many_logs(MAX_ITEMS + 1) if signal is Signal.LOGS else many_points(MAX_ITEMS + 1)
    status, _, payload = post(limited, too_many, path=path)
    assert status == 413
    assert f"request carries 11 {signal.items}; the limit is 10" in status_message(payload)
    assert grpc_code(limited, signal, too_many).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    enough = many_logs(MAX_ITEMS) if signal is Signal.LOGS else many_points(MAX_ITEMS)
    assert post(limited, enough, path=path)[0] == 200
    assert RESPONSES[signal].FromString(call(limited, signal, enough)).ByteSize() == 0

    big = many_logs(MAX_ITEMS, padding=8000)  # over the body limit, whatever the signal
    assert len(big) > LIMIT
    status, _, payload = post(limited, big, path=path)
    assert status == 413 and "exceeds the limit" in status_message(payload)
    assert post(limited, big, path=path, chunked=True)[0] == 413  # no Content-Length
    status, _, payload = post(limited, gzip.compress(big), path=path,
                              headers={"Content-Encoding": "gzip"})
    assert status == 413 and "decompressed body exceeds" in status_message(payload)
    assert grpc_code(limited, signal, big).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    samples = scrape(limited)
    assert metric(samples, f"{STEMS[signal]}_rejected_total", reason="too_large") == 22
    assert answered(samples, signal, "http", "too_large") == 4


def test_bearer_token_is_required_on_logs_and_metrics(start_daemon: Any, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    daemon = start_daemon(f'[auth]\ntoken_file = "{token}"\n')
    for signal in BOTH:
        body = raw_body(signal, "auth")
        status, headers, _ = post(daemon, body, path=PATHS[signal])
        assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
        assert post(daemon, body, path=PATHS[signal],
                    headers={"Authorization": "Bearer nope"})[0] == 401
        assert grpc_code(daemon, signal, body).code() == grpc.StatusCode.UNAUTHENTICATED
        assert post(daemon, body, path=PATHS[signal],
                    headers={"Authorization": "Bearer t0ken"})[0] == 200
        assert call(daemon, signal, body, metadata=(("authorization", "Bearer t0ken"),)) == b""
    samples = scrape(daemon)
    for signal in BOTH:
        assert answered(samples, signal, "http", "unauthenticated") == 2
        assert answered(samples, signal, "grpc", "unauthenticated") == 1
        assert received(samples, signal) == 2 * ITEMS_IN_RAW_BODY[signal]


def test_overload_is_503_and_unavailable_on_logs_and_metrics(start_daemon: Any) -> None:
    """While spans wait for storage over flush.max_pending_spans, logs and metrics are refused
    retryably too: one bound for the whole pipeline."""
    daemon = start_daemon("[flush]\ninterval_ms = 60000\nmax_pending_spans = 1\n"
                          '[log]\nlevel = "debug"\n')
    results, threads = post_in_flight(daemon, {"held": request_bytes(
        make_span(trace_id=new_trace(), attrs=usage("held")))})
    for signal in BOTH:
        status, headers, payload = post(daemon, raw_body(signal, "over"), path=PATHS[signal])
        assert (status, headers["Retry-After"]) == (503, "1")
        assert "usage records waiting for storage" in status_message(payload)
        error = grpc_code(daemon, signal, raw_body(signal, "over"))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert any(key == "google.rpc.retryinfo-bin"
                   for key, _ in error.trailing_metadata() or ())
    samples = scrape(daemon)
    for signal in BOTH:
        assert metric(samples, f"{STEMS[signal]}_rejected_total", reason="overloaded") == \
            2 * ITEMS_IN_RAW_BODY[signal]
        assert received(samples, signal) == 0
    assert daemon.stop(signals.SIGTERM) == 0
    for t in threads:
        t.join(20)
    assert results == {"held": 200}  # committed at shutdown, then answered


# -- in-process receivers over real sockets: the next stage swapped for a sink ---------------

async def test_partial_success_names_log_records_and_data_points(tmp_path: Path) -> None:
    """What the receivers do with an outcome that rejected some items: each signal's own
    partial_success field, in the request's encoding."""
    seen: list[tuple[Signal, str]] = []

    async def sink(signal: Signal, request: Any, wire: bytes | None,
                   credential: str | None) -> ExportOutcome:
        seen.append((signal, type(request).__name__))
        return ExportOutcome(rejected=2, message="2 bad")

    http_receiver = HttpReceiver(Endpoint("127.0.0.1", free_port()), sink,
                                 max_request_bytes=LIMIT)
    grpc_receiver = GrpcReceiver(Endpoint("127.0.0.1", free_port()), sink,
                                 max_request_bytes=LIMIT)
    await http_receiver.start()
    await grpc_receiver.start()
    try:
        stub = _Endpoints(http_receiver.endpoint.port, grpc_receiver.endpoint.port)
        for signal in BOTH:
            body = raw_body(signal, "partial")
            status, _, payload = await asyncio.to_thread(post, stub, body, path=PATHS[signal])
            partial = RESPONSES[signal].FromString(payload).partial_success
            assert (status, getattr(partial, REJECTED[signal]), partial.error_message) == (
                200, 2, "2 bad")
            json_body = to_otlp_json(RESPONSES[signal]())  # any valid JSON object will do
            status, _, payload = await asyncio.to_thread(
                post, stub, json_body, content_type="application/json", path=PATHS[signal])
            camel = "rejectedLogRecords" if signal is Signal.LOGS else "rejectedDataPoints"
            assert json.loads(payload) == {"partialSuccess": {camel: "2",
                                                              "errorMessage": "2 bad"}}
            payload = await asyncio.to_thread(call, stub, signal, body)
            assert getattr(RESPONSES[signal].FromString(payload).partial_success,
                           REJECTED[signal]) == 2
    finally:
        await http_receiver.stop()
        await grpc_receiver.stop()
    assert seen == [(Signal.LOGS, "ExportLogsServiceRequest")] * 3 + [
        (Signal.METRICS, "ExportMetricsServiceRequest")] * 3


async def test_shutting_down_is_503_and_unavailable_on_every_signal(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.db", retention_s=3600)
    await store.open()
    pipeline = Pipeline(store, MappingOptions(pricer=Pricer({}, use_library=False)),
                        flush_interval_s=0.01, max_pending_spans=100, stale_after_s=3600)
    await pipeline.start()
    http_receiver = HttpReceiver(Endpoint("127.0.0.1", free_port()), pipeline.export,
                                 max_request_bytes=LIMIT)
    grpc_receiver = GrpcReceiver(Endpoint("127.0.0.1", free_port()), pipeline.export,
                                 max_request_bytes=LIMIT)
    await http_receiver.start()
    await grpc_receiver.start()
    stub = _Endpoints(http_receiver.endpoint.port, grpc_receiver.endpoint.port)
    try:
        pipeline.begin_shutdown()
        for signal in BOTH:
            body = raw_body(signal, "late")
            status, headers, payload = await asyncio.to_thread(post, stub, body,
                                                               path=PATHS[signal])
            assert (status, headers["Retry-After"]) == (503, "1")
            assert "shutting down" in status_message(payload)
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(call, stub, signal, body)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert pipeline.stats.items[signal].refused == {
                "shutting_down": 2 * ITEMS_IN_RAW_BODY[signal]}
    finally:
        await http_receiver.stop()
        await grpc_receiver.stop()
        await pipeline.shutdown()
        await store.close()


class _Endpoints:
    """Just the ports the post and call helpers read from a Daemon."""

    def __init__(self, http_port: int, grpc_port: int) -> None:
        self.http_port = http_port
        self.grpc_endpoint = f"127.0.0.1:{grpc_port}"
