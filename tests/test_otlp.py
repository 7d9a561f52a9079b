"""Wire formats: OTLP/JSON quirks and bounded decompression."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from collector.receivers.errors import ExportError, Refusal
from collector.receivers.otlp import (
    DEFLATE_WBITS,
    JSON,
    PROTOBUF,
    BoundedGunzip,
    decode_json,
    encode_response,
    export_response,
    gunzip_bounded,
)
from collector.signals import Signal, count_items


def test_json_hex_ids_and_int64_strings() -> None:
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "", "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661000000000, "kind": 2, "unknownField": [1, 2],
        "attributes": [{"key": "n", "value": {"intValue": "12"}}]}]}]}]}
    request = decode_json(json.dumps(doc).encode(), Signal.TRACES)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert span.span_id.hex() == "eee19b7ec3c1b174"
    assert span.parent_span_id == b""
    assert span.start_time_unix_nano == 1544712660000000000
    assert span.attributes[0].value.int_value == 12


@pytest.mark.parametrize("body", [b"[]", b"{\"resourceSpans\": 3}", b"\xff\xfe",
                                  b"[" * 100000 + b"]" * 100000])
def test_json_that_is_not_a_request_is_invalid(body: bytes) -> None:
    with pytest.raises(ExportError) as info:
        decode_json(body, Signal.TRACES)
    assert info.value.refusal is Refusal.INVALID


def test_bounded_gunzip_stops_at_the_limit_without_inflating_everything() -> None:
    bomb = gzip.compress(b"\0" * 10_000_000)
    inflater = BoundedGunzip(1000)
    with pytest.raises(ExportError) as info:
        inflater.feed(bomb)
    assert info.value.refusal is Refusal.TOO_LARGE
    assert gunzip_bounded(gzip.compress(b"x" * 1000), 1000) == b"x" * 1000


def test_deflate_and_truncated_streams() -> None:
    inflater = BoundedGunzip(100, DEFLATE_WBITS)
    inflater.feed(zlib.compress(b"hello"))
    assert inflater.finish() == b"hello"
    with pytest.raises(ExportError, match="truncated"):
        gunzip_bounded(gzip.compress(b"hello world" * 100)[:-12], 10_000)


@pytest.mark.parametrize(("signal", "field"), [(Signal.TRACES, "rejectedSpans"),
                                               (Signal.LOGS, "rejectedLogRecords"),
                                               (Signal.METRICS, "rejectedDataPoints")])
def test_partial_success_encoding(signal: Signal, field: str) -> None:
    assert encode_response(export_response(signal, 0, ""), JSON) == b"{}"
    assert encode_response(export_response(signal, 0, ""), PROTOBUF) == b""
    answer = json.loads(encode_response(export_response(signal, 2, "bad"), JSON))
    assert answer == {"partialSuccess": {field: "2", "errorMessage": "bad"}}


def test_json_log_records_take_hex_ids_enum_names_or_numbers_and_string_int64() -> None:
    doc = {"resourceLogs": [{"scopeLogs": [{"logRecords": [
        {"timeUnixNano": "1767225600000000000", "severityNumber": 9, "severityText": "INFO",
         "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
         "body": {"stringValue": "hello"}, "futureField": 1,
         "attributes": [{"key": "input_token_count", "value": {"intValue": "1234"}}]},
        {"severityNumber": "SEVERITY_NUMBER_WARN", "observedTimeUnixNano": 5}]}]}]}
    request = decode_json(json.dumps(doc).encode(), Signal.LOGS)
    first, second = request.resource_logs[0].scope_logs[0].log_records
    assert (first.trace_id.hex(), first.span_id.hex()) == ("5b8efff798038103d269b633813fc60c",
                                                           "eee19b7ec3c1b174")
    assert (first.time_unix_nano, first.severity_number) == (1767225600000000000, 9)
    assert first.attributes[0].value.int_value == 1234
    assert (second.severity_number, second.observed_time_unix_nano) == (13, 5)


def test_json_metrics_with_exemplar_ids_and_temporality_names_or_numbers() -> None:
    point = {"asInt": "7", "timeUnixNano": "2", "exemplars": [
        {"asDouble": 1.5, "traceId": "5b8efff798038103d269b633813fc60c",
         "spanId": "eee19b7ec3c1b174"}]}
    doc = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [
        {"name": "a", "sum": {"aggregationTemporality": 2, "isMonotonic": True,
                              "dataPoints": [point, point]}},
        {"name": "b", "sum": {"aggregationTemporality": "AGGREGATION_TEMPORALITY_DELTA",
                              "dataPoints": [point]}},
        {"name": "c", "histogram": {"dataPoints": [{"count": "3", "bucketCounts": ["1", "2"],
                                                    "explicitBounds": [1.0]}]}}]}]}]}
    request = decode_json(json.dumps(doc).encode(), Signal.METRICS)
    a, b, c = request.resource_metrics[0].scope_metrics[0].metrics
    assert (a.sum.aggregation_temporality, b.sum.aggregation_temporality) == (2, 1)
    assert a.sum.data_points[0].as_int == 7
    assert a.sum.data_points[0].exemplars[0].trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert list(c.histogram.data_points[0].bucket_counts) == [1, 2]
    assert count_items(Signal.METRICS, request) == 4


@pytest.mark.parametrize("signal", list(Signal))
def test_each_signal_refuses_another_signals_json_shape_only_by_ignoring_it(
        signal: Signal) -> None:
    """Unknown fields are ignored (the specification asks it), so a logs body posted to
    /v1/metrics is an empty, valid metrics export; a bad id is invalid wherever it sits."""
    request = decode_json(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{}]}]}]}', signal)
    assert count_items(signal, request) == (1 if signal is Signal.TRACES else 0)
    with pytest.raises(ExportError, match="spanId must be hex"):
        decode_json(b'{"resourceLogs": [{"scopeLogs": [{"logRecords": [{"spanId": "xyz"}]}]}]}',
                    signal)
