"""PostgreSQL storage: several collectors on one database, each one transaction per flush.

Driver: psycopg 3 (synchronous, its binary build), on one writer thread per collector, like
the SQLite store. A flush is then one hand-off between the event loop and that thread, and the
wire protocol is parsed in C while the thread waits on the network without the GIL. asyncpg
would run its protocol on the event loop, which is the collector's bottleneck (mapping spans),
and would split a flush into one await per statement, the shape that made the SQLite flush
4x slower under load before the store got its own thread. psycopg also parses the connection
URL with libpq itself, so `postgres_url`, PGPASSWORD and .pgpass mean what they mean to psql.

What keeps the guarantees with several collectors on one database:

* **Exactly once.** Span ids go into ``collector_seen_current`` with ``ON CONFLICT DO
  NOTHING RETURNING``: of two collectors inserting one id, the second waits for the first's
  transaction and then finds the id, so exactly one accounts the span (the other's batch is
  re-folded without it, as after a retry).
* **No lost update.** A flush first inserts its new sessions and locks its existing ones in
  one statement, in id order (``ON CONFLICT DO UPDATE ... WHERE false`` locks without
  writing); then it computes the merged rows from the stored row and marks, which nobody else
  can change while it holds the lock. Marks and rollup rows of a session are written only by
  the holder of its session row.
* **No deadlock.** Every flush takes its rows in one order: span ids ascending, sessions by
  id, marks by id, rollup by key, then the one counter row. The stale sweep runs as its own
  transaction, locking by id. Deadlocks and serialization failures are retried all the same.
* **Cheap expiry.** Two generations of span ids, rotated by ``DROP TABLE``/``RENAME``. Flushes
  hold a shared advisory lock (in memory, no row writes) that rotation takes exclusively, so a
  rotation never runs beside a flush that read the old generation.
* **Bounded answers.** A flush without an answer within `commit_timeout_s` is abandoned: its
  socket is shut down, which ends the blocked call, and the pipeline answers retryably. If the
  server committed it after all, the retry finds its span ids and counts nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import conninfo, errors

from collector.accounting.aggregate import Batch
from collector.budgets.spend import SpendPlanner
from collector.config.budgets import AlertSink, Budget
from collector.signals.metrics import CumulativePoint
from collector.signals.traces import KEY_BYTES
from collector.store.base import (
    ALERTS_PENDING_SQL,
    ALERTS_TABLE,
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
    OUTBOX_TABLE,
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
    read_budget_rows,
    resolve_cumulative,
    schema_problem,
    turns_kept_since,
    usage_group,
)
from collector.store.budgets import (
    Outbox,
    dimension_sql,
    fold_budgets,
    record_budgets,
    scope_rows,
)
from collector.store.tags import TagMemo, TagPlan

log = logging.getLogger(__name__)
_T = TypeVar("_T")

APPLICATION_NAME = "agent-usage-collector"
# Every connection talks UTF-8, whatever the database's default client encoding. With a
# SQL_ASCII database (what `initdb --locale=C` makes without -E) the default would be SQL_ASCII,
# for which psycopg returns text as bytes: the collector then failed at start
# (KeyError: 'seen_current_count'). The server checks what clients send against this encoding
# and, for SQL_ASCII, stores those bytes unchanged, so agent text round-trips.
CLIENT_ENCODING = "UTF8"
# Database encodings that can hold any agent's text. SQL_ASCII stores bytes as sent (UTF-8,
# as every collector sends them); any other (LATIN1, WIN1252, EUC_JP, ...) would refuse some
# characters at commit time, retrying the same batch for ever, so it is refused at start.
USABLE_ENCODINGS = ("UTF8", "SQL_ASCII")
# Advisory lock keys (per database): creating the schema, and the span-id generation (flushes
# share it, a rotation takes it alone).
SCHEMA_LOCK = 0x636F_6C6C_0001
GENERATION_LOCK = 0x636F_6C6C_0002
FOLD_LOCK = 0x636F_6C6C_0003  # one collector folds the budget journal at a time
# A deadlock or serialization failure rolls the flush back whole; it is tried again at once
# this many times in all before the pipeline hears of it (and retries after its backoff).
TRANSACTION_ATTEMPTS = 3

# agent_sessions' columns with PostgreSQL's types: SQLite's INTEGER and REAL are 64-bit.
PG_TYPES = {"INTEGER": "BIGINT", "REAL": "DOUBLE PRECISION"}
PG_COLUMNS = tuple((name, PG_TYPES.get(kind, kind)) for name, kind in COLUMNS)

# Text keys and times are COLLATE "C": byte order, as in SQLite, so reports list sessions in
# the same order on both backends and lock order does not depend on the server's locale.
SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_sessions (
    id TEXT COLLATE "C" PRIMARY KEY,
    kind TEXT NOT NULL DEFAULT 'interactive',
    status TEXT NOT NULL DEFAULT 'active',
    channel TEXT NOT NULL DEFAULT 'cli',
    model TEXT NOT NULL DEFAULT '',
    created_at TEXT COLLATE "C" NOT NULL,
    last_active_at TEXT COLLATE "C" NOT NULL,
    turns BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cost_cents DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    goal_text TEXT
);
CREATE INDEX IF NOT EXISTS agent_sessions_status ON agent_sessions (status);
CREATE INDEX IF NOT EXISTS agent_sessions_last_active_at ON agent_sessions (last_active_at);
CREATE TABLE IF NOT EXISTS collector_session_marks (
    id TEXT COLLATE "C" PRIMARY KEY,
    model_ns BIGINT NOT NULL DEFAULT -1,
    kind_ns BIGINT NOT NULL DEFAULT -1,
    status_ns BIGINT NOT NULL DEFAULT -1,
    channel_ns BIGINT NOT NULL DEFAULT -1,
    goal_ns BIGINT NOT NULL DEFAULT -1
);
CREATE TABLE IF NOT EXISTS collector_seen_current (key BYTEA PRIMARY KEY);
CREATE TABLE IF NOT EXISTS collector_seen_previous (key BYTEA PRIMARY KEY);
CREATE TABLE IF NOT EXISTS collector_meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS collector_usage_hourly (
    hour TEXT COLLATE "C" NOT NULL,
    session_id TEXT COLLATE "C" NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    turns BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    cost_cents DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    PRIMARY KEY (hour, model, session_id)
);
CREATE TABLE IF NOT EXISTS collector_session_labels (
    id TEXT COLLATE "C" PRIMARY KEY,
    agent TEXT,
    agent_ns BIGINT NOT NULL DEFAULT -1,
    agent_version TEXT,
    agent_version_ns BIGINT NOT NULL DEFAULT -1,
    user_name TEXT,
    user_ns BIGINT NOT NULL DEFAULT -1,
    host TEXT,
    host_ns BIGINT NOT NULL DEFAULT -1,
    credential TEXT,
    credential_ns BIGINT NOT NULL DEFAULT -1
);
-- Label columns added since the table was first made (IF NOT EXISTS: once per database).
ALTER TABLE collector_session_labels ADD COLUMN IF NOT EXISTS credential TEXT;
ALTER TABLE collector_session_labels
    ADD COLUMN IF NOT EXISTS credential_ns BIGINT NOT NULL DEFAULT -1;
CREATE INDEX IF NOT EXISTS collector_session_labels_agent ON collector_session_labels (agent);
CREATE TABLE IF NOT EXISTS collector_session_dimensions (
    session_id TEXT COLLATE "C" NOT NULL,
    dimension TEXT COLLATE "C" NOT NULL,
    value TEXT NOT NULL,
    value_ns BIGINT NOT NULL,
    PRIMARY KEY (session_id, dimension)
);
CREATE INDEX IF NOT EXISTS collector_session_dimensions_value
    ON collector_session_dimensions (dimension, value);
CREATE INDEX IF NOT EXISTS collector_session_labels_user ON collector_session_labels (user_name);
CREATE INDEX IF NOT EXISTS collector_session_labels_host ON collector_session_labels (host);
CREATE INDEX IF NOT EXISTS collector_usage_hourly_session
    ON collector_usage_hourly (session_id, hour);
-- The fleet view's sort orders, each with the id as tiebreak (as in the SQLite store).
CREATE INDEX IF NOT EXISTS agent_sessions_created_at ON agent_sessions (created_at, id);
CREATE INDEX IF NOT EXISTS agent_sessions_cost ON agent_sessions (cost_cents, id);
CREATE INDEX IF NOT EXISTS agent_sessions_turns ON agent_sessions (turns, id);
CREATE INDEX IF NOT EXISTS agent_sessions_tokens
    ON agent_sessions ((prompt_tokens + completion_tokens), id);
CREATE INDEX IF NOT EXISTS agent_sessions_model ON agent_sessions (model);
CREATE TABLE IF NOT EXISTS collector_usage_daily (
    day TEXT COLLATE "C" NOT NULL,
    model TEXT COLLATE "C" NOT NULL,
    agent TEXT COLLATE "C" NOT NULL,
    turns BIGINT NOT NULL DEFAULT 0,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    reasoning_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    cost_cents DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    PRIMARY KEY (day, model, agent)
);
CREATE TABLE IF NOT EXISTS collector_metric_series (
    series BYTEA PRIMARY KEY,
    start_ns BIGINT NOT NULL,
    time_ns BIGINT NOT NULL,
    value DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS collector_held_usage (
    key BYTEA PRIMARY KEY,
    trace_id BYTEA NOT NULL,
    span_id BYTEA NOT NULL,
    parent_id BYTEA NOT NULL,
    held_ns BIGINT NOT NULL,
    usage TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS collector_held_usage_trace ON collector_held_usage (trace_id);
CREATE INDEX IF NOT EXISTS collector_held_usage_time ON collector_held_usage (held_ns);
CREATE TABLE IF NOT EXISTS collector_trace_links (
    trace_id BYTEA NOT NULL,
    span_id BYTEA NOT NULL,
    parent_id BYTEA NOT NULL,
    session_id TEXT,
    seen_ns BIGINT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE INDEX IF NOT EXISTS collector_trace_links_time ON collector_trace_links (seen_ns);
CREATE TABLE IF NOT EXISTS collector_trace_turns (
    trace_id BYTEA NOT NULL,
    session_id TEXT NOT NULL,
    state INTEGER NOT NULL,
    seen_ns BIGINT NOT NULL,
    PRIMARY KEY (trace_id, session_id)
);
CREATE INDEX IF NOT EXISTS collector_trace_turns_time ON collector_trace_turns (seen_ns);
INSERT INTO collector_meta (name, value) VALUES ('seen_current_count', 0),
    ('seen_previous_count', 0) ON CONFLICT (name) DO NOTHING;
INSERT INTO collector_meta (name, value)
    SELECT 'held_count', count(*) FROM collector_held_usage ON CONFLICT (name) DO NOTHING
"""

# Made only when budgets are configured (collector.store.budgets); the SQLite store's tables
# with PostgreSQL's types.
BUDGET_SCHEMA = """
CREATE TABLE IF NOT EXISTS collector_budget_spend (
    budget TEXT COLLATE "C" NOT NULL,
    scope_value TEXT COLLATE "C" NOT NULL,
    period_start_ns BIGINT NOT NULL,
    spend_cents DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    PRIMARY KEY (budget, scope_value, period_start_ns)
);
CREATE TABLE IF NOT EXISTS collector_budget_alerts (
    budget TEXT COLLATE "C" NOT NULL,
    scope_value TEXT COLLATE "C" NOT NULL,
    period_start_ns BIGINT NOT NULL,
    threshold DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (budget, scope_value, period_start_ns, threshold)
);
CREATE TABLE IF NOT EXISTS collector_alert_outbox (
    id TEXT COLLATE "C" PRIMARY KEY,
    sink TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_ns BIGINT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ns BIGINT NOT NULL DEFAULT 0,
    claimed_until_ns BIGINT NOT NULL DEFAULT 0,
    delivered_ns BIGINT
);
CREATE TABLE IF NOT EXISTS collector_budget_journal (
    id TEXT COLLATE "C" PRIMARY KEY,
    created_ns BIGINT NOT NULL,
    sums TEXT NOT NULL
)
"""

# -- the daily table -------------------------------------------------------------------------
# collector_usage_daily is kept equal to the rollup grouped by each session's current agent by
# triggers, as in the SQLite store, so every statement writing the rollup or the labels (a
# flush, held usage resolved, migrate-sqlite) keeps it in step in its own transaction. Two
# differences from SQLite's, for several collectors writing at once:
# * the rollup's triggers are per statement (transition tables), and add the statement's rows
#   grouped per daily row, in key order: concurrent flushes lock shared daily rows (one per
#   day, model and agent, met by every flush) in one order, so they queue instead of
#   deadlocking as per-row triggers in each flush's own row order would;
# * the agent read for a rollup row is the one committed or written by this transaction: a
#   flush holds its sessions' rows (agent_sessions, step 1) before it writes labels or rollup,
#   so no other transaction changes the agent of a session whose rollup this one adds to.


def _add_daily(select: str) -> str:
    """An upsert adding `select`'s rows (day, model, agent, then the sums) to the daily table,
    in key order."""
    return (f"INSERT INTO {DAILY_TABLE} AS d (day, model, agent, {', '.join(DAILY_SUMS)}) "
            f"{select} ORDER BY 1, 2, 3 ON CONFLICT (day, model, agent) DO UPDATE SET "
            + ", ".join(f"{c} = d.{c} + excluded.{c}" for c in DAILY_SUMS))


def _grouped(rows: str) -> str:
    """`rows` (hour, session_id, model and the sums, signed) summed per daily row."""
    return ("SELECT substr(r.hour, 1, 10), r.model, coalesce(l.agent, ''), "
            + ", ".join(f"sum(r.{c})" for c in DAILY_SUMS)
            + f" FROM ({rows}) AS r LEFT JOIN {LABELS_TABLE} AS l ON l.id = r.session_id "
            "GROUP BY 1, 2, 3")


def _signed(table: str, sign: str) -> str:
    return ("SELECT hour, session_id, model, "
            + ", ".join(f"{sign}{c} AS {c}" for c in DAILY_SUMS) + f" FROM {table}")


def _move_session(session: str, old_agent: str, new_agent: str) -> str:
    """Statements moving a session's rollup from one agent's daily rows to another's, then
    dropping the rows left empty (their cost may keep float noise of ~1e-15 cents)."""
    source = (f"FROM {HOURLY_TABLE} WHERE session_id = {session} "
              "GROUP BY substr(hour, 1, 10), model")
    empty = " AND ".join(f"{c} = 0" for c in DAILY_SUMS[:-1])

    def sums(sign: str) -> str:
        return ", ".join(f"{sign}sum({c})" for c in DAILY_SUMS)

    return (
        _add_daily(f"SELECT substr(hour, 1, 10), model, {old_agent}, {sums('-')} {source}")
        + ";\n" + _add_daily(f"SELECT substr(hour, 1, 10), model, {new_agent}, {sums('')} "
                             f"{source}") + ";\n"
        + f"DELETE FROM {DAILY_TABLE} WHERE agent = {old_agent} AND day >= coalesce(("
          f"SELECT substr(min(hour), 1, 10) FROM {HOURLY_TABLE} WHERE session_id = {session}"
          f"), '9') AND {empty} AND abs(cost_cents) < 1e-6;")


def _function(name: str, body: str) -> str:
    return (f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$\n"
            f"BEGIN\n{body}\nRETURN NULL;\nEND\n$$")


DAILY_FUNCTIONS = (
    _function("collector_daily_hourly_insert",
              _add_daily(_grouped(_signed("new_rows", ""))) + ";"),
    _function("collector_daily_hourly_update",
              _add_daily(_grouped(_signed("new_rows", "") + " UNION ALL "
                                  + _signed("old_rows", "-"))) + ";"),
    _function("collector_daily_hourly_delete",
              _add_daily(_grouped(_signed("old_rows", "-"))) + ";"),
    _function("collector_daily_agent_insert", _move_session("new.id", "''", "new.agent")),
    _function("collector_daily_agent_update",
              _move_session("old.id", "coalesce(old.agent, '')", "''") + "\n"
              + _move_session("new.id", "''", "coalesce(new.agent, '')")),
    _function("collector_daily_agent_delete", _move_session("old.id", "old.agent", "''")),
)
# (name, the CREATE TRIGGER statement); created once, with the table's backfill.
DAILY_TRIGGERS = (
    ("collector_daily_hourly_insert",
     f"CREATE TRIGGER collector_daily_hourly_insert AFTER INSERT ON {HOURLY_TABLE} "
     "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
     "EXECUTE FUNCTION collector_daily_hourly_insert()"),
    ("collector_daily_hourly_update",
     f"CREATE TRIGGER collector_daily_hourly_update AFTER UPDATE ON {HOURLY_TABLE} "
     "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT "
     "EXECUTE FUNCTION collector_daily_hourly_update()"),
    ("collector_daily_hourly_delete",
     f"CREATE TRIGGER collector_daily_hourly_delete AFTER DELETE ON {HOURLY_TABLE} "
     "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT "
     "EXECUTE FUNCTION collector_daily_hourly_delete()"),
    ("collector_daily_agent_insert",
     f"CREATE TRIGGER collector_daily_agent_insert AFTER INSERT ON {LABELS_TABLE} "
     "FOR EACH ROW WHEN (coalesce(new.agent, '') <> '') "
     "EXECUTE FUNCTION collector_daily_agent_insert()"),
    ("collector_daily_agent_update",
     f"CREATE TRIGGER collector_daily_agent_update AFTER UPDATE OF id, agent ON {LABELS_TABLE} "
     "FOR EACH ROW WHEN (coalesce(old.agent, '') <> coalesce(new.agent, '') "
     "OR old.id <> new.id) EXECUTE FUNCTION collector_daily_agent_update()"),
    ("collector_daily_agent_delete",
     f"CREATE TRIGGER collector_daily_agent_delete AFTER DELETE ON {LABELS_TABLE} "
     "FOR EACH ROW WHEN (coalesce(old.agent, '') <> '') "
     "EXECUTE FUNCTION collector_daily_agent_delete()"),
)
# A database written before the daily table existed: filled once from the rollup.
BACKFILL_DAILY = _add_daily(_grouped(_signed(HOURLY_TABLE, "")))


TABLE_COLUMNS = """
SELECT column_name, upper(data_type) FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = 'agent_sessions'
ORDER BY ordinal_position
"""


def _unnest(columns: Sequence[tuple[str, str]]) -> str:
    """Rows arrive as one array per column (sent in binary), zipped back by unnest: one
    statement per table and flush, whatever the number of rows."""
    arrays = ", ".join(f"%s::{kind}[]" for _, kind in columns)
    names = ", ".join(name for name, _ in columns)
    return f"unnest({arrays}) AS b({names})"


SESSION_ARGS = (("id", "text"), ("kind", "text"), ("kind_ns", "bigint"), ("status", "text"),
                ("status_ns", "bigint"), ("channel", "text"), ("channel_ns", "bigint"),
                ("model", "text"), ("model_ns", "bigint"), ("created_at", "text"),
                ("last_active_at", "text"), ("turns", "bigint"), ("prompt_tokens", "bigint"),
                ("completion_tokens", "bigint"), ("reasoning_tokens", "bigint"),
                ("cost_cents", "float8"), ("goal_text", "text"), ("goal_text_ns", "bigint"))
MARK_ARGS = (("id", "text"), ("model_ns", "bigint"), ("kind_ns", "bigint"),
             ("status_ns", "bigint"), ("channel_ns", "bigint"), ("goal_ns", "bigint"))
LABEL_ARGS = (("id", "text"), ("agent", "text"), ("agent_ns", "bigint"),
              ("agent_version", "text"), ("agent_version_ns", "bigint"), ("user_name", "text"),
              ("user_ns", "bigint"), ("host", "text"), ("host_ns", "bigint"),
              ("credential", "text"), ("credential_ns", "bigint"))
DIMENSION_ARGS = (("session_id", "text"), ("dimension", "text"), ("value", "text"),
                  ("value_ns", "bigint"))
HOUR_ARGS = (("hour", "text"), ("session_id", "text"), ("model", "text"), ("turns", "bigint"),
             ("prompt_tokens", "bigint"), ("completion_tokens", "bigint"),
             ("reasoning_tokens", "bigint"), ("cache_read_tokens", "bigint"),
             ("cache_write_tokens", "bigint"), ("cost_cents", "float8"))

# Step 1: new sessions go in as they are; existing ones are only locked (the WHERE false
# update locks the conflicting row without writing it). Rows in id order: no deadlock.
# RETURNING lists the inserted ids only.
INSERT_NEW_SESSIONS = f"""
INSERT INTO agent_sessions AS s (id, kind, status, channel, model, created_at, last_active_at,
    turns, prompt_tokens, completion_tokens, reasoning_tokens, cost_cents, goal_text)
SELECT b.id, coalesce(b.kind, 'interactive'), coalesce(b.status, 'active'),
    coalesce(b.channel, 'cli'), coalesce(b.model, ''), b.created_at, b.last_active_at, b.turns,
    b.prompt_tokens, b.completion_tokens, b.reasoning_tokens, b.cost_cents, b.goal_text
FROM {_unnest(SESSION_ARGS)}
ORDER BY b.id COLLATE "C"
ON CONFLICT (id) DO UPDATE SET id = excluded.id WHERE false
RETURNING s.id
"""


def _latest(column: str, mark: str | None = None) -> str:
    """The new value if a span at least as late as the stored one's set it, else the stored."""
    return (f"CASE WHEN b.{column} IS NOT NULL AND b.{column}_ns >= "
            f"coalesce(m.{mark or column + '_ns'}, -1) THEN b.{column} ELSE s.{column} END")


# Step 2: the sessions that existed, merged with the stored row and marks. Both are read after
# step 1 locked the rows, so they are the latest committed (READ COMMITTED: a fresh snapshot
# per statement) and cannot change before this transaction ends.
UPDATE_SESSIONS = f"""
UPDATE agent_sessions AS s SET
    kind = {_latest("kind")},
    status = CASE WHEN b.status IS NOT NULL AND b.status_ns >= coalesce(m.status_ns, -1)
            THEN b.status
        WHEN s.status = 'unknown' AND b.last_active_at > s.last_active_at THEN 'active'
        ELSE s.status END,
    channel = {_latest("channel")},
    model = {_latest("model")},
    created_at = least(s.created_at, b.created_at),
    last_active_at = greatest(s.last_active_at, b.last_active_at),
    turns = s.turns + b.turns,
    prompt_tokens = s.prompt_tokens + b.prompt_tokens,
    completion_tokens = s.completion_tokens + b.completion_tokens,
    reasoning_tokens = s.reasoning_tokens + b.reasoning_tokens,
    cost_cents = s.cost_cents + b.cost_cents,
    goal_text = {_latest("goal_text", mark="goal_ns")}
FROM {_unnest(SESSION_ARGS)}
LEFT JOIN collector_session_marks AS m ON m.id = b.id
WHERE s.id = b.id
"""

UPSERT_MARKS = f"""
INSERT INTO collector_session_marks AS m (id, model_ns, kind_ns, status_ns, channel_ns, goal_ns)
SELECT * FROM {_unnest(MARK_ARGS)} ORDER BY id COLLATE "C"
ON CONFLICT (id) DO UPDATE SET
    model_ns = greatest(m.model_ns, excluded.model_ns),
    kind_ns = greatest(m.kind_ns, excluded.kind_ns),
    status_ns = greatest(m.status_ns, excluded.status_ns),
    channel_ns = greatest(m.channel_ns, excluded.channel_ns),
    goal_ns = greatest(m.goal_ns, excluded.goal_ns)
"""

def _label(column: str, mark: str) -> str:
    return (f"{column} = CASE WHEN excluded.{column} IS NOT NULL AND excluded.{mark} >= l.{mark} "
            f"THEN excluded.{column} ELSE l.{column} END, "
            f"{mark} = greatest(l.{mark}, excluded.{mark})")


UPSERT_LABELS = f"""
INSERT INTO collector_session_labels AS l (id, agent, agent_ns, agent_version,
    agent_version_ns, user_name, user_ns, host, host_ns, credential, credential_ns)
SELECT * FROM {_unnest(LABEL_ARGS)} ORDER BY id COLLATE "C"
ON CONFLICT (id) DO UPDATE SET
    {_label("agent", "agent_ns")}, {_label("agent_version", "agent_version_ns")},
    {_label("user_name", "user_ns")}, {_label("host", "host_ns")},
    {_label("credential", "credential_ns")}
"""

# The latest value per (session, dimension), as for the labels; an unchanged value moves only
# its end time.
UPSERT_DIMENSIONS = f"""
INSERT INTO collector_session_dimensions AS d (session_id, dimension, value, value_ns)
SELECT * FROM {_unnest(DIMENSION_ARGS)} ORDER BY session_id COLLATE "C", dimension COLLATE "C"
ON CONFLICT (session_id, dimension) DO UPDATE SET
    value = excluded.value, value_ns = excluded.value_ns
WHERE excluded.value_ns >= d.value_ns
"""

# Adds to the stored row as it is when the insert meets it (ON CONFLICT reads the latest
# version), so two collectors adding to one hour both count. Usage from spans naming no model
# counts under the session's model as stored by this flush's session step (see the SQLite
# store for why); this flush holds the session's row, so that model cannot move meanwhile.
UPSERT_HOURLY = f"""
INSERT INTO collector_usage_hourly AS h (hour, session_id, model, turns, prompt_tokens,
    completion_tokens, reasoning_tokens, cache_read_tokens, cache_write_tokens, cost_cents)
SELECT hour, session_id, model, sum(turns), sum(prompt_tokens), sum(completion_tokens),
    sum(reasoning_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(cost_cents)
FROM (SELECT b.hour, b.session_id,
        CASE WHEN b.model <> '' THEN b.model ELSE coalesce(s.model, '') END AS model,
        b.turns, b.prompt_tokens, b.completion_tokens, b.reasoning_tokens,
        b.cache_read_tokens, b.cache_write_tokens, b.cost_cents
      FROM {_unnest(HOUR_ARGS)} LEFT JOIN agent_sessions AS s ON s.id = b.session_id) AS r
-- One row per key: usage without a model may join a row of the session's model.
GROUP BY hour, session_id, model
ORDER BY hour COLLATE "C", model COLLATE "C", session_id COLLATE "C"
ON CONFLICT (hour, model, session_id) DO UPDATE SET
    turns = h.turns + excluded.turns,
    prompt_tokens = h.prompt_tokens + excluded.prompt_tokens,
    completion_tokens = h.completion_tokens + excluded.completion_tokens,
    reasoning_tokens = h.reasoning_tokens + excluded.reasoning_tokens,
    cache_read_tokens = h.cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = h.cache_write_tokens + excluded.cache_write_tokens,
    cost_cents = h.cost_cents + excluded.cost_cents
"""

# One statement per entry of collector.store.base.BATCH_WRITES, run in that order; a tuple is
# run statement by statement (agent_sessions: insert-and-lock, then merge the others).
BATCH_STATEMENTS: dict[str, tuple[str, ...]] = {
    "agent_sessions": (INSERT_NEW_SESSIONS, UPDATE_SESSIONS),
    "collector_session_marks": (UPSERT_MARKS,),
    LABELS_TABLE: (UPSERT_LABELS,),
    DIMENSIONS_TABLE: (UPSERT_DIMENSIONS,),
    HOURLY_TABLE: (UPSERT_HOURLY,),
}
# What each statement's rows look like (for the column arrays).
BATCH_ARGS: dict[str, tuple[tuple[str, str], ...]] = {
    "agent_sessions": SESSION_ARGS,
    "collector_session_marks": MARK_ARGS,
    LABELS_TABLE: LABEL_ARGS,
    DIMENSIONS_TABLE: DIMENSION_ARGS,
    HOURLY_TABLE: HOUR_ARGS,
}

INSERT_SEEN = """
INSERT INTO collector_seen_current (key)
SELECT k FROM unnest(%s::bytea[]) AS k
WHERE NOT EXISTS (SELECT 1 FROM collector_seen_previous AS p WHERE p.key = k)
ORDER BY k
ON CONFLICT (key) DO NOTHING
RETURNING key
"""

# Its own transaction, locking in id order, so it cannot deadlock with flushes (which lock
# their sessions in id order too and hold nothing the sweep waits for afterwards).
SWEEP_STALE = """
UPDATE agent_sessions SET status = 'unknown'
WHERE id IN (SELECT id FROM agent_sessions WHERE status = 'active' AND last_active_at < %s
             ORDER BY id FOR UPDATE)
"""

# Cumulative metric series: first inserted (as absent: start -1) or locked, in key order, so
# that two collectors resolving one series take turns and the second sees the first's value.
LOCK_SERIES = """
INSERT INTO collector_metric_series AS m (series, start_ns, time_ns, value)
SELECT s, -1, -1, 0 FROM unnest(%s::bytea[]) AS s ORDER BY s
ON CONFLICT (series) DO UPDATE SET series = excluded.series WHERE false
"""
READ_SERIES = """
SELECT series, start_ns, time_ns, value FROM collector_metric_series WHERE series = ANY(%s)
"""
UPSERT_SERIES = """
INSERT INTO collector_metric_series AS m (series, start_ns, time_ns, value)
SELECT * FROM unnest(%s::bytea[], %s::bigint[], %s::bigint[], %s::float8[])
    AS b(series, start_ns, time_ns, value) ORDER BY series
ON CONFLICT (series) DO UPDATE SET
    start_ns = excluded.start_ns, time_ns = excluded.time_ns, value = excluded.value
"""

ADD_SEEN_COUNT = "UPDATE collector_meta SET value = value + %s WHERE name = %s RETURNING value"
READ_COUNT = "SELECT value FROM collector_meta WHERE name = %s"

# Usage without a session id (collector.store.base.hold_and_resolve): one statement per
# TraceOps method. Traces are taken with transaction advisory locks (in the two-key space, so
# they cannot meet SCHEMA_LOCK or GENERATION_LOCK), in ascending order, before any held row or
# link of theirs is written or read: two collectors holding, linking or resolving in one trace
# take turns, and the second reads what the first committed.
TRACE_LOCK_CLASS = 0x636F_6C6C  # 'coll'
LOCK_TRACES = "SELECT pg_advisory_xact_lock(%s::int4, k) FROM unnest(%s::int4[]) AS k"
TRACES_WITH_HELD = f"""
SELECT t FROM unnest(%s::bytea[]) AS t
WHERE EXISTS (SELECT 1 FROM {HELD_TABLE} AS h WHERE h.trace_id = t)
"""
EXPIRED_TRACES = f"SELECT DISTINCT trace_id FROM {HELD_TABLE} WHERE held_ns <= %s"
INSERT_HELD = f"""
INSERT INTO {HELD_TABLE} (key, trace_id, span_id, parent_id, held_ns, usage)
SELECT * FROM unnest(%s::bytea[], %s::bytea[], %s::bytea[], %s::bytea[], %s::bigint[],
    %s::text[]) AS b(key, trace_id, span_id, parent_id, held_ns, usage)
ORDER BY key
"""
UPSERT_LINKS = f"""
INSERT INTO {LINKS_TABLE} AS l (trace_id, span_id, parent_id, session_id, seen_ns)
SELECT * FROM unnest(%s::bytea[], %s::bytea[], %s::bytea[], %s::text[], %s::bigint[])
    AS b(trace_id, span_id, parent_id, session_id, seen_ns)
ORDER BY trace_id, span_id
ON CONFLICT (trace_id, span_id) DO UPDATE SET
    parent_id = CASE WHEN excluded.parent_id <> ''::bytea THEN excluded.parent_id
        ELSE l.parent_id END,
    session_id = coalesce(l.session_id, excluded.session_id), seen_ns = excluded.seen_ns
"""
READ_HELD = f"""
SELECT trace_id, key, span_id, parent_id, held_ns, usage FROM {HELD_TABLE}
WHERE trace_id = ANY(%s)
"""
READ_LINKS = f"""
SELECT trace_id, span_id, parent_id, session_id, seen_ns FROM {LINKS_TABLE}
WHERE trace_id = ANY(%s) AND seen_ns >= %s
"""
DELETE_HELD = f"DELETE FROM {HELD_TABLE} WHERE key = ANY(%s) RETURNING key"
# Housekeeping in the sweep's own transaction: links no flush reads any more (READ_LINKS
# filters by time, so when they go does not change any resolution). Rows a flush is
# refreshing are skipped, never waited for: the sweep then cannot deadlock with a flush.
EXPIRE_LINKS = f"""
DELETE FROM {LINKS_TABLE} WHERE ctid IN (
    SELECT ctid FROM {LINKS_TABLE} WHERE seen_ns < %s FOR UPDATE SKIP LOCKED)
"""
READ_TURNS = f"""
SELECT trace_id, session_id, state, seen_ns FROM {TURNS_TABLE} WHERE trace_id = ANY(%s)
"""
UPSERT_TURNS = f"""
INSERT INTO {TURNS_TABLE} (trace_id, session_id, state, seen_ns)
SELECT * FROM unnest(%s::bytea[], %s::text[], %s::int4[], %s::bigint[])
    AS b(trace_id, session_id, state, seen_ns)
ORDER BY trace_id, session_id
ON CONFLICT (trace_id, session_id) DO UPDATE SET
    state = excluded.state, seen_ns = excluded.seen_ns
"""
# As EXPIRE_LINKS, for turn states (READ_TURNS reads them whatever their age: a state goes
# only once its trace is taken to be over).
EXPIRE_TURNS = f"""
DELETE FROM {TURNS_TABLE} WHERE ctid IN (
    SELECT ctid FROM {TURNS_TABLE} WHERE seen_ns < %s FOR UPDATE SKIP LOCKED)
"""
READ_SEEN_COUNTS = "SELECT name, value FROM collector_meta WHERE name IN (%s, %s)"


def _columns(rows: Iterable[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column (empty lists when there are no rows)."""
    columns: list[list[Any]] = [[] for _ in range(width)]
    appends = [c.append for c in columns]
    for row in rows:
        for append, value in zip(appends, row, strict=True):
            append(value)
    return columns


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach the server; `password` None leaves it to PGPASSWORD / .pgpass (libpq)."""

    url: str
    password: str | None = None
    connect_timeout_s: int = 2

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        kwargs: dict[str, Any] = {"connect_timeout": self.connect_timeout_s,
                                  "application_name": APPLICATION_NAME,
                                  "client_encoding": CLIENT_ENCODING}
        if self.password is not None:
            kwargs["password"] = self.password
        try:
            return psycopg.connect(self.url, autocommit=autocommit, **kwargs)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL at {self.where}: "
                               f"{_message(exc)}") from exc

    @property
    def where(self) -> str:
        """host:port/dbname as libpq reads the URL (no password: the URL never holds one)."""
        try:
            parts = conninfo.conninfo_to_dict(self.url)
        except psycopg.Error:
            return "<unparsable url>"
        host = parts.get("host") or "localhost"
        port = parts.get("port") or "5432"
        return f"{host}:{port}/{parts.get('dbname') or parts.get('user') or ''}"


def _encoding_problem(conn: psycopg.Connection[Any]) -> str | None:
    """Why the database cannot hold every agent's text, or None."""
    row = conn.execute("SELECT current_setting('server_encoding')").fetchone()
    encoding = str(row[0]) if row else "?"
    if encoding in USABLE_ENCODINGS:
        return None
    return (f"the database's encoding is {encoding}, which cannot hold every agent's text; "
            f"create the database with ENCODING 'UTF8' (e.g. `createdb -E UTF8 -T template0 "
            f"NAME`; SQL_ASCII also works) and point storage.postgres_url at it")


def _message(exc: BaseException) -> str:
    """One line: libpq's messages run over several."""
    return " ".join(str(exc).split()) or type(exc).__name__


class PostgresStore:
    """The writer of one collector. Not safe for concurrent commits (the pipeline flushes one
    batch at a time); any number of PostgresStores on one database are."""

    def __init__(self, options: ConnectOptions, *, retention_s: int,
                 commit_timeout_s: float,
                 resolve_window_s: int = DEFAULT_RESOLVE_WINDOW_S,
                 budgets: tuple[Budget, ...] = (),
                 sinks: tuple[AlertSink, ...] = ()) -> None:
        self._options = options
        self._budgets = budgets
        self._planner = SpendPlanner(budgets)
        self._tags = TagMemo()
        self._sinks = sinks
        self._retention_ns = retention_s * 1_000_000_000
        self._resolve_window_ns = resolve_window_s * 1_000_000_000
        # Usage held in the database (by any collector on it), as of this one's last commit.
        self.held_now = 0
        self._commit_timeout_s = commit_timeout_s
        self._conn: psycopg.Connection[Any] | None = None
        self._fd = -1
        self._conn_lock = threading.Lock()  # the connection's fd vs. an abort from the loop
        self._thread: ThreadPoolExecutor | None = None
        self._busy: asyncio.Future[Any] | None = None
        self._generation_started_ns: int | None = None
        self._lost_connection = False
        self.seen_current = 0
        self.seen_previous = 0

    @property
    def description(self) -> str:
        return f"postgres {self._options.where}"

    @property
    def dedupe_window(self) -> int:
        return self.seen_current + self.seen_previous

    async def open(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collector-pg")
        try:
            await self._in_writer(self._open)
        except BaseException:
            await self.close()
            raise

    async def _in_writer(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open(self) -> None:
        conn = self._connection()
        try:
            encoding = _encoding_problem(conn)
            if encoding:
                raise SchemaError(f"{self._options.where}: {encoding}")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                found = [(str(r[0]), str(r[1])) for r in conn.execute(TABLE_COLUMNS)]
                problem = schema_problem(found, list(PG_COLUMNS))
                if problem:
                    raise SchemaError(f"{self._options.where}: {problem}")
                regclass = conn.execute("SELECT to_regclass(%s)", (DAILY_TABLE,)).fetchone()
                had_daily = regclass is not None and regclass[0] is not None
                schema = SCHEMA + (";" + BUDGET_SCHEMA if self._budgets else "")
                for statement in schema.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                _daily_triggers(conn, backfill=not had_daily)
                self.seen_current, self.seen_previous = _read_seen_counts(conn)
                self.held_now = _read_count(conn, HELD_COUNT)
        except psycopg.Error as exc:
            self._drop_connection()
            raise StorageError(f"PostgreSQL at {self._options.where}: {_message(exc)}") from exc

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        conn = self._options.connect()
        with self._conn_lock:
            self._conn, self._fd = conn, conn.pgconn.socket
        if self._lost_connection:
            log.warning("reconnected to PostgreSQL at %s", self._options.where)
            self._lost_connection = False
        return conn

    def _drop_connection(self) -> None:
        with self._conn_lock:
            conn, self._conn, self._fd = self._conn, None, -1
        if conn is not None:
            self._lost_connection = True
            conn.close()

    def _abort_in_flight(self) -> None:
        """Cut the connection under a call that has no answer, so the writer thread's blocked
        read fails now instead of after TCP gives up (minutes). Called from the event loop."""
        with self._conn_lock:
            if self._conn is None or self._fd < 0:
                return
            try:
                with socket.socket(fileno=os.dup(self._fd)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the server

    async def close(self) -> None:
        busy = self._busy
        if busy is not None and not busy.done():
            self._abort_in_flight()
            await asyncio.wait([busy])
        if self._thread is not None:
            thread, self._thread = self._thread, None
            if len(self._tags):
                await asyncio.get_running_loop().run_in_executor(thread, self._settle_tags)
            if self._budgets:
                await asyncio.get_running_loop().run_in_executor(thread, self._fold_journal)
            await asyncio.get_running_loop().run_in_executor(thread, self._drop_connection)
            self._lost_connection = False
            thread.shutdown(wait=True)

    async def commit(self, batch: Batch, *, now_ns: int,
                     sweep_before_ns: int | None = None) -> tuple[CommitResult, Batch]:
        if self._thread is None:
            raise StorageError("store is not open")
        busy = self._busy
        if busy is not None and not busy.done():
            raise StorageError("the previous flush is still waiting for PostgreSQL")
        future = asyncio.get_running_loop().run_in_executor(
            self._thread, self._commit, batch, now_ns, sweep_before_ns)
        self._busy = future
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._commit_timeout_s)
        except TimeoutError:
            self._abort_in_flight()
            # Its outcome is no longer anyone's: retrieve it so it is not reported unhandled.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise StorageError(f"no answer from PostgreSQL at {self._options.where} within "
                               f"{self._commit_timeout_s:g} s; connection reset") from None

    def _settle_tags(self) -> None:
        """At close: the tags' end times not written yet (collector.store.tags). Failing
        loses only how late a tag was last given, never a value or a sum."""
        rows = self._tags.owed_rows()
        if not rows:
            return
        try:
            conn = self._connection()
            with conn.transaction():
                self._run_write(conn, DIMENSIONS_TABLE, rows)
        except (psycopg.Error, StorageError) as exc:
            log.warning("tags' latest end times not written at close: %s", exc)
            return
        self._tags.settled()

    def _fold_journal(self) -> None:
        """At close: the journal folded into the spend rows (collector.budgets.spend), so a
        stopped collector leaves nothing of its own waiting. Failing is harmless: the journal
        stays, and readers and the next fold, of any collector, count it."""
        try:
            conn = self._connection()
            with conn.transaction():
                fold_budgets(_BudgetOps(conn), self._planner, self._sinks, time.time_ns())
        except (psycopg.Error, StorageError, ValueError) as exc:
            log.warning("budget journal not folded at close (kept for the next fold): %s",
                        exc)

    def _commit(self, batch: Batch, now_ns: int,
                sweep_before_ns: int | None) -> tuple[CommitResult, Batch]:
        for attempt in range(1, TRANSACTION_ATTEMPTS + 1):
            conn = self._connection()
            try:
                swept = 0
                if sweep_before_ns is not None:
                    with conn.transaction():
                        swept = max(conn.execute(
                            SWEEP_STALE, (iso_utc(sweep_before_ns),)).rowcount, 0)
                        conn.execute(EXPIRE_LINKS, (links_kept_since(
                            now_ns, self._resolve_window_ns),))
                        conn.execute(EXPIRE_TURNS, (turns_kept_since(
                            now_ns, self._retention_ns),))
                self._rotate_if_due(conn, now_ns)
                with conn.transaction():
                    applied, seen_current, traced, tags = self._write(conn, batch, now_ns)
                if tags is not None:
                    self._tags.committed(tags, now_ns)
                if seen_current is not None:
                    self.seen_current = seen_current
                if traced is not None:
                    self.held_now = traced.held_now
                return commit_result(applied, swept, traced), applied
            except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
                if attempt == TRANSACTION_ATTEMPTS:
                    raise StorageError(f"PostgreSQL: {_message(exc)}") from exc
                log.info("flush rolled back (%s); trying again", type(exc).__name__)
            except psycopg.Error as exc:
                if conn.closed or isinstance(exc, psycopg.OperationalError):
                    self._drop_connection()
                raise StorageError(f"PostgreSQL at {self._options.where}: "
                                   f"{_message(exc)}") from exc
            except (OverflowError, ValueError, TypeError) as exc:
                # A value PostgreSQL cannot take: the mapping's bounds should make this
                # impossible; if it happens it is a bug, reported as a failed commit.
                raise StorageError(f"value not storable: {exc!r}") from exc
        raise AssertionError("unreachable")

    def _write(self, conn: psycopg.Connection[Any], batch: Batch, now_ns: int
               ) -> tuple[Batch, int | None, Traced | None, TagPlan | None]:
        """The flush transaction's statements; returns the batch applied (with the held usage
        it resolved), the new span-id count, what it did with held usage and the tag rows it
        wrote (collector.store.tags)."""
        conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (GENERATION_LOCK,))
        applied = batch
        seen_current = None
        if batch.keys:
            keys = sorted(batch.keys)
            if any(len(k) != KEY_BYTES for k in keys):  # the mapping makes every key this wide
                raise ValueError(f"span keys must be {KEY_BYTES} bytes")
            new = {bytes(r[0]) for r in conn.execute(INSERT_SEEN, (keys,), binary=True)}
            if len(new) != len(keys):
                applied = batch.without(batch.keys - new)
        if batch.cumulative:
            applied = _with_cumulative(conn, applied, batch.cumulative)
        accounted = len(applied.keys)
        traced = None
        held_count = _read_count(conn, HELD_COUNT)
        if has_trace_work(applied) or held_count:
            applied, traced = hold_and_resolve(_TraceOps(conn, held_count), applied, now_ns,
                                               self._resolve_window_ns)
        tags = None
        if applied.sessions:
            tags = self._tags.plan(applied, now_ns)
            for write in BATCH_WRITES:
                self._run_write(conn, write.table, tags.rows if write.table == DIMENSIONS_TABLE
                                else write.rows(applied))
        if self._budgets:
            # After the rollup (an alert's top lists include this batch), before the counter
            # rows: a period's spend row is held to commit, like them, and taken after the
            # sessions in every collector's flush.
            record_budgets(_BudgetOps(conn), applied, self._planner, self._sinks, now_ns)
        if traced is not None:
            # Near the end, like the span-id count (and before it: one order for both rows),
            # so flushes of several collectors hold this row only until their commit.
            traced.held_now = held_count
            if traced.held_delta:
                row = conn.execute(ADD_SEEN_COUNT, (traced.held_delta, HELD_COUNT)).fetchone()
                traced.held_now = 0 if row is None else int(row[0])
        if accounted:
            # Last: every flush of every collector updates this one row, and holds it from
            # here to its commit only.
            row = conn.execute(ADD_SEEN_COUNT, (accounted, SEEN_CURRENT_COUNT)).fetchone()
            seen_current = None if row is None else int(row[0])
        return applied, seen_current, traced, tags

    @staticmethod
    def _run_write(conn: psycopg.Connection[Any], table: str,
                   rows: Iterable[tuple[Any, ...]]) -> None:
        args = BATCH_ARGS[table]
        columns = _columns(rows, len(args))
        if not columns[0]:
            return
        statements = BATCH_STATEMENTS[table]
        if table == "agent_sessions":
            inserted = {str(r[0]) for r in conn.execute(statements[0], columns, binary=True)}
            if len(inserted) == len(columns[0]):
                return
            keep = [i for i, sid in enumerate(columns[0]) if sid not in inserted]
            conn.execute(statements[1], [[c[i] for i in keep] for c in columns], binary=True)
            return
        for statement in statements:
            conn.execute(statement, columns, binary=True)

    def _rotate_if_due(self, conn: psycopg.Connection[Any], now_ns: int) -> None:
        """Start a new span-id generation when due, in its own short transaction."""
        started = self._generation_started_ns
        if started is not None and now_ns - started < self._retention_ns:
            return
        with conn.transaction():
            # Alone: waits for flushes that read the current generation to commit.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (GENERATION_LOCK,))
            row = conn.execute("SELECT value FROM collector_meta WHERE name = %s",
                               (GENERATION_STARTED,)).fetchone()
            if row is None:
                conn.execute("INSERT INTO collector_meta (name, value) VALUES (%s, %s)",
                             (GENERATION_STARTED, now_ns))
                started = now_ns
            else:
                started = int(row[0])
                if now_ns - started >= self._retention_ns:
                    conn.execute("DROP TABLE collector_seen_previous")
                    conn.execute(
                        "ALTER TABLE collector_seen_current RENAME TO collector_seen_previous")
                    conn.execute("ALTER INDEX collector_seen_current_pkey "
                                 "RENAME TO collector_seen_previous_pkey")
                    conn.execute("CREATE TABLE collector_seen_current (key BYTEA PRIMARY KEY)")
                    conn.execute("UPDATE collector_meta SET value = %s WHERE name = %s",
                                 (now_ns, GENERATION_STARTED))
                    conn.execute(
                        "UPDATE collector_meta SET value = (SELECT value FROM collector_meta "
                        "WHERE name = %s) WHERE name = %s",
                        (SEEN_CURRENT_COUNT, SEEN_PREVIOUS_COUNT))
                    conn.execute("UPDATE collector_meta SET value = 0 WHERE name = %s",
                                 (SEEN_CURRENT_COUNT,))
                    # Series silent for two periods are forgotten with the span ids of their
                    # time: a later point of one counts from zero, as a new series would.
                    conn.execute("DELETE FROM collector_metric_series WHERE time_ns < %s",
                                 (now_ns - 2 * self._retention_ns,))
                    log.info("dedupe window rotated; span ids older than %d s forgotten",
                             self._retention_ns // 1_000_000_000)
                    started = now_ns
            counts = _read_seen_counts(conn)
        # Only after the commit: a rolled-back rotation must not move the counts.
        self._generation_started_ns = started
        self.seen_current, self.seen_previous = counts


def _with_cumulative(conn: psycopg.Connection[Any], applied: Batch,
                     points: list[CumulativePoint]) -> Batch:
    """The batch plus the usage of its cumulative points (base.resolve_cumulative), against
    the series as stored, read after they are locked."""
    series = sorted({p.series for p in points})
    conn.execute(LOCK_SERIES, (series,), binary=True)
    stored = {bytes(k): (int(s), int(t), float(v))
              for k, s, t, v in conn.execute(READ_SERIES, (series,), binary=True)}
    combined, updated = resolve_cumulative(applied, points, stored)
    if updated:
        keys = sorted(updated)
        conn.execute(UPSERT_SERIES, ([k for k in keys], [updated[k][0] for k in keys],
                                     [updated[k][1] for k in keys],
                                     [updated[k][2] for k in keys]), binary=True)
    return combined


class _TraceOps:
    """collector.store.base.TraceOps in a flush transaction on PostgreSQL."""

    def __init__(self, conn: psycopg.Connection[Any], held_count: int) -> None:
        self._conn = conn
        self._held_count = held_count

    def held_count(self) -> int:
        return self._held_count

    def traces_with_held(self, trace_ids: list[bytes]) -> set[bytes]:
        if not trace_ids:
            return set()
        return {bytes(r[0]) for r in self._conn.execute(TRACES_WITH_HELD, (trace_ids,),
                                                         binary=True)}

    def expired_traces(self, held_before_ns: int) -> set[bytes]:
        return {bytes(r[0]) for r in self._conn.execute(EXPIRED_TRACES, (held_before_ns,))}

    def lock_traces(self, trace_ids: list[bytes]) -> None:
        # Four bytes of the trace id's random end: traces sharing a key only take turns.
        keys = sorted({int.from_bytes(t[-4:], "big", signed=True) for t in trace_ids})
        self._conn.execute(LOCK_TRACES, (TRACE_LOCK_CLASS, keys))

    def insert_held(self, rows: list[HeldRow]) -> None:
        self._conn.execute(INSERT_HELD, _columns(rows, 6), binary=True)

    def upsert_links(self, rows: list[LinkRow]) -> None:
        self._conn.execute(UPSERT_LINKS, _columns(rows, 5), binary=True)

    def read_traces(self, trace_ids: list[bytes], links_seen_since_ns: int
                    ) -> tuple[list[tuple[bytes, HeldRow]], list[LinkRow]]:
        held = [(bytes(t), (bytes(k), bytes(t), bytes(s), bytes(p), int(n), str(u)))
                for t, k, s, p, n, u in self._conn.execute(READ_HELD, (trace_ids,),
                                                            binary=True)]
        links = [(bytes(t), bytes(s), bytes(p), None if n is None else str(n), int(seen))
                 for t, s, p, n, seen in self._conn.execute(
                     READ_LINKS, (trace_ids, links_seen_since_ns), binary=True)]
        return held, links

    def delete_held(self, keys: list[bytes]) -> set[bytes]:
        return {bytes(r[0]) for r in self._conn.execute(DELETE_HELD, (keys,), binary=True)}

    def read_turns(self, trace_ids: list[bytes]) -> list[TurnRow]:
        if not trace_ids:
            return []
        return [(bytes(t), str(n), int(b), int(seen)) for t, n, b, seen in self._conn.execute(
            READ_TURNS, (trace_ids,), binary=True)]

    def upsert_turns(self, rows: list[TurnRow]) -> None:
        self._conn.execute(UPSERT_TURNS, _columns(rows, 4), binary=True)


def _read_count(conn: psycopg.Connection[Any], name: str) -> int:
    row = conn.execute(READ_COUNT, (name,)).fetchone()
    return 0 if row is None else int(row[0])


def _read_seen_counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    rows = {str(r[0]): int(r[1]) for r in conn.execute(
        READ_SEEN_COUNTS, (SEEN_CURRENT_COUNT, SEEN_PREVIOUS_COUNT))}
    return rows[SEEN_CURRENT_COUNT], rows[SEEN_PREVIOUS_COUNT]


# Counter rows every flush already updates when it changes what a reader sees: a flush that
# accounts spans (or holds usage) moves the span-id count, one that only resolves held usage
# moves the held count, a rotation moves both span-id counts.
CHANGE_SIGNAL = f"""
SELECT name, value FROM collector_meta
WHERE name IN ('{SEEN_CURRENT_COUNT}', '{SEEN_PREVIOUS_COUNT}', '{HELD_COUNT}') ORDER BY name
"""


def portable(sql: str) -> str:
    """SQL written once for both backends (SQLite's spelling) as PostgreSQL takes it: `?`
    placeholders, and `instr(a, b) > 0` as `strpos`."""
    return sql.replace("%", "%%").replace("?", "%s").replace("instr(", "strpos(")


def scope_values(conn: psycopg.Connection[Any], dimensions: Sequence[str],
                 session_ids: Sequence[str]) -> dict[tuple[str, str], str | None]:
    """collector.store.budgets.BudgetOps.scope_values on PostgreSQL: one statement, the ids
    as one array."""
    values = ", ".join(dimension_sql(d, "s.id") for d in dimensions)
    sql = f"SELECT s.id, {values} FROM unnest(%s::text[]) AS s(id)"
    return scope_rows(dimensions, conn.execute(sql, (list(session_ids),)))


class _BudgetOps:
    """collector.store.budgets.BudgetOps in a flush transaction on PostgreSQL."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cursor = self._conn.execute(portable(sql), params)
        return cursor.fetchall() if cursor.description is not None else []

    def scope_values(self, dimensions: Sequence[str], session_ids: Sequence[str]
                     ) -> dict[tuple[str, str], str | None]:
        return scope_values(self._conn, dimensions, session_ids)

    def lock_fold(self) -> None:
        """Two folders' deletes of the journal would lock its rows in either order."""
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (FOLD_LOCK,))


class _OutboxConnection:
    """collector.store.budgets.OutboxConnection on PostgreSQL: the delivery task's own
    connection (never the writer's), autocommit."""

    def __init__(self, options: ConnectOptions) -> None:
        self._options = options
        self._conn = options.connect()

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        try:
            return _BudgetOps(self._conn).run(sql, params)
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {self._options.where}: {_message(exc)}") from exc

    def close(self) -> None:
        self._conn.close()


def open_outbox(options: ConnectOptions) -> Outbox:
    """The alert outbox in this database, for collector.budgets.delivery; claims skip rows
    another collector is leasing at that instant."""
    return Outbox(lambda: _OutboxConnection(options), skip_locked=True,
                  description=f"postgres {options.where}")


class QueryConnection:
    """A read-only PostgreSQL connection that runs the fleet view's queries
    (collector.web.queries), which are written once, in the SQL both backends share, with
    SQLite's `?` placeholders. Two spellings differ and are translated here: the placeholders,
    and `instr(a, b) > 0` (PostgreSQL's `strpos`). Sums of BIGINT come back as numeric in
    PostgreSQL; they are returned as int (float if fractional), as SQLite returns them.
    Errors surface as StorageError."""

    def __init__(self, options: ConnectOptions) -> None:
        self._options = options
        self._conn = options.connect()
        self._conn.read_only = True

    def execute(self, sql: str, params: Sequence[Any] = (), /) -> _Rows:
        try:
            return _Rows([tuple(_plain(v) for v in row)
                          for row in self._conn.execute(portable(sql), params).fetchall()])
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {self._options.where}: {_message(exc)}") from exc

    def change_signal(self) -> int:
        """A number that moves with every commit a reader can see (see CHANGE_SIGNAL); the
        stale sweep alone does not move it."""
        return hash(tuple(self.execute(CHANGE_SIGNAL))) & 0x7FFF_FFFF_FFFF_FFFF

    def close(self) -> None:
        self._conn.close()


class _Rows(list[tuple[Any, ...]]):
    def fetchone(self) -> tuple[Any, ...] | None:
        return self[0] if self else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


class PostgresReader:
    """collector.store.base.Reader over PostgreSQL: a connection per call, read-only."""

    def __init__(self, options: ConnectOptions) -> None:
        self._options = options

    @property
    def description(self) -> str:
        return f"postgres {self._options.where}"

    def missing(self) -> str | None:
        return None  # a server that cannot be reached says so on the first read

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        conn = self._options.connect()
        try:
            conn.read_only = True
            return conn.execute(sql, params).fetchall()
        except errors.UndefinedTable as exc:
            raise StorageError(f"PostgreSQL at {self._options.where}: {_message(exc)} (start "
                               "a collector on this database once to create its tables)"
                               ) from exc
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {self._options.where}: {_message(exc)}") from exc
        finally:
            conn.close()

    def read_sessions(self, *, status: str | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(COLUMN_NAMES)} FROM agent_sessions"
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = %s"
            params.append(status)
        sql += ' ORDER BY last_active_at COLLATE "C" DESC, id COLLATE "C"'
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)
        return [dict(zip(COLUMN_NAMES, row, strict=True)) for row in self._query(sql, params)]

    def read_usage(self, *, group: str, lo: str | None = None,
                   hi: str | None = None) -> list[tuple[Any, ...]]:
        column, join, params_ = usage_group(group, "%s")
        where: list[str] = []
        params: list[Any] = list(params_)
        if lo is not None:
            where.append("hour >= %s")
            params.append(lo)
        if hi is not None:
            where.append("hour < %s")
            params.append(hi)
        # sum(bigint) is numeric in PostgreSQL: cast back, so both backends return ints.
        sql = (f'SELECT ({column}) COLLATE "C" AS g, model, max(hour), sum(turns)::bigint, '
               "sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, "
               "sum(reasoning_tokens)::bigint, sum(cache_read_tokens)::bigint, "
               f"sum(cache_write_tokens)::bigint, sum(cost_cents) FROM {HOURLY_TABLE} AS h"
               + join)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += ' GROUP BY g, model ORDER BY g, model COLLATE "C"'
        return self._query(sql, params)

    def count_sessions_by_status(self) -> dict[str, int]:
        rows = self._query("SELECT status, count(*) FROM agent_sessions GROUP BY status", ())
        return {str(status): int(count) for status, count in rows}

    def read_budgets(self, periods: Sequence[tuple[str, int]]) -> BudgetRows:
        if not self._has_budget_tables():
            return [], [], []
        conn = self._options.connect()
        try:
            # One snapshot for every statement: a fold moves sums from the journal to the
            # spend rows between two of them otherwise.
            conn.read_only = True
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            with conn.transaction():
                journal = conn.execute(f"SELECT to_regclass('{JOURNAL_TABLE}') IS NOT NULL"
                                       ).fetchone()
                return read_budget_rows(
                    lambda sql, params: conn.execute(sql, params).fetchall(), periods, "%s",
                    journal=bool(journal and journal[0]))
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {self._options.where}: {_message(exc)}") from exc
        finally:
            conn.close()

    def count_alerts_pending(self) -> int:
        if not self._has_budget_tables():
            return 0
        return int(self._query(ALERTS_PENDING_SQL, ())[0][0])

    def _has_budget_tables(self) -> bool:
        """A database no collector with budgets wrote has none: nothing spent, no error."""
        rows = self._query(f"SELECT to_regclass('{SPEND_TABLE}') IS NOT NULL", ())
        return bool(rows[0][0])

    def close(self) -> None:
        """Nothing is held between calls."""


def _daily_triggers(conn: psycopg.Connection[Any], *, backfill: bool) -> None:
    """Create the daily table's trigger functions, the triggers missing, then (for a database
    written before the table) fill it from the rollup. The triggers come first: creating one
    locks its table against writers until this transaction ends, so no flush commits between
    the backfill's read and the triggers (a trigger adds only what later statements write)."""
    for function in DAILY_FUNCTIONS:
        conn.execute(function)
    names = [name for name, _ in DAILY_TRIGGERS]
    present = {str(r[0]) for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgname = ANY(%s) AND NOT tgisinternal", (names,))}
    for name, statement in DAILY_TRIGGERS:
        if name not in present:
            conn.execute(statement)
    if backfill:
        added = conn.execute(BACKFILL_DAILY).rowcount
        if added > 0:
            log.info("daily usage table created with %d rows from the rollup", added)


# -- moving a SQLite database in ------------------------------------------------------------

MIGRATION_ID = "migration_id"  # in the SQLite file's collector_meta: which file this is
MIGRATED_PREFIX = "migrated_sqlite_"  # in PostgreSQL's collector_meta: files already moved
# A stored value without a mark was never set by a span (a default, or the sweep): it is taken
# for a session PostgreSQL does not have, and loses to any value PostgreSQL has (-2 < -1).
UNMARKED = -2
MIGRATION_CHUNK = 10_000


@dataclass(frozen=True, slots=True)
class Migration:
    sessions: int
    hours: int
    span_ids: int
    already: bool  # moved before: nothing was done
    held: int = 0  # usage still waiting for its trace's session
    budget_rows: int = 0  # spend, crossing, outbox and journal rows (_migrate_budgets)


def migrate_sqlite(path: Path, options: ConnectOptions, *, retention_s: int) -> Migration:
    """Add a SQLite database's sessions, marks, rollup and remembered span ids to PostgreSQL,
    in one transaction, merged as if its spans had arrived there (sums added, latest values by
    span time). Idempotent: the file is stamped with an id and PostgreSQL remembers the ids it
    has taken in, so a re-run (after a failure, or by mistake) does nothing twice. Stop the
    collector writing the file first: rows written after the move are not moved."""
    import sqlite3

    from collector.store.sqlite import SQLiteStore

    async def prepare() -> None:
        # Brings an older file up to date (rollup backfill) and creates the tables here.
        source = SQLiteStore(path, retention_s=retention_s)
        await source.open()
        await source.close()
        target = PostgresStore(options, retention_s=retention_s, commit_timeout_s=60)
        await target.open()
        await target.close()

    asyncio.run(prepare())
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")  # nobody writes the file while it is read
        row = db.execute("SELECT value FROM collector_meta WHERE name = ?",
                         (MIGRATION_ID,)).fetchone()
        if row is None:
            file_id = int.from_bytes(os.urandom(7), "big")
            db.execute("INSERT INTO collector_meta (name, value) VALUES (?, ?)",
                       (MIGRATION_ID, file_id))
        else:
            file_id = int(row[0])
        conn = options.connect(autocommit=False)
        try:
            with conn.transaction():
                result = _migrate(db, conn, f"{MIGRATED_PREFIX}{file_id}")
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {options.where}: {_message(exc)}") from exc
        finally:
            conn.close()
        db.execute("COMMIT")  # the stamp, only once PostgreSQL has committed
        return result
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    finally:
        db.close()


def _migrate(db: Any, conn: psycopg.Connection[Any], marker: str) -> Migration:
    # Alone against rotations; flushes of running collectors go on beside it.
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (GENERATION_LOCK,))
    if conn.execute("SELECT 1 FROM collector_meta WHERE name = %s", (marker,)).fetchone():
        return Migration(0, 0, 0, already=True)
    sessions = hours = 0
    cursor = db.execute(
        "SELECT s.id, s.kind, coalesce(m.kind_ns, ?1), s.status, coalesce(m.status_ns, ?1), "
        "s.channel, coalesce(m.channel_ns, ?1), s.model, coalesce(m.model_ns, ?1), "
        "s.created_at, s.last_active_at, s.turns, s.prompt_tokens, s.completion_tokens, "
        "s.reasoning_tokens, s.cost_cents, s.goal_text, coalesce(m.goal_ns, ?1) "
        "FROM agent_sessions AS s LEFT JOIN collector_session_marks AS m ON m.id = s.id "
        "ORDER BY s.id", (UNMARKED,))
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        sessions += len(chunk)
        PostgresStore._run_write(conn, "agent_sessions", chunk)
    cursor = db.execute("SELECT id, model_ns, kind_ns, status_ns, channel_ns, goal_ns "
                        "FROM collector_session_marks ORDER BY id")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        PostgresStore._run_write(conn, "collector_session_marks", chunk)
    cursor = db.execute("SELECT id, agent, agent_ns, agent_version, agent_version_ns, "
                        "user_name, user_ns, host, host_ns, credential, credential_ns "
                        f"FROM {LABELS_TABLE} ORDER BY id")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        PostgresStore._run_write(conn, LABELS_TABLE, chunk)
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (DIMENSIONS_TABLE,)).fetchone():
        cursor = db.execute(f"SELECT session_id, dimension, value, value_ns "
                            f"FROM {DIMENSIONS_TABLE} ORDER BY session_id, dimension")
        while chunk := cursor.fetchmany(MIGRATION_CHUNK):
            PostgresStore._run_write(conn, DIMENSIONS_TABLE, chunk)
    cursor = db.execute(f"SELECT hour, session_id, model, turns, prompt_tokens, "
                        "completion_tokens, reasoning_tokens, cache_read_tokens, "
                        f"cache_write_tokens, cost_cents FROM {HOURLY_TABLE}")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        hours += len(chunk)
        PostgresStore._run_write(conn, HOURLY_TABLE, chunk)
    # Cumulative series: the later state of each wins (it is what the next point is read
    # against; both collectors counted up to their own state).
    cursor = db.execute("SELECT series, start_ns, time_ns, value FROM collector_metric_series")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        conn.execute(UPSERT_SERIES + " WHERE m.time_ns < excluded.time_ns",
                     _columns(sorted(chunk), 4), binary=True)
    # Usage still held (its key moves with the span ids below, as accounted) and the links
    # that may resolve it: resolved later by whichever collector touches its trace.
    held = 0
    cursor = db.execute(f"SELECT key, trace_id, span_id, parent_id, held_ns, usage "
                        f"FROM {HELD_TABLE} ORDER BY key")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        rows = [(bytes(k), bytes(t), bytes(s), bytes(p), int(n), str(u))
                for k, t, s, p, n, u in chunk]
        held += len(conn.execute(INSERT_HELD + " ON CONFLICT (key) DO NOTHING RETURNING key",
                                 _columns(rows, 6), binary=True).fetchall())
    if held:
        conn.execute(ADD_SEEN_COUNT, (held, HELD_COUNT))
    cursor = db.execute(f"SELECT trace_id, span_id, parent_id, session_id, seen_ns "
                        f"FROM {LINKS_TABLE} ORDER BY trace_id, span_id")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        conn.execute(UPSERT_LINKS, _columns(
            [(bytes(t), bytes(s), bytes(p), n, int(seen)) for t, s, p, n, seen in chunk], 5),
                     binary=True)
    # What is known of each trace's turn: merged flag by flag with what PostgreSQL knows, so
    # a trace's root arriving there counts the turn its SQLite-accounted calls wait for.
    cursor = db.execute(f"SELECT trace_id, session_id, state, seen_ns FROM {TURNS_TABLE} "
                        "ORDER BY trace_id, session_id")
    while chunk := cursor.fetchmany(MIGRATION_CHUNK):
        conn.execute(UPSERT_TURNS.replace("state = excluded.state",
                                          f"state = {TURNS_TABLE}.state | excluded.state"),
                     _columns([(bytes(t), str(n), int(b), int(seen))
                               for t, n, b, seen in chunk], 4), binary=True)
    # Span ids stay remembered: an exporter retrying into PostgreSQL a span the SQLite
    # collector accounted is still a duplicate.
    span_ids = 0
    for table in ("collector_seen_previous", "collector_seen_current"):
        cursor = db.execute(f"SELECT key FROM {table}")
        while chunk := cursor.fetchmany(MIGRATION_CHUNK):
            keys = sorted(bytes(r[0]) for r in chunk)
            new = len(conn.execute(INSERT_SEEN, (keys,), binary=True).fetchall())
            if new:
                conn.execute(ADD_SEEN_COUNT, (new, SEEN_CURRENT_COUNT))
            span_ids += new
    budget_rows = _migrate_budgets(db, conn)
    conn.execute("INSERT INTO collector_meta (name, value) VALUES (%s, %s)", (marker, sessions))
    return Migration(sessions, hours, span_ids, already=False, held=held,
                     budget_rows=budget_rows)


def _migrate_budgets(db: Any, conn: psycopg.Connection[Any]) -> int:
    """The file's budget state, merged as its usage is: spend added per instance period
    (what the file's collector folded), its journal rows kept for the next fold here (what it
    had not), and its crossings and outbox rows kept once each, so that a threshold the file
    recorded is never recorded, nor its alert sent, a second time, and an alert it had not
    delivered yet is delivered from here. Spend rows are taken in key order, as a fold takes
    them. A threshold the two databases' spend reaches only together is recorded by the next
    fold that adds to that instance. Returns the rows moved."""
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (SPEND_TABLE,)).fetchone():
        return 0  # the file's collector had no budgets
    conn.execute(BUDGET_SCHEMA)
    moved = 0
    copies = (
        (f"SELECT budget, scope_value, period_start_ns, spend_cents FROM {SPEND_TABLE} "
         "ORDER BY budget, scope_value, period_start_ns",
         f"INSERT INTO {SPEND_TABLE} AS s (budget, scope_value, period_start_ns, spend_cents) "
         "VALUES (%s, %s, %s, %s) ON CONFLICT (budget, scope_value, period_start_ns) "
         "DO UPDATE SET spend_cents = s.spend_cents + excluded.spend_cents"),
        (f"SELECT budget, scope_value, period_start_ns, threshold FROM {ALERTS_TABLE}",
         f"INSERT INTO {ALERTS_TABLE} (budget, scope_value, period_start_ns, threshold) "
         "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"),
        # A claim is this file's collector's, which no longer runs: not carried.
        (f"SELECT id, sink, payload, created_ns, attempts, next_attempt_ns, delivered_ns "
         f"FROM {OUTBOX_TABLE}",
         f"INSERT INTO {OUTBOX_TABLE} (id, sink, payload, created_ns, attempts, "
         "next_attempt_ns, delivered_ns) VALUES (%s, %s, %s, %s, %s, %s, %s) "
         "ON CONFLICT (id) DO NOTHING"),
        (f"SELECT id, created_ns, sums FROM {JOURNAL_TABLE}",
         f"INSERT INTO {JOURNAL_TABLE} (id, created_ns, sums) VALUES (%s, %s, %s) "
         "ON CONFLICT (id) DO NOTHING"),
    )
    with conn.cursor() as cursor:
        for select, insert in copies:
            source = db.execute(select)
            while chunk := source.fetchmany(MIGRATION_CHUNK):
                cursor.executemany(insert, chunk)
                moved += len(chunk)
    return moved
