"""Span -> usage record mapping. Pure: values in, values out; no I/O, no event loop.

This module is the specification of what a span means to the collector:

* session id: ``gen_ai.conversation.id``, else ``session.id``;
* model: ``gen_ai.response.model``, else ``gen_ai.request.model``, else ``llm.model_name``;
* tokens: GenAI semantic conventions, their deprecated names, or OpenInference; the first
  convention present wins for each count, so a span carrying two conventions counts once;
* cost given by the emitter (USD): ``gen_ai.usage.cost``, ``llm.cost.total``, ``operation.cost``;
* session attributes: ``agent.session.kind`` / ``.channel`` / ``.status`` / ``.goal``.

Each value is looked up on the span's attributes first and on its resource's second.

Which spans count as what:

* agent span (``gen_ai.operation.name = invoke_agent`` or OpenInference kind ``AGENT``): one
  turn; its tokens are roll-ups of its children and are ignored unless ``agent_span_tokens``;
* model call (``chat``, ``text_completion``, ``generate_content`` or kind ``LLM``): tokens, cost
  and model; also a turn when it has no parent span;
* a span's GenAI operation name, when present, decides its kind; the OpenInference span kind
  is consulted only without one;
* any other span with a session id and token counts: one turn plus its tokens;
* a span with a session id and session attributes only: updates the session;
* anything else is not usage and is ignored.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from collector.pricing import Pricer

KINDS = ("interactive", "autonomous", "acp")
STATUSES = ("active", "completed", "failed", "cancelled", "unknown")
CHANNELS = ("cli", "tui", "telegram", "discord", "slack", "acp")
DEFAULT_KIND = "interactive"
DEFAULT_STATUS = "active"
DEFAULT_CHANNEL = "cli"
MODEL_CALL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8
# Bounds that keep every stored number exact: SQLite integers are signed 64-bit, and a sum that
# passes 2**63 silently becomes a float. No call uses a trillion tokens or costs a billion USD;
# with these caps a session needs millions of absurd spans before its sums could overflow.
MAX_TOKEN_COUNT = 10**12
MAX_COST_USD = 1e9
MAX_TIME_NS = 2**63 - 1  # year 2262, the end of signed 64-bit nanoseconds
# Error messages returned to the exporter are capped so one bad request cannot make a huge
# answer; the count of rejected spans is always exact.
MAX_ERROR_MESSAGES = 5
MAX_VALUE_IN_MESSAGE = 64

# Attribute slots: every attribute the mapping reads gets an index into a flat list, so one pass
# over a span's attributes with one dict lookup each finds everything.
(
    S_CONVERSATION_ID, S_SESSION_ID,
    S_RESPONSE_MODEL, S_REQUEST_MODEL, S_OI_MODEL,
    S_IN, S_OUT, S_REASONING, S_CACHE_READ, S_CACHE_WRITE,
    S_IN_DEPRECATED, S_OUT_DEPRECATED,
    S_OI_IN, S_OI_OUT, S_OI_REASONING, S_OI_CACHE_READ, S_OI_CACHE_WRITE,
    S_COST_GENAI, S_COST_OI, S_COST_OP,
    S_KIND, S_STATUS, S_CHANNEL, S_GOAL,
    S_OPERATION, S_OI_SPAN_KIND,
) = range(26)
N_SLOTS = 26

ATTRIBUTE_SLOTS: dict[str, int] = {
    "gen_ai.conversation.id": S_CONVERSATION_ID,
    "session.id": S_SESSION_ID,
    "gen_ai.response.model": S_RESPONSE_MODEL,
    "gen_ai.request.model": S_REQUEST_MODEL,
    "llm.model_name": S_OI_MODEL,
    "gen_ai.usage.input_tokens": S_IN,
    "gen_ai.usage.output_tokens": S_OUT,
    "gen_ai.usage.reasoning.output_tokens": S_REASONING,
    "gen_ai.usage.cache_read.input_tokens": S_CACHE_READ,
    "gen_ai.usage.cache_creation.input_tokens": S_CACHE_WRITE,
    "gen_ai.usage.prompt_tokens": S_IN_DEPRECATED,
    "gen_ai.usage.completion_tokens": S_OUT_DEPRECATED,
    "llm.token_count.prompt": S_OI_IN,
    "llm.token_count.completion": S_OI_OUT,
    "llm.token_count.completion_details.reasoning": S_OI_REASONING,
    "llm.token_count.prompt_details.cache_read": S_OI_CACHE_READ,
    "llm.token_count.prompt_details.cache_write": S_OI_CACHE_WRITE,
    "gen_ai.usage.cost": S_COST_GENAI,
    "llm.cost.total": S_COST_OI,
    "operation.cost": S_COST_OP,
    "agent.session.kind": S_KIND,
    "agent.session.status": S_STATUS,
    "agent.session.channel": S_CHANNEL,
    "agent.session.goal": S_GOAL,
    "gen_ai.operation.name": S_OPERATION,
    "openinference.span.kind": S_OI_SPAN_KIND,
}
SLOT_NAMES = {slot: name for name, slot in ATTRIBUTE_SLOTS.items()}

SESSION_SLOTS = (S_CONVERSATION_ID, S_SESSION_ID)
MODEL_SLOTS = (S_RESPONSE_MODEL, S_REQUEST_MODEL, S_OI_MODEL)
IN_SLOTS = (S_IN, S_IN_DEPRECATED, S_OI_IN)
OUT_SLOTS = (S_OUT, S_OUT_DEPRECATED, S_OI_OUT)
REASONING_SLOTS = (S_REASONING, S_OI_REASONING)
CACHE_READ_SLOTS = (S_CACHE_READ, S_OI_CACHE_READ)
CACHE_WRITE_SLOTS = (S_CACHE_WRITE, S_OI_CACHE_WRITE)
TOKEN_SLOTS = IN_SLOTS + OUT_SLOTS + REASONING_SLOTS + CACHE_READ_SLOTS + CACHE_WRITE_SLOTS
COST_SLOTS = (S_COST_GENAI, S_COST_OI, S_COST_OP)
SESSION_ATTRIBUTE_SLOTS = (S_KIND, S_STATUS, S_CHANNEL, S_GOAL)


class SpanUsage(NamedTuple):
    """What one accepted span contributes to its session."""

    key: bytes  # end time + trace id + span id: the identity for exactly-once accounting
    session_id: str
    start_ns: int
    end_ns: int
    turns: int
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_cents: float
    priced: bool  # False when tokens were counted but no price was known
    model: str | None
    kind: str | None
    status: str | None
    channel: str | None
    goal: str | None


@dataclass(frozen=True, slots=True)
class MappingOptions:
    pricer: Pricer
    agent_span_tokens: bool = False
    max_session_id_length: int = 256
    max_attributes_per_span: int = 256
    max_attribute_value_bytes: int = 8192
    max_value_depth: int = 8
    # Extra attribute name -> slot of the known attribute it stands for (from config aliases).
    alias_slots: Mapping[str, int] = field(default_factory=dict)

    @staticmethod
    def slots_for(aliases: Mapping[str, str]) -> dict[str, int]:
        return {alias: ATTRIBUTE_SLOTS[target] for alias, target in aliases.items()}


@dataclass(slots=True)
class MappingResult:
    records: list[SpanUsage] = field(default_factory=list)
    spans: int = 0
    rejected: int = 0
    ignored: int = 0
    unpriced: int = 0
    errors: list[str] = field(default_factory=list)
    # (attribute, value) pairs outside the allowed sets, replaced by the column default.
    invalid_values: list[tuple[str, str]] = field(default_factory=list)

    def reject(self, message: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERROR_MESSAGES:
            self.errors.append(message)

    @property
    def error_message(self) -> str:
        if not self.rejected:
            return ""
        more = self.rejected - len(self.errors)
        tail = f" (and {more} more)" if more > 0 else ""
        return "; ".join(self.errors) + tail


class InvalidSpan(Exception):
    """A span whose values break the conventions; it is rejected, its request is not."""


def count_spans(request: Any) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def map_request(request: Any, options: MappingOptions, now_ns: int) -> MappingResult:
    """Map an ExportTraceServiceRequest (or anything shaped like it) to usage records."""
    result = MappingResult()
    records = result.records
    for resource_spans in request.resource_spans:
        try:
            resource_values = collect(resource_spans.resource.attributes, options)
        except InvalidSpan as exc:
            for scope_spans in resource_spans.scope_spans:
                for _ in scope_spans.spans:
                    result.spans += 1
                    result.reject(f"resource: {exc}")
            continue
        # Only the groups the resource actually sets need a fallback per span (usually none).
        fallbacks = [(group, [resource_values[s] for s in group]) for group in FIELD_GROUPS
                     if any(resource_values[s] is not None for s in group)]
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                result.spans += 1
                try:
                    record = map_span(span, fallbacks, options, now_ns, result)
                except InvalidSpan as exc:
                    result.reject(str(exc))
                    continue
                if record is None:
                    result.ignored += 1
                else:
                    records.append(record)
                    if not record.priced:
                        result.unpriced += 1
    return result


def collect(attributes: Sequence[Any], options: MappingOptions) -> list[Any]:
    """One pass over KeyValues; the KeyValue of each attribute the mapping knows, by slot.

    KeyValues, not their AnyValues: reading `.value` builds a wrapper object, and only the
    values a span's kind needs are ever read.

    Also enforces the bounds on attribute count and on array/kvlist nesting, which only the
    attributes the mapping does not read can carry, so only those pay for the check.
    """
    if len(attributes) > options.max_attributes_per_span:
        raise InvalidSpan(f"{len(attributes)} attributes exceed the limit of "
                          f"{options.max_attributes_per_span}")
    values: list[Any] = [None] * N_SLOTS
    slot_of = ATTRIBUTE_SLOTS.get
    aliases = options.alias_slots
    for kv in attributes:
        slot = slot_of(kv.key)
        if slot is not None:
            values[slot] = kv
        elif aliases and (slot := aliases.get(kv.key)) is not None:
            # An alias fills a slot only when the known attribute has not: known names win.
            if values[slot] is None:
                values[slot] = kv
        elif (kv.value.WhichOneof("value") in NESTED_KINDS
              and _depth(kv.value, options.max_value_depth) > options.max_value_depth):
            raise InvalidSpan(f"attribute {kv.key[:MAX_VALUE_IN_MESSAGE]!r} nests "
                              f"deeper than {options.max_value_depth} levels")
    return values


NESTED_KINDS = frozenset({"array_value", "kvlist_value"})
# Each field a value is looked up for; a span setting any slot of a group hides the resource's
# values for that whole group (span first, then resource, per field).
FIELD_GROUPS: tuple[tuple[int, ...], ...] = (
    SESSION_SLOTS, MODEL_SLOTS, IN_SLOTS, OUT_SLOTS, REASONING_SLOTS, CACHE_READ_SLOTS,
    CACHE_WRITE_SLOTS, COST_SLOTS, (S_KIND,), (S_STATUS,), (S_CHANNEL,), (S_GOAL,),
    (S_OPERATION,), (S_OI_SPAN_KIND,))


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of an AnyValue (a scalar is 0), exploring at most limit + 1 levels."""
    which = value.WhichOneof("value")
    if which == "array_value":
        children = value.array_value.values
    elif which == "kvlist_value":
        children = [kv.value for kv in value.kvlist_value.values]
    else:
        return 0
    if limit < 0:
        return 1
    return 1 + max((_depth(child, limit - 1) for child in children), default=0)


_new_usage = tuple.__new__
# The span's identity is its trace and span id; its end time goes first in the key so that
# span ids arrive in nearly ascending order and the dedupe index grows at its right edge
# (about 5x cheaper to insert into than random ids). A retried span has the same end time.
_pack_time = struct.Struct(">Q").pack
KEY_BYTES = 8 + TRACE_ID_BYTES + SPAN_ID_BYTES


def map_span(span: Any, fallbacks: list[tuple[tuple[int, ...], list[Any]]],
             options: MappingOptions, now_ns: int, result: MappingResult) -> SpanUsage | None:
    """Map one span; None when it is not usage. Raises InvalidSpan for broken values.

    Written for speed (it runs once per span): KeyValue messages are always truthy, so
    `a or b or c` picks the first attribute present in precedence order.
    """
    try:
        v = collect(span.attributes, options)
    except InvalidSpan as exc:
        raise InvalidSpan(f"span {_ref(span)}: {exc}") from None
    for group, resource_values in fallbacks:
        if all(v[s] is None for s in group):
            for slot, value in zip(group, resource_values, strict=True):
                v[slot] = value

    session_value = v[S_CONVERSATION_ID] or v[S_SESSION_ID]
    if session_value is None:
        return None
    session_id = session_value.value.string_value or _text(session_value.value)
    if not session_id:
        return None
    if len(session_id) > options.max_session_id_length or not session_id.isprintable():
        _check_session_id(session_id, span, options.max_session_id_length)
    trace_id = span.trace_id
    span_id = span.span_id
    if len(trace_id) != TRACE_ID_BYTES or len(span_id) != SPAN_ID_BYTES:
        raise InvalidSpan(f"span {_ref(span)}: trace id must be 16 bytes and span id 8 bytes")

    operation = v[S_OPERATION]
    operation = operation.value.string_value if operation is not None else ""
    # The GenAI operation name, when present, decides; otherwise the OpenInference span kind.
    if operation:
        oi_kind = ""
    else:
        oi_kind = v[S_OI_SPAN_KIND]
        oi_kind = oi_kind.value.string_value.upper() if oi_kind is not None else ""
    if operation == "invoke_agent" or oi_kind == "AGENT":
        turns, counts_tokens = 1, options.agent_span_tokens
    elif operation in MODEL_CALL_OPERATIONS or oi_kind == "LLM":
        turns, counts_tokens = (0 if span.parent_span_id else 1), True
    elif any(v[s] is not None for s in TOKEN_SLOTS):
        turns, counts_tokens = 1, True
    elif any(v[s] is not None for s in SESSION_ATTRIBUTE_SLOTS):
        turns, counts_tokens = 0, False
    else:
        return None

    limit = options.max_attribute_value_bytes
    model_value = v[S_RESPONSE_MODEL] or v[S_REQUEST_MODEL] or v[S_OI_MODEL]
    if model_value is not None:
        model = model_value.value.string_value or _text(model_value.value)
    else:
        model = ""
    if len(model) * 4 > limit:
        _bounded(model, _slot_of(v, MODEL_SLOTS, model_value), span, limit)

    prompt = completion = reasoning = cache_read = cache_write = 0
    cost = 0.0
    priced = True
    if counts_tokens:
        x = v[S_IN] or v[S_IN_DEPRECATED] or v[S_OI_IN]
        if x is not None:
            prompt = x.value.int_value
            if not 0 < prompt <= MAX_TOKEN_COUNT:  # not a plain count: _count decides
                prompt = _count(x, v, IN_SLOTS, span)
        x = v[S_OUT] or v[S_OUT_DEPRECATED] or v[S_OI_OUT]
        if x is not None:
            completion = x.value.int_value
            if not 0 < completion <= MAX_TOKEN_COUNT:  # not a plain count: _count decides
                completion = _count(x, v, OUT_SLOTS, span)
        x = v[S_REASONING] or v[S_OI_REASONING]
        if x is not None:
            reasoning = x.value.int_value
            if not 0 < reasoning <= MAX_TOKEN_COUNT:  # not a plain count: _count decides
                reasoning = _count(x, v, REASONING_SLOTS, span)
        x = v[S_CACHE_READ] or v[S_OI_CACHE_READ]
        if x is not None:
            cache_read = x.value.int_value
            if not 0 < cache_read <= MAX_TOKEN_COUNT:  # not a plain count: _count decides
                cache_read = _count(x, v, CACHE_READ_SLOTS, span)
        x = v[S_CACHE_WRITE] or v[S_OI_CACHE_WRITE]
        if x is not None:
            cache_write = x.value.int_value
            if not 0 < cache_write <= MAX_TOKEN_COUNT:  # not a plain count: _count decides
                cache_write = _count(x, v, CACHE_WRITE_SLOTS, span)
        # GenAI convention: input includes cache reads and writes. Some emitters report cache
        # tokens beside input instead; when cache exceeds input that must be the case.
        cached = cache_read + cache_write
        if cached > prompt:
            uncached = prompt
            prompt += cached
        else:
            uncached = prompt - cached
        # Reasoning is part of output; an emitter reporting more reasoning than output counted
        # it beside output, so it is added once to make output whole.
        if reasoning > completion:
            completion += reasoning
        x = v[S_COST_GENAI] or v[S_COST_OI] or v[S_COST_OP]
        if x is not None:
            cost = _cost(x, v, span) * 100.0
        elif prompt or completion:
            request_value = v[S_REQUEST_MODEL]
            request_model = _text(request_value.value) if request_value is not None else ""
            response_model = model if model_value is not request_value else ""
            priced_cost = options.pricer.cost_cents(
                response_model, request_model, uncached, cache_read, cache_write, completion)
            if priced_cost is None:
                priced = False
            else:
                cost = priced_cost

    start_ns = span.start_time_unix_nano
    end_ns = key_time = span.end_time_unix_nano  # the key uses what the span says, never now
    if start_ns > MAX_TIME_NS or end_ns > MAX_TIME_NS:
        raise InvalidSpan(f"span {_ref(span)}: timestamp after the year 2262")
    if not start_ns:
        start_ns = end_ns or now_ns
    if not end_ns:
        end_ns = start_ns
    if end_ns < start_ns:
        start_ns, end_ns = end_ns, start_ns

    x = v[S_KIND]
    kind = _choice(x.value, KINDS, DEFAULT_KIND, S_KIND, result) if x is not None else None
    x = v[S_STATUS]
    status = (_choice(x.value, STATUSES, DEFAULT_STATUS, S_STATUS, result)
              if x is not None else None)
    x = v[S_CHANNEL]
    channel = (_choice(x.value, CHANNELS, DEFAULT_CHANNEL, S_CHANNEL, result)
               if x is not None else None)
    x = v[S_GOAL]
    goal = _bounded(_text(x.value), S_GOAL, span, limit) or None if x is not None else None

    return _new_usage(SpanUsage, (
        _pack_time(key_time) + trace_id + span_id, session_id, start_ns, end_ns, turns, prompt,
        completion, reasoning, cache_read, cache_write, cost, priced, model or None, kind,
        status, channel, goal,
    ))


def _slot_of(values: list[Any], group: tuple[int, ...], value: Any) -> int:
    """Which attribute of a group a picked value came from (for error messages)."""
    for slot in group:
        if values[slot] is value:
            return slot
    return group[0]


def _ref(span: Any) -> str:
    """How error messages name a span; computed only when there is an error."""
    return span.span_id.hex() or "(no span id)"


def _bounded(text: str, slot: int, span: Any, limit: int) -> str:
    """A stored text value within the byte limit, else the span is rejected."""
    if len(text) > limit or (not text.isascii() and len(text.encode()) > limit):
        raise InvalidSpan(f"span {_ref(span)}: {SLOT_NAMES[slot]} is longer than {limit} bytes")
    return text


def _text(value: Any) -> str:
    """A string attribute as text; integers are accepted for ids. Anything else is ''."""
    if value is None:
        return ""
    text: str = value.string_value
    if text:  # non-empty string_value: the oneof holds a string
        return text
    which = value.WhichOneof("value")
    if which == "string_value":
        return str(value.string_value)
    if which == "int_value":
        return str(value.int_value)
    return ""


def _check_session_id(session_id: str, span: Any, max_length: int) -> None:
    if len(session_id) > max_length:
        raise InvalidSpan(f"span {_ref(span)}: session id longer than {max_length} characters")
    if not session_id.isprintable():
        raise InvalidSpan(f"span {_ref(span)}: session id contains control characters")


def _show(value: Any) -> str:
    which = value.WhichOneof("value")
    shown = repr(getattr(value, which)) if which else "empty value"
    return shown if len(shown) <= MAX_VALUE_IN_MESSAGE else shown[:MAX_VALUE_IN_MESSAGE] + "..."


def _count(kv: Any, values: list[Any], group: tuple[int, ...], span: Any) -> int:
    """A token count: an integer up to MAX_TOKEN_COUNT (integral doubles and digit strings
    accepted). `kv` is the attribute's KeyValue; `values` and `group` name it in errors."""
    value = kv.value
    number: int | None = value.int_value
    if number:  # a non-zero int_value means the oneof holds an int
        if 0 < number <= MAX_TOKEN_COUNT:
            return number
    else:
        number = None
        which = value.WhichOneof("value")
        if which == "int_value":
            number = 0
        elif which == "double_value":
            d = value.double_value
            if math.isfinite(d) and d.is_integer():
                number = int(d)
        elif which == "string_value":
            text = value.string_value.strip()
            if text.isascii() and text.isdigit():
                number = int(text)
        if number is not None and 0 <= number <= MAX_TOKEN_COUNT:
            return number
    raise InvalidSpan(
        f"span {_ref(span)}: {SLOT_NAMES[_slot_of(values, group, kv)]} must be an "
        f"integer from 0 to {MAX_TOKEN_COUNT}, got {_show(value)}")


def _cost(kv: Any, values: list[Any], span: Any) -> float:
    value = kv.value
    which = value.WhichOneof("value")
    number: float | None = None
    if which == "double_value":
        number = value.double_value
    elif which == "int_value":
        number = float(value.int_value)
    elif which == "string_value":
        try:
            number = float(value.string_value)
        except ValueError:
            number = None
    if number is None or not 0 <= number <= MAX_COST_USD:  # also rejects NaN
        raise InvalidSpan(
            f"span {_ref(span)}: {SLOT_NAMES[_slot_of(values, COST_SLOTS, kv)]} must be a "
            f"number of USD from 0 to {MAX_COST_USD:g}, got {_show(value)}")
    return number


def _choice(value: Any, allowed: tuple[str, ...], default: str, slot: int,
            result: MappingResult) -> str | None:
    """An enumerated session attribute; outside its set it becomes the column default."""
    if value is None:
        return None
    text = _text(value).strip().lower()
    if text in allowed:
        return text
    result.invalid_values.append((SLOT_NAMES[slot], _text(value)[:MAX_VALUE_IN_MESSAGE]))
    return default
