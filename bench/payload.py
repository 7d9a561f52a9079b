"""Pre-encoded OTLP requests for the benchmark, and the sums they must produce.

Encoding 512 spans with the protobuf library costs milliseconds, as much as the server spends on
them, so the load generator would measure itself. Instead one request is serialized once as a
template, the byte offsets of every span's trace id, span id and session id are found in it,
and each request sent is that template with those fixed-width fields overwritten: a few
microseconds a span, and every span still gets a unique (trace id, span id), so the collector's
on-disk deduplication sees only new spans, as it would in production.

Which session a span belongs to and what it counts are pure functions of its global index
(request number x 512 + position) and the layout, so the expected per-session sums of any set
of acknowledged requests can be recomputed exactly afterwards.

Two layouts: "span", one resource whose 512 spans are of 512 sessions (a gateway batching a
fleet's spans into one resource, the costliest case for anything read per span), and
"resource", 16 resources of 32 spans each, a resource being one agent process with one session
(what agents' own exporters send, a gateway's batch of them). Dimension tags go where the layout
says: on every span, or on the resource, as `OTEL_RESOURCE_ATTRIBUTES` puts them.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SPANS_PER_REQUEST = 512
DEFAULT_SESSIONS = 1000
MODEL = "gpt-4o-mini"
SESSION_PREFIX = "bench-session-"
SESSION_DIGITS = 7  # fixed width, so a session id can be rewritten in place
MAX_SESSIONS = 10**SESSION_DIGITS
SPAN_DURATION_NS = 1_500_000_000
# How much later each request's spans end than the previous request's: about the wall-clock
# time between requests at full load (some 200 requests/s), so that a session's records keep
# getting later as an agent's do. Were every request's spans to end at one time, whatever keeps
# "the latest" per session (the tags' end times, last_active_at) would find nothing new after
# the first flush, and cost less than it does in production.
REQUEST_SPACING_NS = 5_000_000
Layout = Literal["span", "resource"]
LAYOUTS: tuple[Layout, ...] = ("span", "resource")
RESOURCES_PER_REQUEST = 16  # the "resource" layout
SPANS_PER_RESOURCE = SPANS_PER_REQUEST // RESOURCES_PER_REQUEST
assert SPANS_PER_RESOURCE * RESOURCES_PER_REQUEST == SPANS_PER_REQUEST

# Dimension tags (bench.run's budgets phase): the collector's default [attribution] reads these
# keys. Every value is a prefix and TAG_DIGITS digits, rewritten in place like the session id;
# a position's placeholder is its own number, so TAG_DIGITS must cover SPANS_PER_REQUEST.
# The value is a pure function of the session, as an agent's OTEL_RESOURCE_ATTRIBUTES would be.
TAG_DIGITS = 3
TAGS: tuple[tuple[str, str, int], ...] = (  # attribute, value prefix, distinct values
    ("team.id", "bench-team-", 1000),
    ("department", "bench-dept-", 10),
    ("cost_center", "bench-cc-", 25),
    ("project", "bench-project-", 50),
)
assert 10**TAG_DIGITS >= SPANS_PER_REQUEST

# The 16 attributes on every span: GenAI semantic conventions and OpenInference side by side,
# as an emitter instrumented with both would send them. The collector must count each span once.
ATTRIBUTE_KEYS = (
    "gen_ai.conversation.id",
    "session.id",
    "gen_ai.operation.name",
    "gen_ai.system",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation.input_tokens",
    "llm.model_name",
    "llm.token_count.prompt",
    "llm.token_count.completion",
    "llm.token_count.completion_details.reasoning",
    "openinference.span.kind",
)


@dataclass(frozen=True, slots=True)
class Tokens:
    """What one span reports. cache_read + cache_write <= input and reasoning <= output, so the
    collector's prompt_tokens is exactly `input` and completion_tokens exactly `output`."""

    input: int
    output: int
    reasoning: int
    cache_read: int
    cache_write: int


def tokens_at(position: int) -> Tokens:
    """Token counts of the span at `position` in a request; varied so a swapped field shows."""
    inp = 200 + (position * 7) % 1000
    out = 50 + (position * 13) % 400
    return Tokens(
        input=inp,
        output=out,
        reasoning=(position * 3) % (out + 1),
        cache_read=(position * 5) % (inp // 2 + 1),
        cache_write=(position * 11) % (inp // 4 + 1),
    )


POSITION_TOKENS: tuple[Tokens, ...] = tuple(tokens_at(j) for j in range(SPANS_PER_REQUEST))


def session_id(index: int) -> str:
    return f"{SESSION_PREFIX}{index:0{SESSION_DIGITS}d}"


def session_of(g: int, sessions: int, layout: Layout) -> int:
    """The session of the span of global index `g`: each span its own in the "span" layout,
    each resource's 32 spans one in the "resource" layout."""
    return (g if layout == "span" else g // SPANS_PER_RESOURCE) % sessions


def tag_values(session: int) -> tuple[int, ...]:
    """The number behind each of TAGS for a session: team is its last three digits, so 1,000
    sessions or more carry 1,000 teams; the others repeat over fewer values."""
    return tuple(session % count for _, _, count in TAGS)


def tag_value(prefix: str, number: int) -> str:
    return f"{prefix}{number:0{TAG_DIGITS}d}"


def _kv(key: str, value: str | int) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _span_attributes(position: int, *, tagged: bool) -> list[KeyValue]:
    t = POSITION_TOKENS[position]
    placeholder = session_id(position)
    values: dict[str, str | int] = {
        "gen_ai.conversation.id": placeholder,
        "session.id": placeholder,
        "gen_ai.operation.name": "chat",
        "gen_ai.system": "openai",
        "gen_ai.request.model": MODEL,
        "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": t.input,
        "gen_ai.usage.output_tokens": t.output,
        "gen_ai.usage.reasoning.output_tokens": t.reasoning,
        "gen_ai.usage.cache_read.input_tokens": t.cache_read,
        "gen_ai.usage.cache_creation.input_tokens": t.cache_write,
        "llm.model_name": MODEL,
        "llm.token_count.prompt": t.input,
        "llm.token_count.completion": t.output,
        "llm.token_count.completion_details.reasoning": t.reasoning,
        "openinference.span.kind": "LLM",
    }
    assert tuple(values) == ATTRIBUTE_KEYS
    if tagged:
        values.update(_tags(position))
    return [_kv(k, v) for k, v in values.items()]


def _tags(placeholder: int) -> dict[str, str | int]:
    """The dimension tags with `placeholder` for digits (rewritten per request)."""
    return {key: tag_value(prefix, placeholder) for key, prefix, _ in TAGS}


def _only_offset(data: bytes, needle: bytes, expected: int) -> list[int]:
    """Every offset of `needle` in `data`; there must be exactly `expected` of them."""
    offsets: list[int] = []
    start = data.find(needle)
    while start != -1 and len(offsets) <= expected:
        offsets.append(start)
        start = data.find(needle, start + 1)
    if len(offsets) != expected:
        raise RuntimeError(f"template marker found {len(offsets)} times, expected {expected}")
    return offsets


class RequestFactory:
    """Builds request number `r` as bytes: spans with global index r*512 .. r*512+511.

    `nonce` (the first 8 bytes of every trace id) keeps ids of different runs apart.
    `tagged`: the dimension tags of TAGS are also sent, on every span (20 attributes, not 16)
    or on every resource, as `layout` says.
    """

    def __init__(self, sessions: int = DEFAULT_SESSIONS, *, nonce: int | None = None,
                 now_ns: int | None = None, tagged: bool = False,
                 layout: Layout = "span") -> None:
        if not 1 <= sessions < MAX_SESSIONS:
            raise ValueError(f"sessions must be in 1..{MAX_SESSIONS - 1}")
        self.sessions = sessions
        self.layout = layout
        self.nonce = nonce if nonce is not None else int.from_bytes(os.urandom(8), "big")
        end = now_ns if now_ns is not None else time.time_ns()
        self.end_ns = end
        per_resource = SPANS_PER_REQUEST if layout == "span" else SPANS_PER_RESOURCE
        request = ExportTraceServiceRequest()
        trace_markers: list[bytes] = []
        span_markers: list[bytes] = []
        for j in range(SPANS_PER_REQUEST):
            if j % per_resource == 0:
                resource_spans = request.resource_spans.add()
                resource_spans.resource.attributes.append(_kv("service.name", "bench-agent"))
                if tagged and layout == "resource":
                    resource_spans.resource.attributes.extend(
                        _kv(k, v) for k, v in _tags(j // per_resource).items())
                scope_spans = resource_spans.scope_spans.add()
                scope_spans.scope.name = "bench.loadgen"
            trace_markers.append(os.urandom(16))
            span_markers.append(os.urandom(8))
            scope_spans.spans.append(Span(
                trace_id=trace_markers[-1],
                span_id=span_markers[-1],
                name=f"chat {MODEL}",
                kind=Span.SpanKind.SPAN_KIND_CLIENT,
                start_time_unix_nano=end - SPAN_DURATION_NS,
                end_time_unix_nano=end,
                attributes=_span_attributes(j, tagged=tagged and layout == "span"),
            ))
        template = request.SerializeToString()
        self.template = template
        self._trace_offsets = [_only_offset(template, m, 1)[0] for m in trace_markers]
        self._span_offsets = [_only_offset(template, m, 1)[0] for m in span_markers]
        digits_at = len(SESSION_PREFIX)
        # Every span's start and end times, fixed64 fields (7 and 8): rewritten per request.
        self._time_offsets = [
            o + 1
            for tag, at in ((b"\x39", end - SPAN_DURATION_NS), (b"\x41", end))
            for o in _only_offset(template, tag + struct.pack("<Q", at), SPANS_PER_REQUEST)]
        self._session_offsets = [
            tuple(o + digits_at for o in _only_offset(template, session_id(j).encode(), 2))
            for j in range(SPANS_PER_REQUEST)
        ]
        # The tags are adjacent attributes of fixed width, so from a holder's (span's or
        # resource's) first tag digit to its last, the bytes differ only in the digits: one
        # slice per holder rewrites them all, copied from a run precomputed per session (the
        # sending path stays cheap).
        self._tag_offsets: list[int] = []
        self._tag_runs: list[bytes] = []
        if tagged:
            holders = SPANS_PER_REQUEST // per_resource if layout == "resource" \
                else SPANS_PER_REQUEST
            per_holder = [[_only_offset(template, tag_value(prefix, j).encode(), 1)[0]
                           + len(prefix) for _, prefix, _ in TAGS]
                          for j in range(holders)]
            relative = [o - per_holder[0][0] for o in per_holder[0]]
            if any([o - offsets[0] for o in offsets] != relative for offsets in per_holder):
                raise RuntimeError("tag attributes are not laid out alike in every holder")
            self._tag_offsets = [offsets[0] for offsets in per_holder]
            first = self._tag_offsets[0]
            run = bytearray(template[first:first + relative[-1] + TAG_DIGITS])
            for session in range(sessions):
                for at, n in zip(relative, tag_values(session), strict=True):
                    run[at:at + TAG_DIGITS] = tag_value("", n).encode()
                self._tag_runs.append(bytes(run))

    def request(self, number: int) -> bytes:
        """The bytes of request `number`; cheap enough to call on the sending path."""
        buf = bytearray(self.template)
        base = number * SPANS_PER_REQUEST
        nonce = self.nonce
        sessions = self.sessions
        layout = self.layout
        pack_trace = struct.Struct(">QQ").pack_into
        pack_span = struct.Struct(">Q").pack_into
        for j, (t_off, s_off, (c_off, i_off)) in enumerate(
                zip(self._trace_offsets, self._span_offsets, self._session_offsets,
                    strict=True)):
            g = base + j
            pack_trace(buf, t_off, nonce, g)
            pack_span(buf, s_off, g + 1)  # a span id of zero is invalid
            digits = b"%07d" % session_of(g, sessions, layout)
            buf[c_off:c_off + SESSION_DIGITS] = digits
            buf[i_off:i_off + SESSION_DIGITS] = digits
        shift = number * REQUEST_SPACING_NS
        pack_time = struct.Struct("<Q").pack_into
        start, end = self.end_ns - SPAN_DURATION_NS + shift, self.end_ns + shift
        for k, offset in enumerate(self._time_offsets):
            pack_time(buf, offset, start if k < SPANS_PER_REQUEST else end)
        holder_spans = SPANS_PER_REQUEST // len(self._tag_offsets) if self._tag_offsets else 0
        for k, offset in enumerate(self._tag_offsets):
            run = self._tag_runs[session_of(base + k * holder_spans, sessions, layout)]
            buf[offset:offset + len(run)] = run
        return bytes(buf)


# Per-session sums as the collector stores them: turns, prompt, completion, reasoning.
Sums = dict[str, tuple[int, int, int, int]]


def expected_sums(request_numbers: Iterable[int], sessions: int,
                  layout: Layout = "span") -> Sums:
    """What agent_sessions must hold after exactly these requests were accounted.

    Every span is a root `chat` span: one turn. cache <= input and reasoning <= output, so
    prompt_tokens = input and completion_tokens = output (GenAI wins over OpenInference; the
    values are the same, so double counting would show as exactly 2x).
    """
    turns = [0] * sessions
    prompt = [0] * sessions
    completion = [0] * sessions
    reasoning = [0] * sessions
    per_position = [(t.input, t.output, t.reasoning) for t in POSITION_TOKENS]
    for number in request_numbers:
        g = number * SPANS_PER_REQUEST
        for inp, out, rea in per_position:
            s = session_of(g, sessions, layout)
            turns[s] += 1
            prompt[s] += inp
            completion[s] += out
            reasoning[s] += rea
            g += 1
    return {session_id(s): (turns[s], prompt[s], completion[s], reasoning[s])
            for s in range(sessions) if turns[s]}


def decode_check(data: bytes) -> ExportTraceServiceRequest:
    """Parse a built request back (used by the self-check in the runner)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(data)
    return request
