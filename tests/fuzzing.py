"""Fuzzing parts for tests/test_fuzz.py: seed requests, mutators, strategies and an oracle.

The oracle decides, from the bytes alone and with the collector's own pure functions, what the
daemon must answer (status, rejected spans) and what it must add to the database. The fuzz
tests then compare the real daemon, over real sockets, with that expectation.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import (
    AnyValue,
    ArrayValue,
    InstrumentationScope,
    KeyValue,
    KeyValueList,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from collector.accounting.traces import Node, Waiting, resolve_trace
from collector.config import load_config
from collector.pipeline import map_signal
from collector.receivers.errors import ExportError
from collector.receivers.otlp import (
    DEFLATE_WBITS,
    GZIP_WBITS,
    JSON,
    PROTOBUF,
    WIRES,
    BoundedGunzip,
    decode_json,
    decode_protobuf,
)
from collector.signals import Signal, count_items
from collector.signals.traces import (
    ATTRIBUTE_SLOTS,
    ROLE_CALL,
    ROLE_NAMED,
    ROLE_OWN,
    HeldUsage,
    MappingOptions,
    MappingResult,
    SpanUsage,
    TraceLink,
)
from tests.conftest import MS, SECOND, T0, make_span

INT64_MAX = 2**63 - 1
ID_KEYS = ("traceId", "spanId", "parentSpanId")
KNOWN_KEYS = sorted(ATTRIBUTE_SLOTS)
# Values the mapping gives meaning to, so generated spans often are usage, not noise.
WORDS = ("chat", "invoke_agent", "text_completion", "generate_content", "LLM", "AGENT", "llm",
         "agent", "tool", "interactive", "autonomous", "acp", "active", "completed", "failed",
         "cancelled", "unknown", "cli", "tui", "slack", "telegram", "discord", "test-model",
         "gpt-4o", "claude-3-5-sonnet-20241022", "o3", "s-1", "s-2", "0", "1", "250", " 7 ",
         "-3", "1.5", "1e3", "", " ", "\t", "\x00", "\u202e", "é", "\U0001d518")


# -- seeds -------------------------------------------------------------------------------------

def _usage(session: str, **extra: Any) -> dict[str, Any]:
    return {"gen_ai.conversation.id": session, "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "test-model", "gen_ai.usage.input_tokens": 120,
            "gen_ai.usage.output_tokens": 30, **extra}


def seed_requests(tag: str) -> list[ExportTraceServiceRequest]:
    """Valid requests covering every kind of span; session ids start with `tag`."""
    s = f"{tag}-s"
    trace = int.from_bytes(tag.encode()[:12].ljust(12, b"_"), "big") << 32
    spans = [
        [make_span(trace_id=trace + 1, span_id=1, attrs=_usage(f"{s}1"))],
        [make_span(trace_id=trace + 2, span_id=1,
                   attrs={"gen_ai.conversation.id": f"{s}2", "gen_ai.operation.name":
                          "invoke_agent", "agent.session.kind": "autonomous",
                          "agent.session.goal": "triage the inbox"}),
         make_span(trace_id=trace + 2, span_id=2, parent_id=1, start=T0 + SECOND,
                   attrs=_usage(f"{s}2", **{"gen_ai.usage.cache_read.input_tokens": 80,
                                            "gen_ai.usage.reasoning.output_tokens": 10}))],
        [make_span(trace_id=trace + 3, span_id=7, name="agent.turn",
                   attrs={"session.id": f"{s}3", "gen_ai.response.model": "o3",
                          "gen_ai.usage.input_tokens": 5000, "gen_ai.usage.output_tokens": 900,
                          "gen_ai.usage.reasoning.output_tokens": 600,
                          "agent.session.channel": "slack", "gen_ai.usage.cost": 0.25}),
         make_span(trace_id=trace + 3, span_id=8, name="session.end", start=T0 + 2 * SECOND,
                   attrs={"session.id": f"{s}3", "agent.session.status": "completed"})],
        [make_span(trace_id=trace + 4, span_id=3,
                   attrs={"openinference.span.kind": "LLM", "llm.model_name": "test-model",
                          "llm.token_count.prompt": 40, "llm.token_count.completion": 4,
                          "llm.token_count.prompt_details.cache_write": 8,
                          "tags": ["a", "b"], "flag": True, "ratio": 0.5},
                   resource={"session.id": f"{s}4", "service.name": "agent"}),
         make_span(trace_id=trace + 4, span_id=4, attrs={"http.method": "GET"}),
         make_span(trace_id=trace + 4, span_id=5,
                   attrs=_usage(f"{s}4", **{"gen_ai.usage.input_tokens": "77",
                                            "gen_ai.usage.output_tokens": 3.0}))],
        [make_span(trace_id=trace + 5, span_id=i + 1, start=T0 + i * MS,
                   attrs=_usage(f"{s}5", **{"gen_ai.usage.input_tokens": i}))
         for i in range(6)],
    ]
    return [encode_spans(group) for group in spans]


CAPTURES = Path(__file__).parent / "captures"
GEMINI = CAPTURES / "gemini-cli-0.61.0"


def signal_seeds(signal: Signal, limit: int) -> list[Any]:
    """Small logs or metrics requests for mutation: Gemini CLI's captured records, one (logs)
    or one metric (metrics) per request with its resource and scope, those under half the body
    limit; and the same trimmed to their first few attributes, so larger ones are seeds too."""
    wire = WIRES[signal]
    doc = json.loads((GEMINI / f"{signal.value}.json").read_bytes())
    (resource_key, scope_key, items_key) = (
        ("resourceLogs", "scopeLogs", "logRecords") if signal is Signal.LOGS
        else ("resourceMetrics", "scopeMetrics", "metrics"))
    seeds = []
    for resource in doc[resource_key]:
        for scope in resource[scope_key]:
            for item in scope[items_key]:
                for trim in (False, True):
                    res = copy.deepcopy(resource.get("resource", {}))
                    one = copy.deepcopy(item)
                    if trim:
                        res["attributes"] = res.get("attributes", [])[:3]
                        if "attributes" in one:
                            one["attributes"] = one["attributes"][:4]
                    body = json.dumps({resource_key: [{"resource": res, scope_key: [
                        {"scope": scope.get("scope", {}), items_key: [one]}]}]}).encode()
                    request = decode_json(body, signal)
                    if len(request.SerializeToString()) <= limit // 2:
                        seeds.append(request)
    assert seeds and all(isinstance(seed, wire.request) for seed in seeds)
    return seeds


def to_otlp_json(request: Any) -> dict[str, Any]:
    """OTLP/JSON as exporters write it: lowerCamelCase, hex ids, int64 as strings."""
    doc: dict[str, Any] = json_format.MessageToDict(request)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ID_KEYS and isinstance(value, str):
                    node[key] = base64.b64decode(value).hex()
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return doc


# -- byte mutators -----------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x08, 0x09)


def _pos(rng: random.Random, data: bytes) -> int:
    return rng.randrange(len(data) + 1)


def flip_bits(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def set_bytes(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    if not data:
        return bytes([rng.choice(INTERESTING_BYTES)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] = rng.choice(INTERESTING_BYTES)
    return bytes(out)


def truncate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    return data[:rng.randrange(len(data))] if data else data


def cut(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    i = _pos(rng, data)
    return data[:i] + data[i + rng.randint(1, 64):]


def duplicate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    i = _pos(rng, data)
    j = min(len(data), i + rng.randint(1, 256))
    k = _pos(rng, data)
    return data[:k] + data[i:j] * rng.randint(1, 4) + data[k:]


def splice(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    other = rng.choice(corpus)
    return data[:_pos(rng, data)] + other[_pos(rng, other):]


def concatenate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    # Concatenated protobuf messages merge: repeated fields (spans) are appended.
    return data + rng.choice(corpus) if rng.random() < 0.5 else data * rng.randint(2, 5)


def insert_garbage(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    i = _pos(rng, data)
    return data[:i] + rng.randbytes(rng.randint(1, 32)) + data[i:]


def garbage(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 7, 64, 1000, rng.randint(0, 4096))))


BYTE_MUTATORS: tuple[Callable[[random.Random, bytes, list[bytes]], bytes], ...] = (
    flip_bits, flip_bits, set_bytes, truncate, cut, duplicate, splice, concatenate,
    insert_garbage, garbage)


def mutate_bytes(rng: random.Random, data: bytes, corpus: list[bytes]) -> tuple[bytes, str]:
    """One to three random byte mutations; returns the mutant and the names applied."""
    names = []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        mutator = rng.choice(BYTE_MUTATORS)
        data = mutator(rng, data, corpus)
        names.append(mutator.__name__)
    return data, "+".join(names)


# -- JSON mutators -----------------------------------------------------------------------------

WRONG_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1.5, 10**30, -(10**30), 2**63, 2**64, "", "x", "NaN", "1e999",
    "-0", "9223372036854775807", "9223372036854775808", "18446744073709551616",
    float("nan"), float("inf"), float("-inf"), [], {}, [1, 2], {"a": 1},
    {"stringValue": "x"}, {"intValue": "5"}, "\ud800", "zz", "0" * 64, "00f067aa0ba902b7",
)
MAX_WALK_DEPTH = 40
BAD_HEX = ("", "z", "0", "abc", "zz" * 8, "0" * 15, "0" * 17, "0" * 33, "é" * 16, "0x" + "0" * 30,
           " " + "0" * 31, "AAAAAAAAAAAAAAAAAAAAAA==", "00" * 4096)


def _nodes(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    yield path, doc
    if len(path) > MAX_WALK_DEPTH:  # an earlier "deep" mutation; mutate above it
        return
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _nodes(value, (*path, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _nodes(value, (*path, i))


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


def _rename(key: str, rng: random.Random) -> str:
    choices = [key.upper(), key[:-1], key + "x", "", "\u0000" + key,
               "".join("_" + c.lower() if c.isupper() else c for c in key)]
    if "_" in key:
        head, *rest = key.split("_")
        choices.append(head + "".join(r.title() for r in rest))
    return rng.choice(choices)


def _deep(value: Any, depth: int, rng: random.Random) -> Any:
    if rng.random() < 0.5:  # deep JSON nesting
        for _ in range(depth):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return value
    for _ in range(depth):  # deep AnyValue nesting (array and kvlist values)
        if rng.random() < 0.5:
            value = {"arrayValue": {"values": [value]}}
        else:
            value = {"kvlistValue": {"values": [{"key": "k", "value": value}]}}
    return value


def mutate_json(rng: random.Random, doc: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A structural mutation of an OTLP/JSON document (the input is not changed)."""
    doc = copy.deepcopy(doc)
    nodes = list(_nodes(doc))
    names = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        path, node = rng.choice(nodes)
        op = rng.choice(("delete", "rename", "wrong_type", "wrong_type", "bad_id", "huge_int",
                         "deep", "duplicate", "null", "stringify"))
        names.append(op)
        if not path:
            if op in ("wrong_type", "null"):
                return rng.choice(WRONG_VALUES), "+".join(names)  # type: ignore[return-value]
            continue
        parent, key = _parent(doc, path), path[-1]
        if op == "delete":
            del parent[key]
        elif op == "rename" and isinstance(key, str):
            parent[_rename(key, rng)] = parent.pop(key)
        elif op == "wrong_type":
            parent[key] = rng.choice(WRONG_VALUES)
        elif op == "bad_id":
            for id_path, _ in nodes:
                if id_path and id_path[-1] in ID_KEYS and rng.random() < 0.5:
                    _parent(doc, id_path)[id_path[-1]] = rng.choice((*BAD_HEX, 1, None, []))
                    break
        elif op == "huge_int":
            parent[key] = rng.choice((str(10**rng.randint(18, 40)), 10**rng.randint(18, 40),
                                      str(INT64_MAX), str(-(2**63)), -(2**63) - 1, 1e300, -1e300))
        elif op == "deep":
            parent[key] = _deep(node, rng.choice((3, 9, 20, 70, 120)), rng)
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(node))
        elif op == "null":
            parent[key] = None
        elif op == "stringify":
            parent[key] = json.dumps(node) if not isinstance(node, str | int) else str(node)
        nodes = list(_nodes(doc))
    return doc, "+".join(names)


def dump_json(doc: Any) -> bytes:
    try:
        return json.dumps(doc).encode("utf-8", "surrogatepass")
    except RecursionError:  # stacked "deep" mutations; send a deep document as text instead
        return b'{"resourceSpans":' + b"[" * 5000 + b"]" * 5000 + b"}"


# -- hypothesis strategies: arbitrary ExportTraceServiceRequest messages -----------------------

def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any],
           tenths: int = 8) -> st.SearchStrategy[Any]:
    """`common` in about tenths/10 of the draws, else `rare` (one_of weighs branches evenly)."""
    return st.sampled_from(range(10)).flatmap(lambda k: common if k < tenths else rare)


keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(KNOWN_KEYS),
                 st.text(max_size=24))
strings = st.one_of(st.sampled_from(WORDS), st.text(max_size=40),
                    st.from_regex(r"\s?[0-9]{1,25}\s?", fullmatch=True),
                    st.sampled_from(("x" * 9000, "é" * 5000, "s" * 300)))
ints = st.one_of(st.integers(-(2**63), INT64_MAX), st.integers(-3, 3000),
                 st.sampled_from((0, 1, -1, INT64_MAX, -(2**63), 2**53, 2**31)))
doubles = st.one_of(st.floats(), st.sampled_from(
    (math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 2.5, 1e308, 5e-324, -1.0, 1e15, 0.001)))
scalars = st.one_of(
    strings.map(lambda v: AnyValue(string_value=v)),
    ints.map(lambda v: AnyValue(int_value=v)),
    doubles.map(lambda v: AnyValue(double_value=v)),
    st.booleans().map(lambda v: AnyValue(bool_value=v)),
    st.binary(max_size=24).map(lambda v: AnyValue(bytes_value=v)),
    st.just(AnyValue()),  # no value set at all
)


def _array(values: list[AnyValue]) -> AnyValue:
    return AnyValue(array_value=ArrayValue(values=values))


def _kvlist(items: list[tuple[str, AnyValue]]) -> AnyValue:
    return AnyValue(kvlist_value=KeyValueList(
        values=[KeyValue(key=k, value=v) for k, v in items]))


def _chain(value: AnyValue, depth: int) -> AnyValue:
    for i in range(depth):
        value = _array([value]) if i % 2 else _kvlist([("k", value)])
    return value


nested = st.recursive(scalars, lambda children: st.one_of(
    st.lists(children, max_size=4).map(_array),
    st.lists(st.tuples(keys, children), max_size=4).map(_kvlist)), max_leaves=10)
# Mostly shallow values; sometimes a chain deeper than the default max_value_depth of 8.
any_values = mostly(nested, st.builds(_chain, scalars, st.integers(0, 11)), 9)
random_attributes = st.lists(st.builds(KeyValue, key=keys, value=any_values), max_size=8)
USAGE_KEYS = tuple(k for k in KNOWN_KEYS if k not in (
    "gen_ai.conversation.id", "session.id", "gen_ai.operation.name", "openinference.span.kind"))
counts = st.integers(0, 100_000).map(lambda v: AnyValue(int_value=v))
extremes = st.one_of(
    st.sampled_from((INT64_MAX, 2**62, 2**53 + 1)).map(lambda v: AnyValue(int_value=v)),
    st.from_regex(r"[0-9]{19,30}", fullmatch=True).map(lambda v: AnyValue(string_value=v)),
    st.sampled_from((1e307, 1e300, math.inf, math.nan, -0.0, 1e-300)).map(
        lambda v: AnyValue(double_value=v)))
# Spans shaped like usage (a session id, an operation, token counts, cost, model, session
# attributes) with broken values mixed in, so most examples reach the deep parts of the mapping.
usage_attributes = st.builds(
    lambda session, operation, usage, extra: [session, *operation, *usage, *extra],
    st.builds(KeyValue, key=st.sampled_from(("gen_ai.conversation.id", "session.id")),
              value=mostly(st.sampled_from(("s-1", "s-2", "s-3")).map(
                  lambda v: AnyValue(string_value=v)), scalars)),
    st.lists(st.builds(KeyValue, key=st.sampled_from(("gen_ai.operation.name",
                                                      "openinference.span.kind")),
                       value=st.sampled_from(WORDS).map(lambda v: AnyValue(string_value=v))),
             max_size=1),
    st.lists(st.builds(KeyValue, key=st.sampled_from(USAGE_KEYS),
                       value=mostly(counts, st.one_of(any_values, extremes), 7)),
             max_size=7),
    st.lists(st.builds(KeyValue, key=keys, value=any_values), max_size=3),
)
attributes = mostly(usage_attributes, random_attributes, 7)
valid_ids = st.binary(min_size=16, max_size=16)
valid_span_ids = st.binary(min_size=8, max_size=8)
ids = mostly(valid_ids, st.binary(max_size=20), 9)
span_ids = mostly(valid_span_ids, st.binary(max_size=12), 9)
timestamps = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from((0, T0, T0 + MS, 2**64 - 1)))
spans = st.builds(Span, trace_id=ids, span_id=span_ids, parent_span_id=st.binary(max_size=9),
                  name=st.text(max_size=10), start_time_unix_nano=timestamps,
                  end_time_unix_nano=timestamps, attributes=attributes)
requests = st.builds(
    lambda groups: ExportTraceServiceRequest(resource_spans=groups),
    st.lists(st.builds(
        ResourceSpans,
        resource=st.builds(Resource, attributes=st.lists(
            st.builds(KeyValue, key=keys, value=any_values), max_size=3)),
        scope_spans=st.lists(st.builds(
            ScopeSpans, scope=st.just(InstrumentationScope(name="fuzz")),
            spans=st.lists(spans, max_size=4)), max_size=2)), max_size=2))


# -- the oracle --------------------------------------------------------------------------------

def options_from_config(path: Path) -> MappingOptions:
    """The MappingOptions the daemon builds from this config file."""
    from collector.daemon import mapping_options

    return mapping_options(load_config(path))


ORACLE_CRASHED = 0  # the collector's own decoder raised something it should have classified


@dataclass(frozen=True)
class Expected:
    status: int  # 200, 400, 413 or 415 (ORACLE_CRASHED: no answer is right; the daemon has a bug)
    result: MappingResult | None = None
    crash: str = ""


def expect_http(body: bytes, content_type: str, encoding: str, *, limit: int,
                max_spans: int, options: MappingOptions,
                signal: Signal = Signal.TRACES) -> Expected:
    """What the daemon must answer to this POST, in the receiver's order of checks."""
    media = content_type.split(";")[0].strip().lower()
    if media not in (PROTOBUF, JSON):
        return Expected(415)
    encoding = encoding.strip().lower()
    if encoding not in ("identity", "gzip", "deflate", ""):
        return Expected(415)
    if len(body) > limit:
        return Expected(413)
    try:
        if encoding in ("gzip", "deflate"):
            inflater = BoundedGunzip(limit, GZIP_WBITS if encoding == "gzip" else DEFLATE_WBITS)
            inflater.feed(body)
            body = inflater.finish()
        request = (decode_json(body, signal) if media == JSON
                   else decode_protobuf(body, signal))
    except ExportError as exc:
        return Expected(exc.answer.http_status)
    except Exception as exc:  # the daemon runs the same code: it will answer 500
        return Expected(ORACLE_CRASHED, crash=f"decoding raised {exc!r}")
    return _expect_request(signal, request, max_spans, options)


def expect_grpc(body: bytes, *, limit: int, max_spans: int, options: MappingOptions,
                signal: Signal = Signal.TRACES) -> Expected:
    if len(body) > limit:
        return Expected(413)
    try:
        request = decode_protobuf(body, signal)
    except ExportError as exc:
        return Expected(exc.answer.http_status)
    except Exception as exc:
        return Expected(ORACLE_CRASHED, crash=f"decoding raised {exc!r}")
    return _expect_request(signal, request, max_spans, options)


def _expect_request(signal: Signal, request: Any, max_spans: int,
                    options: MappingOptions) -> Expected:
    if count_items(signal, request) > max_spans:
        return Expected(413)
    try:
        return Expected(200, map_signal(signal, request, options, T0))
    except Exception as exc:
        return Expected(ORACLE_CRASHED, crash=f"mapping raised {exc!r}")


COUNTED = ("turns", "prompt_tokens", "completion_tokens", "reasoning_tokens")


@dataclass
class Ledger:
    """What the database must hold: every accepted usage span once, first arrival wins."""

    seen: set[bytes] = field(default_factory=set)
    sessions: dict[str, dict[str, float]] = field(default_factory=dict)
    spans: int = 0

    def overflows(self, result: MappingResult) -> bool:
        """Would accounting this result need integers SQLite cannot hold (the known bug)?"""
        sums = {sid: dict(row) for sid, row in self.sessions.items()}
        seen = set(self.seen)
        for r in result.records:
            if r.key in seen:
                continue
            seen.add(r.key)
            row = sums.setdefault(r.session_id, dict.fromkeys(COUNTED, 0))
            for name in COUNTED:
                row[name] += getattr(r, name)
                if row[name] > INT64_MAX:
                    return True
            if max(r.cache_read_tokens, r.cache_write_tokens, r.start_ns, r.end_ns) > INT64_MAX:
                return True
        return False

    # Usage without a session id held by the store, and the trace links it keeps, modelled
    # with plain dicts after the store's rules (one request is one flush: each waits for it).
    held: dict[bytes, HeldUsage] = field(default_factory=dict)
    links: dict[tuple[bytes, bytes], list[Any]] = field(default_factory=dict)
    flushes: int = 0

    # Turns across a trace, after the store's rule: per (trace, session) one turn among its
    # turn spans (role ROLE_TURN), first come; a root span that is no usage is the turn of
    # every session its trace carried usage in (role ROLE_CALL) that had none, once.
    turn_flags: dict[tuple[bytes, str], set[str]] = field(default_factory=dict)
    root_traces: set[bytes] = field(default_factory=set)

    def account(self, result: MappingResult) -> None:
        self.flushes += 1
        new_records = []
        for r in result.records:
            if r.key in self.seen:
                continue
            self.seen.add(r.key)
            new_records.append(r)
            self._add(r)
        for h in result.held:
            if h.usage.key not in self.seen:
                self.seen.add(h.usage.key)
                self.spans += 1
                self.held[h.usage.key] = h
        self._resolve(result, new_records)
        # A root is remembered: usage of its trace arriving later gets its turn then.
        self.root_traces |= {root.key[8:24] for root in result.roots}
        for trace in sorted(self.root_traces):
            for (t, session), flags in sorted(self.turn_flags.items()):
                if t != trace or "rooted" in flags or not flags & {"usage", "counted"}:
                    continue
                if "counted" not in flags:
                    self._row(session)["turns"] += 1
                flags |= {"rooted", "counted"}

    def _row(self, session: str) -> dict[str, float]:
        return self.sessions.setdefault(session, {**dict.fromkeys(COUNTED, 0),
                                                  "cost_cents": 0.0})

    def _add(self, r: SpanUsage) -> None:
        if r.role != ROLE_OWN:
            flags = self.turn_flags.setdefault((r.key[8:24], r.session_id), set())
            if r.role == ROLE_CALL:
                flags.add("usage")
            elif r.role == ROLE_NAMED:
                flags.add("named")
            elif "counted" in flags:
                r = r._replace(turns=0)
            elif r.turns:
                flags.add("counted")
        self.spans += 1
        row = self.sessions.setdefault(r.session_id, {**dict.fromkeys(COUNTED, 0),
                                                      "cost_cents": 0.0})
        for name in COUNTED:
            row[name] += getattr(r, name)
        row["cost_cents"] += r.cost_cents

    def _resolve(self, result: MappingResult, new_records: list[SpanUsage]) -> None:
        touched = {h.trace_id for h in result.held}
        keep = [link for link in result.links if link.anchor]
        if self.held:
            held_traces = {h.trace_id for h in self.held.values()}
            candidates = [link for link in result.links if not link.anchor] + [
                TraceLink(r.key[8:24], r.key[24:], b"", r.session_id)
                for r in new_records if len(r.key) == 32]
            keep += [c for c in candidates if c.trace_id in held_traces]
        for link in keep:
            if len(link.trace_id) != 16 or len(link.span_id) != 8:
                continue
            stored = self.links.get((link.trace_id, link.span_id))
            if stored is None:
                self.links[(link.trace_id, link.span_id)] = [
                    link.parent_id, link.session_id, self.flushes]
            else:
                stored[0] = link.parent_id or stored[0]
                stored[1] = stored[1] if stored[1] is not None else link.session_id
                stored[2] = self.flushes
            touched.add(link.trace_id)
        for trace in sorted(touched):
            held = [h for h in self.held.values() if h.trace_id == trace]
            if not held:
                continue
            nodes = {span: Node(parent, session)
                     for (t, span), (parent, session, _) in self.links.items() if t == trace}
            named = sorted((seen, span, session)
                           for (t, span), (_, session, seen) in self.links.items()
                           if t == trace and session is not None)
            for h in held:
                nodes.setdefault(h.span_id, Node(h.parent_id, None))
            for item in resolve_trace(trace, nodes, named[0][2] if named else None,
                                      [Waiting(h.usage.key, h.span_id, h.parent_id, False)
                                       for h in held]):
                usage = self.held.pop(item.key).usage._replace(session_id=item.session_id)
                self.spans -= 1  # counted when it was held
                self._add(usage)

    def differences(self, rows: dict[str, dict[str, Any]]) -> list[str]:
        """Every way the database rows differ from the ledger (empty when exact)."""
        problems = []
        for sid in sorted(set(rows) | set(self.sessions), key=repr):
            want, got = self.sessions.get(sid), rows.get(sid)
            if want is None or got is None:
                problems.append(f"session {sid!r}: expected {want}, database has {got}")
                continue
            for name in COUNTED:
                if got[name] != want[name] or not isinstance(got[name], int):
                    problems.append(f"session {sid!r} {name}: expected {want[name]}, "
                                    f"database has {got[name]!r}")
            if not math.isclose(got["cost_cents"], want["cost_cents"], rel_tol=1e-9,
                                abs_tol=1e-9):
                problems.append(f"session {sid!r} cost_cents: expected {want['cost_cents']}, "
                                f"database has {got['cost_cents']!r}")
        return problems
