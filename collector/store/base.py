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
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from collector.accounting.aggregate import HOUR_NS, Batch, HourDelta, HourKey, SessionDelta
from collector.accounting.traces import Node, Resolved, Waiting, resolve_trace
from collector.accounting.turns import (
    ROOT_SEEN,
    decide_turns,
    earlier_root,
    first_session,
    root_row_id,
    stored_root,
)
from collector.signals.metrics import CumulativePoint, scaled
from collector.signals.traces import (
    KEY_BYTES,
    SPAN_ID_BYTES,
    TRACE_ID_BYTES,
    HeldUsage,
    SpanUsage,
    TraceLink,
    TraceRoot,
)

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
# The configured dimensions ([attribution]) per session: a row per (session, dimension) that
# has a value, so the set of dimensions can change without a migration.
DIMENSIONS_TABLE = "collector_session_dimensions"
# The rollup summed per (UTC day, model, current agent of the session), for the fleet view's
# overview; each backend keeps it equal to the rollup in the statements that write either.
DAILY_TABLE = "collector_usage_daily"
DAILY_SUMS = ("turns", "prompt_tokens", "completion_tokens", "reasoning_tokens",
              "cache_read_tokens", "cache_write_tokens", "cost_cents")
# What a report groups the rollup by (the model is always a second group): a rollup column, or
# a label of the row's session (its latest value; '' for sessions without one).
# The built-in who-spends labels and their columns in collector_session_labels.
LABEL_COLUMNS = {"agent": "agent", "user": "user_name", "host": "host",
                 "credential": "credential"}
USAGE_GROUPS = {"hour": "hour", "session": "session_id",
                **{name: f"coalesce(l.{column}, '')" for name, column in LABEL_COLUMNS.items()}}
# Made only when budgets are configured (collector.store.budgets writes them).
SPEND_TABLE = "collector_budget_spend"
ALERTS_TABLE = "collector_budget_alerts"
OUTBOX_TABLE = "collector_alert_outbox"
JOURNAL_TABLE = "collector_budget_journal"  # flushes' sums not yet folded into the spend


def usage_group(group: str, mark: str) -> tuple[str, str, tuple[Any, ...]]:
    """What a rollup read groups by: (column expression, join, the join's parameters). A
    `group` outside USAGE_GROUPS is a configured dimension's name (the caller checked it),
    grouped by the session's latest value of it ('' for sessions without one). `mark` is the
    backend's parameter marker."""
    column = USAGE_GROUPS.get(group)
    if column is None:
        return ("coalesce(d.value, '')",
                f" LEFT JOIN {DIMENSIONS_TABLE} AS d ON d.session_id = h.session_id "
                f"AND d.dimension = {mark}", (group,))
    if column.startswith("coalesce"):
        return column, f" LEFT JOIN {LABELS_TABLE} AS l ON l.id = h.session_id", ()
    return column, "", ()
# collector_meta names, the same in every backend.
SEEN_CURRENT_COUNT = "seen_current_count"
SEEN_PREVIOUS_COUNT = "seen_previous_count"
GENERATION_STARTED = "seen_generation_started_ns"
HELD_COUNT = "held_count"
HELD_TABLE = "collector_held_usage"
LINKS_TABLE = "collector_trace_links"
TURNS_TABLE = "collector_trace_turns"
DEFAULT_RESOLVE_WINDOW_S = 600


class StorageError(Exception):
    """The batch was not committed; nothing of it was applied. Retrying is safe."""


class SchemaError(Exception):
    """The database holds an agent_sessions table this collector cannot write safely."""


@dataclass(frozen=True, slots=True)
class CommitResult:
    spans: int  # spans newly accounted (held ones included)
    duplicates: int  # spans already accounted (in this batch or before)
    sessions: int  # session rows upserted
    swept: int  # sessions marked 'unknown' by the stale sweep
    held: int = 0  # usage newly held, waiting for its trace to name its session
    resolved: int = 0  # held usage added to the session a span of its trace named
    resolved_by_window: int = 0  # held usage added to a session at the end of its wait
    held_now: int = 0  # usage held in the database after this commit (all collectors')


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

    @property
    def held_now(self) -> int:
        """Usage held in the database (by every collector on it), as of this one's last
        commit: while it is not zero the pipeline flushes now and then even when idle."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def commit(self, batch: Batch, *, now_ns: int,
                     sweep_before_ns: int | None = None) -> tuple[CommitResult, Batch]:
        """Commit `batch` (and mark active sessions last active before `sweep_before_ns`
        unknown); returns what was applied and the batch minus spans accounted before.
        Raises StorageError when nothing of the batch was committed."""
        ...


# (budget, scope value, period start ns, spend cents or threshold) rows: the spend and the
# recorded crossings of collector_budget_spend and collector_budget_alerts.
BudgetRow = tuple[str, str, int, float]
# With the budget journal's rows (collector.budgets.spend.decode reads them), read with them
# in one snapshot: a fold moves sums from the journal into the spend rows.
BudgetRows = tuple[list[BudgetRow], list[BudgetRow], list[str]]


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

    def read_budgets(self, periods: Sequence[tuple[str, int]]) -> BudgetRows:
        """For each (budget, period start): its spend rows (budget, scope value, period
        start ns, spend cents) and recorded crossings (budget, scope value, period start ns,
        threshold), as collector.budgets.status.budget_status takes them; and the budget
        journal (flushes' sums not yet folded into the spend rows: spend too), all from one
        snapshot."""
        ...

    def count_alerts_pending(self) -> int:
        """Outbox rows not yet delivered (every sink, every collector on the database)."""
        ...

    def close(self) -> None: ...


# The budget reads, one statement each for both backends: plain SELECTs over the tables'
# primary keys (collector_budget_spend and collector_budget_alerts lead with budget and
# period start per instance), `mark` being the backend's parameter style. At most
# BUDGET_PERIODS_PER_READ pairs a statement, far above any config's budget count.
BUDGET_PERIODS_PER_READ = 200
ALERTS_PENDING_SQL = f"SELECT count(*) FROM {OUTBOX_TABLE} WHERE delivered_ns IS NULL"


def budget_read_sql(table: str, column: str, pairs: int, mark: str) -> str:
    """SELECT budget, scope_value, period_start_ns, `column` FROM `table` for `pairs`
    (budget, period start) pairs, bound as budget, start, budget, start, ..."""
    where = " OR ".join([f"(budget = {mark} AND period_start_ns = {mark})"] * pairs)
    return (f"SELECT budget, scope_value, period_start_ns, {column} FROM {table} "
            f"WHERE {where} ORDER BY budget, scope_value, period_start_ns")


def read_budget_rows(execute: Callable[[str, list[Any]], Iterable[Sequence[Any]]],
                     periods: Sequence[tuple[str, int]], mark: str, *, journal: bool = True
                     ) -> BudgetRows:
    """Reader.read_budgets over a backend's `execute(sql, params) -> rows`, all in the one
    snapshot `execute` reads from. `journal`: whether the database has the journal table
    (made later than the other budget tables)."""
    spend: list[BudgetRow] = []
    crossings: list[BudgetRow] = []
    for start in range(0, len(periods), BUDGET_PERIODS_PER_READ):
        chunk = periods[start:start + BUDGET_PERIODS_PER_READ]
        params: list[Any] = [v for pair in chunk for v in pair]
        for out, table, column in ((spend, SPEND_TABLE, "spend_cents"),
                                   (crossings, ALERTS_TABLE, "threshold")):
            out.extend((str(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in execute(
                budget_read_sql(table, column, len(chunk), mark), params))
    texts = [str(r[0]) for r in execute(READ_JOURNAL_SQL, [])] if journal else []
    return spend, crossings, texts


READ_JOURNAL_SQL = f"SELECT sums FROM {JOURNAL_TABLE} ORDER BY created_ns, id"


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
            d.user_ns, d.host, d.host_ns, d.credential, d.credential_ns)


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


def session_dimensions(d: SessionDelta) -> list[tuple[str, str, int]]:
    """(dimension, value, end time of the span that set it) per dimension a session's delta
    gives."""
    if d.dimensions:
        return [(name, value, value_ns)
                for name, (value, value_ns) in d.latest_dimensions().items()]
    # The usual session: one whole set of tags, one end time.
    return [(name, value, d.tags_ns) for name, value in d.tags]


def dimension_rows(batch: Batch) -> Iterator[tuple[str, str, str, int]]:
    """(session, dimension, value, end time of the span that set it) per dimension given."""
    for d in batch.sessions.values():
        for name, value, value_ns in session_dimensions(d):
            yield d.session_id, name, value, value_ns


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
    BatchWrite(DIMENSIONS_TABLE, dimension_rows),
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
            event = scaled(point.unit, delta, point.is_cost, point.key, point.session_id,
                           point.start_ns or point.time_ns, point.time_ns, point.model,
                           point.labels)
            if point.credential is not None:
                event = event._replace(credential=point.credential)
            resolved.append(event)
    if not resolved:
        return applied, updated
    combined = Batch(duplicates=applied.duplicates)
    combined.refold(applied)
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


# -- usage without a session id (collector.accounting.traces), held in the flush transaction --
#
# Both backends run `hold_and_resolve` inside their flush transaction, through `TraceOps`: one
# statement per method and backend. The decisions (which links are kept, what a held span
# resolves to) are made here, so both backends resolve every held span the same way.

# (key, trace_id, span_id, parent_id, held_ns, usage as JSON)
HeldRow = tuple[bytes, bytes, bytes, bytes, int, str]
# (trace_id, span_id, parent_id, session_id, seen_ns)
LinkRow = tuple[bytes, bytes, bytes, str | None, int]
# (trace_id, session_id, state bits of collector.accounting.turns, seen_ns)
TurnRow = tuple[bytes, str, int, int]


class TraceOps(Protocol):
    """A backend's statements on collector_held_usage, collector_trace_links and the held
    count, run in the open flush transaction."""

    def held_count(self) -> int:
        """The held count as committed (the batch's own held usage not yet in it)."""
        ...

    def traces_with_held(self, trace_ids: list[bytes]) -> set[bytes]:
        """Which of these traces (sorted, each TRACE_ID_BYTES long) have held usage."""
        ...

    def expired_traces(self, held_before_ns: int) -> set[bytes]:
        """Traces with usage held at or before this time."""
        ...

    def lock_traces(self, trace_ids: list[bytes]) -> None:
        """Take these traces (sorted) for this transaction: another collector's flush that
        holds, links or resolves in one of them waits for this one's commit."""
        ...

    def insert_held(self, rows: list[HeldRow]) -> None: ...

    def upsert_links(self, rows: list[LinkRow]) -> None:
        """Rows have distinct keys; a stored link keeps its session if it has one and takes
        a non-empty parent."""
        ...

    def read_traces(self, trace_ids: list[bytes], links_seen_since_ns: int
                    ) -> tuple[list[tuple[bytes, HeldRow]], list[LinkRow]]:
        """The held rows (with their trace id) and the links seen since the given time, of
        these traces."""
        ...

    def delete_held(self, keys: list[bytes]) -> set[bytes]:
        """Delete these held rows (keys sorted); the keys actually deleted."""
        ...

    def read_turns(self, trace_ids: list[bytes]) -> list[TurnRow]:
        """The turn states of these traces (sorted), in no particular order."""
        ...

    def upsert_turns(self, rows: list[TurnRow]) -> None:
        """Rows sorted by (trace, session); each replaces the stored state of its key."""
        ...


@dataclass(slots=True)
class Traced:
    """What a flush did with held usage."""

    held: int = 0
    resolved: int = 0
    by_window: int = 0
    held_delta: int = 0  # the change to the held count
    held_now: int = 0  # set by the backend once it has written the count
    roots: int = 0  # records added for root spans' turns (no span of their own)


def usage_json(usage: SpanUsage) -> str:
    """A held record's usage (everything but its key and placeholder session)."""
    return json.dumps(usage[2:], allow_nan=False)


# Where a held record's dimensions are in its JSON (usage_json drops key and session).
_DIMENSIONS_AT = SpanUsage._fields.index("dimensions") - 2


def held_usage(key: bytes, session_id: str, usage: str) -> SpanUsage:
    """A held record as usage again. Rows held before a field existed take its default; the
    dimensions' pairs come back from JSON as lists."""
    fields = json.loads(usage)
    if len(fields) > _DIMENSIONS_AT:
        fields[_DIMENSIONS_AT] = tuple((str(n), str(v)) for n, v in fields[_DIMENSIONS_AT])
    return SpanUsage(key, session_id, *fields)


def held_rows(held: Iterable[HeldUsage], now_ns: int) -> list[HeldRow]:
    """In key order: the order every backend locks and writes them in."""
    return sorted((h.usage.key, h.trace_id, h.span_id, h.parent_id, now_ns,
                   usage_json(h.usage)) for h in held)


def link_rows(links: Iterable[TraceLink], now_ns: int) -> list[LinkRow]:
    """One row per (trace, span), in that order, merged as the stored upsert merges: the
    first session named stays, a later non-empty parent replaces an earlier one. Malformed
    ids (not of OTLP's widths) are dropped: they can never be an ancestor."""
    merged: dict[tuple[bytes, bytes], tuple[bytes, str | None]] = {}
    for link in links:
        if len(link.trace_id) != TRACE_ID_BYTES or len(link.span_id) != SPAN_ID_BYTES:
            continue
        key = (link.trace_id, link.span_id)
        known = merged.get(key)
        if known is None:
            merged[key] = (link.parent_id, link.session_id)
        else:
            merged[key] = (link.parent_id or known[0],
                           known[1] if known[1] is not None else link.session_id)
    return [(t, s, p, session, now_ns) for (t, s), (p, session) in sorted(merged.items())]


def candidate_links(applied: Batch) -> list[TraceLink]:
    """Links kept only when their trace has held usage: bridges and the batch's own usage
    spans (which name their session). An agent's spans that all name their session (the
    common case) then leave no row."""
    candidates = [link for link in applied.links if not link.anchor]
    candidates.extend(
        TraceLink(key[8:8 + TRACE_ID_BYTES], key[8 + TRACE_ID_BYTES:], b"", r.session_id)
        for r in applied.records if len(key := r.key) == KEY_BYTES)
    return candidates


def resolve_held(trace_id: bytes, held: Iterable[HeldRow], links: Iterable[LinkRow],
                 expired_before_ns: int, turns: Iterable[TurnRow] = ()
                 ) -> list[tuple[Resolved, SpanUsage]]:
    """The held usage of one trace that resolves now, each with its session. The trace's
    first session is the link seen first (ties by span id), so it does not depend on the
    order a backend returns rows in; without one, the session its model calls named first
    (its turn states): a turn span naming no session whose model calls named theirs, in
    earlier requests, resolves as soon as it arrives."""
    nodes: dict[bytes, Node] = {}
    first: tuple[int, bytes, str] | None = None
    for _, span_id, parent_id, session_id, seen_ns in links:
        nodes[span_id] = Node(parent_id, session_id)
        if session_id is not None and (first is None or (seen_ns, span_id) < first[:2]):
            first = (seen_ns, span_id, session_id)
    usages: dict[bytes, str] = {}
    waiting: list[Waiting] = []
    for key, _, span_id, parent_id, held_ns, usage in sorted(held):
        nodes.setdefault(span_id, Node(parent_id, None))
        usages[key] = usage
        waiting.append(Waiting(key, span_id, parent_id, held_ns <= expired_before_ns))
    trace_first = first[2] if first is not None else first_session(
        (session_id, seen_ns) for _, session_id, _, seen_ns in turns)
    return [(item, held_usage(item.key, item.session_id, usages[item.key]))
            for item in resolve_trace(trace_id, nodes, trace_first, waiting)]


def turn_traces(applied: Batch) -> tuple[dict[bytes, list[SpanUsage]], dict[bytes, TraceRoot]]:
    """The batch's records with a role, by trace, and one root per trace (the first by key:
    a retried root is the same span)."""
    by_trace: dict[bytes, list[SpanUsage]] = {}
    if applied.roles:
        for record in applied.records:
            if record.role and len(key := record.key) == KEY_BYTES:
                by_trace.setdefault(key[8:8 + TRACE_ID_BYTES], []).append(record)
    roots: dict[bytes, TraceRoot] = {}
    for root in applied.roots:
        trace_id = root.key[8:8 + TRACE_ID_BYTES]
        known = roots.get(trace_id)
        if known is None or root.key < known.key:
            roots[trace_id] = root
    return by_trace, roots


def apply_turns(ops: TraceOps, combined: Batch, applied: Batch, now_ns: int,
                stored: dict[bytes, list[TurnRow]],
                stored_roots: dict[bytes, TraceRoot] | None = None) -> Batch:
    """Decide the turns of the batch's traces (collector.accounting.turns) from their stored
    states, write the states that changed, and return the batch with each record's final
    turns and the roots' records. The traces are locked by the caller."""
    by_trace, roots = turn_traces(combined)
    if not by_trace and not roots:
        return combined
    decided: dict[bytes, SpanUsage] = {}
    added: list[SpanUsage] = []
    changed: list[TurnRow] = []
    for trace_id in sorted(by_trace.keys() | roots.keys()):
        states = {session_id: bits for _, session_id, bits, _ in stored.get(trace_id, ())}
        known = (stored_roots or {}).get(trace_id)
        arrived = roots.get(trace_id)
        root = earlier_root(known, arrived)
        if arrived is not None and root is arrived and root != known:
            # Remembered for usage of its trace that arrives later (collector.accounting.turns).
            changed.append((trace_id, root_row_id(arrived), ROOT_SEEN, now_ns))
        records = by_trace.get(trace_id, [])
        if not records and not states:
            continue  # a root of a trace that carried no usage: not a turn
        out, new_states = decide_turns(states, records, root)
        for record in out:
            if len(record.key) == KEY_BYTES:
                decided[record.key] = record
            else:
                added.append(record)
        changed.extend((trace_id, session_id, bits, now_ns)
                       for session_id, bits in sorted(new_states.items()))
    if changed:
        ops.upsert_turns(changed)
    if not added and all(decided[r.key] is r for r in combined.records if r.key in decided):
        return combined
    final = Batch(duplicates=combined.duplicates)
    for credential, run in combined.runs():
        final.add((decided.get(r.key, r) for r in run), credential)
    final.add(added)
    final.held, final.links, final.roots = applied.held, applied.links, applied.roots
    return final


def links_kept_since(now_ns: int, window_ns: int) -> int:
    """Links are forgotten two resolve windows after they were last seen."""
    return now_ns - 2 * window_ns


def hold_and_resolve(ops: TraceOps, applied: Batch, now_ns: int,
                     window_ns: int) -> tuple[Batch, Traced]:
    """Hold the batch's usage without a session, remember the trace links that matter, and
    resolve the held usage that can be resolved now, then decide the turns of the traces
    concerned (apply_turns), all in the caller's transaction: a held span is either in the
    held table or in its session, never both and never neither, and a trace's turn in a
    session is counted once, whichever collector on the database receives its spans.

    Order (the same in every backend, so that flushes of several collectors cannot deadlock):
    look up the traces concerned (with held usage, records with a role, or a root and stored
    turn states), lock them in order, write held rows and links, read each trace back whole,
    delete what resolves (only what the delete finds is counted), write the turn states."""
    traced = Traced(held=len(applied.held))
    count = ops.held_count() + traced.held
    held_traces = {h.trace_id for h in applied.held}
    touched = set(held_traces)
    by_trace, roots = turn_traces(applied)
    touched |= by_trace.keys()
    # A root is remembered whether or not its trace carried usage yet: that may come later.
    touched |= roots.keys()
    links = [link for link in applied.links if link.anchor]
    if count:
        candidates = candidate_links(applied)
        wanted = {c.trace_id for c in candidates if len(c.trace_id) == TRACE_ID_BYTES}
        with_held = ops.traces_with_held(sorted(wanted - held_traces)) | (wanted & held_traces)
        links.extend(c for c in candidates if c.trace_id in with_held)
        touched |= with_held
    rows = link_rows(links, now_ns)
    touched |= {row[0] for row in rows}
    expired_before = now_ns - window_ns
    if count:
        touched |= ops.expired_traces(expired_before)
    if not touched:
        return applied, traced
    order = sorted(touched)
    ops.lock_traces(order)
    if applied.held:
        ops.insert_held(held_rows(applied.held, now_ns))
    if rows:
        ops.upsert_links(rows)
    held_by_trace: dict[bytes, list[HeldRow]] = {}
    links_by_trace: dict[bytes, list[LinkRow]] = {}
    stored_held, stored_links = ops.read_traces(order, links_kept_since(now_ns, window_ns))
    for trace_id, held_row in stored_held:
        held_by_trace.setdefault(trace_id, []).append(held_row)
    for link_row in stored_links:
        links_by_trace.setdefault(link_row[0], []).append(link_row)
    turns_by_trace: dict[bytes, list[TurnRow]] = {}
    roots_by_trace: dict[bytes, TraceRoot] = {}
    for turn_row in ops.read_turns(order):
        remembered = stored_root(turn_row[1])
        if remembered is None:
            turns_by_trace.setdefault(turn_row[0], []).append(turn_row)
        else:
            roots_by_trace[turn_row[0]] = earlier_root(roots_by_trace.get(turn_row[0]),
                                                       remembered) or remembered
    outcome: dict[bytes, tuple[Resolved, SpanUsage]] = {}
    for trace_id in order:
        trace_held = held_by_trace.get(trace_id)
        if trace_held:
            for item, usage in resolve_held(trace_id, trace_held,
                                            links_by_trace.get(trace_id, ()), expired_before,
                                            turns_by_trace.get(trace_id, ())):
                outcome[item.key] = (item, usage)
    resolved: list[SpanUsage] = []
    if outcome:
        # Under the trace locks nobody else can have taken them; counted only as deleted all
        # the same, so a held span is never added twice.
        for key in sorted(ops.delete_held(sorted(outcome))):
            item, usage = outcome[key]
            resolved.append(usage)
            if item.by_window:
                traced.by_window += 1
            else:
                traced.resolved += 1
    traced.held_delta = traced.held - len(resolved)
    combined = applied
    if resolved:
        combined = Batch(duplicates=applied.duplicates)
        combined.refold(applied)
        combined.add(resolved)
        combined.held, combined.links, combined.roots = applied.held, applied.links, \
            applied.roots
    final = apply_turns(ops, combined, applied, now_ns, turns_by_trace, roots_by_trace)
    traced.roots = len(final.records) - len(combined.records)
    return final, traced


def has_trace_work(applied: Batch) -> bool:
    """Whether a flush has anything for hold_and_resolve besides stored held usage."""
    return bool(applied.held or applied.links or applied.roots or applied.roles)


def turns_kept_since(now_ns: int, retention_ns: int) -> int:
    """Turn states are forgotten after the span-id retention: a trace whose spans arrive
    further apart than that is taken for several."""
    return now_ns - retention_ns


def commit_result(applied: Batch, swept: int, traced: Traced | None) -> CommitResult:
    """`applied` includes the held usage resolved by this flush: those were accounted (and
    counted as spans) when they were held."""
    if traced is None:
        return CommitResult(spans=len(applied), duplicates=applied.duplicates,
                            sessions=len(applied.sessions), swept=swept)
    resolved = traced.resolved + traced.by_window + traced.roots
    return CommitResult(spans=len(applied) - resolved, duplicates=applied.duplicates,
                        sessions=len(applied.sessions), swept=swept, held=traced.held,
                        resolved=traced.resolved, resolved_by_window=traced.by_window,
                        held_now=traced.held_now)
