"""Per-session aggregation of usage records. Pure: no I/O, no event loop.

A `Batch` is what one flush commits. It folds records into one `SessionDelta` per session as they
arrive, so a flush costs one upsert per session touched, not one per span. It keeps the records
too, because the store may find some of them already accounted (an exporter retry after a
restart) and then asks for the same batch without those: the re-fold is exact, never a
subtraction.

Beside the session deltas it folds one `HourDelta` per (session, model, hour of the span's end),
which the store adds to the hourly rollup in the same transaction: reports then read a table
that grows with sessions and hours, not with spans.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass, field

from collector.mapping import SpanUsage

NO_TIME = -1
HOUR_NS = 3600 * 1_000_000_000
NO_MODEL = ""  # the rollup's model for usage without one (a key column cannot be NULL)


@dataclass(slots=True)
class SessionDelta:
    """What a batch adds to one session; `*_ns` is the end time of the span that set a value."""

    session_id: str
    created_ns: int
    last_ns: int
    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_cents: float = 0.0
    spans: int = 0
    model: str | None = None
    model_ns: int = NO_TIME
    kind: str | None = None
    kind_ns: int = NO_TIME
    status: str | None = None
    status_ns: int = NO_TIME
    channel: str | None = None
    channel_ns: int = NO_TIME
    goal: str | None = None
    goal_ns: int = NO_TIME


@dataclass(slots=True)
class HourDelta:
    """What a batch adds to one (session, model, hour) of the hourly rollup."""

    turns: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_cents: float = 0.0

    def is_empty(self) -> bool:
        """Session updates (a status, a goal) carry no usage; they need no rollup row."""
        return not (self.turns or self.prompt_tokens or self.completion_tokens
                    or self.reasoning_tokens or self.cost_cents)


# (session id, model or NO_MODEL, hour number since the epoch: end_ns // HOUR_NS)
HourKey = tuple[str, str, int]


@dataclass(slots=True)
class Batch:
    """Records accepted since the last flush, folded per session, each span at most once."""

    records: list[SpanUsage] = field(default_factory=list)
    keys: set[bytes] = field(default_factory=set)
    sessions: dict[str, SessionDelta] = field(default_factory=dict)
    hours: dict[HourKey, HourDelta] = field(default_factory=dict)
    duplicates: int = 0  # spans seen twice within this batch (a retry racing its original)

    def __len__(self) -> int:
        return len(self.records)

    def add(self, records: Iterable[SpanUsage]) -> None:
        keys = self.keys
        sessions = self.sessions
        hours = self.hours
        for record in records:
            key = record.key
            if key in keys:
                self.duplicates += 1
                continue
            keys.add(key)
            self.records.append(record)
            delta = sessions.get(record.session_id)
            if delta is None:
                delta = sessions[record.session_id] = SessionDelta(
                    record.session_id, record.start_ns, record.end_ns)
            fold(delta, record)
            # Inline, not a function call: this runs once per span on the export path.
            hour_key = (record.session_id, record.model or NO_MODEL, record.end_ns // HOUR_NS)
            hour = hours.get(hour_key)
            if hour is None:
                hour = hours[hour_key] = HourDelta()
            hour.turns += record.turns
            hour.prompt_tokens += record.prompt_tokens
            hour.completion_tokens += record.completion_tokens
            hour.reasoning_tokens += record.reasoning_tokens
            hour.cache_read_tokens += record.cache_read_tokens
            hour.cache_write_tokens += record.cache_write_tokens
            hour.cost_cents += record.cost_cents

    def without(self, accounted: Set[bytes]) -> Batch:
        """The same batch minus spans already accounted in storage."""
        rest = Batch()
        rest.add(r for r in self.records if r.key not in accounted)
        rest.duplicates = self.duplicates + len(self.records) - len(rest.records)
        return rest

    def absorb(self, later: Batch) -> None:
        """Fold a later batch into this one (used when this one failed to commit)."""
        self.duplicates += later.duplicates
        self.add(later.records)


def fold(delta: SessionDelta, r: SpanUsage) -> None:
    """Add one record to a session delta. Latest values are by span end time, ties to the later."""
    if r.start_ns < delta.created_ns:
        delta.created_ns = r.start_ns
    end = r.end_ns
    if end > delta.last_ns:
        delta.last_ns = end
    delta.spans += 1
    delta.turns += r.turns
    delta.prompt_tokens += r.prompt_tokens
    delta.completion_tokens += r.completion_tokens
    delta.reasoning_tokens += r.reasoning_tokens
    delta.cache_read_tokens += r.cache_read_tokens
    delta.cache_write_tokens += r.cache_write_tokens
    delta.cost_cents += r.cost_cents
    if r.model is not None and end >= delta.model_ns:
        delta.model, delta.model_ns = r.model, end
    if r.kind is not None and end >= delta.kind_ns:
        delta.kind, delta.kind_ns = r.kind, end
    if r.status is not None and end >= delta.status_ns:
        delta.status, delta.status_ns = r.status, end
    if r.channel is not None and end >= delta.channel_ns:
        delta.channel, delta.channel_ns = r.channel, end
    if r.goal is not None and end >= delta.goal_ns:
        delta.goal, delta.goal_ns = r.goal, end
