"""A record an agent's dialect reads (a span, a log record or a metric point) -> a usage event.

Pure. Every signal decodes its records into the same `Record` and the dialect decides what each
one is: a model call (tokens, cost, model), a turn (a user prompt), or nothing. Identity is
what makes "counted once" hold across signals and retries:

* a call with a request id, of a dialect whose calls arrive on several signals, is that
  request: the log record and the span of one call share the key (zero time prefix + digest
  of dialect, session and request id), so whichever arrives first counts and the other is a
  duplicate;
* a call without one counts only on the dialect's source signal (the others repeat it), keyed
  like any record of that signal;
* a turn reported on several signals (Claude Code's user_prompt log and interaction span) is
  keyed by the span context they share, else by its prompt id;
* anything else is keyed by its own content: an exporter's retry resends the same bytes.

Keys are KEY_BYTES wide like span keys (8 bytes of time, then 24), so one dedupe table serves
every signal.
"""

from __future__ import annotations

import fnmatch
import hashlib
import struct
from collections.abc import Iterable, Mapping, Set
from typing import Any, NamedTuple

from collector.dialects.model import (
    COUNTS,
    HOST_NAME,
    METRICS,
    SERVICE_NAME,
    SERVICE_VERSION,
    Dialect,
    Selector,
)
from collector.signals import values
from collector.signals.scan import EMPTY, NESTED, any_value, nesting_depth
from collector.signals.traces import (
    KEY_BYTES,
    NO_LABELS,
    ROLE_NAMED,
    ROLE_OWN,
    SPAN_ID_BYTES,
    TRACE_ID_BYTES,
    UNRESOLVED,
    Labels,
    MappingOptions,
    MappingResult,
    SpanUsage,
    TraceLink,
    stored_parent,
)

_pack_time = struct.Struct(">Q").pack
DIGEST_BYTES = KEY_BYTES - 8
NO_TIME_PREFIX = bytes(8)
CENTS_PER_USD = 100.0

CALL = "call"
TURN = "turn"


class Record(NamedTuple):
    """One record of any signal, as plain values.

    `names`: what selectors match (a span's name; a log record's event_name field, event.name
    attribute and string body; a metric's name). `end_ns` is the span's end, the log record's
    time (else its observed time) or the point's time. `content` is what identifies it when it
    carries no id: bytes, or the protobuf message itself, encoded only if a key needs it.
    """

    signal: str
    names: tuple[str, ...]
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]
    trace_id: bytes
    span_id: bytes
    start_ns: int
    end_ns: int
    content: Any
    ref: str  # how error messages name the record
    parent_id: bytes = b""  # a span's parent span id


def attributes_of(kvs: Iterable[Any], options: MappingOptions, ref: str,
                  wanted: Set[str] | None = None) -> dict[str, Any]:
    """KeyValues as a dict of plain values (nested values kept as a marker, never read as
    values), only those named in `wanted` when given: agents send a dozen attributes a
    record and a dialect reads a few. The attribute-count bound applies to all; the nesting
    bound to the values read (it bounds the reader's walk, and unread values are not
    walked)."""
    out: dict[str, Any] = {}
    limit = options.max_value_depth
    count = 0
    for kv in kvs:
        count += 1
        key = kv.key
        if wanted is not None and key not in wanted:
            continue
        value = kv.value
        text = value.string_value
        if text:
            out[key] = text
            continue
        plain = any_value(value)
        if plain is NESTED and nesting_depth(value, limit) > limit:
            raise values.InvalidRecord(f"{ref}: attribute {key[:64]!r} nests deeper than "
                                       f"{limit} levels")
        out[key] = plain
    if count > options.max_attributes_per_span:
        raise values.InvalidRecord(f"{ref}: {count} attributes exceed the limit of "
                                   f"{options.max_attributes_per_span}")
    return out


def selector_matches(selector: Selector, record: Record) -> bool:
    if selector.signal != record.signal:
        return False
    name = selector.name
    if not any(n == name or fnmatch.fnmatchcase(n, name) for n in record.names if n):
        return False
    attributes = record.attributes
    return all(values.text(attributes.get(k)) == v for k, v in selector.where)


def role_of(dialect: Dialect, record: Record) -> str | None:
    if any(selector_matches(s, record) for s in dialect.calls):
        return CALL
    if any(selector_matches(s, record) for s in dialect.turns):
        return TURN
    return None


def lookup(dialect: Dialect, record: Record, role: str) -> Any:
    """The first present value of a role's attributes: the record's, then its resource's."""
    found = lookup_named(dialect, record, role)
    return None if found is None else found[1]


def lookup_named(dialect: Dialect, record: Record, role: str) -> tuple[str, Any] | None:
    """(attribute name, value) of the first present attribute of a role, so that an error
    names the attribute the agent sent."""
    return first_present(record, dialect.names_for(role))


def first_present(record: Record, names: tuple[str, ...]) -> tuple[str, Any] | None:
    """(name, value) of the first of `names` the record gives a plain value, else the first
    its resource gives."""
    for source in (record.attributes, record.resource):
        for name in names:
            value = source.get(name)
            if value is not None and value is not EMPTY and value is not NESTED:
                return name, value
    return None


def digest(*parts: bytes | str) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.digest()


def content_key(record: Record) -> bytes:
    content = record.content
    if not isinstance(content, bytes):
        content = content.SerializeToString(deterministic=True)
    return _pack_time(min(max(record.end_ns, 0), values.MAX_TIME_NS)) + digest(
        record.signal, content)


def session_of(dialect: Dialect, record: Record, options: MappingOptions) -> str | None:
    value = lookup(dialect, record, "session_id")
    if value is None:
        return None
    session = values.text(value)
    if not session:
        return None
    return values.session_id(session, record.ref, options.max_session_id_length)




def labels_of(dialect: Dialect, record: Record, options: MappingOptions) -> Labels:
    """Who spends: the resource's service name, version and host (the record's own when it
    names them), the dialect's user attribute, and each configured dimension's first present
    attribute (the record's, then the resource's)."""
    limit = options.max_attribute_value_bytes

    def label(value: Any, name: str) -> str | None:
        return values.bounded_text(value, name, record.ref, limit)

    def attribute(name: str) -> Any:
        value = record.attributes.get(name)
        return value if value is not None else record.resource.get(name)

    dimensions: list[tuple[str, str]] = []
    for dimension, names in options.dimensions:
        found = first_present(record, names)
        if found is not None:
            text = label(found[1], found[0])
            if text:
                dimensions.append((dimension, text))
    return (label(attribute(SERVICE_NAME), SERVICE_NAME),
            label(attribute(SERVICE_VERSION), SERVICE_VERSION),
            label(lookup(dialect, record, "user"), "user"),
            label(attribute(HOST_NAME), HOST_NAME),
            options.tag_set(tuple(dimensions)) if dimensions else ())


def map_record(dialect: Dialect, record: Record, options: MappingOptions, now_ns: int,
               result: MappingResult) -> SpanUsage | None:
    """The usage event of one record, None when it is not usage. Raises InvalidRecord."""
    role = role_of(dialect, record)
    if role is None:
        return None
    session = session_of(dialect, record, options)
    spans = record.signal == "traces" and len(record.trace_id) == TRACE_ID_BYTES \
        and len(record.span_id) == SPAN_ID_BYTES
    if session is None:
        if spans:
            _hold(dialect, record, role, options, now_ns, result)
        return None
    if spans:
        # A span naming a session names it for its trace's spans that do not.
        result.links.append(TraceLink(record.trace_id, record.span_id,
                                      stored_parent(record.parent_id), session))
    usage = (_call if role == CALL else _turn)(dialect, record, session, options, now_ns)
    if usage is not None and spans and record.parent_id:
        # Remembered with its trace (collector.accounting.turns), so that the trace's turn
        # span naming no session, when it arrives after this one, takes this session at once.
        usage = usage._replace(role=ROLE_NAMED)
    return usage


def _hold(dialect: Dialect, record: Record, role: str, options: MappingOptions, now_ns: int,
          result: MappingResult) -> None:
    """A span the dialect reads as usage but that names no session: held until its trace
    names one. Only where its identity does not depend on the session: a call with a request
    id, or a turn keyed by its prompt id, is left to the signal that names the session (the
    key of that one would differ). A call the dialect does not count from spans (Codex's:
    its source is the logs) is not usage here either, session or not."""
    if role == CALL:
        if dialect.shared_calls and values.text(lookup(dialect, record, "request_id")):
            return
        usage = _call(dialect, record, UNRESOLVED, options, now_ns)
    else:
        if dialect.shared_turns and not any(record.span_id):
            return
        usage = _turn(dialect, record, UNRESOLVED, options, now_ns)
        # A dialect's turn is its agent's user prompt: what encloses it is the agent's own
        # plumbing (opencode's server span, never exported, is every prompt's ancestor), not
        # a nearer session. So it waits for no ancestor: its trace's session is its own.
        result.hold(usage, record.trace_id, record.span_id, b"")
        return
    if usage is not None:
        result.hold(usage, record.trace_id, record.span_id, record.parent_id)


def _times(record: Record, now_ns: int) -> tuple[int, int]:
    start, end = record.start_ns, record.end_ns
    if start > values.MAX_TIME_NS or end > values.MAX_TIME_NS:
        raise values.InvalidRecord(f"{record.ref}: timestamp after the year 2262")
    if not start:
        start = end or now_ns
    if not end:
        end = start
    if end < start:
        start, end = end, start
    return start, end


def model_of(dialect: Dialect, record: Record, options: MappingOptions) -> str | None:
    return values.bounded_text(lookup(dialect, record, "model"), "model", record.ref,
                               options.max_attribute_value_bytes)


def _turn(dialect: Dialect, record: Record, session: str, options: MappingOptions,
          now_ns: int) -> SpanUsage:
    key: bytes | None = None
    if dialect.shared_turns:
        # Reported on several signals: the span context they share, else the prompt id.
        if len(record.trace_id) == 16 and len(record.span_id) == 8 and any(record.span_id):
            key = NO_TIME_PREFIX + digest("turn-context", record.trace_id, record.span_id)
        else:
            prompt = values.text(lookup(dialect, record, "prompt_id"))
            if prompt:
                key = NO_TIME_PREFIX + digest("turn-prompt", dialect.name, session, prompt)
    start, end = _times(record, now_ns)
    return usage(key or content_key(record), session, start, end, turns=1,
                 model=model_of(dialect, record, options),
                 labels=labels_of(dialect, record, options))


def _call(dialect: Dialect, record: Record, session: str, options: MappingOptions,
          now_ns: int) -> SpanUsage | None:
    request = values.text(lookup(dialect, record, "request_id"))
    if record.signal != dialect.source and (not request or dialect.source == METRICS):
        # The source signal reports this call and this record repeats it. A request id lets
        # logs and spans count whichever arrives first; metric points share no id with them.
        return None
    counts = {}
    for role in COUNTS:
        found = lookup_named(dialect, record, role)
        if found is not None:
            counts[role] = values.count(found[1], found[0], record.ref)
    cost_found = lookup_named(dialect, record, "cost_usd")
    if not counts and cost_found is None:
        return None  # e.g. Codex's response.completed event without its usage
    model = model_of(dialect, record, options)
    prompt, completion, reasoning, cache_read, cache_write, uncached = tokens(
        dialect, counts.get("input", 0), counts.get("output", 0), counts.get("reasoning", 0),
        counts.get("cache_read", 0), counts.get("cache_write", 0))
    priced = True
    if cost_found is not None:
        cost = values.cost_usd(cost_found[1], cost_found[0], record.ref) * CENTS_PER_USD
    elif prompt or completion:
        priced_cost = options.pricer.cost_cents(model or "", "", uncached, cache_read,
                                                cache_write, completion)
        priced = priced_cost is not None
        cost = priced_cost or 0.0
    else:
        cost = 0.0
    if request and dialect.shared_calls:
        key = NO_TIME_PREFIX + digest("call", dialect.name, session, request)
    elif record.signal == "traces":
        key = _pack_time(min(record.end_ns, values.MAX_TIME_NS)) + record.trace_id + \
            record.span_id
        if len(key) != KEY_BYTES:
            raise values.InvalidRecord(f"{record.ref}: trace id must be 16 bytes and span id "
                                       f"8 bytes")
    else:
        key = content_key(record)
    start, end = _times(record, now_ns)
    return usage(key, session, start, end, turns=0 if dialect.turns else 1, prompt=prompt,
                 completion=completion, reasoning=reasoning, cache_read=cache_read,
                 cache_write=cache_write, cost=cost, priced=priced, model=model,
                 labels=labels_of(dialect, record, options))


def tokens(dialect: Dialect, input_: int, output: int, reasoning: int, cache_read: int,
           cache_write: int) -> tuple[int, int, int, int, int, int]:
    """(prompt, completion, reasoning, cache_read, cache_write, uncached input) under the
    dialect's semantics: the row's prompt_tokens include cached tokens and its
    completion_tokens include reasoning, whatever the agent reports."""
    cached = cache_read + cache_write
    if dialect.input_includes_cache and cached <= input_:
        prompt, uncached = input_, input_ - cached
    else:
        # Reported beside input (or an agent said "includes" but sent more cache than input:
        # then it cannot have been included).
        prompt, uncached = input_ + cached, input_
    if dialect.reasoning_in_output and reasoning <= output:
        completion = output
    else:
        completion = output + reasoning
    return prompt, completion, reasoning, cache_read, cache_write, uncached


def usage(key: bytes, session: str, start: int, end: int, *, turns: int = 0, prompt: int = 0,
          completion: int = 0, reasoning: int = 0, cache_read: int = 0, cache_write: int = 0,
          cost: float = 0.0, priced: bool = True, model: str | None = None,
          labels: Labels = NO_LABELS) -> SpanUsage:
    """The one place a dialect's record becomes the usage event every signal shares."""
    agent, agent_version, user, host, dimensions = labels
    return SpanUsage(key, session, start, end, turns, prompt, completion, reasoning,
                     cache_read, cache_write, cost, priced, model, None, None, None, None,
                     agent, agent_version, user, host, ROLE_OWN, None, dimensions)
