"""collector/scan.py: its compiled reader and its Python twin return the same, right tuples.

Three layers:

* requests built with the protobuf classes, each read by both readers and compared with the
  tuples written out by hand;
* wire bytes that only a hand encoder makes (fields out of order, a value field given twice,
  unknown fields and groups, known fields with the wrong wire type): upb decodes them, the
  Python reader reads what upb decoded, and the compiled reader must find the same in the bytes;
* fixed-seed differential fuzzing: byte mutants of the fuzz seeds and generated wire requests.

Values are compared by type and, for floats, by bit pattern (`typed`): `True == 1`, `1.0 == 1`,
`-0.0 == 0.0` and `nan != nan` would otherwise hide a difference or invent one.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from collector.signals.scan import (
    COMPILED_AVAILABLE,
    EMPTY,
    NESTED,
    ResourceScan,
    Scanner,
    SpanScan,
)
from collector.signals.traces import ATTRIBUTE_SLOTS, N_SLOTS
from tests import fuzzing
from tests.conftest import MS, T0

ScanResult = list[tuple[ResourceScan, list[SpanScan]]]

NO_COMPILED = ("collector.signals._scan is not built (no C compiler at install): only the "
               "Python reader runs")
needs_compiled = pytest.mark.skipif(not COMPILED_AVAILABLE, reason=NO_COMPILED)

# A small slot table. Slot 3's name holds a NUL byte (the compiled reader compares lengths, not
# C strings); "b" is both a known name and an alias, so it is read as known and slot 4, which
# only that alias names, must stay empty.
A, B, C, NUL, ALIAS_ONLY = range(5)
SLOTS = 5
KNOWN = {"a": A, "b": B, "c": C, "n\x00l": NUL}
ALIASES = {"alias.a": A, "alias.a2": A, "alias.c": C, "b": ALIAS_ONLY}
DEPTH = 1  # max_depth where a case does not say

TRACE = bytes(range(1, 17))
SPAN_ID = bytes(range(1, 9))
START, END = T0, T0 + MS


@pytest.fixture(params=[pytest.param(True, id="compiled", marks=needs_compiled),
                        pytest.param(False, id="python")])
def compiled(request: pytest.FixtureRequest) -> bool:
    """Runs a test once with each reader."""
    chosen: bool = request.param
    return chosen


def scanner(compiled: bool, max_depth: int = DEPTH,
            aliases: Mapping[str, int] = ALIASES) -> Scanner:
    reader = Scanner(KNOWN, aliases, SLOTS, max_depth, compiled=compiled)
    assert reader.compiled is compiled  # the reader under test is the one asked for
    return reader


def typed(value: Any) -> Any:
    """`value` with every leaf tagged by its type; floats by their bits, markers by identity."""
    if value is EMPTY:
        return "EMPTY"
    if value is NESTED:
        return "NESTED"
    if isinstance(value, list):
        return [typed(item) for item in value]
    if isinstance(value, tuple):
        return tuple(typed(item) for item in value)
    if isinstance(value, float):
        return ("float", struct.pack(">d", value).hex())
    if value is None or isinstance(value, str | bytes | int):
        return (type(value).__name__, value)
    return (type(value).__name__, repr(value))  # anything else is a difference worth seeing


# -- the expected tuples --------------------------------------------------------------------------

def slots(values: Mapping[int, Any] | None = None, n: int = SLOTS) -> list[Any]:
    out: list[Any] = [None] * n
    for slot, value in (values or {}).items():
        out[slot] = value
    return out


def span_scan(values: Mapping[int, Any] | None, count: int, deep: str | None = None, *,
              trace_id: bytes = TRACE, span_id: bytes = SPAN_ID, parent: bool = False,
              start: int = START, end: int = END) -> SpanScan:
    return (slots(values), trace_id, span_id, parent, start, end, count, deep)


def resource_scan(values: Mapping[int, Any] | None = None, count: int = 0,
                  deep: str | None = None) -> ResourceScan:
    return (slots(values), count, deep)


def one_resource(*spans: SpanScan, resource: ResourceScan | None = None) -> ScanResult:
    return [(resource or resource_scan(), list(spans))]


# -- requests from the protobuf classes -----------------------------------------------------------

def text(value: str) -> AnyValue:
    return AnyValue(string_value=value)


def integer(value: int) -> AnyValue:
    return AnyValue(int_value=value)


def array(*values: AnyValue) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=values))


def kvlist(*items: tuple[str, AnyValue | None]) -> AnyValue:
    return AnyValue(kvlist_value=KeyValueList(values=[attr(k, v) for k, v in items]))


def attr(key: str, value: AnyValue | None = None) -> KeyValue:
    """A KeyValue; without `value` its value field is absent."""
    return KeyValue(key=key) if value is None else KeyValue(key=key, value=value)


def nest(depth: int, shape: str) -> AnyValue:
    """A string wrapped in `depth` arrays, key-value lists, or both alternating."""
    value = text("leaf")
    for level in range(depth):
        as_array = shape == "array" or (shape == "alternating" and level % 2 == 0)
        value = array(value) if as_array else kvlist(("k", value))
    return value


def span(*attributes: KeyValue, trace_id: bytes = TRACE, span_id: bytes = SPAN_ID,
         parent: bytes = b"", start: int = START, end: int = END) -> Span:
    return Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name="s",
                start_time_unix_nano=start, end_time_unix_nano=end, attributes=attributes)


def resource_spans(*scopes: Sequence[Span], attributes: Sequence[KeyValue] = ()) -> ResourceSpans:
    return ResourceSpans(resource=Resource(attributes=attributes),
                         scope_spans=[ScopeSpans(spans=spans) for spans in scopes])


def request(*resources: ResourceSpans) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest(resource_spans=resources)


def single(*attributes: KeyValue) -> ExportTraceServiceRequest:
    """One resource without attributes, one scope, one span with these attributes."""
    return request(resource_spans([span(*attributes)]))


# -- (a) hand-built requests ----------------------------------------------------------------------

VALUE_KINDS = [
    pytest.param(text("x"), "x", id="string"),
    pytest.param(text(""), "", id="empty-string"),
    pytest.param(text("é\U0001d518\x00\u202e"), "é\U0001d518\x00\u202e", id="unicode-string"),
    pytest.param(AnyValue(bool_value=True), True, id="true"),
    pytest.param(AnyValue(bool_value=False), False, id="false"),
    pytest.param(integer(0), 0, id="int-zero"),
    pytest.param(integer(-1), -1, id="int-minus-one"),
    pytest.param(integer(2**63 - 1), 2**63 - 1, id="int64-max"),
    pytest.param(integer(-(2**63)), -(2**63), id="int64-min"),
    pytest.param(AnyValue(double_value=0.0), 0.0, id="double-zero"),
    pytest.param(AnyValue(double_value=-0.0), -0.0, id="double-negative-zero"),
    pytest.param(AnyValue(double_value=1.5), 1.5, id="double"),
    pytest.param(AnyValue(double_value=5e-324), 5e-324, id="double-subnormal"),
    pytest.param(AnyValue(double_value=float("inf")), float("inf"), id="double-inf"),
    pytest.param(AnyValue(double_value=float("-inf")), float("-inf"), id="double-minus-inf"),
    pytest.param(AnyValue(double_value=float("nan")), float("nan"), id="double-nan"),
    pytest.param(AnyValue(bytes_value=b"\x00\xff"), b"\x00\xff", id="bytes"),
    pytest.param(AnyValue(bytes_value=b""), b"", id="empty-bytes"),
    pytest.param(array(text("x"), integer(1)), NESTED, id="array"),
    pytest.param(array(), NESTED, id="empty-array"),
    pytest.param(kvlist(("k", text("v"))), NESTED, id="kvlist"),
    pytest.param(kvlist(), NESTED, id="empty-kvlist"),
    pytest.param(AnyValue(), EMPTY, id="empty-value"),
    pytest.param(None, EMPTY, id="keyvalue-without-value"),
]


@pytest.mark.parametrize(("value", "expected"), VALUE_KINDS)
def test_every_value_kind_of_a_known_attribute(compiled: bool, value: AnyValue | None,
                                               expected: Any) -> None:
    got = scanner(compiled).scan(single(attr("a", value)))
    assert typed(got) == typed(one_resource(span_scan({A: expected}, 1)))


@pytest.mark.parametrize(("value", "expected"), VALUE_KINDS)
def test_every_value_kind_of_a_resource_attribute(compiled: bool, value: AnyValue | None,
                                                  expected: Any) -> None:
    got = scanner(compiled).scan(request(resource_spans([span()],
                                                        attributes=[attr("c", value)])))
    assert typed(got) == typed(one_resource(span_scan(None, 0),
                                            resource=resource_scan({C: expected}, 1)))


def test_unknown_attributes_are_counted_but_not_read(compiled: bool) -> None:
    got = scanner(compiled).scan(single(attr("x", text("v")), attr("", integer(1)), attr("ab"),
                                        attr("A", text("case matters")), attr("n", text("nul"))))
    assert typed(got) == typed(one_resource(span_scan(None, 5)))


def test_a_known_name_with_a_nul_byte_is_matched_whole(compiled: bool) -> None:
    got = scanner(compiled).scan(single(attr("n\x00l", text("yes")), attr("n", text("no")),
                                        attr("n\x00", text("no"))))
    assert typed(got) == typed(one_resource(span_scan({NUL: "yes"}, 3)))


@pytest.mark.parametrize(("attributes", "expected"), [
    pytest.param([attr("a", integer(1)), attr("a", text("x")),
                  attr("a", AnyValue(double_value=2.5))], 2.5, id="three-kinds"),
    pytest.param([attr("a", integer(1)), attr("a")], EMPTY, id="then-without-value"),
    pytest.param([attr("a"), attr("a", integer(1))], 1, id="after-without-value"),
    pytest.param([attr("a", array()), attr("a", AnyValue(bool_value=False))], False,
                 id="nested-then-scalar"),
    pytest.param([attr("a", text("x")), attr("a", kvlist())], NESTED, id="scalar-then-nested"),
])
def test_a_repeated_known_name_keeps_its_last_value(compiled: bool, attributes: list[KeyValue],
                                                    expected: Any) -> None:
    got = scanner(compiled).scan(single(*attributes))
    assert typed(got) == typed(one_resource(span_scan({A: expected}, len(attributes))))


@pytest.mark.parametrize(("attributes", "expected"), [
    pytest.param([attr("alias.a", text("alias"))], {A: "alias"}, id="alias-alone"),
    pytest.param([attr("alias.a", text("alias")), attr("a", text("known"))], {A: "known"},
                 id="alias-before-known"),
    pytest.param([attr("a", text("known")), attr("alias.a", text("alias"))], {A: "known"},
                 id="alias-after-known"),
    pytest.param([attr("a", integer(1)), attr("alias.a", integer(2)), attr("a", integer(3))],
                 {A: 3}, id="known-alias-known"),
    pytest.param([attr("alias.a", text("first")), attr("alias.a2", text("second")),
                  attr("alias.a", text("third"))], {A: "first"}, id="aliases-first-wins"),
    pytest.param([attr("a"), attr("alias.a", text("x"))], {A: EMPTY},
                 id="alias-after-known-without-value"),
    pytest.param([attr("alias.a"), attr("alias.a2", text("x"))], {A: EMPTY},
                 id="alias-without-value-fills-the-slot"),
    pytest.param([attr("b", integer(1)), attr("b", integer(2))], {B: 2},
                 id="alias-name-equal-to-a-known-name-reads-as-known"),
    pytest.param([attr("alias.c", array(array()))], {C: NESTED}, id="alias-nested"),
    pytest.param([attr("alias.c", integer(7)), attr("alias.a", text("x"))], {C: 7, A: "x"},
                 id="aliases-of-two-slots"),
])
def test_aliases_fill_their_slot_only_while_it_is_empty(compiled: bool,
                                                        attributes: list[KeyValue],
                                                        expected: dict[int, Any]) -> None:
    got = scanner(compiled).scan(single(*attributes))
    assert typed(got) == typed(one_resource(span_scan(expected, len(attributes))))


def test_without_an_alias_table_aliases_are_unknown_names(compiled: bool) -> None:
    got = scanner(compiled, aliases={}).scan(single(attr("alias.a", text("x")),
                                                    attr("b", text("y"))))
    assert typed(got) == typed(one_resource(span_scan({B: "y"}, 2)))


@pytest.mark.parametrize("max_depth", [0, 1, 3])
@pytest.mark.parametrize("shape", ["array", "kvlist", "alternating"])
def test_nesting_is_allowed_up_to_max_depth_and_reported_one_past(
        compiled: bool, max_depth: int, shape: str) -> None:
    at_limit, past = nest(max_depth, shape), nest(max_depth + 1, shape)
    got = scanner(compiled, max_depth).scan(request(resource_spans(
        [span(attr("at", at_limit)), span(attr("past", past)),
         span(attr("first", past), attr("second", past), attr("at", at_limit))],
        attributes=[attr("res", past)])))
    assert typed(got) == typed(one_resource(
        span_scan(None, 1), span_scan(None, 1, "past"), span_scan(None, 3, "first"),
        resource=resource_scan(None, 1, "res")))


@pytest.mark.parametrize(("value", "max_depth", "deep"), [
    pytest.param(array(), 0, True, id="empty-array-at-depth-0"),
    pytest.param(kvlist(), 0, True, id="empty-kvlist-at-depth-0"),
    pytest.param(array(array()), 1, True, id="empty-inner-array-is-a-level"),
    pytest.param(kvlist(("k", kvlist())), 1, True, id="empty-inner-kvlist-is-a-level"),
    pytest.param(kvlist(("k", None)), 1, False, id="kvlist-entry-without-value"),
    pytest.param(kvlist(("k", AnyValue())), 1, False, id="kvlist-entry-with-empty-value"),
    pytest.param(array(text("s"), integer(1), nest(2, "array")), 2, True,
                 id="deep-element-after-shallow-ones"),
    pytest.param(array(text("s"), integer(1), nest(1, "array")), 2, False,
                 id="elements-within-the-limit"),
    pytest.param(kvlist(("x", text("s")), ("y", None), ("z", nest(2, "kvlist"))), 2, True,
                 id="deep-entry-after-shallow-ones"),
    pytest.param(array(array(text("s")), kvlist(("k", array(nest(1, "array"))))), 3, True,
                 id="deep-second-branch"),
])
def test_depth_counts_every_array_and_kvlist_level(compiled: bool, value: AnyValue,
                                                   max_depth: int, deep: bool) -> None:
    got = scanner(compiled, max_depth).scan(single(attr("x", value)))
    assert typed(got) == typed(one_resource(span_scan(None, 1, "x" if deep else None)))


def test_only_unknown_names_are_checked_for_depth_and_the_first_deep_one_is_named(
        compiled: bool) -> None:
    too_deep = nest(3, "alternating")
    got = scanner(compiled, 1).scan(single(
        attr("a", too_deep), attr("alias.c", too_deep), attr("b", too_deep),
        attr("shallow", array(text("s"))), attr("first", too_deep), attr("second", too_deep)))
    assert typed(got) == typed(one_resource(
        span_scan({A: NESTED, B: NESTED, C: NESTED}, 6, "first")))


def test_an_alias_whose_slot_is_taken_is_not_checked_for_depth(compiled: bool) -> None:
    got = scanner(compiled, 0).scan(single(attr("alias.a", text("x")),
                                           attr("alias.a2", array(array()))))
    assert typed(got) == typed(one_resource(span_scan({A: "x"}, 2)))


def test_resource_attributes_are_read_apart_from_span_attributes(compiled: bool) -> None:
    got = scanner(compiled).scan(request(resource_spans(
        [span(attr("b", text("span")))],
        attributes=[attr("a", text("resource")), attr("alias.c", text("alias")),
                    attr("deep", nest(2, "array")), attr("c", integer(1)),
                    attr("later", nest(2, "kvlist"))])))
    assert typed(got) == typed(one_resource(
        span_scan({B: "span"}, 1),
        resource=resource_scan({A: "resource", C: 1}, 5, "deep")))


def test_several_resources_and_scopes_keep_their_order_and_nothing_leaks(compiled: bool) -> None:
    first = resource_spans(
        [span(attr("a", integer(1)), attr("x", nest(2, "array")), span_id=b"1" * 8),
         span(span_id=b"2" * 8)],
        [],
        [span(attr("b", text("x")), span_id=b"3" * 8)],
        attributes=[attr("a", text("r1")), attr("deep", nest(2, "array"))])
    second = resource_spans()
    third = resource_spans([span(span_id=b"4" * 8)], [span(attr("a"), span_id=b"5" * 8)])
    got = scanner(compiled).scan(request(first, second, third))
    assert typed(got) == typed([
        (resource_scan({A: "r1"}, 2, "deep"),
         [span_scan({A: 1}, 2, "x", span_id=b"1" * 8), span_scan(None, 0, span_id=b"2" * 8),
          span_scan({B: "x"}, 1, span_id=b"3" * 8)]),
        (resource_scan(), []),
        (resource_scan(), [span_scan(None, 0, span_id=b"4" * 8),
                           span_scan({A: EMPTY}, 1, span_id=b"5" * 8)]),
    ])


@pytest.mark.parametrize(("span_", "expected"), [
    pytest.param(Span(), span_scan(None, 0, trace_id=b"", span_id=b"", start=0, end=0),
                 id="nothing-set"),
    pytest.param(span(parent=b"\x07" * 8), span_scan(None, 0, parent=True), id="parent"),
    pytest.param(span(parent=b"\x00"), span_scan(None, 0, parent=True), id="parent-one-zero"),
    pytest.param(span(parent=b""), span_scan(None, 0, parent=False), id="parent-empty"),
    pytest.param(span(trace_id=b"t", span_id=b"s" * 20),
                 span_scan(None, 0, trace_id=b"t", span_id=b"s" * 20), id="odd-id-lengths"),
    pytest.param(span(start=0, end=2**64 - 1), span_scan(None, 0, start=0, end=2**64 - 1),
                 id="time-extremes"),
])
def test_ids_parent_flag_and_times(compiled: bool, span_: Span, expected: SpanScan) -> None:
    got = scanner(compiled).scan(request(resource_spans([span_])))
    assert typed(got) == typed(one_resource(expected))


def test_an_empty_request_and_a_resource_without_spans(compiled: bool) -> None:
    reader = scanner(compiled)
    assert reader.scan(request()) == []
    got = reader.scan(request(ResourceSpans()))
    assert typed(got) == typed([(resource_scan(), [])])


@pytest.mark.parametrize("size", [0, 1, *range(117, 131), 255, 256, 16_383, 16_384])
def test_lengths_around_the_one_byte_varint_limit(compiled: bool, size: int) -> None:
    """Every enclosing message's length passes 127 (a one-byte length) at some size here."""
    got = scanner(compiled).scan(request(resource_spans(
        [span(attr("a", text("x" * size)), attr("k" * size, nest(DEEP, "array")),
              attr("c", AnyValue(bytes_value=b"\xff" * size)))],
        attributes=[attr("b", text("é" * size))])))
    assert typed(got) == typed(one_resource(
        span_scan({A: "x" * size, C: b"\xff" * size}, 3, "k" * size),
        resource=resource_scan({B: "é" * size}, 1)))


LONG_NAME = "gen_ai.usage.cache_read.input_tokens"
NEAR_MISSES = [LONG_NAME[:i] + "#" + LONG_NAME[i + 1:] for i in range(len(LONG_NAME))]


def test_a_name_one_byte_off_a_known_name_is_unknown(compiled: bool) -> None:
    """Whatever the name table hashes, names are compared whole."""
    reader = Scanner({LONG_NAME: 0, "short": 1}, {"alias.name": 2}, 3, DEPTH, compiled=compiled)
    near = [*NEAR_MISSES, LONG_NAME[:-1], LONG_NAME + "s", "shor", "shorts", "Short", "alias.nam"]
    got = reader.scan(single(*[attr(name, text(name)) for name in near]))
    assert typed(got) == typed([(([None] * 3, 0, None), [
        ([None] * 3, TRACE, SPAN_ID, False, START, END, len(near), None)])])


def test_names_alike_but_for_one_inner_byte_each_find_their_slot(compiled: bool) -> None:
    reader = Scanner({name: i for i, name in enumerate(NEAR_MISSES)}, {}, len(NEAR_MISSES),
                     DEPTH, compiled=compiled)
    got = reader.scan(single(*[attr(name, integer(i)) for i, name in enumerate(NEAR_MISSES)],
                             attr(LONG_NAME, integer(-1))))
    assert typed(got) == typed([(([None] * len(NEAR_MISSES), 0, None), [
        (list(range(len(NEAR_MISSES))), TRACE, SPAN_ID, False, START, END,
         len(NEAR_MISSES) + 1, None)])])


def test_the_mapping_slot_table_reads_every_known_name(compiled: bool) -> None:
    """The names collector.signals.traces knows, each to its own slot, in a table of that
    size."""
    reader = Scanner(ATTRIBUTE_SLOTS, {}, N_SLOTS, 8, compiled=compiled)
    names = sorted(ATTRIBUTE_SLOTS)
    got = reader.scan(single(*[attr(name, integer(i)) for i, name in enumerate(names)],
                             attr("gen_ai.usage.input_token", text("near miss"))))
    expected = {ATTRIBUTE_SLOTS[name]: i for i, name in enumerate(names)}
    assert typed(got) == typed([(([None] * N_SLOTS, 0, None), [
        (slots(expected, N_SLOTS), TRACE, SPAN_ID, False, START, END, len(names) + 1, None)])])


# -- (b) wire bytes only a hand encoder makes -----------------------------------------------------

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
UNKNOWN_FIELD = 1000  # unused at every level of the request
MAX_FIELD = 2**29 - 1


def varint(n: int) -> bytes:
    """Base-128 varint; a negative number is written as its 64-bit two's complement."""
    n &= 2**64 - 1
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def delimited(field: int, payload: bytes) -> bytes:
    return tag(field, LEN) + varint(len(payload)) + payload


def varint_field(field: int, n: int) -> bytes:
    return tag(field, VARINT) + varint(n)


def fixed64(field: int, n: int) -> bytes:
    return tag(field, I64) + struct.pack("<Q", n)


def fixed32(field: int, n: int) -> bytes:
    return tag(field, I32) + struct.pack("<I", n)


def group(field: int, *parts: bytes) -> bytes:
    return tag(field, SGROUP) + b"".join(parts) + tag(field, EGROUP)


def unknown_fields(field: int = UNKNOWN_FIELD) -> bytes:
    """One unknown field of every wire type, then a group holding them and a nested group."""
    plain = (varint_field(field, 2**64 - 1) + fixed64(field, 7) + delimited(field, b"\x08\x01")
             + fixed32(field, 7))
    return plain + group(field, plain, group(MAX_FIELD, plain), plain) + group(MAX_FIELD)


# AnyValue members (field numbers 1..7 of its oneof), written as the AnyValue's fields.
def v_string(value: str) -> bytes:
    return delimited(1, value.encode())


def v_bool(n: int) -> bytes:
    return varint_field(2, n)


def v_int(n: int) -> bytes:
    return varint_field(3, n)


def v_double_bits(bits: int) -> bytes:
    return fixed64(4, bits)


def v_array(*values: bytes) -> bytes:
    return delimited(5, b"".join(delimited(1, value) for value in values))


def v_kvlist(*key_values: bytes) -> bytes:
    return delimited(6, b"".join(delimited(1, kv) for kv in key_values))


def v_nest(depth: int) -> bytes:
    """A string in `depth` arrays."""
    return v_string("leaf") if depth == 0 else v_array(v_nest(depth - 1))


def w_kv(key: str, *values: bytes) -> bytes:
    """A KeyValue: its key, then its value field once per given AnyValue (they merge)."""
    return delimited(1, key.encode()) + b"".join(delimited(2, value) for value in values)


def w_attr(key_value: bytes) -> bytes:
    return delimited(9, key_value)


W_IDS = delimited(1, TRACE) + delimited(2, SPAN_ID) + fixed64(7, START) + fixed64(8, END)


def w_request(*span_fields: bytes, resource: bytes = b"") -> bytes:
    """One ResourceSpans (with `resource` as its Resource's fields), one scope, one span of the
    ids and times, then `span_fields`."""
    rs = (delimited(1, resource) if resource else b"") + delimited(2, delimited(
        2, W_IDS + b"".join(span_fields)))
    return delimited(1, rs)


def a_is(value: Any, count: int = 1, deep: str | None = None) -> ScanResult:
    return one_resource(span_scan({A: value}, count, deep))


def nothing_read(count: int, deep: str | None = None) -> ScanResult:
    return one_resource(span_scan(None, count, deep))


DEEP = 2  # v_nest(DEEP) is one level past DEPTH
WIRE_CASES = [
    # -- fields out of the usual order
    pytest.param(delimited(1, delimited(2, delimited(2, w_attr(w_kv("a", v_int(7))) + W_IDS))),
                 a_is(7), id="span-attributes-before-ids"),
    pytest.param(w_request(w_attr(delimited(2, v_int(7)) + delimited(1, b"a"))), a_is(7),
                 id="keyvalue-value-before-key"),
    pytest.param(delimited(1, delimited(2, delimited(2, W_IDS))
                           + delimited(1, delimited(1, w_kv("a", v_string("r"))))),
                 one_resource(span_scan(None, 0), resource=resource_scan({A: "r"}, 1)),
                 id="resource-after-scope-spans"),
    pytest.param(delimited(1, delimited(1, delimited(1, w_kv("a", v_int(1))))
                           + delimited(2, delimited(2, W_IDS))
                           + delimited(1, delimited(1, w_kv("a", v_int(2)))
                                       + delimited(1, w_kv("deep", v_nest(DEEP)))
                                       + delimited(1, w_kv("b", v_string("x"))))),
                 one_resource(span_scan(None, 0),
                              resource=resource_scan({A: 2, B: "x"}, 4, "deep")),
                 id="resource-twice-merges-its-attributes"),
    # -- a KeyValue's value field given more than once: the AnyValues merge
    pytest.param(w_request(w_attr(w_kv("a", v_int(1), v_string("x")))), a_is("x"),
                 id="value-twice-last-member-wins"),
    pytest.param(w_request(w_attr(w_kv("a", v_int(1), b""))), a_is(1),
                 id="value-twice-empty-second-changes-nothing"),
    pytest.param(w_request(w_attr(w_kv("a", v_array(), v_string("x"), v_array()))),
                 a_is(NESTED), id="value-thrice-array-string-array"),
    pytest.param(w_request(w_attr(w_kv("a", v_array(), v_string("x")))), a_is("x"),
                 id="value-twice-array-then-string"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(DEEP), v_string("x")))), nothing_read(1),
                 id="unknown-deep-array-replaced-by-string"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(DEEP), v_string("x"), v_nest(1)))),
                 nothing_read(1), id="unknown-deep-array-string-shallow-array"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(1), v_string("x"), v_nest(DEEP)))),
                 nothing_read(1, "u"), id="unknown-shallow-array-string-deep-array"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(1), v_array(v_array())))),
                 nothing_read(1, "u"), id="unknown-arrays-concatenate-shallow-then-deep"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(DEEP), v_nest(1)))), nothing_read(1, "u"),
                 id="unknown-arrays-concatenate-deep-then-shallow"),
    pytest.param(w_request(w_attr(w_kv("u", v_kvlist(w_kv("k", v_nest(1))), v_nest(1)))),
                 nothing_read(1), id="unknown-deep-kvlist-replaced-by-shallow-array"),
    pytest.param(w_request(w_attr(w_kv("u", v_kvlist(w_kv("k", v_string("s"))),
                                       v_kvlist(w_kv("k", v_array()))))),
                 nothing_read(1, "u"), id="unknown-kvlists-concatenate"),
    pytest.param(w_request(w_attr(w_kv("u", v_kvlist(w_kv("k", v_array(), v_string("s")))))),
                 nothing_read(1), id="nested-entry-value-twice-deep-then-string"),
    pytest.param(w_request(w_attr(w_kv("u", v_kvlist(w_kv("k", v_string("s"), v_array()))))),
                 nothing_read(1, "u"), id="nested-entry-value-twice-string-then-deep"),
    pytest.param(w_request(w_attr(w_kv("u", v_array(v_string("s") + v_array())))),
                 nothing_read(1, "u"), id="nested-element-two-members-last-is-deep"),
    pytest.param(w_request(w_attr(w_kv("u", v_array(v_array() + v_string("s"))))),
                 nothing_read(1), id="nested-element-two-members-last-is-scalar"),
    # -- one AnyValue with several oneof members, or one member twice
    pytest.param(w_request(w_attr(w_kv("a", v_int(1) + v_string("x")))), a_is("x"),
                 id="anyvalue-int-then-string"),
    pytest.param(w_request(w_attr(w_kv("a", v_string("x") + v_array() + v_bool(0)))),
                 a_is(False), id="anyvalue-string-array-bool"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(DEEP) + v_int(3)))), nothing_read(1),
                 id="anyvalue-deep-array-then-int"),
    pytest.param(w_request(w_attr(w_kv("u", v_nest(1) + v_array(v_array())))),
                 nothing_read(1, "u"), id="anyvalue-array-field-twice-merges"),
    # -- a KeyValue's key twice, a span field repeated: the last wins
    pytest.param(w_request(w_attr(delimited(1, b"u") + delimited(2, v_int(5))
                                  + delimited(1, b"a"))), a_is(5), id="key-unknown-then-known"),
    pytest.param(w_request(w_attr(delimited(1, b"a") + delimited(2, v_int(5))
                                  + delimited(1, b"u"))), nothing_read(1),
                 id="key-known-then-unknown"),
    pytest.param(w_request(w_attr(delimited(1, b"u") + delimited(2, v_nest(DEEP))
                                  + delimited(1, b"alias.a"))), a_is(NESTED),
                 id="key-unknown-deep-then-alias"),
    pytest.param(w_request(delimited(1, b"T" * 16), delimited(2, b"S" * 8), fixed64(7, 1),
                           fixed64(8, 2), delimited(1, b"t"), fixed64(7, 3)),
                 one_resource(span_scan(None, 0, trace_id=b"t", span_id=b"S" * 8, start=3,
                                        end=2)), id="span-fields-repeated"),
    pytest.param(w_request(delimited(4, b"p" * 8), delimited(4, b"")),
                 one_resource(span_scan(None, 0, parent=False)), id="parent-set-then-cleared"),
    pytest.param(w_request(delimited(4, b""), delimited(4, b"p")),
                 one_resource(span_scan(None, 0, parent=True)), id="parent-cleared-then-set"),
    pytest.param(w_request(w_attr(w_kv("a", v_int(1))), delimited(1, b""),
                           w_attr(w_kv("a", v_int(2)))),
                 one_resource(span_scan({A: 2}, 2, trace_id=b"")), id="attributes-around-ids"),
    # -- unknown fields of every wire type (with groups) at every level
    pytest.param(unknown_fields() + w_request() + unknown_fields(MAX_FIELD),
                 nothing_read(0), id="unknown-in-request"),
    pytest.param(delimited(1, unknown_fields() + delimited(2, delimited(2, W_IDS))),
                 nothing_read(0), id="unknown-in-resource-spans"),
    pytest.param(w_request(resource=unknown_fields() + delimited(1, w_kv("a", v_int(1)))),
                 one_resource(span_scan(None, 0), resource=resource_scan({A: 1}, 1)),
                 id="unknown-in-resource"),
    pytest.param(delimited(1, delimited(2, unknown_fields() + delimited(2, W_IDS)
                                        + unknown_fields())),
                 nothing_read(0), id="unknown-in-scope-spans"),
    pytest.param(w_request(unknown_fields(), w_attr(w_kv("a", v_int(1))), unknown_fields()),
                 a_is(1), id="unknown-in-span"),
    pytest.param(w_request(w_attr(unknown_fields() + w_kv("a", v_int(1)) + unknown_fields())),
                 a_is(1), id="unknown-in-keyvalue"),
    pytest.param(w_request(w_attr(w_kv("a", unknown_fields() + v_int(1) + unknown_fields()))),
                 a_is(1), id="unknown-in-anyvalue"),
    pytest.param(w_request(w_attr(w_kv("u", delimited(5, unknown_fields()
                                                          + delimited(1, v_string("s")))))),
                 nothing_read(1), id="unknown-in-arrayvalue"),
    pytest.param(w_request(w_attr(w_kv("u", delimited(6, unknown_fields()
                                                          + delimited(1, w_kv("k", v_array())))))),
                 nothing_read(1, "u"), id="unknown-in-kvlist"),
    pytest.param(w_request(w_attr(w_kv("u", v_array(unknown_fields() + v_array())))),
                 nothing_read(1, "u"), id="unknown-in-nested-anyvalue"),
    pytest.param(group(1, *[tag(UNKNOWN_FIELD, SGROUP)] * 99, *[tag(UNKNOWN_FIELD, EGROUP)] * 99)
                 + w_request(), nothing_read(0), id="groups-nested-100-deep-upb-limit"),
    # upb takes field number 0 inside a group (and only there): it skips a group's contents
    # without checking their numbers
    pytest.param(group(UNKNOWN_FIELD, varint_field(0, 5)) + w_request(), nothing_read(0),
                 id="field-number-0-in-a-group-in-request"),
    pytest.param(w_request(group(UNKNOWN_FIELD, varint_field(0, 5), fixed64(0, 1),
                                 delimited(0, b"x"), fixed32(0, 1), group(0, varint_field(0, 1))),
                           w_attr(w_kv("a", v_int(1)))),
                 a_is(1), id="field-number-0-in-a-group-in-span"),
    # -- a known field number with the wrong wire type is an unknown field
    pytest.param(varint_field(1, 5) + fixed64(1, 5) + group(1, delimited(2, W_IDS)) + w_request(),
                 nothing_read(0), id="wrong-type-resource-spans"),
    pytest.param(delimited(1, varint_field(1, 1) + group(1, delimited(1, w_kv("a", v_int(1))))
                           + fixed32(2, 1) + group(2, delimited(2, W_IDS))
                           + delimited(2, delimited(2, W_IDS))),
                 nothing_read(0), id="wrong-type-resource-and-scope-spans"),
    pytest.param(w_request(resource=fixed64(1, 0) + group(1, delimited(1, b"a"))
                           + delimited(1, w_kv("b", v_int(1)))),
                 one_resource(span_scan(None, 0), resource=resource_scan({B: 1}, 1)),
                 id="wrong-type-resource-attributes"),
    pytest.param(delimited(1, delimited(2, varint_field(2, 1) + group(2, W_IDS)
                                        + delimited(2, W_IDS))),
                 nothing_read(0), id="wrong-type-spans"),
    pytest.param(w_request(varint_field(1, 5), fixed32(2, 5), varint_field(4, 1),
                           delimited(4, b""), varint_field(7, 9), delimited(8, b"\x01" * 8),
                           fixed32(8, 9)),
                 nothing_read(0), id="wrong-type-ids-parent-times"),
    pytest.param(w_request(varint_field(9, 3), fixed64(9, 3),
                           group(9, delimited(1, b"a"), delimited(2, v_int(1)))),
                 nothing_read(0), id="wrong-type-span-attributes"),
    pytest.param(w_request(w_attr(delimited(1, b"a") + varint_field(1, 5) + fixed32(1, 5)
                                  + delimited(2, v_int(7)) + fixed64(2, 0)
                                  + group(2, v_int(8)))), a_is(7),
                 id="wrong-type-key-and-value"),
    pytest.param(w_request(w_attr(delimited(1, b"a") + fixed64(2, 0))), a_is(EMPTY),
                 id="wrong-type-value-only"),
    pytest.param(w_request(w_attr(w_kv("a", v_string("x") + varint_field(1, 5) + delimited(2, b"")
                                       + delimited(3, b"\x01") + fixed32(4, 0)
                                       + varint_field(5, 1) + fixed64(6, 0)
                                       + varint_field(7, 0) + group(3) + fixed64(3, 1)))),
                 a_is("x"), id="wrong-type-anyvalue-members-do-not-switch-the-oneof"),
    pytest.param(w_request(w_attr(w_kv("a", delimited(3, b"\x01") + fixed32(4, 0)))),
                 a_is(EMPTY), id="wrong-type-anyvalue-members-only"),
    pytest.param(w_request(w_attr(w_kv("u", delimited(5, group(1, delimited(5, b""))
                                                      + varint_field(1, 0))))),
                 nothing_read(1), id="wrong-type-array-values"),
    pytest.param(w_request(w_attr(w_kv("u", delimited(6, group(1, w_kv("k", v_array()))
                                                      + fixed64(1, 0))))),
                 nothing_read(1), id="wrong-type-kvlist-values"),
    pytest.param(w_request(w_attr(w_kv("u", v_kvlist(delimited(1, b"k")
                                                     + group(2, delimited(5, b"")))))),
                 nothing_read(1), id="wrong-type-nested-entry-value"),
    # -- encodings the protobuf library never writes
    # key: tag 0x0a as 2 bytes; value: tag 0x12, length 6 as 3 bytes, holding int_value's tag
    # 0x18 as 2 bytes and 3 as 4 bytes
    pytest.param(w_request(w_attr(b"\x8a\x00\x01a" + b"\x12\x86\x80\x00"
                                  + b"\x98\x00\x83\x80\x80\x00")), a_is(3),
                 id="non-minimal-varints"),
    pytest.param(w_request(w_attr(w_kv("a", v_bool(2)))), a_is(True), id="bool-from-2"),
    pytest.param(w_request(w_attr(w_kv("a", v_bool(256)))), a_is(True), id="bool-from-256"),
    pytest.param(w_request(w_attr(w_kv("a", v_bool(2**64 - 1)))), a_is(True),
                 id="bool-from-uint64-max"),
    pytest.param(w_request(w_attr(w_kv("a", tag(3, VARINT) + b"\xff" * 9 + b"\x7f"))), a_is(-1),
                 id="int-with-bits-past-64"),
    pytest.param(w_request(w_attr(w_kv("a", v_int(-(2**63))))), a_is(-(2**63)), id="int64-min"),
    pytest.param(w_request(w_attr(w_kv("a", v_double_bits(0x7FF0000000000001)))),
                 a_is(struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0]),
                 id="signalling-nan-bits"),
    pytest.param(w_request(w_attr(w_kv("a", v_double_bits(0xFFF8000000000000)))),
                 a_is(struct.unpack("<d", struct.pack("<Q", 0xFFF8000000000000))[0]),
                 id="negative-nan-bits"),
    pytest.param(w_request(w_attr(b"")), nothing_read(1), id="zero-length-keyvalue"),
    pytest.param(w_request(w_attr(w_kv("a", b""))), a_is(EMPTY), id="zero-length-anyvalue"),
    pytest.param(w_request(w_attr(w_kv("a", v_string("x")))) + w_request(),
                 one_resource(span_scan({A: "x"}, 1)) + one_resource(span_scan(None, 0)),
                 id="two-requests-concatenated"),
    pytest.param(w_request(w_attr(w_kv("\uffff", v_nest(DEEP))), w_attr(w_kv("é", v_int(1)))),
                 nothing_read(2, "\uffff"), id="noncharacter-key"),
]


def parse_or_skip(wire: bytes) -> ExportTraceServiceRequest:
    parsed = ExportTraceServiceRequest()
    try:
        parsed.ParseFromString(wire)
    except DecodeError as exc:
        pytest.skip(f"upb rejects these bytes ({exc}); the readers only ever see what it accepts")
    return parsed


@pytest.mark.parametrize(("wire", "expected"), WIRE_CASES)
def test_wire_case(compiled: bool, wire: bytes, expected: ScanResult) -> None:
    """The Python reader reads what upb decoded; the compiled one reads the same bytes."""
    parsed = parse_or_skip(wire)
    got = scanner(compiled).scan(parsed, wire=wire)
    assert typed(got) == typed(expected)


@needs_compiled
@pytest.mark.parametrize("wire", [param.values[0] for param in WIRE_CASES],
                         ids=[param.id or "" for param in WIRE_CASES])
@pytest.mark.parametrize("max_depth", [0, DEPTH, 3])
def test_wire_case_readers_agree_at_any_depth(wire: bytes, max_depth: int) -> None:
    parsed = parse_or_skip(wire)
    assert typed(scanner(True, max_depth).scan(parsed, wire=wire)) == typed(
        scanner(False, max_depth).scan(parsed))


@needs_compiled
@pytest.mark.parametrize("wire", [
    pytest.param(b"\x0a\x05ab", id="length-past-the-end"),
    pytest.param(w_request()[:-3], id="truncated"),
    pytest.param(b"\x08" + b"\xff" * 10 + b"\x01", id="eleven-byte-varint"),
    pytest.param(b"\x08\xff", id="varint-past-the-end"),
    pytest.param(tag(UNKNOWN_FIELD, EGROUP), id="end-group-without-start"),
    pytest.param(tag(UNKNOWN_FIELD, SGROUP) + varint_field(1, 1), id="group-never-closed"),
    pytest.param(tag(UNKNOWN_FIELD, SGROUP) + tag(UNKNOWN_FIELD + 1, EGROUP),
                 id="group-closed-by-another-number"),
    pytest.param(tag(UNKNOWN_FIELD, 6), id="wire-type-6"),
    pytest.param(tag(UNKNOWN_FIELD, 7), id="wire-type-7"),
    pytest.param(b"\x02\x00", id="field-number-0"),
    pytest.param(b"\xfa\xff\xff\xff\xff\x01\x00", id="tag-past-32-bits"),
    pytest.param(w_request(w_attr(w_kv("a", delimited(1, b"\xff")))), id="known-string-bad-utf8"),
    pytest.param(group(1, *[tag(UNKNOWN_FIELD, SGROUP)] * 100, *[tag(UNKNOWN_FIELD, EGROUP)] * 100),
                 id="groups-nested-101-deep"),
])
def test_compiled_reader_refuses_broken_bytes_with_value_error(wire: bytes) -> None:
    with pytest.raises(DecodeError):
        ExportTraceServiceRequest().ParseFromString(wire)  # upb refuses them too
    with pytest.raises(ValueError):
        scanner(True).scan(ExportTraceServiceRequest(), wire=wire)


# -- differential fuzzing (fixed seeds) -----------------------------------------------------------

MUTANTS_ACCEPTED = 3000  # mutants upb accepts, compared; the ones it refuses are only read raw
MAX_MUTANTS = 40_000
GENERATED_REQUESTS = 2500
MAX_DIFFERENCES_SHOWN = 3
# For the mapping's table: aliases of a nested, a bool, a double and a string attribute of the
# fuzz seeds, and one alias equal to a known name.
MAPPING_ALIASES = {"tags": ATTRIBUTE_SLOTS["session.id"], "flag": ATTRIBUTE_SLOTS["llm.cost.total"],
                   "ratio": ATTRIBUTE_SLOTS["gen_ai.usage.cost"],
                   "service.name": ATTRIBUTE_SLOTS["gen_ai.conversation.id"],
                   "session.id": ATTRIBUTE_SLOTS["agent.session.goal"]}
FUZZ_DEPTHS = (0, 1, 2, 3)


def reader_pairs(known: Mapping[str, int], aliases: Mapping[str, int],
                 n_slots: int) -> list[tuple[Scanner, Scanner]]:
    """(compiled, python) readers, with and without the alias table, at each fuzzed depth."""
    return [(Scanner(known, table, n_slots, depth, compiled=True),
             Scanner(known, table, n_slots, depth, compiled=False))
            for depth in FUZZ_DEPTHS for table in ({}, aliases)]


def compare(pair: tuple[Scanner, Scanner], wire: bytes
            ) -> tuple[ScanResult | None, str | None]:
    """Both readers on `wire`: (the Python reader's result, or None when upb refuses the
    bytes; what went wrong, or None). On refused bytes the compiled reader may return anything
    or raise ValueError, nothing else."""
    compiled, python = pair
    parsed = ExportTraceServiceRequest()
    try:
        parsed.ParseFromString(wire)
    except DecodeError:
        try:
            compiled.scan(parsed, wire=wire)
        except ValueError:
            pass
        except Exception as exc:
            return None, f"refused by upb; the compiled reader raised {exc!r}: {wire!r}"
        return None, None
    want = python.scan(parsed)
    try:
        got = compiled.scan(parsed, wire=wire)
    except Exception as exc:
        return want, f"accepted by upb; the compiled reader raised {exc!r}: {wire!r}"
    if typed(got) != typed(want):
        return want, f"compiled {got!r}\n    python {want!r}\n    bytes {wire!r}"
    return want, None


def test_readers_agree_on_byte_mutants() -> None:
    """Byte mutants (tests/fuzzing.py) of the fuzz seeds and of generated wire requests."""
    if not COMPILED_AVAILABLE:
        pytest.skip(NO_COMPILED)
    rng = random.Random(5101)
    corpus = [seed.SerializeToString() for seed in fuzzing.seed_requests("scan")]
    generate = WireRequests(random.Random(5102), ATTRIBUTE_SLOTS, MAPPING_ALIASES)
    corpus += [generate.request() for _ in range(40)]
    pairs = reader_pairs(ATTRIBUTE_SLOTS, MAPPING_ALIASES, N_SLOTS)
    accepted = tried = 0
    differences: list[str] = []
    while accepted < MUTANTS_ACCEPTED and tried < MAX_MUTANTS:
        wire, how = fuzzing.mutate_bytes(rng, rng.choice(corpus), corpus)
        tried += 1
        result, problem = compare(pairs[tried % len(pairs)], wire)
        accepted += result is not None
        if problem:
            differences.append(f"[#{tried} {how}] {problem}")
    assert not differences, (f"{len(differences)} of {tried} mutants:\n"
                             + "\n".join(differences[:MAX_DIFFERENCES_SHOWN]))
    assert accepted == MUTANTS_ACCEPTED, f"only {accepted} of {tried} mutants accepted by upb"
    assert tried > 2 * accepted  # most mutants are refused: the raw reading was exercised too


def test_readers_agree_on_generated_wire_requests() -> None:
    if not COMPILED_AVAILABLE:
        pytest.skip(NO_COMPILED)
    generate = WireRequests(random.Random(5103), KNOWN, ALIASES)
    pairs = reader_pairs(KNOWN, ALIASES, SLOTS)
    differences: list[str] = []
    accepted = 0
    reached: set[str] = set()  # what was read, so the generator is known to reach it
    for i in range(GENERATED_REQUESTS):
        wire = generate.request()
        result, problem = compare(pairs[i % len(pairs)], wire)
        if problem:
            differences.append(f"[#{i}] {problem}")
        if result is None:
            continue
        accepted += 1
        for (resource, _, resource_deep), spans in result:
            for values, deep in [(resource, resource_deep), *((s[0], s[7]) for s in spans)]:
                reached.update(kind_of(value) for value in values if value is not None)
                if deep is not None:
                    reached.add("deep key")
    assert not differences, (f"{len(differences)} of {GENERATED_REQUESTS} requests:\n"
                             + "\n".join(differences[:MAX_DIFFERENCES_SHOWN]))
    assert accepted > 0.9 * GENERATED_REQUESTS
    assert reached >= {"str", "bool", "int", "float", "bytes", "EMPTY", "NESTED", "deep key"}, \
        reached


def kind_of(value: Any) -> str:
    shown = typed(value)
    return shown if isinstance(shown, str) else str(shown[0])


# Each message's fields the readers look at, with their declared wire types.
REQUEST_FIELDS = {1: LEN}
RESOURCE_SPANS_FIELDS = {1: LEN, 2: LEN}
RESOURCE_FIELDS = {1: LEN}
SCOPE_SPANS_FIELDS = {1: LEN, 2: LEN}
SPAN_FIELDS = {1: LEN, 2: LEN, 4: LEN, 7: I64, 8: I64, 9: LEN}
KEY_VALUE_FIELDS = {1: LEN, 2: LEN}
ANY_VALUE_FIELDS = {1: LEN, 2: VARINT, 3: VARINT, 4: I64, 5: LEN, 6: LEN, 7: LEN}
LIST_FIELDS = {1: LEN}  # ArrayValue and KeyValueList


class WireRequests:
    """Random, mostly well-formed requests on the wire, with what the protobuf library never
    writes: shuffled fields, repeated fields, merged values, switched oneof members, unknown
    fields and groups, known field numbers with the wrong wire type."""

    def __init__(self, rng: random.Random, known: Mapping[str, int],
                 aliases: Mapping[str, int]) -> None:
        self.rng = rng
        self.keys = [*known, *aliases, "u", "", "é", "x\x00y"]

    def request(self) -> bytes:
        parts = [delimited(1, self.resource_spans()) for _ in range(self.rng.randint(0, 3))]
        return self.noisy(parts, REQUEST_FIELDS)

    def noisy(self, parts: list[bytes], fields: Mapping[int, int]) -> bytes:
        """The parts, sometimes with an unknown field or a known one with the wrong wire type
        added, sometimes shuffled."""
        rng = self.rng
        if rng.random() < 0.2:
            parts.append(self.unknown())
        if rng.random() < 0.1:
            field = rng.choice(list(fields))
            parts.append(self.wrong_type(field, fields[field]))
        if rng.random() < 0.3:
            rng.shuffle(parts)
        return b"".join(parts)

    def unknown(self, depth: int = 0) -> bytes:
        rng = self.rng
        # Field number 0 is refused, except inside a group (where upb does not look).
        field = rng.choice((UNKNOWN_FIELD, 17, MAX_FIELD) + ((0,) if depth else ()))
        wire_type = rng.choice((VARINT, I64, LEN, SGROUP, I32))
        if wire_type == SGROUP:
            inside = [self.unknown(depth + 1) for _ in range(rng.randint(0, 2) if depth < 3 else 0)]
            return group(field, *inside)
        return self.field_of_type(field, wire_type)

    def wrong_type(self, field: int, declared: int) -> bytes:
        wire_type = self.rng.choice([t for t in (VARINT, I64, LEN, SGROUP, I32) if t != declared])
        return group(field) if wire_type == SGROUP else self.field_of_type(field, wire_type)

    def field_of_type(self, field: int, wire_type: int) -> bytes:
        rng = self.rng
        if wire_type == VARINT:
            return varint_field(field, rng.getrandbits(64))
        if wire_type == I64:
            return fixed64(field, rng.getrandbits(64))
        if wire_type == I32:
            return fixed32(field, rng.getrandbits(32))
        return delimited(field, rng.randbytes(rng.randint(0, 6)))

    def resource_spans(self) -> bytes:
        rng = self.rng
        parts = []
        for _ in range(rng.choice((0, 1, 1, 2))):  # a second Resource merges with the first
            attributes = [delimited(1, self.key_value(0)) for _ in range(rng.randint(0, 3))]
            parts.append(delimited(1, self.noisy(attributes, RESOURCE_FIELDS)))
        for _ in range(rng.randint(0, 2)):
            scope = [delimited(2, self.span()) for _ in range(rng.randint(0, 3))]
            if rng.random() < 0.3:
                scope.append(delimited(1, delimited(1, b"scope")))
            parts.append(delimited(2, self.noisy(scope, SCOPE_SPANS_FIELDS)))
        return self.noisy(parts, RESOURCE_SPANS_FIELDS)

    def span(self) -> bytes:
        rng = self.rng
        parts = [delimited(9, self.key_value(0)) for _ in range(rng.randint(0, 5))]
        for field, sizes in ((1, (16, 16, 16, 0, 3)), (2, (8, 8, 8, 0)), (4, (8, 0))):
            for _ in range(rng.choice((0, 1, 1, 1, 2))):  # a repeated field: the last wins
                parts.append(delimited(field, rng.randbytes(rng.choice(sizes))))
        for field in (7, 8):
            for _ in range(rng.choice((0, 1, 1, 1, 2))):
                parts.append(fixed64(field, rng.choice((0, START, 2**64 - 1,
                                                        rng.getrandbits(64)))))
        if rng.random() < 0.2:
            parts.append(delimited(5, b"name"))
        return self.noisy(parts, SPAN_FIELDS)

    def key_value(self, depth: int) -> bytes:
        rng = self.rng
        parts = []
        for _ in range(rng.choice((1, 1, 1, 1, 1, 1, 2, 0))):  # the last key wins
            parts.append(delimited(1, rng.choice(self.keys).encode()))
        for _ in range(rng.choice((0, 1, 1, 1, 1, 2, 3))):  # value fields merge
            parts.append(delimited(2, self.any_value(depth)))
        return self.noisy(parts, KEY_VALUE_FIELDS)

    def any_value(self, depth: int) -> bytes:
        rng = self.rng
        parts = []
        for _ in range(rng.choice((0, 1, 1, 1, 1, 2, 3))):  # the last oneof member wins
            kind = rng.randint(1, 7)
            if kind == 1:
                parts.append(v_string(rng.choice(("", "x", "é", "\x00", "\U0001d518", "7"))))
            elif kind == 2:
                parts.append(v_bool(rng.choice((0, 1, 2, 2**64 - 1))))
            elif kind == 3:
                parts.append(v_int(rng.choice((0, 1, -1, 2**63 - 1, -(2**63), 300))))
            elif kind == 4:
                parts.append(v_double_bits(rng.choice((
                    0, 1 << 63, 0x3FF8000000000000, 0x7FF0000000000000, 0x7FF8000000000000,
                    0x7FF0000000000001, rng.getrandbits(64)))))
            elif kind == 7:
                parts.append(delimited(7, rng.randbytes(rng.randint(0, 3))))
            else:  # an array or a key-value list, a few levels deep at most
                width = rng.randint(0, 2) if depth < 4 else 0
                items = [delimited(1, self.any_value(depth + 1) if kind == 5
                                   else self.key_value(depth + 1)) for _ in range(width)]
                parts.append(delimited(kind, self.noisy(items, LIST_FIELDS)))
        return self.noisy(parts, ANY_VALUE_FIELDS)
