"""What the fleet view reads, as plain functions over a read-only connection.

No web library here: each function takes a connection and values and returns JSON-ready
values, so the numbers the page shows are tested against the database without a server.
Sums come from the same tables the reports read (`collector_usage_hourly` for anything over
time, `agent_sessions` for a session's totals), so the page and `collector report` agree.

Every query is bounded for a fleet of 100,000 sessions and a million turns: the overview reads
the daily table (`collector_usage_daily`, the rollup per UTC day, model and agent, kept equal to
it by triggers) and the last two hours of the rollup; the sessions table pages by keyset on an
index per sort order, or, when the filters match few sessions, sorts just those; counts beyond
COUNT_CAP are not counted; and a session's hours come from the rollup's session index.

The same statements run on PostgreSQL (collector.store.postgres.QueryConnection), where the
daily table is kept by triggers too. One SQLite trick is left out there: a unary `+` that
keeps SQLite from leading with a column's index (SQLite has no statistics on a read-only file;
PostgreSQL's planner has them, and `+` is not defined on text). The answers are the same.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from collector.report import NO_MODEL_LABEL, format_usd
from collector.store.base import DAILY_TABLE, DIMENSIONS_TABLE, HOURLY_TABLE, LABELS_TABLE
from collector.web.params import BadQuery as BadQuery  # raised by parse(), answered 400
from collector.web.params import choice, cursor_value, integer, storable, text

DAY = dt.timedelta(days=1)
HOUR = dt.timedelta(hours=1)
SERIES_DAYS = 30
SPEND_WINDOWS = {"today": 1, "7d": 7, "30d": 30}  # UTC days, today included
BURN_HOURS = 2  # the current UTC hour and the one before it
MAX_SERIES = 8  # stacked series shown; the rest are summed as "other"
OTHER_LABEL = "(other)"
ACTIVE_SHOWN = 10
DEFAULT_PAGE = 50
MAX_PAGE = 500
# Sessions a CSV export reads per statement: its memory is one chunk, whatever the export's size.
EXPORT_CHUNK = 1000
STATUSES = ("active", "completed", "failed", "cancelled", "unknown")
LABEL_COLUMNS = {"agent": "l.agent", "user": "l.user_name", "host": "l.host"}
# The filters whose values come from agents, and where each is kept (each column indexed).
SEARCH_FIELDS = {"model": ("agent_sessions", "model"), "agent": (LABELS_TABLE, "agent"),
                 "user": (LABELS_TABLE, "user_name"), "host": (LABELS_TABLE, "host")}
# /api/filters offers the FILTER_TOP values that spent most among the FILTER_RECENT sessions
# last active: its size and cost stay bounded under any flood of distinct values.
FILTER_TOP = 50
FILTER_RECENT = 20_000
# /api/filters/search: at most SEARCH_MAX values an answer; a substring match reads at most
# SEARCH_SCAN rows of the field's table (a prefix match reads its index range, any size).
SEARCH_DEFAULT = 20
SEARCH_MAX = 100
SEARCH_SCAN = 200_000

# A filtered count reads at most this many sessions of its leading index; beyond, the total
# is a lower bound ("at least"): counting every match of a broad filter costs a row each.
COUNT_CAP = 10_000
# Filters matching at most this many sessions are read through their own index and sorted
# (a bounded sort); broader ones walk the sort order's index and skip non-matching rows,
# which finds a page after about limit * sessions / matches rows.
SMALL_MATCH = 2_000

# Sort keys of the sessions table -> SQL expression; each has an index (expr, id), or is
# last_active_at's index (ties, rare outside benchmarks, are sorted by id within the index walk).
SORTS = {
    "last_active_at": "s.last_active_at",
    "created_at": "s.created_at",
    "cost": "s.cost_cents",
    "turns": "s.turns",
    "tokens": "(s.prompt_tokens + s.completion_tokens)",
    "id": "s.id",
}

SESSION_COLUMNS = (
    "s.id, s.kind, s.status, s.channel, s.model, s.created_at, s.last_active_at, s.turns, "
    "s.prompt_tokens, s.completion_tokens, s.reasoning_tokens, s.cost_cents, s.goal_text, "
    "l.agent, l.agent_version, l.user_name, l.host, l.credential")
SESSION_FROM = f"agent_sessions AS s LEFT JOIN {LABELS_TABLE} AS l ON l.id = s.id"


class Connection(Protocol):
    """A read-only connection: sqlite3's, or collector.store.postgres.QueryConnection, which
    runs these same statements on PostgreSQL (SQL both accept, with `?` placeholders)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


def _unindexed(conn: Connection) -> str:
    """The prefix that keeps SQLite from reading a column through its index (a unary +);
    nothing on PostgreSQL, whose planner chooses from its statistics."""
    return "+" if isinstance(conn, sqlite3.Connection) else ""


def iso_hour(moment: dt.datetime) -> str:
    """A rollup `hour` key: the start of the UTC hour, in agent_sessions' time format."""
    return moment.strftime("%Y-%m-%dT%H:00:00.000Z")


def cost_usd(cents: float) -> float:
    """As the reports' JSON gives it: dollars, rounded to 8 places only to drop float noise."""
    return round(cents / 100, 8)


def money(cents: float) -> dict[str, Any]:
    """A cost for the page: the number, and its text exactly as the report tables print it
    (the page shows the text, so its rounding is the reports' by construction)."""
    return {"cost_usd": cost_usd(cents), "cost_text": format_usd(cents)}


def _session(row: tuple[Any, ...]) -> dict[str, Any]:
    (sid, kind, status, channel, model, created, last, turns, prompt, completion, reasoning,
     cents, goal, agent, agent_version, user, host, credential) = row
    return {
        "id": sid, "kind": kind, "status": status, "channel": channel, "model": model,
        "created_at": created, "last_active_at": last, "turns": turns,
        "prompt_tokens": prompt, "completion_tokens": completion,
        "reasoning_tokens": reasoning, "total_tokens": prompt + completion,
        "cost_cents": cents, **money(cents), "goal_text": goal,
        "agent": agent, "agent_version": agent_version, "user": user, "host": host,
        "credential": credential,  # the ingest token's name (collector.security)
    }


def overview(conn: Connection, now: dt.datetime) -> dict[str, Any]:
    """Spend today / 7 / 30 days, burn rate, daily spend by model and by agent, tokens by kind
    and the sessions active now. Days are UTC days, as `collector report daily` draws them."""
    today = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    first_day = today - (SERIES_DAYS - 1) * DAY
    days = [(first_day + i * DAY).date().isoformat() for i in range(SERIES_DAYS)]
    day_index = {d: i for i, d in enumerate(days)}

    by_model: dict[str, list[float]] = {}
    by_agent: dict[str, list[float]] = {}
    spend = dict.fromkeys(SPEND_WINDOWS, 0.0)
    window_starts = {name: (today - (n - 1) * DAY).date().isoformat()
                     for name, n in SPEND_WINDOWS.items()}
    tokens = {"turns": 0, "input_tokens": 0, "cache_read_tokens": 0, "cache_write_tokens": 0,
              "output_tokens": 0, "reasoning_tokens": 0}
    # The window's slice of the daily table: at most days x models x agents rows.
    rows = conn.execute(
        f"SELECT day, model, agent, turns, prompt_tokens, completion_tokens, reasoning_tokens, "
        f"cache_read_tokens, cache_write_tokens, cost_cents FROM {DAILY_TABLE} "
        f"WHERE day >= ? AND day <= ?", (days[0], days[-1]))
    for day, model, agent, turns, prompt, completion, reasoning, c_read, c_write, cents in rows:
        i = day_index[day]
        by_model.setdefault(model, [0.0] * SERIES_DAYS)[i] += cents
        by_agent.setdefault(agent, [0.0] * SERIES_DAYS)[i] += cents
        for name, start in window_starts.items():
            if day >= start:
                spend[name] += cents
        tokens["turns"] += turns
        tokens["input_tokens"] += prompt - c_read - c_write
        tokens["cache_read_tokens"] += c_read
        tokens["cache_write_tokens"] += c_write
        tokens["output_tokens"] += completion
        tokens["reasoning_tokens"] += reasoning

    burn_start = now.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0) - (
        BURN_HOURS - 1) * HOUR
    burn_cents = conn.execute(
        f"SELECT coalesce(sum(cost_cents), 0.0) FROM {HOURLY_TABLE} WHERE hour >= ?",
        (iso_hour(burn_start),)).fetchone()[0]
    elapsed_h = max((now - burn_start).total_seconds() / 3600, 1.0)

    prompt_total = (tokens["input_tokens"] + tokens["cache_read_tokens"]
                    + tokens["cache_write_tokens"])
    active_count = conn.execute(
        "SELECT count(*) FROM agent_sessions WHERE status = 'active'").fetchone()[0]
    # Active sessions are the recently active ones (the stale sweep ends the others): walk
    # the last_active_at index from the newest instead of sorting every active session.
    active = [_session(r) for r in conn.execute(
        f"SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE {_unindexed(conn)}s.status = "
        "'active' "
        "ORDER BY s.last_active_at DESC, s.id LIMIT ?", (ACTIVE_SHOWN,))]
    return {
        "now": now.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "spend": {name: {"cost_cents": cents, **money(cents), "since": window_starts[name]}
                  for name, cents in spend.items()},
        "burn_rate": {"cost_usd_per_hour": cost_usd(burn_cents / elapsed_h),
                      "cost_text_per_hour": format_usd(burn_cents / elapsed_h),
                      "cost_cents": burn_cents, "since": iso_hour(burn_start)},
        "series": {"days": days, "by_model": _stacked(by_model, NO_MODEL_LABEL),
                   "by_agent": _stacked(by_agent, NO_MODEL_LABEL)},
        "tokens": {**tokens,
                   "total_tokens": prompt_total + tokens["output_tokens"],
                   "cache_hit_rate": (tokens["cache_read_tokens"] / prompt_total
                                      if prompt_total else None)},
        "active": {"count": active_count, "sessions": active},
    }


def _stacked(series: dict[str, list[float]], none_label: str) -> list[dict[str, Any]]:
    """Series as the chart stacks them: the costliest MAX_SERIES, then the rest as one."""
    ranked = sorted(series.items(), key=lambda kv: (-sum(kv[1]), kv[0]))
    out = [{"name": name or none_label, "cost_usd": [cost_usd(c) for c in cents]}
           for name, cents in ranked[:MAX_SERIES]]
    if len(ranked) > MAX_SERIES:
        rest = [sum(values) for values in zip(*(v for _, v in ranked[MAX_SERIES:]),
                                              strict=True)]
        out.append({"name": OTHER_LABEL, "cost_usd": [cost_usd(c) for c in rest]})
    return out


@dataclass(frozen=True, slots=True)
class SessionQuery:
    """The sessions table's filters, order and page, as parsed from the query string."""

    status: str | None = None
    agent: str | None = None
    user: str | None = None
    host: str | None = None
    model: str | None = None
    search: str | None = None  # part of a session id
    sort: str = "last_active_at"
    descending: bool = True
    cursor: tuple[Any, str] | None = None  # (sort value, id) of the last row shown
    limit: int = DEFAULT_PAGE
    # ([attribution] dimension, value) filters, in the configured order.
    dimensions: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, params: Mapping[str, str], *, paged: bool = True,
              dimensions: Sequence[str] = ()) -> SessionQuery:
        """The query from request parameters; BadQuery (a 400) for any value out of range.
        Each configured dimension is a parameter of its own name (collector.config.attribution
        keeps those names clear of the others)."""
        status = text(params, "status")
        if status is not None and status not in STATUSES:
            raise BadQuery(f"status must be one of {', '.join(STATUSES)}")
        sort = choice(params, "sort", SORTS, "last_active_at")
        order = choice(params, "order", ("asc", "desc"), "desc")
        limit = DEFAULT_PAGE
        cursor = None
        if paged:
            limit = integer(params, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
            raw = text(params, "cursor")
            if raw is not None:
                cursor = decode_cursor(raw)
        return cls(status=status, agent=text(params, "agent"), user=text(params, "user"),
                   host=text(params, "host"), model=text(params, "model"),
                   search=text(params, "q"), sort=sort, descending=order == "desc",
                   cursor=cursor, limit=limit,
                   dimensions=tuple((d, v) for d in dimensions
                                    if (v := text(params, d)) is not None))

    def conditions(self) -> list[tuple[str, list[Any]]]:
        """Each filter as (SQL condition, its parameters); each has an index to lead with."""
        out: list[tuple[str, list[Any]]] = []
        if self.status is not None:
            out.append(("s.status = ?", [self.status]))
        for name, column in LABEL_COLUMNS.items():
            value = getattr(self, name)
            if value is not None:
                out.append((f"{column} = ?", [value]))
        if self.model is not None:
            out.append(("s.model = ?", ["" if self.model == NO_MODEL_LABEL else self.model]))
        for name, value in self.dimensions:
            # One range of the dimension's (dimension, value) index; a row value, so that
            # _no_index leaves the subquery whole.
            out.append((f"s.id IN (SELECT d.session_id FROM {DIMENSIONS_TABLE} AS d "
                        "WHERE (d.dimension, d.value) = (?, ?))", [name, value]))
        if self.search is not None:
            # A prefix of the id, as an index range (UTF-8 sorts as code points).
            last = ord(self.search[-1])
            if last < 0x10FFFF:
                out.append(("s.id >= ? AND s.id < ?",
                            [self.search, self.search[:-1] + chr(last + 1)]))
            else:
                out.append(("s.id >= ? AND substr(s.id, 1, ?) = ?",
                            [self.search, len(self.search), self.search]))
        return out

    def where(self) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for clause, values in self.conditions():
            clauses.append(clause)
            params += values
        return clauses, params


def encode_cursor(value: Any, session_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([value, session_id]).encode()).decode()


def decode_cursor(raw: str) -> tuple[Any, str]:
    try:
        decoded = json.loads(base64.urlsafe_b64decode(raw.encode()))
    except (ValueError, TypeError, RecursionError):
        raise BadQuery("cursor is not one this API gave") from None
    if not isinstance(decoded, list) or len(decoded) != 2 or not isinstance(decoded[1], str):
        raise BadQuery("cursor is not one this API gave")
    return cursor_value(decoded[0]), storable(decoded[1], "cursor")


def _no_index(clause: str, plus: str) -> str:
    """The same condition, written so SQLite cannot lead with its index (a unary + on each
    column, `plus` from _unindexed), so that the index chosen here leads instead."""
    return " AND ".join(plus + part for part in clause.split(" AND "))


def _candidates(conn: Connection, clause: str, params: list[Any]) -> int:
    """Sessions one filter's index holds, counted up to COUNT_CAP + 1 (an index-only read)."""
    table = (f"{LABELS_TABLE} AS l" if clause.startswith("l.") else "agent_sessions AS s")
    return int(conn.execute(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {clause} "
                            "LIMIT ?) AS m", [*params, COUNT_CAP + 1]).fetchone()[0])


@dataclass(frozen=True, slots=True)
class _Plan:
    total: int  # matching sessions, or a lower bound when not exact
    exact: bool
    clauses: list[str]  # the filters, all but the leading one written without their index
    params: list[Any]
    lead: str | None  # the filter to read through its index, None: walk the order's index


def _plan(conn: Connection, query: SessionQuery) -> _Plan:
    """Count the matches and choose the leading index: SQLite has no statistics on a
    read-only file, so it cannot tell a filter matching 80 sessions from one matching 20,000.

    The most selective filter (fewest sessions in its index, counted up to COUNT_CAP) leads.
    With at most COUNT_CAP candidates the count is exact; beyond, the matches among the first
    COUNT_CAP candidates are a lower bound. A page is then the few matches sorted (exact and
    at most SMALL_MATCH), or a walk of the sort order's index skipping non-matches."""
    conditions = query.conditions()
    if not conditions:
        n = int(conn.execute("SELECT count(*) FROM agent_sessions").fetchone()[0])
        return _Plan(n, True, [], [], None)
    sizes = [_candidates(conn, clause, params) for clause, params in conditions]
    lead = min(range(len(conditions)), key=sizes.__getitem__)
    plus = _unindexed(conn)
    clauses = [c if i == lead else _no_index(c, plus) for i, (c, _) in enumerate(conditions)]
    params = [v for _, values in conditions for v in values]
    if len(conditions) == 1:
        total = sizes[0]
    else:
        total = int(conn.execute(
            f"SELECT count(*) FROM (SELECT 1 FROM {SESSION_FROM} WHERE {' AND '.join(clauses)} "
            "LIMIT ?) AS m", [*params, COUNT_CAP + 1]).fetchone()[0])
    exact = sizes[lead] <= COUNT_CAP
    total = min(total, COUNT_CAP)
    if exact and total <= SMALL_MATCH:
        return _Plan(total, True, clauses, params, conditions[lead][0])
    return _Plan(total, exact, [_no_index(c, plus) for c, _ in conditions], params, None)


def sessions_page(conn: Connection, query: SessionQuery) -> dict[str, Any]:
    """One page of sessions in the query's order, the cursor of the next page (keyset: the
    page after a row is found by its sort value and id, never by an offset) and the count of
    the sessions matching the filters (`total`, exact when `total_exact`, else a lower bound).

    Which index leads is chosen here, not left to SQLite's guess: filters matching few
    sessions are read through their own index and those rows sorted; otherwise the sort
    order's index is walked from the cursor and rows not matching are skipped."""
    plan = _plan(conn, query)
    sessions, next_cursor = _page(conn, query, plan)
    return {"sessions": sessions,
            "next": None if next_cursor is None else encode_cursor(*next_cursor),
            "total": plan.total, "total_exact": plan.exact}


def _page(conn: Connection, query: SessionQuery,
          plan: _Plan) -> tuple[list[dict[str, Any]], tuple[Any, str] | None]:
    """The query's page (query.limit rows after query.cursor) read as `plan` says, and the
    (sort value, id) of its last row when more follow."""
    clauses, params = plan.clauses, plan.params
    expr = SORTS[query.sort]
    direction = "DESC" if query.descending else "ASC"
    order = f"{expr} {direction}, s.id {direction}"
    if plan.lead is not None:
        plus = _unindexed(conn)  # sort the few matches
        order = f"{plus}{expr} {direction}, {plus}s.id {direction}"
    if query.cursor is not None:
        value, last_id = query.cursor
        op = "<" if query.descending else ">"
        # A row-value range: one index range on (expr, id).
        clauses = [*clauses, f"({expr}, s.id) {op} (?, ?)"]
        params = [*params, value, last_id]
    sql = f"SELECT {SESSION_COLUMNS}, {expr} AS sort_value FROM {SESSION_FROM}"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += f" ORDER BY {order} LIMIT ?"
    rows = conn.execute(sql, [*params, query.limit + 1]).fetchall()
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    next_cursor = (rows[-1][-1], rows[-1][0]) if more and rows else None
    sessions = [_session(r[:-1]) for r in rows]
    attach_dimensions(conn, sessions)
    return sessions, next_cursor


def attach_dimensions(conn: Connection, sessions: list[dict[str, Any]]) -> None:
    """Give each session dict its `dimensions` ({name: latest value}): one read of the
    dimensions' primary key for the page (a page is at most MAX_PAGE or EXPORT_CHUNK ids)."""
    by_id: dict[str, dict[str, str]] = {}
    for session in sessions:
        session["dimensions"] = by_id[session["id"]] = {}
    if not by_id:
        return
    ids = list(by_id)
    marks = ",".join("?" * len(ids))
    for sid, name, value in conn.execute(
            f"SELECT session_id, dimension, value FROM {DIMENSIONS_TABLE} "
            f"WHERE session_id IN ({marks})", ids).fetchall():
        by_id[sid][name] = value


@dataclass(frozen=True, slots=True)
class ExportChunk:
    """Some of an export's rows, and what reads the next ones (None: this was the last)."""

    sessions: list[dict[str, Any]]
    next: ExportPosition | None


@dataclass(frozen=True, slots=True)
class ExportPosition:
    """Where an export goes on: its query with the cursor of the last row written, and the
    plan chosen for its first chunk (the matches are counted once per export, not per chunk)."""

    query: SessionQuery
    plan: _Plan


def export_chunk(conn: Connection, query: SessionQuery,
                 position: ExportPosition | None = None) -> ExportChunk:
    """The next EXPORT_CHUNK sessions matching `query` in its order (for CSV export), read
    by keyset from `position` (None: from the first). Each chunk is its own statement, so an
    export holds no read transaction and no reader between chunks; a session that changes
    while an export runs is written where its sort value was when its chunk was read."""
    if position is None:
        chunk_query = replace(query, cursor=None, limit=EXPORT_CHUNK)
        position = ExportPosition(chunk_query, _plan(conn, chunk_query))
    sessions, next_cursor = _page(conn, position.query, position.plan)
    if next_cursor is None:
        return ExportChunk(sessions, None)
    return ExportChunk(sessions, replace(position,
                                         query=replace(position.query, cursor=next_cursor)))


def session_detail(conn: Connection, session_id: str) -> dict[str, Any] | None:
    """A session's row, its labels and its usage per UTC hour and model (None if unknown)."""
    row = conn.execute(f"SELECT {SESSION_COLUMNS} FROM {SESSION_FROM} WHERE s.id = ?",
                       (session_id,)).fetchone()
    if row is None:
        return None
    session = _session(row)
    attach_dimensions(conn, [session])
    hours = [{
        "hour": hour, "model": model or NO_MODEL_LABEL, "turns": turns,
        "input_tokens": prompt - c_read - c_write, "cache_read_tokens": c_read,
        "cache_write_tokens": c_write, "output_tokens": completion,
        "reasoning_tokens": reasoning, **money(cents),
    } for hour, model, turns, prompt, completion, reasoning, c_read, c_write, cents
        in conn.execute(
            f"SELECT hour, model, turns, prompt_tokens, completion_tokens, reasoning_tokens, "
            f"cache_read_tokens, cache_write_tokens, cost_cents FROM {HOURLY_TABLE} "
            "WHERE session_id = ? ORDER BY hour, model", (session_id,))]
    return {"session": session, "hours": hours}


def _ranked(spend: Mapping[str, list[float]]) -> list[str]:
    """Values by spend, then sessions, then value (the filters' order)."""
    ranked = sorted(spend.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))
    return [value for value, _ in ranked]


def filter_values(conn: Connection, dimensions: Sequence[str] = ()) -> dict[str, Any]:
    """The values the table's filters offer: per field, the FILTER_TOP that spent most (then
    were used most) among the FILTER_RECENT sessions active last. One bounded read (the
    last_active_at index), whatever the fleet's size or how many distinct values agents sent;
    any other value is found by search_values. `complete[field]`: the list is every value.
    Each configured dimension in `dimensions` is a field too (`dimensions` lists them)."""
    rows = conn.execute(
        f"SELECT s.model, l.agent, l.user_name, l.host, s.cost_cents FROM {SESSION_FROM} "
        "ORDER BY s.last_active_at DESC LIMIT ?", (FILTER_RECENT + 1,)).fetchall()
    every_session = len(rows) <= FILTER_RECENT
    rows = rows[:FILTER_RECENT]
    out: dict[str, Any] = {"status": list(STATUSES)}
    complete: dict[str, bool] = {"status": True}
    for i, field in enumerate(SEARCH_FIELDS):
        spend: dict[str, list[float]] = {}
        for row in rows:
            value = row[i]
            if field == "model":
                value = value or NO_MODEL_LABEL
            if value is None:
                continue
            totals = spend.setdefault(value, [0.0, 0])
            totals[0] += row[4]
            totals[1] += 1
        ranked = _ranked(spend)
        out[field] = ranked[:FILTER_TOP]
        complete[field] = every_session and len(ranked) <= FILTER_TOP
    if dimensions:
        by_dimension: dict[str, dict[str, list[float]]] = {d: {} for d in dimensions}
        for name, value, cents in conn.execute(
                f"SELECT d.dimension, d.value, r.cost_cents FROM (SELECT id, cost_cents "
                "FROM agent_sessions ORDER BY last_active_at DESC LIMIT ?) AS r "
                f"JOIN {DIMENSIONS_TABLE} AS d ON d.session_id = r.id",
                (FILTER_RECENT,)).fetchall():
            values = by_dimension.get(name)
            if values is not None:
                totals = values.setdefault(value, [0.0, 0])
                totals[0] += cents
                totals[1] += 1
        for name, spend in by_dimension.items():
            ranked = _ranked(spend)
            out[name] = ranked[:FILTER_TOP]
            complete[name] = every_session and len(ranked) <= FILTER_TOP
    out["complete"] = complete
    out["dimensions"] = list(dimensions)
    return out


def search_values(conn: Connection, field: str, needle: str, limit: int) -> dict[str, Any]:
    """Up to `limit` values of a filter field matching `needle`: those starting with it
    (exact case, in order; on SQLite a walk of the field's index, one seek per value), then
    those containing it in any case, among the first SEARCH_SCAN rows of its table (a bounded
    read). `more`: there are other matches beyond these. A `field` outside SEARCH_FIELDS is
    a configured dimension (the caller checked it)."""
    scoped: tuple[Any, ...] = ()
    if field in SEARCH_FIELDS:
        table, column = SEARCH_FIELDS[field]
        scope = ""
    else:
        table, column = DIMENSIONS_TABLE, "value"
        scope, scoped = "dimension = ?", (field,)
    found = _prefixed(conn, table, column, needle, limit + 1, scope, scoped)
    if len(found) <= limit:
        seen = set(found)
        rows = conn.execute(
            f"SELECT DISTINCT x FROM (SELECT {column} AS x FROM {table} "
            f"{'WHERE ' + scope if scope else ''} LIMIT ?) AS r "
            "WHERE x IS NOT NULL AND instr(lower(x), ?) > 0 ORDER BY x LIMIT ?",
            (*scoped, SEARCH_SCAN, needle.lower(), limit + 1 + len(found))).fetchall()
        found += [str(r[0]) for r in rows if r[0] not in seen]
    values = [v or NO_MODEL_LABEL for v in found[:limit]]
    return {"field": field, "q": needle, "values": values, "more": len(found) > limit}


def _prefixed(conn: Connection, table: str, column: str, prefix: str, limit: int,
              scope: str = "", scoped: tuple[Any, ...] = ()) -> list[str]:
    """Distinct values of `column` starting with `prefix`, in order, at most `limit`.
    `scope`: a condition that leads the index (a dimension's name), with its parameters
    `scoped`."""
    n = len(prefix)
    scope = f"{scope} AND " if scope else ""
    if isinstance(conn, sqlite3.Connection):
        # SQLite compares text as bytes, so the values with a prefix are one range of the
        # index: walk it a distinct value at a time (a loose index scan), `limit` seeks.
        sql = (f"WITH RECURSIVE v(x, k) AS (SELECT (SELECT min({column}) FROM {table} "
               f"WHERE {scope}{column} >= ?), 1 UNION ALL SELECT (SELECT min({column}) "
               f"FROM {table} WHERE {scope}{column} > v.x), k + 1 FROM v WHERE v.x IS NOT NULL "
               "AND substr(v.x, 1, ?) = ? AND k < ?) "
               "SELECT x FROM v WHERE x IS NOT NULL AND substr(x, 1, ?) = ?")
        rows = conn.execute(sql, (*scoped, prefix, *scoped, n, prefix, limit, n,
                                  prefix)).fetchall()
    else:
        # PostgreSQL's label columns sort in the database's collation, where the values
        # sharing a prefix need not be one range: the prefix is compared as text instead.
        sql = (f"SELECT {column} FROM {table} WHERE {scope}substr({column}, 1, ?) = ? "
               f"GROUP BY {column} ORDER BY {column} LIMIT ?")
        rows = conn.execute(sql, (*scoped, n, prefix, limit)).fetchall()
    return [str(r[0]) for r in rows][:limit]


CSV_COLUMNS = ("id", "agent", "agent_version", "user", "host", "credential", "status", "kind",
               "channel", "model", "created_at", "last_active_at", "turns", "prompt_tokens",
               "completion_tokens", "reasoning_tokens", "total_tokens", "cost_usd")
