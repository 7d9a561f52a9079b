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

import itertools
from collections.abc import Iterable, Iterator, Set
from dataclasses import dataclass, field
from typing import Any

from collector.signals.traces import (
    Dimensions,
    HeldUsage,
    MappingResult,
    SpanUsage,
    TraceLink,
    TraceRoot,
)

NO_TIME = -1
HOUR_NS = 3600 * 1_000_000_000
NO_MODEL = ""  # the rollup's model for usage without one (a key column cannot be NULL)
# SessionDelta.tags_at while the session's tags are as late as its latest span.
FOLLOWS_LAST = -2
# SessionDelta.same once its spans differ in their tags: an object no span's tags are.
MIXED: Dimensions = (("", ""),)


@dataclass(slots=True)
class SessionDelta:
    """What a batch sets on one session; `*_ns` is the end time of the span that set a value.

    Its sums are not here: they are the sum of the session's hour deltas (`Batch.totals`),
    so each span is added once, to one hour delta, on the export path.
    """

    session_id: str
    created_ns: int
    last_ns: int
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
    # Who spends; same latest-value rule. Stored in a side table, not in agent_sessions.
    agent: str | None = None
    agent_ns: int = NO_TIME
    agent_version: str | None = None
    agent_version_ns: int = NO_TIME
    user: str | None = None
    user_ns: int = NO_TIME
    host: str | None = None
    host_ns: int = NO_TIME
    # The ingest token that carried the latest span (who spends, as proven by the credential).
    credential: str | None = None
    credential_ns: int = NO_TIME
    # The configured dimensions ([attribution]): name -> (latest value, its end time), read
    # through latest_dimensions(). A session's spans nearly always repeat one set of tags: the
    # latest such set is kept whole in `tags` (its end time `tags_ns`, later than that of any
    # of its names in `dimensions`), so a span repeating it only moves `tags_ns`.
    dimensions: dict[str, tuple[str, int]] | None = None
    tags: Dimensions = ()
    # The end time of the latest span that gave `tags`; FOLLOWS_LAST while every span of the
    # session in this batch gave them (then it is last_ns, which the fold keeps anyway).
    tags_at: int = FOLLOWS_LAST
    # What Batch.add compares a span's tags with, by identity, to know it changes nothing but
    # times already kept: `tags` while tags_at follows last_ns (or () while the session has
    # none), else MIXED, which no span carries.
    same: Dimensions = ()

    @property
    def tags_ns(self) -> int:
        return self.last_ns if self.tags_at == FOLLOWS_LAST else self.tags_at

    def latest_dimensions(self) -> dict[str, tuple[str, int]]:
        given = dict(self.dimensions or {})
        for name, value in self.tags:
            given[name] = (value, self.tags_ns)
        return given

    def latest_tags(self) -> Dimensions:
        """The session's latest value of each configured dimension, without their times:
        nearly always its one whole set of tags, as it came."""
        if not self.dimensions:
            return self.tags
        return tuple((name, value) for name, (value, _) in self.latest_dimensions().items())

    def has_labels(self) -> bool:
        return max(self.agent_ns, self.agent_version_ns, self.user_ns, self.host_ns,
                   self.credential_ns) >= 0


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

    def add(self, other: HourDelta) -> None:
        self.turns += other.turns
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.cache_read_tokens += other.cache_read_tokens
        self.cache_write_tokens += other.cache_write_tokens
        self.cost_cents += other.cost_cents


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
    # Cumulative metric points; the store makes them usage against their series' last value.
    cumulative: list[Any] = field(default_factory=list)
    # Usage without a session id (its key is in `keys` too: recorded as accounted with it),
    # and what spans tell about their traces' sessions (collector.accounting.traces).
    held: list[HeldUsage] = field(default_factory=list)
    links: list[TraceLink] = field(default_factory=list)
    # Root spans that are no usage, and how many records have a role: what the store decides
    # turns across traces from (collector.accounting.turns).
    roots: list[TraceRoot] = field(default_factory=list)
    roles: int = 0
    # Which token carried which records, as runs: (index in `records` where a run starts, the
    # token's name or None). Records before the first run were carried by none. Kept beside
    # the records rather than in each (one tuple per request, not one per span); a record's
    # own `credential` (held usage, cumulative points) counts when its run has none.
    credentials: list[tuple[int, str | None]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records) + len(self.cumulative) + len(self.held)

    def __bool__(self) -> bool:
        """Whether there is anything to commit (trace links alone are)."""
        return bool(self.records or self.cumulative or self.held or self.links or self.roots)

    def hold(self, held: Iterable[HeldUsage], links: Iterable[TraceLink] = (),
             roots: Iterable[TraceRoot] = ()) -> None:
        """Take usage waiting for its session (each span at most once), trace links and
        root spans."""
        self.roots.extend(roots)
        keys = self.keys
        for item in held:
            key = item.usage.key
            if key in keys:
                self.duplicates += 1
                continue
            keys.add(key)
            self.held.append(item)
        self.links.extend(links)

    def add(self, records: Iterable[SpanUsage], credential: str | None = None) -> None:
        """Fold records in, carried by the token named `credential` (None: by none, or as
        each record says). One loop, everything inline: it runs once per span on the export
        path. Latest values go by span end time; ties go to the later arrival."""
        runs = self.credentials
        if (runs[-1][1] if runs else None) != credential:
            runs.append((len(self.records), credential))
        keys = self.keys
        sessions = self.sessions
        hours = self.hours
        append = self.records.append
        for record in records:
            (key, session_id, start, end, turns, prompt, completion, reasoning, cache_read,
             cache_write, cost, _, model, kind, status, channel, goal, agent, agent_version,
             user, host, role, carried_by, dimensions) = record
            if key in keys:
                self.duplicates += 1
                continue
            keys.add(key)
            append(record)
            if role:
                self.roles += 1
            delta = sessions.get(session_id)
            if delta is None:
                delta = sessions[session_id] = SessionDelta(session_id, start, end)
                if dimensions:
                    delta.tags = delta.same = dimensions
            else:
                # Before last_ns moves: while the session's spans all repeat one set of tags,
                # their end time is last_ns and this is the whole of their fold.
                if dimensions is not delta.same:
                    _fold_tags(delta, end, dimensions)
                if start < delta.created_ns:
                    delta.created_ns = start
                if end > delta.last_ns:
                    delta.last_ns = end
            if model is not None and end >= delta.model_ns:
                delta.model, delta.model_ns = model, end
            if kind is not None or status is not None or channel is not None or goal is not None:
                _latest_session_values(delta, end, kind, status, channel, goal)
            # Inline: nearly every span carries its resource's agent and host.
            if agent is not None and end >= delta.agent_ns:
                delta.agent, delta.agent_ns = agent, end
            if host is not None and end >= delta.host_ns:
                delta.host, delta.host_ns = host, end
            if user is not None and end >= delta.user_ns:
                delta.user, delta.user_ns = user, end
            if agent_version is not None and end >= delta.agent_version_ns:
                delta.agent_version, delta.agent_version_ns = agent_version, end
            if credential is not None:
                carried_by = credential
            if carried_by is not None and end >= delta.credential_ns:
                delta.credential, delta.credential_ns = carried_by, end
            hour_key = (session_id, model or NO_MODEL, end // HOUR_NS)
            hour = hours.get(hour_key)
            if hour is None:
                hour = hours[hour_key] = HourDelta()
            hour.turns += turns
            hour.prompt_tokens += prompt
            hour.completion_tokens += completion
            hour.reasoning_tokens += reasoning
            hour.cache_read_tokens += cache_read
            hour.cache_write_tokens += cache_write
            hour.cost_cents += cost

    def totals(self) -> dict[str, HourDelta]:
        """Each session's sums over the batch: the sum of its hour deltas (once per flush)."""
        totals: dict[str, HourDelta] = {}
        for (session_id, _, _), hour in self.hours.items():
            total = totals.get(session_id)
            if total is None:
                total = totals[session_id] = HourDelta()
            total.add(hour)
        return totals

    def runs(self) -> Iterator[tuple[str | None, Iterable[SpanUsage]]]:
        """The records with the token that carried them, run by run (for a re-fold)."""
        starts = self.credentials
        records = self.records
        if not starts or starts[0][0] > 0:
            yield None, itertools.islice(records, 0, starts[0][0] if starts else None)
        for i, (start, credential) in enumerate(starts):
            end = starts[i + 1][0] if i + 1 < len(starts) else None
            yield credential, itertools.islice(records, start, end)

    def refold(self, other: Batch) -> None:
        """Fold another batch's records in, each with the token that carried it."""
        for credential, records in other.runs():
            self.add(records, credential)

    def without(self, accounted: Set[bytes]) -> Batch:
        """The same batch minus spans already accounted in storage."""
        rest = Batch(cumulative=self.cumulative, links=self.links, roots=self.roots)
        for credential, records in self.runs():
            rest.add((r for r in records if r.key not in accounted), credential)
        rest.hold(h for h in self.held if h.usage.key not in accounted)
        rest.duplicates = (self.duplicates + len(self.records) - len(rest.records)
                           + len(self.held) - len(rest.held))
        return rest

    def absorb(self, later: Batch) -> None:
        """Fold a later batch into this one (used when this one failed to commit)."""
        self.duplicates += later.duplicates
        self.refold(later)
        self.cumulative.extend(later.cumulative)
        self.hold(later.held, later.links, later.roots)


def _latest_session_values(delta: SessionDelta, end: int, kind: str | None, status: str | None,
                           channel: str | None, goal: str | None) -> None:
    """The session attributes a span sets, where it is the latest to set them (rare spans)."""
    if kind is not None and end >= delta.kind_ns:
        delta.kind, delta.kind_ns = kind, end
    if status is not None and end >= delta.status_ns:
        delta.status, delta.status_ns = status, end
    if channel is not None and end >= delta.channel_ns:
        delta.channel, delta.channel_ns = channel, end
    if goal is not None and end >= delta.goal_ns:
        delta.goal, delta.goal_ns = goal, end


def _fold_tags(delta: SessionDelta, end: int, dimensions: Dimensions) -> None:
    """A span whose tags are not (by identity) the ones every earlier span of its session in
    the batch gave; called before the span moves last_ns."""
    tags = delta.tags
    if delta.same is not MIXED:
        if dimensions and dimensions == tags:
            return  # the same set in another object: still every span's
        # From here on the session's tags are not simply as late as its latest span.
        delta.same = MIXED
        if tags:
            delta.tags_at = delta.last_ns
    if not dimensions:
        return
    if dimensions is tags or dimensions == tags:
        # The session's latest tags again: only how late they were given can move (an older
        # span repeating them changes nothing).
        if end > delta.tags_at:
            delta.tags_at = end
    elif not tags and not delta.dimensions:  # the session's first tags
        delta.tags, delta.tags_at = dimensions, end
    else:
        _latest_dimensions(delta, end, dimensions)


def _latest_dimensions(delta: SessionDelta, end: int, dimensions: Dimensions) -> None:
    """Fold a span's tags in per name (latest end time wins); they become the session's
    whole `tags` when they are the latest for every name they give."""
    given = delta.latest_dimensions()
    latest = True
    for name, value in dimensions:
        known = given.get(name)
        if known is None or end >= known[1]:
            given[name] = (value, end)
        else:
            latest = False
    delta.dimensions = given
    delta.tags, delta.tags_at = (dimensions, end) if latest else ((), NO_TIME)
    if latest:
        for name, _ in dimensions:
            del given[name]


def credit(result: MappingResult, credential: str) -> None:
    """Mark what of a request waits in storage (held usage, cumulative points) as carried by
    the token named `credential`, so it reaches the session when resolved later. Its records
    get it from Batch.add.

    Set from the authenticated request, never from attributes: a span cannot claim a
    credential it was not sent with."""
    if result.held:
        result.held = [h._replace(usage=h.usage._replace(credential=credential))
                       for h in result.held]
    if result.cumulative:
        result.cumulative = [p._replace(credential=credential) for p in result.cumulative]
