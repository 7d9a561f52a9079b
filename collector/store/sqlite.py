"""SQLite storage: one writer connection, one transaction per flush.

The store owns its connection, schema and transaction. A batch is committed whole or not at all:
the span ids it carries are recorded in the same transaction as the sums they produce, so a span
is accounted exactly once even across crashes, restarts and several daemons on one file.

Tables besides ``agent_sessions`` (whose columns are fixed by its readers):

* ``collector_session_marks``: per session, the end time of the span that set each "latest"
  value (model, kind, status, channel, goal), so late or out-of-order spans never overwrite a
  newer value;
* ``collector_seen_current`` / ``collector_seen_previous``: span ids already accounted, in two
  generations rotated every retention period, so an id is remembered for at least one period
  and at most two, and expiry is a cheap ``DROP TABLE``;
* ``collector_meta``: the start of the current generation and how many span ids each
  generation holds (kept in the flush transaction, so the dedupe-window metric needs no scan);
* ``collector_usage_hourly``: usage per (UTC hour, session, model), added to in the same
  transaction as ``agent_sessions``, so its sums always equal the sessions' sums and reports
  read rows per session and hour, never spans;
* ``collector_session_labels``: who spends, per session (agent, its version, user, host),
  each the latest value given with the end time of the span that gave it; kept apart because
  ``agent_sessions`` has fixed columns;
* ``collector_usage_daily``: the rollup summed per (UTC day, model, agent), for the fleet
  view's overview. Triggers keep it equal to the rollup grouped by the session's current agent
  label in every statement that writes either (so in the flush transaction, whatever writes
  them), including when a session's agent changes;
* ``collector_held_usage``: usage whose span names no session, waiting for a span of its
  trace to name one (collector.accounting.traces); inserted in the transaction that records
  its key as accounted, and deleted in the one that adds it to its session;
* ``collector_trace_links``: per span (trace id, span id), its parent and the session it
  names, for spans of traces with held usage and for anchors (agent spans, root spans naming
  a session); forgotten two resolve windows after they were seen;
* ``collector_trace_turns``: per (trace id, session), what is known of the trace's turn in
  that session (collector.accounting.turns: counted, carried usage, root's times added), for
  traces with agent spans or model calls under a parent; forgotten after the span-id
  retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from collector.accounting.aggregate import Batch, HourDelta, SessionDelta
from collector.budgets.spend import SpendPlanner
from collector.config.budgets import AlertSink, Budget
from collector.signals.metrics import CumulativePoint
from collector.signals.traces import KEY_BYTES, TRACE_ID_BYTES
from collector.store.base import (
    ALERTS_PENDING_SQL,
    BATCH_WRITES,
    COLUMN_NAMES,
    COLUMNS,
    DAILY_SUMS,
    DAILY_TABLE,
    DEFAULT_RESOLVE_WINDOW_S,
    DIMENSIONS_TABLE,
    GENERATION_STARTED,
    HELD_COUNT,
    HELD_TABLE,
    HOURLY_TABLE,
    JOURNAL_TABLE,
    LABELS_TABLE,
    LINKS_TABLE,
    SEEN_CURRENT_COUNT,
    SEEN_PREVIOUS_COUNT,
    SPEND_TABLE,
    TURNS_TABLE,
    BudgetRows,
    CommitResult,
    HeldRow,
    LinkRow,
    SchemaError,
    StorageError,
    Traced,
    TurnRow,
    commit_result,
    has_trace_work,
    hold_and_resolve,
    iso_utc,
    links_kept_since,
    mark_params,
    read_budget_rows,
    resolve_cumulative,
    session_params,
    turns_kept_since,
    usage_group,
)
from collector.store.base import schema_problem as _schema_problem
from collector.store.budgets import (
    Outbox,
    dimension_sql,
    fold_budgets,
    record_budgets,
    scope_rows,
)
from collector.store.tags import TagMemo

__all__ = ["COLUMNS", "COLUMN_NAMES", "CommitResult", "SQLiteReader", "SQLiteStore",
           "SchemaError", "StorageError", "iso_utc"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

BUSY_TIMEOUT_MS = 2000
FILE_MODE = 0o600
DIR_MODE = 0o700
# A data directory or database file with either bit is refused: others could tamper with it.
SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH

SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_sessions (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT 'interactive',
    status TEXT NOT NULL DEFAULT 'active',
    channel TEXT NOT NULL DEFAULT 'cli',
    model TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    last_active_at TEXT NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cost_cents REAL NOT NULL DEFAULT 0.0,
    goal_text TEXT
);
CREATE INDEX IF NOT EXISTS agent_sessions_status ON agent_sessions (status);
CREATE INDEX IF NOT EXISTS agent_sessions_last_active_at ON agent_sessions (last_active_at);
CREATE TABLE IF NOT EXISTS collector_session_marks (
    id TEXT PRIMARY KEY,
    model_ns INTEGER NOT NULL DEFAULT -1,
    kind_ns INTEGER NOT NULL DEFAULT -1,
    status_ns INTEGER NOT NULL DEFAULT -1,
    channel_ns INTEGER NOT NULL DEFAULT -1,
    goal_ns INTEGER NOT NULL DEFAULT -1
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_seen_current (key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_seen_previous (key BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS collector_usage_hourly (
    hour TEXT NOT NULL,
    session_id TEXT NOT NULL,
    model TEXT NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_cents REAL NOT NULL DEFAULT 0.0,
    PRIMARY KEY (hour, model, session_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_session_labels (
    id TEXT PRIMARY KEY,
    agent TEXT,
    agent_ns INTEGER NOT NULL DEFAULT -1,
    agent_version TEXT,
    agent_version_ns INTEGER NOT NULL DEFAULT -1,
    user_name TEXT,  -- "user" is reserved in PostgreSQL
    user_ns INTEGER NOT NULL DEFAULT -1,
    host TEXT,
    host_ns INTEGER NOT NULL DEFAULT -1,
    credential TEXT,  -- the ingest token's name (collector.security), never an attribute
    credential_ns INTEGER NOT NULL DEFAULT -1
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS collector_session_labels_agent ON collector_session_labels (agent);
CREATE INDEX IF NOT EXISTS collector_session_labels_user ON collector_session_labels (user_name);
CREATE TABLE IF NOT EXISTS collector_session_dimensions (
    session_id TEXT NOT NULL,
    dimension TEXT NOT NULL,
    value TEXT NOT NULL,
    value_ns INTEGER NOT NULL,
    PRIMARY KEY (session_id, dimension)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS collector_session_dimensions_value
    ON collector_session_dimensions (dimension, value);
CREATE INDEX IF NOT EXISTS collector_session_labels_host ON collector_session_labels (host);
CREATE INDEX IF NOT EXISTS collector_usage_hourly_session
    ON collector_usage_hourly (session_id, hour);
-- The fleet view's sort orders, each with the id as tiebreak, so a page (and the page after a
-- keyset cursor) is an index range, never a sort of every session.
CREATE INDEX IF NOT EXISTS agent_sessions_created_at ON agent_sessions (created_at, id);
CREATE INDEX IF NOT EXISTS agent_sessions_cost ON agent_sessions (cost_cents, id);
CREATE INDEX IF NOT EXISTS agent_sessions_turns ON agent_sessions (turns, id);
CREATE INDEX IF NOT EXISTS agent_sessions_tokens
    ON agent_sessions ((prompt_tokens + completion_tokens), id);
CREATE INDEX IF NOT EXISTS agent_sessions_model ON agent_sessions (model);
CREATE TABLE IF NOT EXISTS collector_usage_daily (
    day TEXT NOT NULL,
    model TEXT NOT NULL,
    agent TEXT NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    cost_cents REAL NOT NULL DEFAULT 0.0,
    PRIMARY KEY (day, model, agent)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_metric_series (
    series BLOB PRIMARY KEY,
    start_ns INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    value REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_held_usage (
    key BLOB PRIMARY KEY,
    trace_id BLOB NOT NULL,
    span_id BLOB NOT NULL,
    parent_id BLOB NOT NULL,
    held_ns INTEGER NOT NULL,
    usage TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS collector_held_usage_trace ON collector_held_usage (trace_id);
CREATE INDEX IF NOT EXISTS collector_held_usage_time ON collector_held_usage (held_ns);
CREATE TABLE IF NOT EXISTS collector_trace_links (
    trace_id BLOB NOT NULL,
    span_id BLOB NOT NULL,
    parent_id BLOB NOT NULL,
    session_id TEXT,
    seen_ns INTEGER NOT NULL,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS collector_trace_links_time ON collector_trace_links (seen_ns);
CREATE TABLE IF NOT EXISTS collector_trace_turns (
    trace_id BLOB NOT NULL,
    session_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    seen_ns INTEGER NOT NULL,
    PRIMARY KEY (trace_id, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS collector_trace_turns_time ON collector_trace_turns (seen_ns);
"""

_SUMS = DAILY_SUMS


def _add_daily(select: str) -> str:
    """An upsert adding `select`'s rows (day, model, agent, then the sums) to the daily table."""
    return (f"INSERT INTO {DAILY_TABLE} (day, model, agent, {', '.join(_SUMS)}) {select} "
            "ON CONFLICT (day, model, agent) DO UPDATE SET "
            + ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUMS))


def _row_sums(row: str, sign: str = "") -> str:
    return ", ".join(f"{sign}{row}.{c}" for c in _SUMS)


def _agent_of(session: str) -> str:
    return f"coalesce((SELECT agent FROM {LABELS_TABLE} WHERE id = {session}), '')"


def _move_session(session: str, old_agent: str, new_agent: str) -> str:
    """Statements moving a session's rollup rows from one agent's daily rows to another's,
    then dropping the rows left empty (their cost may keep float noise of ~1e-15 cents)."""
    sums = ", ".join(f"{{sign}}sum({c})" for c in _SUMS)
    source = (f"FROM {HOURLY_TABLE} WHERE session_id = {session} "
              "GROUP BY substr(hour, 1, 10), model")
    empty = " AND ".join(f"{c} = 0" for c in _SUMS[:-1])
    return (
        _add_daily(f"SELECT substr(hour, 1, 10), model, {old_agent}, "
                   f"{sums.format(sign='-')} {source}") + ";\n"
        + _add_daily(f"SELECT substr(hour, 1, 10), model, {new_agent}, "
                     f"{sums.format(sign='')} {source}") + ";\n"
        + f"DELETE FROM {DAILY_TABLE} WHERE agent = {old_agent} AND day >= coalesce(("
          f"SELECT substr(min(hour), 1, 10) FROM {HOURLY_TABLE} WHERE session_id = {session}"
          f"), '9') AND {empty} AND abs(cost_cents) < 1e-6;")


# Rollup rows only ever get added to (their key never changes); the general cases are covered
# anyway so that no statement can leave the daily table out of step.
DAILY_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_hourly_insert
AFTER INSERT ON {HOURLY_TABLE} BEGIN
{_add_daily(f"SELECT substr(new.hour, 1, 10), new.model, {_agent_of('new.session_id')}, "
            f"{_row_sums('new')} WHERE true")};
END""",
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_hourly_update
AFTER UPDATE ON {HOURLY_TABLE}
WHEN new.hour = old.hour AND new.model = old.model AND new.session_id = old.session_id BEGIN
{_add_daily(f"SELECT substr(new.hour, 1, 10), new.model, {_agent_of('new.session_id')}, "
            + ", ".join(f"new.{c} - old.{c}" for c in _SUMS) + " WHERE true")};
END""",
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_hourly_rekey
AFTER UPDATE ON {HOURLY_TABLE}
WHEN new.hour != old.hour OR new.model != old.model OR new.session_id != old.session_id BEGIN
{_add_daily(f"SELECT substr(old.hour, 1, 10), old.model, {_agent_of('old.session_id')}, "
            f"{_row_sums('old', '-')} WHERE true")};
{_add_daily(f"SELECT substr(new.hour, 1, 10), new.model, {_agent_of('new.session_id')}, "
            f"{_row_sums('new')} WHERE true")};
END""",
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_hourly_delete
AFTER DELETE ON {HOURLY_TABLE} BEGIN
{_add_daily(f"SELECT substr(old.hour, 1, 10), old.model, {_agent_of('old.session_id')}, "
            f"{_row_sums('old', '-')} WHERE true")};
END""",
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_agent_insert
AFTER INSERT ON {LABELS_TABLE} WHEN coalesce(new.agent, '') != '' BEGIN
{_move_session('new.id', "''", 'new.agent')}
END""",
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_agent_update
AFTER UPDATE OF id, agent ON {LABELS_TABLE}
WHEN coalesce(old.agent, '') != coalesce(new.agent, '') OR old.id != new.id BEGIN
{_move_session('old.id', "coalesce(old.agent, '')", "''")}
{_move_session('new.id', "''", "coalesce(new.agent, '')")}
END""",
    f"""CREATE TRIGGER IF NOT EXISTS collector_daily_agent_delete
AFTER DELETE ON {LABELS_TABLE} WHEN coalesce(old.agent, '') != '' BEGIN
{_move_session('old.id', 'old.agent', "''")}
END""",
)
SCHEMA_SCRIPT = SCHEMA + ";\n".join(("", *DAILY_TRIGGERS, ""))
"""The whole schema, triggers included, for `executescript` (benchmarks building files)."""

# A database written before the daily table existed: filled once from the rollup.
BACKFILL_DAILY = _add_daily(
    "SELECT substr(h.hour, 1, 10) AS day, h.model, coalesce(l.agent, '') AS agent, "
    + ", ".join(f"sum(h.{c})" for c in _SUMS)
    + f" FROM {HOURLY_TABLE} AS h LEFT JOIN {LABELS_TABLE} AS l ON l.id = h.session_id "
    "WHERE true GROUP BY day, h.model, agent")


BATCH_ROWS = "__batch_rows__"
"""Where a RowsStatement's template reads the batch's rows, as a subquery."""
BATCH_WITH = "__batch_with__"
"""Where a RowsStatement's template defines them: before its SELECT, after INSERT INTO, so the
statement still starts with INSERT and the driver reports its rowcount."""
MAX_ROWS_PER_STATEMENT = 512


class RowsStatement:
    """A statement over a batch's rows, bound as one multi-row VALUES list.

    The statement is one step, so the writer thread takes the GIL back once per statement, not
    once per row: with the export path holding the GIL most of the time, per-row hand-offs
    (executemany) made a flush of 1,000 sessions take 4x longer under load than idle. The
    rows were once sent as a single JSON parameter split by json_extract, which is also one
    step, but each json_extract parses its whole row again: most of an upsert's time went to
    splitting. Bound parameters cost SQLite nothing to read.

    A chunk of n rows is padded with rows of NULLs to the next power of two (at most
    MAX_ROWS_PER_STATEMENT) and the template reads only rows whose first column is not NULL,
    so one statement serves every size with at most ten texts to prepare, all of which stay in
    the connection's statement cache.

    `constants`: columns the rows do not carry, as SQL literals (most sessions leave their
    kind, status, channel and goal alone; their rows are sent without them).

    `rest`: a second statement over the same rows, run on a chunk only when this one left some
    of its rows alone (an upsert whose conflict clause applies where a condition holds; see
    _upsert_session). It takes the chunk's parameters as they were bound for this one."""

    def __init__(self, columns: str, template: str,
                 constants: dict[str, str] | None = None, *,
                 rest: RowsStatement | None = None) -> None:
        names = [name.strip() for name in columns.split(",")]
        constants = constants or {}
        carried = [name for name in names if name not in constants]
        self.width = len(carried)
        if rest is not None and rest.width != self.width:
            raise ValueError("a rest statement reads the same rows")
        self.rest = rest
        select = ", ".join(f"{constants[name]} AS {name}" if name in constants else name
                           for name in names)
        if template.count(BATCH_WITH) != 1 or BATCH_ROWS not in template:
            raise ValueError("a rows statement reads its rows where it defines them")
        head, body = template.replace(
            BATCH_ROWS, f"(SELECT {select} FROM batch_rows WHERE {carried[0]} IS NOT NULL)"
        ).split(BATCH_WITH)
        self._head = f"{head}WITH batch_rows ({', '.join(carried)}) AS (VALUES "
        self._body = ")\n" + body
        self._texts: dict[int, str] = {}

    def sql(self, rows: int) -> str:
        """The statement's text for a chunk padded to `rows` rows."""
        text = self._texts.get(rows)
        if text is None:
            one = "(" + ",".join("?" * self.width) + ")"
            text = self._texts[rows] = self._head + ",".join([one] * rows) + self._body
        return text

    def run(self, db: sqlite3.Connection, rows: Iterable[tuple[Any, ...]]) -> int:
        """Run over `rows`, MAX_ROWS_PER_STATEMENT at a time; the rows it (or its rest)
        inserted or updated, not counting its triggers'. A flush touching many sessions never
        holds more than one chunk's parameters (a whole flush's, built at once, raised peak
        RSS by ~30 MB)."""
        rows = iter(rows)
        changed = 0
        while chunk := list(itertools.islice(rows, MAX_ROWS_PER_STATEMENT)):
            changed += self.execute(db, len(chunk), *self.bind(chunk))
        return changed

    def execute(self, db: sqlite3.Connection, rows: int, sql: str, params: list[Any]) -> int:
        """Run one bound chunk of `rows` rows, and the rest statement on it if this one left
        some alone; the rows inserted or updated."""
        changed: int = db.execute(sql, params).rowcount
        if self.rest is not None and changed < rows:
            changed += db.execute(self.rest.sql(len(params) // self.width), params).rowcount
        return changed

    def bind(self, chunk: list[tuple[Any, ...]]) -> tuple[str, list[Any]]:
        """The text and parameters of one chunk."""
        padded = 1 << (len(chunk) - 1).bit_length()
        params = [value for row in chunk for value in row]
        if len(params) != self.width * len(chunk):
            raise ValueError(f"rows must have {self.width} values")
        params.extend(itertools.repeat(None, (padded - len(chunk)) * self.width))
        return self.sql(padded), params


# `hour` is the start of the UTC hour in agent_sessions' time format. The key is (hour, model,
# session): a report over a date range reads one contiguous slice of the table, and summing per
# (hour, model) streams in key order without sorting (a million rows in about 0.2 s).
#
# Usage from spans naming no model (an agent span's turn: its model calls are its children)
# counts under the session's model as stored after this flush's session upsert, which runs
# first: the model of the session's latest model call. Children end, and are exported, no
# later than their agent span, so the turn lands under the model its calls used; only a
# session with no model call yet keeps it under '' ("(none)" in reports).
HOURLY_ROW = ("hour, session_id, model, turns, prompt_tokens, completion_tokens, reasoning_tokens, "
              "cache_read_tokens, cache_write_tokens, cost_cents")
UPSERT_HOURLY = RowsStatement(HOURLY_ROW, f"""
INSERT INTO collector_usage_hourly (hour, session_id, model, turns, prompt_tokens,
    completion_tokens, reasoning_tokens, cache_read_tokens, cache_write_tokens, cost_cents)
{BATCH_WITH}
SELECT hour, session_id,
    CASE WHEN model != '' THEN model
        ELSE coalesce((SELECT s.model FROM agent_sessions AS s WHERE s.id = session_id), '')
        END,
    turns, prompt_tokens, completion_tokens, reasoning_tokens, cache_read_tokens,
    cache_write_tokens, cost_cents
FROM {BATCH_ROWS}
WHERE true
ON CONFLICT (hour, model, session_id) DO UPDATE SET
    turns = turns + excluded.turns,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
    cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
    cost_cents = cost_cents + excluded.cost_cents
""")

# A database written before the rollup existed: each session's sums go to the hour of its last
# activity (its cache split is unknown, so 0), which keeps reports equal to agent_sessions.
BACKFILL_HOURLY = """
INSERT INTO collector_usage_hourly (hour, session_id, model, turns, prompt_tokens,
    completion_tokens, reasoning_tokens, cost_cents)
SELECT substr(last_active_at, 1, 13) || ':00:00.000Z', id, model, turns, prompt_tokens,
    completion_tokens, reasoning_tokens, cost_cents
FROM agent_sessions
WHERE turns != 0 OR prompt_tokens != 0 OR completion_tokens != 0 OR reasoning_tokens != 0
    OR cost_cents != 0
"""

# Counted once, for databases written before the counts were kept.
INIT_SEEN_COUNT = """
INSERT INTO collector_meta (name, value) SELECT ?1, (SELECT count(*) FROM {table})
WHERE NOT EXISTS (SELECT 1 FROM collector_meta WHERE name = ?1)
"""

# All of a batch's span ids go in as one packed blob, split inside SQLite: a single statement
# step, so the whole insert runs without the GIL and without a Python call per span. An id is
# new when it is in neither generation; the changes() count says whether all were new.
_SPLIT_KEYS = ("WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n + 1 < ?2)"
               f" SELECT substr(?1, n * {KEY_BYTES} + 1, {KEY_BYTES}) AS key FROM i")
INSERT_SEEN = f"""
INSERT OR IGNORE INTO collector_seen_current (key)
SELECT key FROM ({_SPLIT_KEYS}) AS batch
WHERE NOT EXISTS (SELECT 1 FROM collector_seen_previous p WHERE p.key = batch.key)
"""
ACCOUNTED_BEFORE = f"""
SELECT key FROM ({_SPLIT_KEYS}) AS batch
WHERE key IN (SELECT key FROM collector_seen_current)
   OR key IN (SELECT key FROM collector_seen_previous)
"""


def _latest(column: str, default: str, mark: str | None = None) -> str:
    """The new value if a span at least as late as the stored one's set it, else the stored
    value (or the column default for a new session). `mark`: the marks column, if not
    `{column}_ns`."""
    return (f"CASE WHEN s.id IS NULL THEN coalesce(b.{column}, {default}) "
            f"WHEN b.{column} IS NOT NULL "
            f"AND b.{column}_ns >= coalesce(m.{mark or column + '_ns'}, -1) "
            f"THEN b.{column} ELSE s.{column} END")


SESSION_ROW = ("id, kind, kind_ns, status, status_ns, channel, channel_ns, model, model_ns, "
               "created_at, last_active_at, turns, prompt_tokens, completion_tokens, "
               "reasoning_tokens, cost_cents, goal_text, goal_text_ns")
# What nearly every span sets of a session: its model, times and sums, not its kind, status,
# channel or goal. Such sessions' rows leave those out (10 columns of 18; session_params).
PLAIN_CONSTANTS = {"kind": "NULL", "kind_ns": "-1", "status": "NULL", "status_ns": "-1",
                   "channel": "NULL", "channel_ns": "-1", "goal_text": "NULL",
                   "goal_text_ns": "-1"}


# What a session upsert changes of a stored row nearly every time: its last activity and sums.
# The other columns are set only where their new value differs, and those of them that are
# indexed (status, model, created_at) then have their index entries rewritten.
_SESSION_MOVES = ("last_active_at", "turns", "prompt_tokens", "completion_tokens",
                  "reasoning_tokens", "cost_cents")
_SESSION_KEEPS = ("kind", "status", "channel", "model", "created_at", "goal_text")
_UNCHANGED = " AND ".join(f"excluded.{c} IS {c}" for c in _SESSION_KEEPS)


def _upsert_session(constants: dict[str, str] | None = None) -> RowsStatement:
    """The whole new row is computed from the batch (b), the stored row (s) and the session's
    marks (m) read before this flush updates them.

    Two steps, because SQLite rewrites the index entries of every column a conflict clause
    sets, changed or not: the statement returned sets only the columns that move and applies
    where nothing else changes; its rest (run on a chunk only when the first left rows alone)
    sets the whole row where anything else changes. A row the first updated is left alone by
    the rest: the values it compares depend on the batch, the marks and the columns the first
    did not set."""
    return RowsStatement(SESSION_ROW, _session_template(rest=False), constants,
                         rest=RowsStatement(SESSION_ROW, _session_template(rest=True),
                                            constants))


def _session_template(*, rest: bool) -> str:
    if rest:
        update = ", ".join(f"{c} = excluded.{c}" for c in _SESSION_MOVES + _SESSION_KEEPS)
        update += f" WHERE NOT ({_UNCHANGED})"
    else:
        update = ", ".join(f"{c} = excluded.{c}" for c in _SESSION_MOVES)
        update += f" WHERE {_UNCHANGED}"
    return f"""
INSERT INTO agent_sessions (id, kind, status, channel, model, created_at, last_active_at, turns,
    prompt_tokens, completion_tokens, reasoning_tokens, cost_cents, goal_text)
{BATCH_WITH}
SELECT b.id,
    {_latest("kind", "'interactive'")},
    CASE WHEN s.id IS NULL THEN coalesce(b.status, 'active')
        WHEN b.status IS NOT NULL AND b.status_ns >= coalesce(m.status_ns, -1) THEN b.status
        WHEN s.status = 'unknown' AND b.last_active_at > s.last_active_at THEN 'active'
        ELSE s.status END,
    {_latest("channel", "'cli'")},
    {_latest("model", "''")},
    CASE WHEN s.id IS NULL THEN b.created_at ELSE min(s.created_at, b.created_at) END,
    CASE WHEN s.id IS NULL THEN b.last_active_at
        ELSE max(s.last_active_at, b.last_active_at) END,
    coalesce(s.turns, 0) + b.turns,
    coalesce(s.prompt_tokens, 0) + b.prompt_tokens,
    coalesce(s.completion_tokens, 0) + b.completion_tokens,
    coalesce(s.reasoning_tokens, 0) + b.reasoning_tokens,
    coalesce(s.cost_cents, 0.0) + b.cost_cents,
    {_latest("goal_text", "NULL", mark="goal_ns")}
FROM {BATCH_ROWS} AS b
LEFT JOIN agent_sessions AS s ON s.id = b.id
LEFT JOIN collector_session_marks AS m ON m.id = b.id
WHERE true
ON CONFLICT (id) DO UPDATE SET {update}
"""


UPSERT_SESSION = _upsert_session()
UPSERT_SESSION_PLAIN = _upsert_session(PLAIN_CONSTANTS)
MARKS_ROW = "id, model_ns, kind_ns, status_ns, channel_ns, goal_ns"


def _upsert_marks(constants: dict[str, str] | None = None) -> RowsStatement:
    return RowsStatement(MARKS_ROW, f"""
INSERT INTO collector_session_marks (id, model_ns, kind_ns, status_ns, channel_ns, goal_ns)
{BATCH_WITH}
SELECT * FROM {BATCH_ROWS}
WHERE true
ON CONFLICT (id) DO UPDATE SET
    model_ns = max(model_ns, excluded.model_ns),
    kind_ns = max(kind_ns, excluded.kind_ns),
    status_ns = max(status_ns, excluded.status_ns),
    channel_ns = max(channel_ns, excluded.channel_ns),
    goal_ns = max(goal_ns, excluded.goal_ns)
""", constants)


UPSERT_MARKS = _upsert_marks()
# A plain session's marks: only its model's moves.
UPSERT_MARKS_PLAIN = _upsert_marks({"kind_ns": "-1", "status_ns": "-1", "channel_ns": "-1",
                                    "goal_ns": "-1"})

LABELS_ROW = ("id, agent, agent_ns, agent_version, agent_version_ns, user_name, user_ns, host, "
              "host_ns, credential, credential_ns")
_LABELS = (("agent", "agent_ns"), ("user_name", "user_ns"), ("host", "host_ns"))
UNINDEXED_LABELS = (("agent_version", "agent_version_ns"), ("credential", "credential_ns"))
# Label columns added after the table was first made, added to an existing one at open.
ADDED_LABEL_COLUMNS = (("credential", "TEXT"), ("credential_ns", "INTEGER NOT NULL DEFAULT -1"))
_LABEL_CHANGES = " OR ".join(
    f"(excluded.{c} IS NOT NULL AND excluded.{ns} >= {ns} AND excluded.{c} IS NOT {c})"
    for c, ns in _LABELS)


def _labels_template(*, rest: bool) -> str:
    """Each label is the latest given, with the end time of the span that gave it.

    Two steps, as for sessions: agent, user and host are indexed, and nearly always arrive
    unchanged. The first step (`rest` False) moves the end times (and the unindexed version)
    where none of the three changes; its rest sets them where one does. The unindexed ones
    (version, credential) are set in either step."""
    update = []
    for column, ns in UNINDEXED_LABELS:
        update += [f"{column} = CASE WHEN excluded.{column} IS NOT NULL "
                   f"AND excluded.{ns} >= {ns} THEN excluded.{column} ELSE {column} END",
                   f"{ns} = max({ns}, excluded.{ns})"]
    for column, ns in _LABELS:
        if rest:
            update.append(f"{column} = CASE WHEN excluded.{column} IS NOT NULL "
                          f"AND excluded.{ns} >= {ns} THEN excluded.{column} ELSE {column} END")
        update.append(f"{ns} = max({ns}, excluded.{ns})")
    where = f"({_LABEL_CHANGES})" if rest else f"NOT ({_LABEL_CHANGES})"
    return f"""
INSERT INTO collector_session_labels (id, agent, agent_ns, agent_version, agent_version_ns,
    user_name, user_ns, host, host_ns, credential, credential_ns)
{BATCH_WITH}
SELECT * FROM {BATCH_ROWS}
WHERE true
ON CONFLICT (id) DO UPDATE SET {", ".join(update)} WHERE {where}
"""


UPSERT_LABELS = RowsStatement(LABELS_ROW, _labels_template(rest=False),
                              rest=RowsStatement(LABELS_ROW, _labels_template(rest=True)))

DIMENSIONS_ROW = "session_id, dimension, value, value_ns"


def _dimensions_template(*, rest: bool) -> str:
    """The latest value per (session, dimension). Two steps, as for the labels: a value
    nearly always arrives unchanged, and then only its end time moves (no index write); the
    rest sets the values that changed."""
    if rest:
        update = ("value = excluded.value, value_ns = excluded.value_ns "
                  "WHERE excluded.value_ns >= value_ns AND excluded.value != value")
    else:
        update = "value_ns = max(value_ns, excluded.value_ns) WHERE excluded.value = value"
    return f"""
INSERT INTO {DIMENSIONS_TABLE} (session_id, dimension, value, value_ns)
{BATCH_WITH}
SELECT * FROM {BATCH_ROWS}
WHERE true
ON CONFLICT (session_id, dimension) DO UPDATE SET {update}
"""


UPSERT_DIMENSIONS = RowsStatement(
    DIMENSIONS_ROW, _dimensions_template(rest=False),
    rest=RowsStatement(DIMENSIONS_ROW, _dimensions_template(rest=True)))

# One statement per entry of collector.store.base.BATCH_WRITES, run in that order.
BATCH_STATEMENTS = {
    "agent_sessions": UPSERT_SESSION,
    "collector_session_marks": UPSERT_MARKS,
    LABELS_TABLE: UPSERT_LABELS,
    DIMENSIONS_TABLE: UPSERT_DIMENSIONS,
    HOURLY_TABLE: UPSERT_HOURLY,
}

# Series are few (one per session, model and token type) and cumulative points rare next to
# spans, so these go row by row with their keys as blobs.
UPSERT_SERIES = """
INSERT INTO collector_metric_series (series, start_ns, time_ns, value) VALUES (?, ?, ?, ?)
ON CONFLICT (series) DO UPDATE SET
    start_ns = excluded.start_ns, time_ns = excluded.time_ns, value = excluded.value
"""

SWEEP_STALE = """
UPDATE agent_sessions SET status = 'unknown' WHERE status = 'active' AND last_active_at < ?
"""


def _run_rows(db: sqlite3.Connection, statement: RowsStatement,
              rows: Iterable[tuple[Any, ...]]) -> int:
    return statement.run(db, rows)


def is_plain(d: SessionDelta) -> bool:
    """Whether the batch sets nothing of the session but its model, times and sums."""
    return d.kind is None and d.status is None and d.channel is None and d.goal is None


def plain_session_params(d: SessionDelta, t: HourDelta) -> tuple[Any, ...]:
    """A plain session's row (UPSERT_SESSION_PLAIN): SESSION_ROW without PLAIN_CONSTANTS."""
    return (d.session_id, d.model, d.model_ns, iso_utc(d.created_ns), iso_utc(d.last_ns),
            t.turns, t.prompt_tokens, t.completion_tokens, t.reasoning_tokens, t.cost_cents)


def write_sessions(db: sqlite3.Connection, applied: Batch,
                   execute: Callable[[sqlite3.Connection, RowsStatement,
                                      Iterable[tuple[Any, ...]]], int] | None = None, *,
                   dimensions: Iterable[tuple[Any, ...]] | None = None) -> int:
    """Upsert the batch's tables in BATCH_WRITES order; the sessions written.

    Plain sessions (most of them: spans setting a model, times and sums) go through the
    narrower session and marks statements. Every session upsert runs before any marks upsert:
    each reads the marks as they were before this flush. `execute` is _run_rows unless a
    profiler wraps it; `dimensions`, the store's TagPlan rows (collector.store.tags), else
    every tag the batch carries."""
    run = execute or _run_rows
    deltas = list(applied.sessions.values())
    if not deltas:
        return 0
    totals = applied.totals()
    plain = [d for d in deltas if is_plain(d)]
    full = [d for d in deltas if not is_plain(d)] if len(plain) < len(deltas) else []
    for write in BATCH_WRITES:
        if write.table == "agent_sessions":
            run(db, UPSERT_SESSION_PLAIN,
                (plain_session_params(d, totals[d.session_id]) for d in plain))
            run(db, UPSERT_SESSION, (session_params(d, totals[d.session_id]) for d in full))
        elif write.table == "collector_session_marks":
            run(db, UPSERT_MARKS_PLAIN,
                ((d.session_id, d.model_ns) for d in plain if d.model_ns >= 0))
            run(db, UPSERT_MARKS, (mark_params(d) for d in full))
        elif write.table == DIMENSIONS_TABLE and dimensions is not None:
            run(db, UPSERT_DIMENSIONS, dimensions)
        else:
            run(db, BATCH_STATEMENTS[write.table], write.rows(applied))
    return len(deltas)


def prepare_file(path: Path) -> None:
    """Create the directory and an owner-only database file before SQLite opens it, after
    refusing any place where another user could swap or edit what the collector commits.

    Refused, each with a StorageError naming the path: a directory (or database file)
    writable by group or others, since whoever can write the directory can replace the
    database or plant its -wal/-shm files; a database path that is a symbolic link unless it
    leads to an existing regular file this user owns (a dangling link is never followed, so
    the collector creates nothing where the link points); anything but a regular file.
    Existing -wal/-shm files get the database file's mode (SQLite gives that mode to the ones
    it creates)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    target = path
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        _private_directory(path.parent)
        try:  # O_EXCL | O_NOFOLLOW: nothing that appeared meanwhile is followed or reused
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise StorageError(f"cannot create the database {path}: "
                               f"{exc.strerror or exc}") from None
        os.close(fd)
        return
    if stat.S_ISLNK(found.st_mode):
        target = _link_target(path)
    _private_directory(path.parent)
    if target != path:
        _private_directory(target.parent)
    mode = _private_file(target)
    for suffix in ("-wal", "-shm"):
        _match_mode(Path(f"{target}{suffix}"), mode)


def _private_directory(directory: Path) -> None:
    try:
        mode = os.stat(directory).st_mode
    except OSError as exc:
        raise StorageError(f"data directory {directory}: {exc.strerror or exc}") from None
    if mode & SHARED_WRITE:
        raise StorageError(
            f"data directory {directory} is writable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}): another user could replace the database or its "
            f"-wal/-shm files. Run `chmod go-w {directory}`, or set storage.sqlite_path to a "
            "file in a directory only this user can write")


def _link_target(path: Path) -> Path:
    """Where a symbolic link at the database path leads, if it may be followed."""
    try:
        target = Path(os.path.realpath(path, strict=True))
        found = os.stat(target)
    except OSError:
        raise StorageError(
            f"database path {path} is a symbolic link to {os.readlink(path)!r}, which does "
            "not exist: refusing to create a database through a link. Create the target "
            "first, or set storage.sqlite_path to the file itself") from None
    if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
        raise StorageError(
            f"database path {path} is a symbolic link to {target}, which is not a regular "
            f"file owned by this user (uid {os.geteuid()}): refusing to follow it. Set "
            "storage.sqlite_path to the file itself")
    return target


def _private_file(path: Path) -> int:
    found = os.stat(path)
    if not stat.S_ISREG(found.st_mode):
        raise StorageError(f"database path {path} is not a regular file")
    mode = stat.S_IMODE(found.st_mode)
    if mode & SHARED_WRITE:
        raise StorageError(
            f"database file {path} is writable by group or others (mode {mode:04o}); run "
            f"`chmod go-w {path}` (the collector creates it {FILE_MODE:04o})")
    return mode


def _match_mode(path: Path, mode: int) -> None:
    """A -wal or -shm file left from before gets the database file's mode; a link there is
    refused (SQLite would write through it)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(found.st_mode):
        raise StorageError(f"{path} is not a regular file (a link?): refusing to open the "
                           "database beside it")
    if stat.S_IMODE(found.st_mode) != mode:
        try:
            os.chmod(path, mode)
        except OSError as exc:
            raise StorageError(f"cannot give {path} the database file's mode {mode:04o}: "
                               f"{exc.strerror or exc}") from None


def add_label_columns(db: sqlite3.Connection) -> None:
    """A database made before a label column existed gets it (empty: no label yet)."""
    have = {row[1] for row in db.execute(f"PRAGMA table_info({LABELS_TABLE})")}
    for column, kind in ADDED_LABEL_COLUMNS:
        if column not in have:
            db.execute(f"ALTER TABLE {LABELS_TABLE} ADD COLUMN {column} {kind}")
            log.info("%s: column %s added", LABELS_TABLE, column)


def schema_problem(table_info: list[Any]) -> str | None:
    """What is wrong with an existing agent_sessions, from PRAGMA table_info rows; None if fine."""
    return _schema_problem([(r[1], (r[2] or "").upper()) for r in table_info], list(COLUMNS))


class SQLiteStore:
    """The writer. Not safe for concurrent commits: the pipeline flushes one batch at a time.

    One connection, owned by one thread; `open`, `commit` and `close` each run there as one
    synchronous function, so a flush costs one hand-off between the event loop and the
    thread. (aiosqlite, used before, hands off once per statement: under load each hand-off
    waited 10-40 ms behind the requests queued on the loop, and a flush of ~8 statements took
    ~130 ms instead of ~35.)
    """

    def __init__(self, path: Path, *, retention_s: int,
                 resolve_window_s: int = DEFAULT_RESOLVE_WINDOW_S,
                 budgets: tuple[Budget, ...] = (),
                 sinks: tuple[AlertSink, ...] = ()) -> None:
        self.path = path
        self._budgets = budgets
        self._planner = SpendPlanner(budgets)
        self._tags = TagMemo()
        self._sinks = sinks
        self._retention_ns = retention_s * 1_000_000_000
        self._resolve_window_ns = resolve_window_s * 1_000_000_000
        # Usage held in the database (by any collector on it), as of this daemon's last commit.
        self.held_now = 0
        self._db: sqlite3.Connection | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._generation_started_ns: int | None = None
        # Span ids remembered, per generation, as of this daemon's last commit.
        self.seen_current = 0
        self.seen_previous = 0

    @property
    def description(self) -> str:
        return f"sqlite {self.path}"

    @property
    def dedupe_window(self) -> int:
        """Span ids remembered for exactly-once accounting (both generations)."""
        return self.seen_current + self.seen_previous

    async def _in_writer(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def open(self) -> None:
        prepare_file(self.path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector-sqlite")
        try:
            self._db = await self._in_writer(self._open)
        except BaseException:
            self._thread.shutdown(wait=False)
            self._thread = None
            raise

    def _open(self) -> sqlite3.Connection:
        # Each RowsStatement prepares up to ten texts (one per padded size): room for all.
        db = sqlite3.connect(self.path, isolation_level=None, cached_statements=256)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StorageError(f"{self.path}: cannot switch to WAL journal mode")
            # FULL: a commit is on disk before the exporter hears success (power loss too).
            db.execute("PRAGMA synchronous = FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                problem = schema_problem(db.execute("PRAGMA table_info(agent_sessions)").fetchall())
                if problem:
                    raise SchemaError(f"{self.path}: {problem}")
                had_rollup = db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (HOURLY_TABLE,)).fetchone()
                had_daily = db.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (DAILY_TABLE,)).fetchone()
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                add_label_columns(db)
                if self._budgets:  # no budget tables in a database that never had budgets
                    for statement in BUDGET_SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                if not had_rollup:
                    backfilled = db.execute(BACKFILL_HOURLY).rowcount
                    if backfilled > 0:
                        log.info("hourly rollup created from %d existing sessions", backfilled)
                if not had_daily:  # before the triggers exist, so nothing is added twice
                    db.execute(BACKFILL_DAILY)
                for trigger in DAILY_TRIGGERS:
                    db.execute(trigger)
                for name, table in ((SEEN_CURRENT_COUNT, "collector_seen_current"),
                                    (SEEN_PREVIOUS_COUNT, "collector_seen_previous")):
                    db.execute(INIT_SEEN_COUNT.format(table=table), (name,))
                self.seen_current, self.seen_previous = _read_seen_counts(db)
                db.execute(INIT_SEEN_COUNT.format(table=HELD_TABLE), (HELD_COUNT,))
                self.held_now = _held_count(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except BaseException:
            db.close()
            raise
        return db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            if len(self._tags):
                await self._in_writer(self._settle_tags, db)
            if self._budgets:
                await self._in_writer(self._fold_journal, db)
            await self._in_writer(db.close)
        if self._thread is not None:
            thread, self._thread = self._thread, None
            thread.shutdown(wait=True)  # idle by now: nothing is queued after the close

    async def commit(self, batch: Batch, *, now_ns: int,
                     sweep_before_ns: int | None = None) -> tuple[CommitResult, Batch]:
        """Commit a batch in one transaction; returns what was applied and the batch applied.

        Raises StorageError when nothing was committed (the caller keeps the batch).
        """
        db = self._db
        if db is None:
            raise StorageError("store is not open")
        return await self._in_writer(self._commit, db, batch, now_ns, sweep_before_ns)

    def _settle_tags(self, db: sqlite3.Connection) -> None:
        """At close: the tags' end times not written yet (collector.store.tags). Failing
        loses only how late a tag was last given, never a value or a sum."""
        rows = self._tags.owed_rows()
        if rows and _write_at_close(db, lambda: UPSERT_DIMENSIONS.run(db, rows),
                                    "tags' latest end times not written at close"):
            self._tags.settled()

    def _fold_journal(self, db: sqlite3.Connection) -> None:
        """At close: what the journal holds folded into the spend rows (collector.budgets.
        spend), so a stopped daemon leaves the budget tables whole. Failing is harmless: the
        journal stays, and readers and the next fold count it."""
        _write_at_close(
            db, lambda: fold_budgets(_BudgetOps(db), self._planner, self._sinks, time.time_ns()),
            "budget journal not folded at close (kept for the next fold)", (ValueError,))

    def _commit(self, db: sqlite3.Connection, batch: Batch, now_ns: int,
                sweep_before_ns: int | None) -> tuple[CommitResult, Batch]:
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot begin a write transaction: {exc}") from exc
        try:
            rotated = self._rotate_if_due(db, now_ns)
            applied = _record_seen(db, batch)
            seen_current = None
            if applied.keys:
                row = db.execute(
                    "UPDATE collector_meta SET value = value + ? WHERE name = ? RETURNING value",
                    (len(applied.keys), SEEN_CURRENT_COUNT)).fetchone()
                seen_current = None if row is None else int(row[0])
            if batch.cumulative:
                applied = _with_cumulative(db, applied, batch.cumulative)
            traced = None
            if has_trace_work(applied) or self.held_now or _held_count(db):
                applied, traced = _with_traces(db, applied, now_ns, self._resolve_window_ns,
                                               self._retention_ns)
            tags = self._tags.plan(applied, now_ns) if applied.sessions else None
            write_sessions(db, applied, dimensions=None if tags is None else tags.rows)
            if self._budgets:  # after the rollup: an alert's top lists include this batch
                record_budgets(_BudgetOps(db), applied, self._planner, self._sinks, now_ns)
            swept = 0
            if sweep_before_ns is not None:
                swept = max(db.execute(SWEEP_STALE, (iso_utc(sweep_before_ns),)).rowcount, 0)
            db.execute("COMMIT")
            # Only now: a rolled-back flush must not move the counts.
            if rotated is not None:
                self.seen_current, self.seen_previous = rotated
            if seen_current is not None:
                self.seen_current = seen_current
            if traced is not None:
                self.held_now = traced.held_now
            if tags is not None:
                self._tags.committed(tags, now_ns)
        except BaseException as exc:
            # A failed COMMIT may already have rolled back; then ROLLBACK itself fails.
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            # A rotation in this transaction was rolled back too: re-read the generation's
            # start from the database next time instead of trusting memory.
            self._generation_started_ns = None
            if isinstance(exc, sqlite3.Error):
                raise StorageError(str(exc)) from exc
            if isinstance(exc, OverflowError | ValueError | TypeError):
                # A value SQLite cannot bind: the mapping's bounds should make this
                # impossible; if it happens it is a bug, reported as a failed commit.
                raise StorageError(f"value not storable: {exc!r}") from exc
            raise
        return commit_result(applied, swept, traced), applied

    def _rotate_if_due(self, db: sqlite3.Connection, now_ns: int) -> tuple[int, int] | None:
        """Rotate the span-id generations when due; the new (current, previous) counts if read."""
        started = self._generation_started_ns
        if started is not None and now_ns - started < self._retention_ns:
            return None
        # Read inside the write transaction: another daemon on this file may have rotated.
        row = db.execute("SELECT value FROM collector_meta WHERE name = ?",
                         (GENERATION_STARTED,)).fetchone()
        if row is None:
            db.execute("INSERT INTO collector_meta (name, value) VALUES (?, ?)",
                       (GENERATION_STARTED, now_ns))
            self._generation_started_ns = now_ns
            return None
        started = int(row[0])
        if now_ns - started >= self._retention_ns:
            db.execute("DROP TABLE collector_seen_previous")
            db.execute("ALTER TABLE collector_seen_current RENAME TO collector_seen_previous")
            db.execute("CREATE TABLE collector_seen_current (key BLOB PRIMARY KEY) WITHOUT ROWID")
            db.execute("UPDATE collector_meta SET value = ? WHERE name = ?",
                       (now_ns, GENERATION_STARTED))
            db.execute(
                "UPDATE collector_meta SET value = (SELECT value FROM collector_meta WHERE "
                "name = ?1) WHERE name = ?2", (SEEN_CURRENT_COUNT, SEEN_PREVIOUS_COUNT))
            db.execute("UPDATE collector_meta SET value = 0 WHERE name = ?",
                       (SEEN_CURRENT_COUNT,))
            # Series silent for two periods are forgotten with the span ids of their time: a
            # point of one arriving later counts from zero, as a new series would.
            db.execute("DELETE FROM collector_metric_series WHERE time_ns < ?",
                       (now_ns - 2 * self._retention_ns,))
            log.info("dedupe window rotated; span ids older than %d s forgotten",
                     self._retention_ns // 1_000_000_000)
            started = now_ns
        self._generation_started_ns = started
        # Also after another daemon on this file rotated: read what the generations hold now.
        return _read_seen_counts(db)


def _write_at_close(db: sqlite3.Connection, work: Callable[[], object], failed: str,
                    also: tuple[type[Exception], ...] = ()) -> bool:
    """Run `work` in a write transaction of its own as the store closes; False, logged as
    `failed`, when it (or an error of the types `also`) failed: what it would have written is
    left for later, never half written."""
    errors: tuple[type[Exception], ...] = (sqlite3.Error, *also)
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            work()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    except errors as exc:
        log.warning("%s: %s", failed, exc)
        return False
    return True


def _record_seen(db: sqlite3.Connection, batch: Batch) -> Batch:
    """Record the batch's span ids; return the batch minus spans accounted before."""
    if not batch.keys:
        return batch
    keys = batch.keys
    packed = b"".join(keys)
    if len(packed) != KEY_BYTES * len(keys):  # the mapping makes every key this wide
        raise ValueError(f"span keys must be {KEY_BYTES} bytes")
    # Accounted-before ids are rare (a retry after a crash or a lost answer): look for them
    # only when the insert did not add every id, and then redo it without them.
    db.execute("SAVEPOINT seen")
    before = db.total_changes
    db.execute(INSERT_SEEN, (packed, len(keys)))
    if db.total_changes - before == len(keys):
        db.execute("RELEASE seen")
        return batch
    db.execute("ROLLBACK TO seen")
    db.execute("RELEASE seen")
    rows = db.execute(ACCOUNTED_BEFORE, (packed, len(keys))).fetchall()
    rest = batch.without({bytes(r[0]) for r in rows})
    if rest.keys:
        db.execute(INSERT_SEEN, (b"".join(rest.keys), len(rest.keys)))
    return rest


SERIES_CHUNK = 500


def _with_cumulative(db: sqlite3.Connection, applied: Batch,
                     points: list[CumulativePoint]) -> Batch:
    """The batch plus the usage of its cumulative metric points (collector.store.base.
    resolve_cumulative), against the series as stored, in this transaction, so a restart or
    another collector on this file neither loses nor doubles any of it."""
    series = sorted({p.series for p in points})
    stored: dict[bytes, tuple[int, int, float]] = {}
    for i in range(0, len(series), SERIES_CHUNK):
        chunk = series[i:i + SERIES_CHUNK]
        marks = ",".join("?" * len(chunk))
        for key, start, time_ns, value in db.execute(
                "SELECT series, start_ns, time_ns, value FROM collector_metric_series "
                f"WHERE series IN ({marks})", chunk):
            stored[bytes(key)] = (int(start), int(time_ns), float(value))
    combined, updated = resolve_cumulative(applied, points, stored)
    db.executemany(UPSERT_SERIES, ((k, *v) for k, v in updated.items()))
    return combined


def _held_count(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT value FROM collector_meta WHERE name = ?", (HELD_COUNT,)).fetchone()
    return 0 if row is None else int(row[0])


# The trace ids of a packed blob that have held usage: one statement, like the span ids.
_HELD_TRACES = (
    "WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n + 1 < ?2) "
    f"SELECT DISTINCT t FROM (SELECT substr(?1, n * {TRACE_ID_BYTES} + 1, {TRACE_ID_BYTES}) "
    f"AS t FROM i) WHERE EXISTS (SELECT 1 FROM {HELD_TABLE} h WHERE h.trace_id = t)")
INSERT_LINK = f"""
INSERT INTO {LINKS_TABLE} (trace_id, span_id, parent_id, session_id, seen_ns)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (trace_id, span_id) DO UPDATE SET
    parent_id = CASE WHEN excluded.parent_id != x'' THEN excluded.parent_id ELSE parent_id END,
    session_id = coalesce(session_id, excluded.session_id), seen_ns = excluded.seen_ns
"""
ADD_HELD_COUNT = ("INSERT INTO collector_meta (name, value) VALUES (?1, ?2) ON CONFLICT (name) "
                  "DO UPDATE SET value = value + ?2 RETURNING value")


class _TraceOps:
    """collector.store.base.TraceOps on the writer connection. One writer at a time holds the
    file (BEGIN IMMEDIATE), so locking traces is nothing more."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def held_count(self) -> int:
        return _held_count(self._db)

    def traces_with_held(self, trace_ids: list[bytes]) -> set[bytes]:
        if not trace_ids:
            return set()
        return {bytes(r[0]) for r in self._db.execute(
            _HELD_TRACES, (b"".join(trace_ids), len(trace_ids)))}

    def expired_traces(self, held_before_ns: int) -> set[bytes]:
        return {bytes(r[0]) for r in self._db.execute(
            f"SELECT DISTINCT trace_id FROM {HELD_TABLE} WHERE held_ns <= ?",
            (held_before_ns,))}

    def lock_traces(self, trace_ids: list[bytes]) -> None:
        """The write transaction already excludes every other writer."""

    def insert_held(self, rows: list[HeldRow]) -> None:
        self._db.executemany(f"INSERT INTO {HELD_TABLE} (key, trace_id, span_id, parent_id, "
                             "held_ns, usage) VALUES (?, ?, ?, ?, ?, ?)", rows)

    def upsert_links(self, rows: list[LinkRow]) -> None:
        self._db.executemany(INSERT_LINK, rows)

    def read_traces(self, trace_ids: list[bytes], links_seen_since_ns: int
                    ) -> tuple[list[tuple[bytes, HeldRow]], list[LinkRow]]:
        held: list[tuple[bytes, HeldRow]] = []
        links: list[LinkRow] = []
        for trace_id in trace_ids:
            held.extend((trace_id, (bytes(k), trace_id, bytes(s), bytes(p), int(t), str(u)))
                        for k, s, p, t, u in self._db.execute(
                            f"SELECT key, span_id, parent_id, held_ns, usage FROM {HELD_TABLE} "
                            "WHERE trace_id = ?", (trace_id,)))
            links.extend((trace_id, bytes(s), bytes(p), None if n is None else str(n), int(t))
                         for s, p, n, t in self._db.execute(
                             f"SELECT span_id, parent_id, session_id, seen_ns FROM {LINKS_TABLE} "
                             "WHERE trace_id = ? AND seen_ns >= ?",
                             (trace_id, links_seen_since_ns)))
        return held, links

    def delete_held(self, keys: list[bytes]) -> set[bytes]:
        deleted: set[bytes] = set()
        for key in keys:
            if self._db.execute(f"DELETE FROM {HELD_TABLE} WHERE key = ?", (key,)).rowcount:
                deleted.add(key)
        return deleted

    def read_turns(self, trace_ids: list[bytes]) -> list[TurnRow]:
        rows: list[TurnRow] = []
        for trace_id in trace_ids:
            rows.extend((trace_id, str(n), int(b), int(t)) for n, b, t in self._db.execute(
                f"SELECT session_id, state, seen_ns FROM {TURNS_TABLE} WHERE trace_id = ?",
                (trace_id,)))
        return rows

    def upsert_turns(self, rows: list[TurnRow]) -> None:
        self._db.executemany(
            f"INSERT INTO {TURNS_TABLE} (trace_id, session_id, state, seen_ns) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (trace_id, session_id) DO UPDATE SET "
            "state = excluded.state, seen_ns = excluded.seen_ns", rows)


def _with_traces(db: sqlite3.Connection, applied: Batch, now_ns: int,
                 window_ns: int, retention_ns: int) -> tuple[Batch, Traced]:
    """collector.store.base.hold_and_resolve in this transaction, then forget old links and
    turn states and write the held count."""
    combined, traced = hold_and_resolve(_TraceOps(db), applied, now_ns, window_ns)
    db.execute(f"DELETE FROM {LINKS_TABLE} WHERE seen_ns < ?",
               (links_kept_since(now_ns, window_ns),))
    db.execute(f"DELETE FROM {TURNS_TABLE} WHERE seen_ns < ?",
               (turns_kept_since(now_ns, retention_ns),))
    row = db.execute(ADD_HELD_COUNT, (HELD_COUNT, traced.held_delta)).fetchone()
    traced.held_now = int(row[0])
    return combined, traced


BUDGET_SCHEMA = """
CREATE TABLE IF NOT EXISTS collector_budget_spend (
    budget TEXT NOT NULL,
    scope_value TEXT NOT NULL,
    period_start_ns INTEGER NOT NULL,
    spend_cents REAL NOT NULL DEFAULT 0.0,
    PRIMARY KEY (budget, scope_value, period_start_ns)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_budget_alerts (
    budget TEXT NOT NULL,
    scope_value TEXT NOT NULL,
    period_start_ns INTEGER NOT NULL,
    threshold REAL NOT NULL,
    PRIMARY KEY (budget, scope_value, period_start_ns, threshold)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_alert_outbox (
    id TEXT PRIMARY KEY,
    sink TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ns INTEGER NOT NULL DEFAULT 0,
    claimed_until_ns INTEGER NOT NULL DEFAULT 0,
    delivered_ns INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collector_budget_journal (
    id TEXT PRIMARY KEY,
    created_ns INTEGER NOT NULL,
    sums TEXT NOT NULL
) WITHOUT ROWID
"""


def scope_values(db: sqlite3.Connection, dimensions: Sequence[str],
                 session_ids: Sequence[str]) -> dict[tuple[str, str], str | None]:
    """collector.store.budgets.BudgetOps.scope_values on SQLite: one statement, the ids as
    one JSON array (no limit on bound parameters to chunk around)."""
    values = ", ".join(dimension_sql(d, "j.value") for d in dimensions)
    sql = f"SELECT j.value, {values} FROM json_each(?) AS j"
    return scope_rows(dimensions, db.execute(sql, (json.dumps(list(session_ids)),)))


class _BudgetOps:
    """collector.store.budgets.BudgetOps in a flush transaction on SQLite."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return self._db.execute(sql, params).fetchall()

    def scope_values(self, dimensions: Sequence[str], session_ids: Sequence[str]
                     ) -> dict[tuple[str, str], str | None]:
        return scope_values(self._db, dimensions, session_ids)

    def lock_fold(self) -> None:
        """One writer at a time already: the flush holds the file's write lock."""


class _OutboxConnection:
    """collector.store.budgets.OutboxConnection on the SQLite file: autocommit, and used
    from whichever worker thread the delivery task's call lands on (one call at a time)."""

    def __init__(self, path: Path) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite at {path}: {exc}") from exc
        self._path = path

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite at {self._path}: {exc}") from exc

    def close(self) -> None:
        self._db.close()


def open_outbox(path: Path) -> Outbox:
    """The alert outbox in this file, for collector.budgets.delivery."""
    return Outbox(lambda: _OutboxConnection(path), skip_locked=False,
                  description=f"sqlite {path}")


def _read_seen_counts(db: sqlite3.Connection) -> tuple[int, int]:
    rows: dict[str, int] = {str(r[0]): int(r[1]) for r in db.execute(
        "SELECT name, value FROM collector_meta WHERE name IN (?, ?)",
        (SEEN_CURRENT_COUNT, SEEN_PREVIOUS_COUNT)).fetchall()}
    return int(rows[SEEN_CURRENT_COUNT]), int(rows[SEEN_PREVIOUS_COUNT])


def read_sessions(path: Path, *, status: str | None = None,
                  limit: int | None = None) -> list[dict[str, Any]]:
    """Rows for readers, newest activity first. Opens its own connection; never writes."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.row_factory = sqlite3.Row
        sql = f"SELECT {', '.join(COLUMN_NAMES)} FROM agent_sessions"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        sql += " ORDER BY last_active_at DESC, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [dict(row) for row in conn.execute(sql, params)]
    finally:
        conn.close()


def read_usage(path: Path, *, group: str, lo: str | None = None,
               hi: str | None = None) -> list[tuple[Any, ...]]:
    """Rollup sums per (group, model) for hours in [lo, hi), ordered by (group, model); the
    rows of collector.report.

    `group` is "hour", "session", "agent", "user" or "host". Opens its own read-only
    connection; never writes.
    """
    column, join, params_ = usage_group(group, "?")
    where: list[str] = []
    params: list[Any] = list(params_)
    if lo is not None:
        where.append("hour >= ?")
        params.append(lo)
    if hi is not None:
        where.append("hour < ?")
        params.append(hi)
    sql = (f"SELECT {column} AS g, model, max(hour), sum(turns), sum(prompt_tokens), "
           "sum(completion_tokens), sum(reasoning_tokens), sum(cache_read_tokens), "
           f"sum(cache_write_tokens), sum(cost_cents) FROM {HOURLY_TABLE} AS h" + join)
    if where:
        sql += " WHERE " + " AND ".join(where)
    # The order is the grouping's (free in SQLite) and is promised: a session report folds
    # each session's rows as they come, adding its models' costs in the same order each time.
    sql += " GROUP BY g, model ORDER BY g, model"
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def count_sessions_by_status(path: Path) -> dict[str, int]:
    """Sessions per status (read from the status index alone). Read-only connection."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        rows = conn.execute("SELECT status, count(*) FROM agent_sessions GROUP BY status")
        return {str(status): int(count) for status, count in rows}
    finally:
        conn.close()


class SQLiteReader:
    """collector.store.base.Reader over a SQLite file: a read-only connection per call, so a
    reader never holds the file open between calls or blocks the writer (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def description(self) -> str:
        return f"sqlite {self.path}"

    def missing(self) -> str | None:
        if self.path.exists():
            return None
        return f"no database at {self.path} (has the daemon run?)"

    def read_sessions(self, *, status: str | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        return _reading(self.path, read_sessions, self.path, status=status, limit=limit)

    def read_usage(self, *, group: str, lo: str | None = None,
                   hi: str | None = None) -> list[tuple[Any, ...]]:
        return _reading(self.path, read_usage, self.path, group=group, lo=lo, hi=hi)

    def count_sessions_by_status(self) -> dict[str, int]:
        return _reading(self.path, count_sessions_by_status, self.path)

    def read_budgets(self, periods: Sequence[tuple[str, int]]) -> BudgetRows:
        rows: BudgetRows = _reading(self.path, self._budget_query, read_budget_rows,
                                    periods, "?")
        return rows

    def count_alerts_pending(self) -> int:
        rows = _reading(self.path, self._budget_query,
                        lambda execute, journal: list(execute(ALERTS_PENDING_SQL, [])))
        return int(rows[0][0]) if rows else 0

    def _budget_query(self, read: Callable[..., _T], *args: Any) -> _T:
        """`read(execute, *args, journal=...)` on one read-only connection, in one read
        transaction (one snapshot). A database whose daemon never had budgets has no budget
        tables: that reads as nothing spent, not an error; one from before the journal has
        no journal table."""
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("BEGIN")
            tables = {str(r[0]) for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name IN (?, ?)",
                (SPEND_TABLE, JOURNAL_TABLE))}
            if SPEND_TABLE not in tables:
                return read(lambda sql, params: [], *args, journal=False)
            return read(lambda sql, params: conn.execute(sql, params).fetchall(), *args,
                        journal=JOURNAL_TABLE in tables)
        finally:
            conn.close()

    def close(self) -> None:
        """Nothing is held between calls."""


def _reading(path: Path, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    try:
        return fn(*args, **kwargs)
    except sqlite3.Error as exc:
        hint = (" (start this version of the daemon once to create the hourly rollup)"
                if "no such table" in str(exc) else "")
        raise StorageError(f"cannot read {path}: {exc}{hint}") from exc
