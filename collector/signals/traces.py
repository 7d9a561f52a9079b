"""Span -> usage record mapping. Pure: values in, values out; no I/O, no event loop.

This module is the specification of what a span means to the collector:

* session id: ``gen_ai.conversation.id``, else ``session.id``, else ``langfuse.session.id``,
  ``traceloop.association.properties.session_id``, ``ai.telemetry.metadata.sessionId``; usage
  without one takes its trace's session (collector.accounting.traces): such a span is returned
  as held usage (with its parent span id), and spans that can name a trace's session are
  returned as trace links;
* model: ``gen_ai.response.model``, else ``gen_ai.request.model``, else ``llm.model_name``;
* tokens: GenAI semantic conventions, their deprecated names, or OpenInference; the first
  convention present wins for each count, so a span carrying two conventions counts once;
* cost given by the emitter (USD): ``gen_ai.usage.cost``, ``llm.cost.total``, ``operation.cost``;
* session attributes: ``agent.session.kind`` / ``.channel`` / ``.status`` / ``.goal``;
* who spends: agent ``service.name`` and ``service.version``, host ``host.name``, user
  ``user.email``, else ``user.id``, else ``enduser.id`` (usually resource attributes).

Each value is looked up on the span's attributes first and on its resource's second.

Which spans count as what (a record's `turns` is what the span claims; its `role` says how
the store settles it across the trace, collector.accounting.turns: one turn per trace and
session):

* agent span (``gen_ai.operation.name = invoke_agent`` or OpenInference kind ``AGENT``): a turn
  candidate (ROLE_TURN); its tokens are roll-ups of its children and are ignored unless
  ``agent_span_tokens``;
* model call (``chat``, ``text_completion``, ``generate_content`` or kind ``LLM``): tokens, cost
  and model; a turn of its own when it has no parent span (ROLE_OWN), else usage inside its
  trace (ROLE_CALL);
* a span's GenAI operation name, when present, decides its kind; the OpenInference span kind
  is consulted only without one;
* any other span with a session id and token counts: its tokens, and a turn of its own at the
  root, else a turn candidate;
* a span with a session id and session attributes only: updates the session;
* a root span that is none of these: a TraceRoot, the turn of its trace's sessions with usage;
* anything else is not usage and is ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from collector.accounting.pricing import Pricer
from collector.dialects import DialectSet, effective_dialects
from collector.signals import values
from collector.signals.scan import Scanner, SpanScan, service_name
from collector.signals.slots import (
    ATTRIBUTE_SLOTS,
    CACHE_READ_SLOTS,
    CACHE_WRITE_SLOTS,
    CONVENTION_ALIASES,
    COST_SLOTS,
    IN_SLOTS,
    MODEL_SLOTS,
    N_SLOTS,
    OTHER_SESSION_SLOTS,
    OUT_SLOTS,
    REASONING_SLOTS,
    S_AGENT,
    S_AGENT_VERSION,
    S_CACHE_READ,
    S_CACHE_WRITE,
    S_CHANNEL,
    S_CONVERSATION_ID,
    S_ENDUSER_ID,
    S_GOAL,
    S_HOST,
    S_IN,
    S_IN_DEPRECATED,
    S_KIND,
    S_OI_CACHE_READ,
    S_OI_CACHE_WRITE,
    S_OI_IN,
    S_OI_OUT,
    S_OI_REASONING,
    S_OI_SPAN_KIND,
    S_OI_TOTAL,
    S_OPERATION,
    S_OUT,
    S_OUT_DEPRECATED,
    S_REASONING,
    S_REQUEST_MODEL,
    S_SESSION_ID,
    S_STATUS,
    S_TOTAL,
    S_USER_EMAIL,
    S_USER_ID,
    SESSION_ATTRIBUTE_SLOTS,
    SESSION_SLOTS,
    SLOT_NAMES,
    TOKEN_SLOTS,
    USER_SLOTS,
)
from collector.signals.values import (
    MAX_ERROR_MESSAGES,
    MAX_TIME_NS,
    MAX_TOKEN_COUNT,
    MAX_VALUE_IN_MESSAGE,
    InvalidRecord,
)

KINDS = ("interactive", "autonomous", "acp")
STATUSES = ("active", "completed", "failed", "cancelled", "unknown")
CHANNELS = ("cli", "tui", "telegram", "discord", "slack", "acp")
DEFAULT_KIND = "interactive"
DEFAULT_STATUS = "active"
DEFAULT_CHANNEL = "cli"
MODEL_CALL_OPERATIONS = frozenset({"chat", "text_completion", "generate_content"})
TRACE_ID_BYTES = 16
# Sets of tags MappingOptions.tag_set keeps (each a few hundred bytes): far more than a fleet's
# teams times projects, few enough that one agent sending a new set per span costs little.
MAX_TAG_SETS = 16_384
SPAN_ID_BYTES = 8
# (dimension name, value) pairs, in the configured order; only the dimensions given.
Dimensions = tuple[tuple[str, str], ...]


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
    # Who spends (latest value per session, like model); None when the span does not say.
    agent: str | None = None  # service.name
    agent_version: str | None = None  # service.version
    user: str | None = None  # user.email, else user.id, else enduser.id
    host: str | None = None  # host.name
    # How the store decides its turn across its trace (collector.accounting.turns): ROLE_OWN,
    # its `turns` as they are; ROLE_TURN, a turn candidate; ROLE_CALL, usage inside a trace.
    role: int = 0
    # The name of the ingest token that carried it (collector.security); never an attribute.
    credential: str | None = None
    # The configured dimensions it names ([attribution]): (dimension, value) pairs, latest
    # value per session as for the labels above.
    dimensions: Dimensions = ()


# SpanUsage.role values.
ROLE_OWN = 0  # a root model call, a session update, a dialect's record: counted as mapped
ROLE_TURN = 1  # an agent span (or usage of no known kind): its trace's turn in its session
ROLE_CALL = 2  # a model call with a parent: its trace carried usage in its session
ROLE_NAMED = 3  # a dialect's span under a parent: counted as mapped; names its trace's session


class TraceRoot(NamedTuple):
    """A trace's root span that is no usage of its own (a workflow, a graph, a request): the
    turn of the sessions its trace carries usage in (collector.accounting.turns)."""

    key: bytes  # end time + trace id + span id, as a span's
    start_ns: int
    end_ns: int


# The session of held usage until its trace names one; never a valid session id (those are
# printable), so a held record can never be folded into a session by mistake.
UNRESOLVED = "\x00unresolved"
# The parent of a span whose parent id is malformed: no span has this id (zero is invalid).
NO_SUCH_SPAN = bytes(SPAN_ID_BYTES)


def stored_parent(parent_id: bytes) -> bytes:
    """A parent span id as held and linked: empty for a root, NO_SUCH_SPAN when malformed (its
    ancestors cannot be found)."""
    return parent_id if len(parent_id) in (0, SPAN_ID_BYTES) else NO_SUCH_SPAN


class HeldUsage(NamedTuple):
    """Usage whose span names no session: it waits, on disk, for a span of its trace to name
    one. `usage.session_id` is UNRESOLVED; the chain to its ancestors starts at `parent_id`
    (empty for a root span)."""

    usage: SpanUsage
    trace_id: bytes
    span_id: bytes
    parent_id: bytes


class TraceLink(NamedTuple):
    """What a span tells about its trace: its parent, and the session it names (None when it
    names none; such links only bridge a held span to an ancestor further up). `anchor`: kept
    whether or not anything of its trace is held (an agent span, or a root span naming a
    session: what a later span without a session most likely belongs to); other links are
    kept only for traces with held usage."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    session_id: str | None
    anchor: bool = False


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
    # False: read attributes with the Python scanner even when the compiled one is installed
    # (the tests run both).
    compiled_scanner: bool = True
    # The agents' dialects (built-ins plus config); resources and scopes they recognise are
    # read by their rules instead of the generic conventions.
    dialects: DialectSet = field(default_factory=lambda: DialectSet(effective_dialects()))
    # [attribution]: (dimension name, the attributes it is read from, in order).
    dimensions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    scanner: Scanner = field(init=False, repr=False, compare=False)
    # Per dimension, the slots of its attributes (after the known ones: the scanner reads
    # them in the same pass), and each extra slot's attribute name for error messages.
    dimension_slots: tuple[tuple[str, tuple[int, ...]], ...] = field(
        init=False, repr=False, compare=False)
    slot_names: dict[int, str] = field(init=False, repr=False, compare=False)
    # A span's values from the agent slot on, when it names no label and no dimension.
    no_label_values: list[None] = field(init=False, repr=False, compare=False)
    # The attribute names a dialect reads, with the dimensions' (by dialect name).
    _wanted: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)
    # Each set of tags read so far, kept once (see tag_set).
    _tag_sets: dict[Dimensions, Dimensions] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The other conventions' names first, so that a config alias of the same name wins.
        aliases = {**self.slots_for(CONVENTION_ALIASES), **self.alias_slots}
        known = dict(ATTRIBUTE_SLOTS)
        names = dict(SLOT_NAMES)
        dimension_slots = []
        n_slots = N_SLOTS
        for name, attributes in self.dimensions:
            slots = []
            for attribute in attributes:
                slot = known.get(attribute)
                if slot is None:
                    slot = known[attribute] = n_slots
                    names[slot] = attribute
                    n_slots += 1
                slots.append(slot)
            dimension_slots.append((name, tuple(slots)))
        set_ = object.__setattr__
        set_(self, "scanner", Scanner(known, aliases, n_slots, self.max_value_depth,
                                      compiled=self.compiled_scanner))
        set_(self, "dimension_slots", tuple(dimension_slots))
        set_(self, "slot_names", names)
        set_(self, "no_label_values", [None] * (n_slots - S_AGENT))
        set_(self, "_wanted", {})
        set_(self, "_tag_sets", {})

    def tag_set(self, tags: Dimensions) -> Dimensions:
        """The one tuple kept for this set of tags. A fleet's agents repeat a few sets (one
        per team and project) in every request; with one object per set, whatever compares
        a session's tags with what it remembered of them (the aggregator, the store's tag
        memo) finds the same object and stops at identity, never reading the old set's
        tuples and strings again: those are long out of the caches by the next flush, and
        reading them was most of what remembering tags cost. Bounded: forgotten whole when
        full (a set forgotten is kept again when next read; only identity is lost)."""
        sets = self._tag_sets
        kept = sets.get(tags)
        if kept is None:
            if len(sets) >= MAX_TAG_SETS:
                sets.clear()
            kept = sets[tags] = tags
        return kept

    def read_for(self, dialect: Any) -> frozenset[str]:
        """The attributes a dialect's records are decoded for: its own and the dimensions'."""
        wanted = self._wanted.get(dialect.name)
        if wanted is None:
            wanted = self._wanted[dialect.name] = dialect.read_attributes | frozenset(
                a for _, attributes in self.dimensions for a in attributes)
        return wanted

    @staticmethod
    def slots_for(aliases: Mapping[str, str]) -> dict[str, int]:
        return {alias: ATTRIBUTE_SLOTS[target] for alias, target in aliases.items()}


@dataclass(slots=True)
class MappingResult:
    """What mapping one request of any signal gave. `spans` counts the request's items: spans,
    log records or data points (the name predates logs and metrics)."""

    records: list[SpanUsage] = field(default_factory=list)
    spans: int = 0
    rejected: int = 0
    ignored: int = 0
    unpriced: int = 0
    errors: list[str] = field(default_factory=list)
    # (attribute, value) pairs outside the allowed sets, replaced by the column default.
    invalid_values: list[tuple[str, str]] = field(default_factory=list)
    # Cumulative metric points, made usage by the store (collector.signals.metrics).
    cumulative: list[Any] = field(default_factory=list)
    # Usage without a session id, and what spans tell about their traces' sessions.
    held: list[HeldUsage] = field(default_factory=list)
    links: list[TraceLink] = field(default_factory=list)
    # Root spans that are no usage themselves, for the turns of their traces.
    roots: list[TraceRoot] = field(default_factory=list)

    def take(self, record: SpanUsage | None) -> None:
        """Count a mapped record: usage kept, or None (not usage) counted as ignored."""
        if record is None:
            self.ignored += 1
        else:
            self.records.append(record)
            if not record.priced:
                self.unpriced += 1

    def hold(self, usage: SpanUsage, trace_id: bytes, span_id: bytes, parent_id: bytes) -> None:
        """Keep usage whose span names no session until its trace names one."""
        self.held.append(HeldUsage(usage._replace(session_id=UNRESOLVED), trace_id, span_id,
                                   stored_parent(parent_id)))
        if not usage.priced:
            self.unpriced += 1

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


# A span whose values break the conventions; it is rejected, its request is not.
InvalidSpan = InvalidRecord


def count_spans(request: Any) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def map_request(request: Any, options: MappingOptions, now_ns: int,
                wire: bytes | None = None) -> MappingResult:
    """Map an ExportTraceServiceRequest to usage records. `wire` is its protobuf encoding
    when the caller has it (the bytes it was decoded from).

    Spans of a scope an agent's dialect recognises are read by the dialect's rules
    (collector.signals.records); all others by the generic conventions below."""
    result = MappingResult()
    records = result.records
    dialects = options.dialects
    for index, ((resource_values, count, deep_key), spans) in enumerate(
            options.scanner.scan(request, wire)):
        problem = _attribute_problem(count, deep_key, options)
        if problem:
            for _ in spans:
                result.spans += 1
                result.reject(f"resource: {problem}")
            continue
        scopes = _dialect_scopes(request.resource_spans[index], dialects) if dialects else None
        # Only the groups the resource actually sets need a fallback per span (usually none).
        fallbacks = [(group, [resource_values[s] for s in group]) for group in FIELD_GROUPS
                     if any(resource_values[s] is not None for s in group)]
        # Who spends is nearly always said by the resource alone: read it once for all its
        # spans; a span repeating none of the label attributes takes these as they are.
        try:
            labels = _labels(resource_values, NO_LABELS, "resource",
                             options.max_attribute_value_bytes, options)
        except InvalidSpan as exc:
            for _ in spans:
                result.spans += 1
                result.reject(str(exc))
            continue
        if scopes is not None:
            _map_dialect_scopes(request.resource_spans[index], scopes, spans, fallbacks,
                                labels, options, now_ns, result)
            continue
        first = result.spans  # the position of a span in `spans` is result.spans - first - 1
        protos: list[Any] | None = None
        for span in spans:
            result.spans += 1
            try:
                record = map_span(span, fallbacks, labels, options, now_ns, result)
                if record is None:
                    # Not usage as it stands; perhaps usage of its trace's session, or a link
                    # to it. Off the hot path: every span of the benchmark names a session.
                    if protos is None:
                        protos = [p for ss in request.resource_spans[index].scope_spans
                                  for p in ss.spans]
                    _without_session(span, protos[result.spans - first - 1].parent_span_id,
                                     fallbacks, labels, options, now_ns, result)
                    continue
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


def _dialect_scopes(resource_spans: Any, dialects: DialectSet) -> list[Any] | None:
    """Per scope of the resource, the dialect that reads it; None when none does (the common
    case, decided from the service name and scope names alone)."""
    service = service_name(resource_spans.resource.attributes)
    found = [dialects.find(service, ss.scope.name) for ss in resource_spans.scope_spans]
    return found if any(d is not None for d in found) else None


def _map_dialect_scopes(resource_spans: Any, scopes: list[Any], spans: list[SpanScan],
                        fallbacks: list[tuple[tuple[int, ...], list[Any]]], labels: Labels,
                        options: MappingOptions, now_ns: int, result: MappingResult) -> None:
    """A resource with a dialect's scopes: those scopes' spans go through the dialect, the
    others (same resource, other instrumentation) through the generic mapping."""
    from collector.signals import records as dialect_records  # it builds on this module

    # Decoded once per dialect: each reads its own attributes of the resource.
    resources: dict[str, dict[str, Any]] = {}
    offset = 0
    for dialect, ss in zip(scopes, resource_spans.scope_spans, strict=True):
        scanned = spans[offset:offset + len(ss.spans)]
        offset += len(ss.spans)
        for span, scan in zip(ss.spans, scanned, strict=True):
            result.spans += 1
            held = len(result.held)
            try:
                if dialect is None:
                    record = map_span(scan, fallbacks, labels, options, now_ns, result)
                    if record is None:
                        _without_session(scan, span.parent_span_id, fallbacks, labels,
                                         options, now_ns, result)
                        continue
                else:
                    resource = resources.get(dialect.name)
                    if resource is None:
                        resource = resources[dialect.name] = dialect_records.attributes_of(
                            resource_spans.resource.attributes, options, "resource",
                            options.read_for(dialect))
                    ref = f"span {_ref(span.span_id)}"
                    record = dialect_records.map_record(dialect, dialect_records.Record(
                        "traces", (span.name,),
                        dialect_records.attributes_of(span.attributes, options, ref,
                                                      options.read_for(dialect)),
                        resource, span.trace_id, span.span_id, span.start_time_unix_nano,
                        span.end_time_unix_nano, span.trace_id + span.span_id, ref,
                        span.parent_span_id),
                        options, now_ns, result)
            except InvalidSpan as exc:
                result.reject(str(exc))
                continue
            if record is None and held != len(result.held):
                continue  # held: usage once its trace names the session, not ignored
            result.take(record)


def _attribute_problem(count: int, deep_key: str | None, options: MappingOptions) -> str:
    """The bounds on attribute count and on array/kvlist nesting (which only attributes the
    mapping does not read can break: the scanner checks only those)."""
    if count > options.max_attributes_per_span:
        return f"{count} attributes exceed the limit of {options.max_attributes_per_span}"
    if deep_key is not None:
        return (f"attribute {deep_key[:MAX_VALUE_IN_MESSAGE]!r} nests deeper than "
                f"{options.max_value_depth} levels")
    return ""


# Each field a value is looked up for; a span setting any slot of a group hides the resource's
# values for that whole group (span first, then resource, per field).
FIELD_GROUPS: tuple[tuple[int, ...], ...] = (
    SESSION_SLOTS, MODEL_SLOTS, IN_SLOTS, OUT_SLOTS, REASONING_SLOTS, CACHE_READ_SLOTS,
    CACHE_WRITE_SLOTS, COST_SLOTS, (S_KIND,), (S_STATUS,), (S_CHANNEL,), (S_GOAL,),
    (S_OPERATION,), (S_OI_SPAN_KIND,))
# The who-spends slots come last, so a span's own labels are one slice of its values.
# Then the dimensions' attributes ([attribution]), so one slice from S_AGENT covers them all.
LABEL_SLOTS = (S_AGENT, S_AGENT_VERSION, S_HOST, S_USER_EMAIL, S_USER_ID, S_ENDUSER_ID)
# agent, version, user, host, dimensions
Labels = tuple[str | None, str | None, str | None, str | None, Dimensions]
NO_LABELS: Labels = (None, None, None, None, ())
_NO_LABEL_VALUES = [None] * (N_SLOTS - S_AGENT)


_new_usage = tuple.__new__
# The span's identity is its trace and span id; its end time goes first in the key so that
# span ids arrive in nearly ascending order and the dedupe index grows at its right edge
# (about 5x cheaper to insert into than random ids). A retried span has the same end time.
_pack_time = struct.Struct(">Q").pack
KEY_BYTES = 8 + TRACE_ID_BYTES + SPAN_ID_BYTES


def map_span(span: SpanScan, fallbacks: list[tuple[tuple[int, ...], list[Any]]],
             resource_labels: Labels, options: MappingOptions, now_ns: int,
             result: MappingResult) -> SpanUsage | None:
    """Map one scanned span; None when it is not usage. Raises InvalidSpan for broken values.

    Its steps, each a helper on the span's values `v` (`v[slot]` is an attribute's value, None
    when absent; a group's first present slot wins): the session (_session_of), what the
    span is (_what_span), its model, tokens and cost (_tokens), its times (_times), its
    session attributes (_session_values) and who spends (_labels). It runs once per span, so
    the usual span (a model call naming its session in `gen_ai.conversation.id`, with
    ordinary times and no session attributes) takes each step inline, without the call.
    """
    v, trace_id, span_id, has_parent, start_ns, end_ns, count, deep_key = span
    if count > options.max_attributes_per_span or deep_key is not None:
        raise InvalidSpan(f"span {_ref(span_id)}: "
                          f"{_attribute_problem(count, deep_key, options)}")
    for group, resource_values in fallbacks:
        if all(v[s] is None for s in group):
            for slot, value in zip(group, resource_values, strict=True):
                v[slot] = value
    session_id = v[S_CONVERSATION_ID]
    if session_id.__class__ is not str or not session_id \
            or len(session_id) > options.max_session_id_length or not session_id.isprintable():
        session_id = _session_of(v, span_id, options)
        if session_id is None:
            return None
    if len(trace_id) != TRACE_ID_BYTES or len(span_id) != SPAN_ID_BYTES:
        raise InvalidSpan(f"span {_ref(span_id)}: trace id must be 16 bytes and span id 8 "
                          f"bytes")
    operation = v[S_OPERATION]
    calls = _MODEL_CALLS.get(operation) if operation.__class__ is str else None
    what: SpanIs | None
    if calls is not None:
        what = calls[has_parent]  # the usual span, decided without a call
    else:
        what = _what_span(v, has_parent, options)
        if what is None:
            return None
    turns, counts_tokens, role, agent_span = what
    if agent_span:
        # What later spans of its trace without a session most likely belong to.
        result.links.append(TraceLink(trace_id, span_id, b"", session_id, True))
    limit = options.max_attribute_value_bytes
    model_slot = _first(v, MODEL_SLOTS)
    model = v[model_slot]
    model = model if model.__class__ is str else _text(model)
    if len(model) * 4 > limit:
        _bounded(model, model_slot, span_id, limit)
    tokens = _tokens(v, span_id, model, model_slot, options) if counts_tokens else NO_TOKENS
    key_time = end_ns  # the key uses what the span says, never now
    if not 0 < start_ns <= end_ns <= MAX_TIME_NS:
        start_ns, end_ns = _times(start_ns, end_ns, now_ns, span_id)
    if (v[S_KIND] is None and v[S_STATUS] is None and v[S_CHANNEL] is None
            and v[S_GOAL] is None):
        kind = status = channel = goal = None
    else:
        kind, status, channel, goal = _session_values(v, span_id, limit, result)
    if v[S_AGENT:] == options.no_label_values:
        agent, agent_version, user, host, dimensions = resource_labels
    elif v[S_AGENT:N_SLOTS] == _NO_LABEL_VALUES:
        # Tags of its own but none of the labels (a span tagged per team, say): the
        # resource's labels with the span's dimensions.
        agent, agent_version, user, host, dimensions = resource_labels
        dimensions = _dimensions(v, dimensions, span_id, limit, options)
    else:
        agent, agent_version, user, host, dimensions = _labels(
            v, resource_labels, f"span {_ref(span_id)}", limit, options)
    prompt, completion, reasoning, cache_read, cache_write, cost, priced = tokens
    return _new_usage(SpanUsage, (
        _pack_time(key_time) + trace_id + span_id, session_id, start_ns, end_ns, turns, prompt,
        completion, reasoning, cache_read, cache_write, cost, priced, model or None, kind,
        status, channel, goal, agent, agent_version, user, host, role,
        None,  # credential: the pipeline's
        dimensions,
    ))


def _session_of(v: list[Any], span_id: bytes, options: MappingOptions) -> str | None:
    """The session a span names (the conventions in order), None when it names none."""
    session_value = v[S_CONVERSATION_ID]
    if session_value is None:
        session_value = v[S_SESSION_ID]
        if session_value is None:
            session_value = v[_first(v, OTHER_SESSION_SLOTS)]
            if session_value is None:
                return None
    session_id = session_value if session_value.__class__ is str else _text(session_value)
    if not session_id:
        return None
    if len(session_id) > options.max_session_id_length or not session_id.isprintable():
        _check_session_id(session_id, span_id, options.max_session_id_length)
    return session_id


# What a span is: (turns as mapped, whether its tokens count, role, agent span or not).
SpanIs = tuple[int, bool, int, bool]
_AGENT_SPAN: SpanIs = (1, False, ROLE_TURN, True)
_AGENT_SPAN_WITH_TOKENS: SpanIs = (1, True, ROLE_TURN, True)
_ROOT_CALL: SpanIs = (1, True, ROLE_OWN, False)
_CHILD_CALL: SpanIs = (0, True, ROLE_CALL, False)
# Usage of no known kind: a turn of its own at the root, else a turn candidate like an agent.
_ROOT_USAGE: SpanIs = (1, True, ROLE_OWN, False)
_CHILD_USAGE: SpanIs = (1, True, ROLE_TURN, False)
_SESSION_UPDATE: SpanIs = (0, False, ROLE_OWN, False)


# A GenAI model-call operation decides alone: (without a parent, with one).
_MODEL_CALLS = {operation: (_ROOT_CALL, _CHILD_CALL) for operation in MODEL_CALL_OPERATIONS}


def _what_span(v: list[Any], has_parent: bool, options: MappingOptions) -> SpanIs | None:
    """An agent span, a model call, other usage or a session update (module docstring)."""
    operation = v[S_OPERATION]
    if operation.__class__ is not str:
        operation = ""
    # The GenAI operation name, when present, decides; otherwise the OpenInference span kind.
    if operation:
        oi_kind = ""
    else:
        oi_kind = v[S_OI_SPAN_KIND]
        oi_kind = oi_kind.upper() if oi_kind.__class__ is str else ""
    if operation == "invoke_agent" or oi_kind == "AGENT":
        return _AGENT_SPAN_WITH_TOKENS if options.agent_span_tokens else _AGENT_SPAN
    if operation in MODEL_CALL_OPERATIONS or oi_kind == "LLM":
        return _CHILD_CALL if has_parent else _ROOT_CALL
    if any(v[s] is not None for s in TOKEN_SLOTS):
        return _CHILD_USAGE if has_parent else _ROOT_USAGE
    if any(v[s] is not None for s in SESSION_ATTRIBUTE_SLOTS):
        return _SESSION_UPDATE
    return None


# (prompt, completion, reasoning, cache read, cache write, cost in cents, priced)
Tokens = tuple[int, int, int, int, int, float, bool]
NO_TOKENS: Tokens = (0, 0, 0, 0, 0, 0.0, True)


def _tokens(v: list[Any], span_id: bytes, model: str, model_slot: int,
            options: MappingOptions) -> Tokens:
    """A span's token counts (made whole: input with its cache, output with its reasoning)
    and its cost: the emitter's, else priced from the model."""
    # A plain count is an int in (0, MAX_TOKEN_COUNT]; anything else goes to _count.
    prompt = completion = reasoning = cache_read = cache_write = 0
    s = (S_IN if v[S_IN] is not None else
         S_IN_DEPRECATED if v[S_IN_DEPRECATED] is not None else S_OI_IN)
    x = v[s]
    if x is not None:
        prompt = (x if x.__class__ is int and 0 < x <= MAX_TOKEN_COUNT
                  else _count(x, s, span_id))
    s = (S_OUT if v[S_OUT] is not None else
         S_OUT_DEPRECATED if v[S_OUT_DEPRECATED] is not None else S_OI_OUT)
    x = v[s]
    if x is not None:
        completion = (x if x.__class__ is int and 0 < x <= MAX_TOKEN_COUNT
                      else _count(x, s, span_id))
    s = S_REASONING if v[S_REASONING] is not None else S_OI_REASONING
    x = v[s]
    if x is not None:
        reasoning = (x if x.__class__ is int and 0 < x <= MAX_TOKEN_COUNT
                     else _count(x, s, span_id))
    s = S_CACHE_READ if v[S_CACHE_READ] is not None else S_OI_CACHE_READ
    x = v[s]
    if x is not None:
        cache_read = (x if x.__class__ is int and 0 < x <= MAX_TOKEN_COUNT
                      else _count(x, s, span_id))
    s = S_CACHE_WRITE if v[S_CACHE_WRITE] is not None else S_OI_CACHE_WRITE
    x = v[s]
    if x is not None:
        cache_write = (x if x.__class__ is int and 0 < x <= MAX_TOKEN_COUNT
                       else _count(x, s, span_id))
    # GenAI convention: input includes cache reads and writes. Some emitters report cache
    # tokens beside input instead; when cache exceeds input that must be the case, and a
    # total that adds the cache to input and output says so too (Strands on Bedrock or
    # Anthropic passes their input, which excludes the cache, on as gen_ai.usage.input_tokens).
    cached = cache_read + cache_write
    if cached > prompt or (cached and _total_adds_cache(v, prompt, completion, reasoning,
                                                         cached)):
        uncached = prompt
        prompt += cached
    else:
        uncached = prompt - cached
    # Reasoning is part of output; an emitter reporting more reasoning than output counted
    # it beside output, so it is added once to make output whole.
    if reasoning > completion:
        completion += reasoning
    cost = 0.0
    priced = True
    s = _first(v, COST_SLOTS)
    if v[s] is not None:
        cost = _cost(v[s], s, span_id) * 100.0
    elif prompt or completion:
        request_model = _text(v[S_REQUEST_MODEL])
        response_model = model if model_slot != S_REQUEST_MODEL else ""
        priced_cost = options.pricer.cost_cents(
            response_model, request_model, uncached, cache_read, cache_write, completion)
        if priced_cost is None:
            priced = False
        else:
            cost = priced_cost
    return prompt, completion, reasoning, cache_read, cache_write, cost, priced


def _total_adds_cache(v: list[Any], prompt: int, completion: int, reasoning: int,
                      cached: int) -> bool:
    """The span's total token count equals input + output + cache (reasoning inside output
    or beside it), and not input + output: its cache was reported beside its input. A total
    that is absent, not a plain count, or fits neither says nothing."""
    total = v[S_TOTAL] if v[S_TOTAL] is not None else v[S_OI_TOTAL]
    if total.__class__ is not int or not 0 < total <= MAX_TOKEN_COUNT:
        return False
    inside = total in (prompt + completion, prompt + completion + reasoning)
    beside = total in (prompt + completion + cached, prompt + completion + reasoning + cached)
    return beside and not inside


def _times(start_ns: int, end_ns: int, now_ns: int, span_id: bytes) -> tuple[int, int]:
    """(start, end) as stored: a missing one takes the other (or now), in order."""
    if start_ns > MAX_TIME_NS or end_ns > MAX_TIME_NS:
        raise InvalidSpan(f"span {_ref(span_id)}: timestamp after the year 2262")
    if not start_ns:
        start_ns = end_ns or now_ns
    if not end_ns:
        end_ns = start_ns
    if end_ns < start_ns:
        start_ns, end_ns = end_ns, start_ns
    return start_ns, end_ns


def _session_values(v: list[Any], span_id: bytes, limit: int, result: MappingResult
                    ) -> tuple[str | None, str | None, str | None, str | None]:
    """The session attributes a span sets: kind, status, channel, goal (rare spans)."""
    x = v[S_KIND]
    kind = _choice(x, KINDS, DEFAULT_KIND, S_KIND, result) if x is not None else None
    x = v[S_STATUS]
    status = _choice(x, STATUSES, DEFAULT_STATUS, S_STATUS, result) if x is not None else None
    x = v[S_CHANNEL]
    channel = (_choice(x, CHANNELS, DEFAULT_CHANNEL, S_CHANNEL, result)
               if x is not None else None)
    x = v[S_GOAL]
    goal = _bounded(_text(x), S_GOAL, span_id, limit) or None if x is not None else None
    return kind, status, channel, goal


def _without_session(span: SpanScan, parent_id: bytes,
                     fallbacks: list[tuple[tuple[int, ...], list[Any]]],
                     resource_labels: Labels, options: MappingOptions, now_ns: int,
                     result: MappingResult) -> None:
    """A span map_span found no usage in: held usage when it would be usage with a session
    (it names none), else a trace link when it can help resolve another span, else ignored.
    Raises InvalidSpan as map_span does."""
    v, trace_id, span_id = span[0], span[1], span[2]
    parent_id = stored_parent(parent_id)
    ids_valid = len(trace_id) == TRACE_ID_BYTES and len(span_id) == SPAN_ID_BYTES
    named = v[_first(v, SESSION_SLOTS)]  # map_span applied the resource's values already
    session = _text(named) if named is not None else ""
    if session:
        # Names a session but is no usage (a workflow's root span, a tool span): it can
        # still name the session of its trace's spans that do not.
        if ids_valid and len(session) <= options.max_session_id_length \
                and session.isprintable():
            result.links.append(TraceLink(trace_id, span_id, parent_id, session,
                                          not parent_id))
            if not parent_id:
                _root(span, result)
        result.ignored += 1
        return
    v[S_SESSION_ID] = "-"  # any session: the mapping below is the same for every one
    links = len(result.links)
    try:
        usage = map_span(span, fallbacks, resource_labels, options, now_ns, result)
    finally:
        v[S_SESSION_ID] = named
        del result.links[links:]  # an agent span's anchor would name the stand-in
    if usage is None:
        # A link from a held span up to its ancestors; a root's says the chain is complete.
        if ids_valid:
            result.links.append(TraceLink(trace_id, span_id, parent_id, None))
            if not parent_id:
                _root(span, result)
        result.ignored += 1
        return
    result.hold(usage, trace_id, span_id, parent_id)


def _root(span: SpanScan, result: MappingResult) -> None:
    """A root span that is no usage: the turn of its trace's sessions, if it carries usage
    (collector.accounting.turns). A span with broken timestamps is none."""
    _, trace_id, span_id, _, start_ns, end_ns = span[:6]
    if start_ns > MAX_TIME_NS or end_ns > MAX_TIME_NS or not (start_ns or end_ns):
        return
    key_time = end_ns
    start_ns, end_ns = _times(start_ns, end_ns, 0, span_id)
    result.roots.append(TraceRoot(_pack_time(key_time) + trace_id + span_id, start_ns, end_ns))


def _first(values: list[Any], group: tuple[int, ...]) -> int:
    """The slot of a group's first present value; the group's last slot when none is."""
    for slot in group:
        if values[slot] is not None:
            return slot
    return group[-1]


def _ref(span_id: bytes) -> str:
    """How error messages name a span; computed only when there is an error."""
    return span_id.hex() or "(no span id)"


def _bounded(text: str, slot: int, span_id: bytes, limit: int) -> str:
    """A stored text value within the byte limit, else the span is rejected."""
    return values.bounded(text, SLOT_NAMES[slot], f"span {_ref(span_id)}", limit)


_text = values.text


def _labels(v: list[Any], fallback: Labels, who: str, limit: int,
            options: MappingOptions) -> Labels:
    """Who spends, from values `v` (a span's or a resource's), each field (and dimension)
    falling back to `fallback` when `v` does not give it. `who` names the span or resource
    in errors."""
    agent, agent_version, user, host, dimensions = fallback
    if v[S_AGENT] is not None:
        agent = _label(v[S_AGENT], S_AGENT, who, limit) or agent
    if v[S_AGENT_VERSION] is not None:
        agent_version = _label(v[S_AGENT_VERSION], S_AGENT_VERSION, who, limit) or agent_version
    if v[S_HOST] is not None:
        host = _label(v[S_HOST], S_HOST, who, limit) or host
    slot = _first(v, USER_SLOTS)
    if v[slot] is not None:
        user = _label(v[slot], slot, who, limit) or user
    if options.dimension_slots:
        dimensions = _dimensions(v, dimensions, who, limit, options)
    return agent, agent_version, user, host, dimensions


def _dimensions(v: list[Any], fallback: Dimensions, who: str | bytes, limit: int,
                options: MappingOptions) -> Dimensions:
    """Each dimension's first present attribute of `v`, else its value in `fallback`. `who`
    names the resource, or is the span's id (named only if a value is refused)."""
    names = options.slot_names
    found: list[tuple[str, str]] = []
    for dimension, slots in options.dimension_slots:
        for slot in slots:
            raw = v[slot]
            if raw is not None:
                # Inline for the usual short ASCII text (its length is its size in bytes);
                # anything else goes through bounded_text, which also raises on a long one.
                if raw.__class__ is str and len(raw) <= limit and raw.isascii():
                    value = raw or None
                else:
                    value = values.bounded_text(
                        raw, names[slot], who if isinstance(who, str) else f"span {_ref(who)}",
                        limit)
                if value:
                    found.append((dimension, value))
                    break
    # Runs once per tagged span: the usual cases (tags on the span alone, or on the resource
    # alone) return without building a mapping. `fallback` is this function's own result for
    # the resource, so it is already in dimension order.
    if not fallback:
        return options.tag_set(tuple(found)) if found else ()
    if not found:
        return fallback
    given = dict(fallback)
    given.update(found)
    return options.tag_set(
        tuple((d, given[d]) for d, _ in options.dimension_slots if d in given))


def _label(value: Any, slot: int, who: str, limit: int) -> str | None:
    """A who-spends value: text or an integer id; None when empty or of another type. Longer
    than the byte limit rejects the span (all of the resource's, for a resource's value), as a
    long model does."""
    return values.bounded_text(value, SLOT_NAMES[slot], who, limit)


def _check_session_id(session_id: str, span_id: bytes, max_length: int) -> None:
    values.session_id(session_id, f"span {_ref(span_id)}", max_length)


def _count(value: Any, slot: int, span_id: bytes) -> int:
    """A token count; `slot` names the attribute in errors (off the hot path: plain ints are
    read inline by map_span)."""
    return values.count(value, SLOT_NAMES[slot], f"span {_ref(span_id)}")


def _cost(value: Any, slot: int, span_id: bytes) -> float:
    return values.cost_usd(value, SLOT_NAMES[slot], f"span {_ref(span_id)}")


def _choice(value: Any, allowed: tuple[str, ...], default: str, slot: int,
            result: MappingResult) -> str:
    """An enumerated session attribute; outside its set it becomes the column default."""
    text = _text(value).strip().lower()
    if text in allowed:
        return text
    result.invalid_values.append((SLOT_NAMES[slot], _text(value)[:MAX_VALUE_IN_MESSAGE]))
    return default
