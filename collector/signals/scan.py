"""Reading a request's attributes by slot: the first step of the mapping. Pure.

`Scanner.scan` turns an ExportTraceServiceRequest into plain values, one tuple per span:

    resource = (slots, attribute_count, deep_key)
    span = (slots, trace_id, span_id, has_parent, start_ns, end_ns, attribute_count, deep_key)

`slots` holds, for each attribute slot the mapping knows, the attribute's value as a Python
value (str, int, float, bool, bytes), EMPTY for an attribute without a value, NESTED for an
array or key-value list, or None when absent. A known name repeated keeps its last value; an
alias fills its slot only while no value is there. `deep_key` names the first attribute the
mapping does not read that nests deeper than the limit (None if none).

Two implementations produce the same tuples. The compiled one (collector/signals/_scan.c, built at
install when a C compiler is present) reads the request's wire bytes and creates Python objects
only for values a slot takes; the Python one walks the decoded protobuf objects and is the
reference the tests compare the compiled one against.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_CompiledScanner: type[Any] | None
try:
    from collector.signals._scan import Scanner as _CompiledScanner
except ImportError:  # no C compiler at install time: the Python reader does the same, slower
    _CompiledScanner = None

COMPILED_AVAILABLE = _CompiledScanner is not None
NESTED_KINDS = frozenset({"array_value", "kvlist_value"})


class UnreadableRequest(ValueError):
    """The compiled reader could not follow bytes the protobuf library accepted (a disagreement
    between the two readers: a bug). The request is refused as invalid, not answered with a
    server error."""


class _Marker:
    """A value kind the mapping never reads as a value, only reports."""

    __slots__ = ("_shown",)

    def __init__(self, shown: str) -> None:
        self._shown = shown

    def __repr__(self) -> str:
        return self._shown


EMPTY = _Marker("empty value")
NESTED = _Marker("array or key-value list")

Slots = list[Any]
ResourceScan = tuple[Slots, int, "str | None"]
SpanScan = tuple[Slots, bytes, bytes, bool, int, int, int, "str | None"]


class Scanner:
    """Reads requests for one slot table; `compiled=False` forces the Python reader."""

    def __init__(self, known: Mapping[str, int], aliases: Mapping[str, int], n_slots: int,
                 max_depth: int, *, compiled: bool = True) -> None:
        self._known = dict(known)
        # A name that is both known and an alias is read as the known name.
        self._aliases = {name: slot for name, slot in aliases.items() if name not in known}
        self._n_slots = n_slots
        self._max_depth = max_depth
        self._compiled = None
        if compiled and _CompiledScanner is not None:
            self._compiled = _CompiledScanner(self._known, self._aliases, n_slots, max_depth,
                                              EMPTY, NESTED)

    @property
    def compiled(self) -> bool:
        """Whether the compiled reader reads for this scanner."""
        return self._compiled is not None

    def scan(self, request: Any, wire: bytes | None = None
             ) -> list[tuple[ResourceScan, list[SpanScan]]]:
        """`wire` is the request's protobuf encoding when the caller has it (saves encoding
        it again for the compiled reader); it must be what `request` was decoded from."""
        if self._compiled is not None:
            if wire is None:
                wire = request.SerializeToString()
            try:
                result: list[tuple[ResourceScan, list[SpanScan]]] = self._compiled.scan(wire)
            except ValueError as exc:
                raise UnreadableRequest(f"cannot read the request's attributes: {exc}") from None
            return result
        return [(self._attributes(rs.resource.attributes),
                 [self._span(span) for ss in rs.scope_spans for span in ss.spans])
                for rs in request.resource_spans]

    def _span(self, span: Any) -> SpanScan:
        slots, count, deep_key = self._attributes(span.attributes)
        return (slots, span.trace_id, span.span_id, bool(span.parent_span_id),
                span.start_time_unix_nano, span.end_time_unix_nano, count, deep_key)

    def _attributes(self, attributes: Any) -> ResourceScan:
        slots: Slots = [None] * self._n_slots
        deep_key: str | None = None
        known, aliases = self._known, self._aliases
        for kv in attributes:
            key = kv.key
            slot = known.get(key)
            if slot is not None:
                # Inline for the two common kinds: a non-empty string_value or a non-zero
                # int_value can only mean the oneof holds that member.
                value = kv.value
                text = value.string_value
                if text:
                    slots[slot] = text
                else:
                    number = value.int_value
                    slots[slot] = number if number else any_value(value)
            elif (slot := aliases.get(key)) is not None:
                if slots[slot] is None:
                    slots[slot] = any_value(kv.value)
            elif (deep_key is None and kv.value.WhichOneof("value") in NESTED_KINDS
                  and nesting_depth(kv.value, self._max_depth) > self._max_depth):
                deep_key = key
        return slots, len(attributes), deep_key


def service_name(attributes: Any) -> str:
    """A resource's service.name without decoding its other attributes (what recognises an
    agent's dialect, per resource, on every signal)."""
    for kv in attributes:
        if kv.key == "service.name":
            text: str = kv.value.string_value
            return text
    return ""


def any_value(value: Any) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return EMPTY
    if which in NESTED_KINDS:
        return NESTED
    return getattr(value, which)


def nesting_depth(value: Any, limit: int) -> int:
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
    return 1 + max((nesting_depth(child, limit - 1) for child in children), default=0)
