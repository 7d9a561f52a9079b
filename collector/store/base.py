"""What the pipeline and the readers see of storage, whichever database is behind it.

The pipeline calls `commit(batch, now_ns=..., sweep_before_ns=...)` on a `Store` and nothing
else about storage; `collector sessions`, `collector report` and the ops gauges read through a
`Reader`. A backend (collector.store.sqlite, collector.store.postgres) implements both, and
collector.store.open_store / open_reader pick one from the config, so adding a backend changes
nothing above this module.

Each backend owns its schema, connection and transaction, and keeps the same promises:

* a commit is whole or nothing; when it raises StorageError nothing of it was applied, so the
  caller keeps the batch and retries it;
* the span ids a batch carries are recorded in the same transaction as the sums they produce,
  so a span is accounted once across retries, restarts and every collector on one database;
* a late or out-of-order span never overwrites a newer latest value (collector_session_marks).

What one flush writes is listed once, in BATCH_WRITES: each table's rows are derived from the
committed batch here, and each backend has one statement per entry (a contract test checks
that no backend misses one). A new table is one more entry and one statement per backend.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from collector.accounting.aggregate import HOUR_NS, Batch, HourDelta, HourKey, SessionDelta
from collector.signals.metrics import CumulativePoint, scaled

# agent_sessions' columns, fixed by its readers, with each backend's column types.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT"),
    ("kind", "TEXT"),
    ("status", "TEXT"),
    ("channel", "TEXT"),
    ("model", "TEXT"),
    ("created_at", "TEXT"),
    ("last_active_at", "TEXT"),
    ("turns", "INTEGER"),
    ("prompt_tokens", "INTEGER"),
    ("completion_tokens", "INTEGER"),
    ("reasoning_tokens", "INTEGER"),
    ("cost_cents", "REAL"),
    ("goal_text", "TEXT"),
)
COLUMN_NAMES = tuple(name for name, _ in COLUMNS)
HOURLY_TABLE = "collector_usage_hourly"
LABELS_TABLE = "collector_session_labels"
# What a report groups the rollup by (the model is always a second group): a rollup column, or
# a label of the row's session (its latest value; '' for sessions without one).
USAGE_GROUPS = {"hour": "hour", "session": "session_id", "agent": "coalesce(l.agent, '')",
                "user": "coalesce(l.user_name, '')", "host": "coalesce(l.host, '')"}
# collector_meta names, the same in every backend.
SEEN_CURRENT_COUNT = "seen_current_count"
SEEN_PREVIOUS_COUNT = "seen_previous_count"
GENERATION_STARTED = "seen_generation_started_ns"


class StorageError(Exception):
    """The batch was not committed; nothing of it was applied. Retrying is safe."""


class SchemaError(Exception):
    """The database holds an agent_sessions table this collector cannot write safely."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    spans: int  # spans newly accounted
    duplicates: int  # spans already accounted (in this batch or before)
    sessions: int  # session rows upserted
    swept: int  # sessions marked 'unknown' by the stale sweep


class Store(Protocol):
    """The writer the pipeline holds. One commit at a time (the pipeline flushes serially).

    Lifecycle: `open` creates or checks the schema (raises StorageError or SchemaError when it
    cannot); `close` is safe after a failed or missing `open`.
    """

    @property
    def description(self) -> str:
        """Where the data goes, for logs; never carries a password."""
        ...

    @property
    def dedupe_window(self) -> int:
        """Span ids remembered for exactly-once accounting, as of this process's last commit."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def commit(self, batch: Batch, *, now_ns: int,
                     sweep_before_ns: int | None = None) -> tuple[CommitResult, Batch]:
        """Commit `batch` (and mark active sessions last active before `sweep_before_ns`
        unknown); returns what was applied and the batch minus spans accounted before.
        Raises StorageError when nothing of the batch was committed."""
        ...


class Reader(Protocol):
    """Read-only access for the CLI, reports and gauges. Methods block: call them off the
    event loop. Backend errors surface as StorageError."""

    @property
    def description(self) -> str: ...

    def missing(self) -> str | None:
        """Why there is nothing to read (no database yet), or None."""
        ...

    def read_sessions(self, *, status: str | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        """agent_sessions rows as dicts of the 13 columns, newest activity first, then id."""
        ...

    def read_usage(self, *, group: str, lo: str | None = None,
                   hi: str | None = None) -> list[tuple[Any, ...]]:
        """Rollup sums per (group, model) for hours in [lo, hi), ordered by (group, model):
        (group, model, max(hour), turns, prompt, completion, reasoning, cache read,
        cache write, cost_cents). `group` is a key of USAGE_GROUPS."""
        ...

    def count_sessions_by_status(self) -> dict[str, int]: ...

    def close(self) -> None: ...


# Seconds whose formatted prefix is kept: a flush's span times cluster within a few seconds
# (hour starts repeat too), so formatting is mostly a lookup plus the milliseconds.
SECOND_PREFIXES_CACHED = 4096


@functools.lru_cache(maxsize=SECOND_PREFIXES_CACHED)
def _second_prefix(seconds: int) -> str:
    tm = time.gmtime(seconds)
    return (f"{tm.tm_year:04d}-{tm.tm_mon:02d}-{tm.tm_mday:02d}T{tm.tm_hour:02d}:"
            f"{tm.tm_min:02d}:{tm.tm_sec:02d}.")


def iso_utc(ns: int) -> str:
    """YYYY-MM-DDTHH:MM:SS.mmmZ; fixed width, so text order is time order."""
    seconds, rest = divmod(max(ns, 0), 1_000_000_000)
    # clamp to year 9999
    return f"{_second_prefix(min(seconds, 253402300799))}{rest // 1_000_000:03d}Z"


def session_params(d: SessionDelta, t: HourDelta) -> tuple[Any, ...]:
    """`t`: the session's sums over the batch (Batch.totals)."""
    return (d.session_id, d.kind, d.kind_ns, d.status, d.status_ns, d.channel, d.channel_ns,
            d.model, d.model_ns, iso_utc(d.created_ns), iso_utc(d.last_ns), t.turns,
            t.prompt_tokens, t.completion_tokens, t.reasoning_tokens, t.cost_cents, d.goal,
            d.goal_ns)


SESSION_PARAM_NAMES = ("id", "kind", "kind_ns", "status", "status_ns", "channel", "channel_ns",
                       "model", "model_ns", "created_at", "last_active_at", "turns",
                       "prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_cents",
                       "goal_text", "goal_text_ns")


def mark_params(d: SessionDelta) -> tuple[Any, ...]:
    return (d.session_id, d.model_ns, d.kind_ns, d.status_ns, d.channel_ns, d.goal_ns)


def label_params(d: SessionDelta) -> tuple[Any, ...]:
    return (d.session_id, d.agent, d.agent_ns, d.agent_version, d.agent_version_ns, d.user,
            d.user_ns, d.host, d.host_ns)


def hour_params(key: HourKey, h: HourDelta) -> tuple[Any, ...]:
    session_id, model, hour = key
    return (iso_utc(hour * HOUR_NS), session_id, model, h.turns, h.prompt_tokens,
            h.completion_tokens, h.reasoning_tokens, h.cache_read_tokens, h.cache_write_tokens,
            h.cost_cents)


def session_rows(batch: Batch) -> Iterable[tuple[Any, ...]]:
    if not batch.sessions:
        return ()
    totals = batch.totals()
    return (session_params(d, totals[d.session_id]) for d in batch.sessions.values())


def mark_rows(batch: Batch) -> Iterable[tuple[Any, ...]]:
    """Only sessions that set a latest value need a mark."""
    return (mark_params(d) for d in batch.sessions.values()
            if max(d.model_ns, d.kind_ns, d.status_ns, d.channel_ns, d.goal_ns) >= 0)


def label_rows(batch: Batch) -> Iterable[tuple[Any, ...]]:
    return (label_params(d) for d in batch.sessions.values() if d.has_labels())


def hour_rows(batch: Batch) -> Iterable[tuple[Any, ...]]:
    """Session updates carry no usage and need no rollup row."""
    return (hour_params(k, h) for k, h in batch.hours.items() if not h.is_empty())


@dataclass(frozen=True, slots=True)
class BatchWrite:
    """One table a flush writes: its name and its rows, derived from the applied batch."""

    table: str
    rows: Callable[[Batch], Iterable[tuple[Any, ...]]]


# In this order in every backend: agent_sessions first, because its rows are locked there and
# the marks, labels and rollup of a session are written only by whoever holds its row; the
# rollup last, since it reads the session's model as just stored.
BATCH_WRITES: tuple[BatchWrite, ...] = (
    BatchWrite("agent_sessions", session_rows),
    BatchWrite("collector_session_marks", mark_rows),
    BatchWrite(LABELS_TABLE, label_rows),
    BatchWrite(HOURLY_TABLE, hour_rows),
)


# A series' stored state: (start_ns, time_ns, value) of the last point counted.
SeriesState = tuple[int, int, float]


def resolve_cumulative(applied: Batch, points: list[CumulativePoint],
                       stored: dict[bytes, SeriesState]) -> tuple[Batch, dict[bytes, SeriesState]]:
    """The batch plus the usage of its cumulative metric points, and the series states to
    store. Pure: each backend reads `stored` (and locks those series) in the flush
    transaction, and writes the states back in it.

    Per series, in time order: a point at or before the stored time adds nothing (a retry or
    a late export); a later point with the same start adds its increase; a new start time (or
    a value that went down) is a reset and adds its whole value; a first point adds its whole
    value (the series was never counted). A series stored with start -1 counts as absent."""
    stored = dict(stored)
    updated: dict[bytes, SeriesState] = {}
    resolved = []
    for point in sorted(points, key=lambda p: (p.series, p.time_ns)):
        last = stored.get(point.series)
        if last is None or point.start_ns > last[0]:
            delta = point.value
        elif point.start_ns < last[0] or point.time_ns <= last[1]:
            continue
        elif point.value < last[2]:
            delta = point.value
        else:
            delta = point.value - last[2]
        stored[point.series] = updated[point.series] = (point.start_ns, point.time_ns,
                                                        point.value)
        if delta:
            resolved.append(scaled(point.unit, delta, point.is_cost, point.key,
                                   point.session_id, point.start_ns or point.time_ns,
                                   point.time_ns, point.model, point.labels))
    if not resolved:
        return applied, updated
    combined = Batch(duplicates=applied.duplicates)
    combined.add(applied.records)
    combined.add(resolved)
    return combined, updated


def schema_problem(found: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str | None:
    """What is wrong with an existing agent_sessions, given its (name, type) columns; None if
    fine or absent."""
    if not found or found == expected:
        return None
    want = ", ".join(f"{n} {t}" for n, t in expected)
    actual = ", ".join(f"{n} {t}" for n, t in found)
    return f"table agent_sessions has columns ({actual}); expected exactly ({want})"
