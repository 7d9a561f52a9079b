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


def test_json_hex_ids_and_int64_strings() -> None:
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "", "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661000000000, "kind": 2, "unknownField": [1, 2],
        "attributes": [{"key": "n", "value": {"intValue": "12"}}]}]}]}]}
    request = decode_json(json.dumps(doc).encode())
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
        decode_json(body)
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


def test_partial_success_encoding() -> None:
    assert encode_response(export_response(0, ""), JSON) == b"{}"
    assert encode_response(export_response(0, ""), PROTOBUF) == b""
    answer = json.loads(encode_response(export_response(2, "bad"), JSON))
    assert answer == {"partialSuccess": {"rejectedSpans": "2", "errorMessage": "bad"}}
