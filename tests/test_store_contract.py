"""The storage contract, run against every backend on a real database: SQLite on a file in
tmp_path, PostgreSQL on the throwaway server (tests/pg.py), a fresh database per test."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from collector.accounting.aggregate import Batch
from collector.signals.traces import (
    ROLE_CALL,
    ROLE_TURN,
    UNRESOLVED,
    HeldUsage,
    SpanUsage,
    TraceLink,
    TraceRoot,
)
from collector.store import postgres, sqlite
from collector.store.base import BATCH_WRITES, Reader, SchemaError, Store
from collector.store.postgres import ConnectOptions, PostgresReader, PostgresStore
from collector.store.sqlite import SQLiteReader, SQLiteStore
from tests.conftest import MS, SECOND, T0

HOUR = 3600 * SECOND


def rec(key: int, session: str = "s", *, t: int = T0, turns: int = 1, prompt: int = 10,
        model: str | None = "m", status: str | None = None, kind: str | None = None,
        goal: str | None = None, cost: float = 0.5) -> SpanUsage:
    return SpanUsage(key.to_bytes(32, "big"), session, t, t + MS, turns, prompt, 2, 1, 0, 0,
                     cost, True, model, kind, status, None, goal)


def batch(*records: SpanUsage) -> Batch:
    b = Batch()
    b.add(records)
    return b


@dataclass
class Backend:
    """How a test makes stores and readers on one database, and reads it raw."""

    name: str
    make_store: Callable[..., Store]
    reader: Reader
    query: Callable[[str], list[tuple[Any, ...]]]
    drop_rollup: Callable[[], None]
    make_other_columns: Callable[[], None]

    def store(self, retention_s: int = 100, resolve_window_s: int = 600) -> Store:
        return self.make_store(retention_s, resolve_window_s)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "db.sqlite"

        def query(sql: str) -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(path)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()

        def exec_sqlite(sql: str) -> None:
            conn = sqlite3.connect(path)
            conn.execute(sql)
            conn.commit()
            conn.close()

        return Backend("sqlite", lambda r, w: SQLiteStore(path, retention_s=r, resolve_window_s=w),
                       SQLiteReader(path),
                       query, lambda: exec_sqlite("DROP TABLE collector_usage_hourly"),
                       lambda: exec_sqlite("CREATE TABLE agent_sessions (id TEXT PRIMARY KEY, "
                                           "cost REAL)"))
    server = request.getfixturevalue("pg_server")
    url = server.new_database()
    options = ConnectOptions(url)

    def pg_query(sql: str) -> list[tuple[Any, ...]]:
        return server.query(url, sql)  # type: ignore[no-any-return]

    def pg_exec(sql: str) -> None:
        server.execute(url, sql)

    return Backend("postgres",
                   lambda r, w: PostgresStore(options, retention_s=r, commit_timeout_s=30,
                                              resolve_window_s=w),
                   PostgresReader(options), pg_query,
                   lambda: pg_exec("DROP TABLE collector_usage_hourly"),
                   lambda: pg_exec("CREATE TABLE agent_sessions (id TEXT PRIMARY KEY, "
                                   "cost DOUBLE PRECISION)"))


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.store()
    await s.open()
    yield s
    await s.close()


def rows(backend: Backend) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in backend.reader.read_sessions()}


def test_every_batch_write_has_a_statement_in_every_backend() -> None:
    tables = {w.table for w in BATCH_WRITES}
    assert set(sqlite.BATCH_STATEMENTS) == tables
    assert set(postgres.BATCH_STATEMENTS) == tables == set(postgres.BATCH_ARGS)


async def test_commit_adds_to_what_is_stored(store: Store, backend: Backend) -> None:
    result, _ = await store.commit(batch(rec(1), rec(2, "other")), now_ns=T0)
    assert (result.spans, result.sessions, result.duplicates) == (2, 2, 0)
    await store.commit(batch(rec(3, t=T0 + SECOND)), now_ns=T0)
    row = rows(backend)["s"]
    assert (row["turns"], row["prompt_tokens"], row["completion_tokens"]) == (2, 20, 4)
    assert (row["reasoning_tokens"], row["cost_cents"]) == (2, 1.0)
    assert row["created_at"] == "2026-01-01T00:00:00.000Z"
    assert row["last_active_at"] == "2026-01-01T00:00:01.001Z"
    assert (row["kind"], row["status"], row["channel"], row["model"]) == (
        "interactive", "active", "cli", "m")
    assert list(row) == [
        "id", "kind", "status", "channel", "model", "created_at", "last_active_at", "turns",
        "prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_cents", "goal_text"]


async def test_ids_already_accounted_are_skipped_exactly(store: Store, backend: Backend) -> None:
    await store.commit(batch(rec(1), rec(2)), now_ns=T0)
    result, applied = await store.commit(batch(rec(2), rec(3), rec(1), rec(4)), now_ns=T0)
    assert (result.spans, result.duplicates) == (2, 2)
    assert {r.key for r in applied.records} == {(3).to_bytes(32, "big"), (4).to_bytes(32, "big")}
    assert rows(backend)["s"]["turns"] == 4


async def test_a_second_store_on_the_same_database_shares_the_dedupe(
        store: Store, backend: Backend) -> None:
    await store.commit(batch(rec(1)), now_ns=T0)
    other = backend.store()
    await other.open()
    try:
        result, _ = await other.commit(batch(rec(1), rec(2)), now_ns=T0)
    finally:
        await other.close()
    assert (result.spans, result.duplicates) == (1, 1)
    assert rows(backend)["s"]["turns"] == 2


async def test_dedupe_window_rotates_after_the_retention(store: Store) -> None:
    await store.commit(batch(rec(1)), now_ns=T0)
    await store.commit(batch(rec(2)), now_ns=T0 + 100 * SECOND)
    result, _ = await store.commit(batch(rec(1)), now_ns=T0 + 150 * SECOND)
    assert result.duplicates == 1
    await store.commit(batch(), now_ns=T0 + 200 * SECOND)
    result, _ = await store.commit(batch(rec(1)), now_ns=T0 + 201 * SECOND)
    assert (result.spans, result.duplicates) == (1, 0)


async def test_dedupe_window_counts_follow_commits_rotation_and_reopen(
        store: Store, backend: Backend) -> None:
    await store.commit(batch(rec(1), rec(2)), now_ns=T0)
    await store.commit(batch(rec(2), rec(3)), now_ns=T0)
    assert store.dedupe_window == 3
    await store.commit(batch(rec(4)), now_ns=T0 + 100 * SECOND)  # rotates first
    assert store.dedupe_window == 4
    assert backend.query("SELECT count(*) FROM collector_seen_previous") == [(3,)]
    again = backend.store()
    await again.open()
    await again.close()
    assert again.dedupe_window == 4


async def test_latest_values_go_by_span_time_not_arrival(store: Store, backend: Backend) -> None:
    await store.commit(batch(rec(1, t=T0 + 10 * SECOND, model="new", status="completed",
                                 kind="autonomous", goal="late goal")), now_ns=T0)
    # An older span arriving later sets nothing it carries, but adds its usage.
    await store.commit(batch(rec(2, t=T0, model="old", status="failed", kind="acp",
                                 goal="early goal")), now_ns=T0)
    row = rows(backend)["s"]
    assert (row["model"], row["status"], row["kind"], row["goal_text"]) == (
        "new", "completed", "autonomous", "late goal")
    assert (row["turns"], row["created_at"]) == (2, "2026-01-01T00:00:00.000Z")
    # A newer one does.
    await store.commit(batch(rec(3, t=T0 + 20 * SECOND, model="newer", status="failed")),
                       now_ns=T0)
    row = rows(backend)["s"]
    assert (row["model"], row["status"], row["goal_text"]) == ("newer", "failed", "late goal")
    marks = backend.query("SELECT model_ns, status_ns, kind_ns, goal_ns "
                          "FROM collector_session_marks")
    assert marks == [(T0 + 20 * SECOND + MS, T0 + 20 * SECOND + MS, T0 + 10 * SECOND + MS,
                      T0 + 10 * SECOND + MS)]


async def test_sweep_marks_only_active_sessions_unknown_and_activity_revives(
        store: Store, backend: Backend) -> None:
    await store.commit(batch(rec(1, "a"), rec(2, "done", status="completed"),
                             rec(3, "fresh", t=T0 + 10 * SECOND)), now_ns=T0)
    result, _ = await store.commit(batch(), now_ns=T0, sweep_before_ns=T0 + 5 * SECOND)
    assert result.swept == 1
    assert {k: v["status"] for k, v in rows(backend).items()} == {
        "a": "unknown", "done": "completed", "fresh": "active"}
    assert backend.reader.count_sessions_by_status() == {"unknown": 1, "completed": 1,
                                                         "active": 1}
    await store.commit(batch(rec(4, "a", t=T0 + 60 * SECOND)), now_ns=T0)
    assert rows(backend)["a"]["status"] == "active"


def rollup(backend: Backend) -> dict[tuple[str, str, str], tuple[Any, ...]]:
    return {(r[0], r[1], r[2]): tuple(r[3:]) for r in backend.query(
        "SELECT hour, session_id, model, turns, prompt_tokens, completion_tokens, "
        "reasoning_tokens, cache_read_tokens, cache_write_tokens, cost_cents "
        "FROM collector_usage_hourly")}


async def test_hourly_rollup_commits_with_the_sessions_and_only_once(
        store: Store, backend: Backend) -> None:
    await store.commit(batch(rec(1), rec(2, model=None), rec(3, t=T0 + HOUR + 5 * SECOND)),
                       now_ns=T0)
    update = SpanUsage((4).to_bytes(32, "big"), "s", T0, T0, 0, 0, 0, 0, 0, 0, 0.0, True, None,
                       None, "completed", None, None)
    await store.commit(batch(rec(3, t=T0 + HOUR + 5 * SECOND), update), now_ns=T0)
    # The span naming no model counts under the session's model.
    assert rollup(backend) == {
        ("2026-01-01T00:00:00.000Z", "s", "m"): (2, 20, 4, 2, 0, 0, 1.0),
        ("2026-01-01T01:00:00.000Z", "s", "m"): (1, 10, 2, 1, 0, 0, 0.5),
    }
    usage = backend.reader.read_usage(group="session")
    assert [tuple(u) for u in usage] == [
        ("s", "m", "2026-01-01T01:00:00.000Z", 3, 30, 6, 3, 0, 0, 1.5)]
    assert rows(backend)["s"]["status"] == "completed"
    assert [tuple(u) for u in backend.reader.read_usage(
        group="hour", lo="2026-01-01T00:30:00.000Z")] == [
        ("2026-01-01T01:00:00.000Z", "m", "2026-01-01T01:00:00.000Z", 1, 10, 2, 1, 0, 0, 0.5)]


async def test_readers_order_filter_and_limit(store: Store, backend: Backend) -> None:
    # Byte order for ids on both backends ("B" < "a"), newest activity first.
    await store.commit(batch(rec(1, "a", t=T0), rec(2, "B", t=T0), rec(3, "z", t=T0 + SECOND),
                             rec(4, "done", status="completed")), now_ns=T0)
    assert [r["id"] for r in backend.reader.read_sessions()] == ["z", "B", "a", "done"]
    assert [r["id"] for r in backend.reader.read_sessions(limit=2)] == ["z", "B"]
    assert [r["id"] for r in backend.reader.read_sessions(status="completed")] == ["done"]
    assert [u[0] for u in backend.reader.read_usage(group="session")] == ["B", "a", "done", "z"]
    assert isinstance(backend.reader.read_usage(group="hour")[0][3], int)


async def test_two_stores_committing_the_same_sessions_at_once_lose_nothing(
        backend: Backend) -> None:
    stores = [backend.store() for _ in range(3)]
    for s in stores:
        await s.open()
    try:
        # Each round: every store commits the same span ids (only one may count each) and
        # its own, over the same sessions in different orders.
        for round_ in range(6):
            base = round_ * 1000
            await asyncio.gather(*(
                s.commit(batch(*(rec(base + k, f"s{(k * (i + 1)) % 7}", cost=0.25)
                                 for k in range(40)),
                               *(rec(base + 100 * (i + 1) + k, f"s{k % 7}", cost=0.25)
                                 for k in range(20))), now_ns=T0)
                for i, s in enumerate(stores)))
    finally:
        for s in stores:
            await s.close()
    total = sum(r["turns"] for r in rows(backend).values())
    assert total == 6 * (40 + 3 * 20)
    cost = sum(r["cost_cents"] for r in rows(backend).values())
    assert cost == total * 0.25
    assert sum(u[3] for u in backend.reader.read_usage(group="session")) == total


async def test_other_columns_are_a_schema_error(backend: Backend) -> None:
    backend.make_other_columns()
    with pytest.raises(SchemaError, match=r"agent_sessions has columns \(id TEXT, cost "):
        s = backend.store()
        try:
            await s.open()
        finally:
            await s.close()


def test_a_missing_rollup_is_a_storage_error_with_a_hint(backend: Backend) -> None:
    async def create() -> None:
        s = backend.store()
        await s.open()
        await s.close()

    asyncio.run(create())
    backend.drop_rollup()
    from collector.store.base import StorageError

    with pytest.raises(StorageError, match="collector_usage_hourly"):
        backend.reader.read_usage(group="hour")


def point(series: int, value: float, *, start: int = T0, t: int = T0 + SECOND,
          session: str = "m") -> Any:
    """A cumulative input-token point (one prompt token per unit, unpriced)."""
    from collector.signals.metrics import CumulativePoint, Unit

    return CumulativePoint(series.to_bytes(32, "big"), start, t, value, False,
                           Unit(1, 0, 0, 0, 0, 0.0, True), session, "model",
                           (10_000 + series * 1000 + t // SECOND % 1000).to_bytes(32, "big"))


def cumulative(*points: Any) -> Batch:
    b = Batch()
    b.cumulative.extend(points)
    return b


async def test_cumulative_points_count_their_increase_once_across_stores(
        store: Store, backend: Backend) -> None:
    await store.commit(cumulative(point(1, 100)), now_ns=T0)
    # The same point again (a retry), then an increase, then a reset (new start time).
    await store.commit(cumulative(point(1, 100)), now_ns=T0)
    await store.commit(cumulative(point(1, 130, t=T0 + 2 * SECOND)), now_ns=T0)
    await store.commit(cumulative(point(1, 5, start=T0 + 3 * SECOND, t=T0 + 4 * SECOND)),
                       now_ns=T0)
    assert rows(backend)["m"]["prompt_tokens"] == 135
    # Two stores resolving points of one series at once: each increase counts once.
    other = backend.store()
    await other.open()
    try:
        for step in range(1, 6):
            t = T0 + (4 + step) * SECOND
            await asyncio.gather(
                store.commit(cumulative(point(1, 5 + 10 * step, start=T0 + 3 * SECOND, t=t)),
                             now_ns=T0),
                other.commit(cumulative(point(1, 5 + 10 * step, start=T0 + 3 * SECOND, t=t)),
                             now_ns=T0))
    finally:
        await other.close()
    assert rows(backend)["m"]["prompt_tokens"] == 135 + 50
    assert backend.query("SELECT value FROM collector_metric_series") == [(55.0,)]


async def test_labels_keep_the_latest_value_given_and_a_modelless_turn_takes_the_sessions_model(
        store: Store, backend: Backend) -> None:
    late = rec(1, t=T0 + 10 * SECOND)._replace(agent="claude-code", user="ann", host="h2")
    early = rec(2, t=T0, model=None)._replace(agent="old-agent", agent_version="1.0",
                                              host="h1")
    await store.commit(batch(late), now_ns=T0)
    await store.commit(batch(early), now_ns=T0)
    assert backend.query("SELECT id, agent, agent_version, user_name, host "
                         "FROM collector_session_labels") == [
        ("s", "claude-code", "1.0", "ann", "h2")]
    # The turn that named no model counts under the session's model ("m"), not "".
    assert [tuple(u[:4]) for u in backend.reader.read_usage(group="session")] == [
        ("s", "m", "2026-01-01T00:00:00.000Z", 2)]
    assert [tuple(u[:4]) for u in backend.reader.read_usage(group="agent")] == [
        ("claude-code", "m", "2026-01-01T00:00:00.000Z", 2)]
    assert [tuple(u[:2]) for u in backend.reader.read_usage(group="user")] == [("ann", "m")]


# -- usage without a session id: held, then resolved once, whichever store resolves it --

WINDOW_S = 10


def held_call(trace: int, span: int, parent: int | None, *, prompt: int = 100) -> HeldUsage:
    """A model call naming no session: span `span` of trace `trace`, child of `parent`."""
    trace_id, span_id = trace.to_bytes(16, "big"), span.to_bytes(8, "big")
    key = (T0 + MS).to_bytes(8, "big") + trace_id + span_id
    usage = SpanUsage(key, UNRESOLVED, T0, T0 + MS, 0, prompt, 7, 0, 0, 0, 0.25, True,
                      "gpt-4o", None, None, None, None, "app", None, None, None)
    return HeldUsage(usage, trace_id, span_id,
                     b"" if parent is None else parent.to_bytes(8, "big"))


def agent_span(trace: int, span: int, session: str) -> TraceLink:
    return TraceLink(trace.to_bytes(16, "big"), span.to_bytes(8, "big"), b"", session, True)


def traced(held: list[HeldUsage] = (), links: list[TraceLink] = ()  # type: ignore[assignment]
           ) -> Batch:
    b = Batch()
    b.hold(held, links)
    return b


def held_state(backend: Backend) -> tuple[int, int]:
    """(rows in the held table, the held count kept beside it)."""
    rows_held = backend.query("SELECT count(*) FROM collector_held_usage")[0][0]
    count = backend.query("SELECT value FROM collector_meta WHERE name = 'held_count'")[0][0]
    return int(rows_held), int(count)


@pytest.fixture
async def held_store(backend: Backend) -> AsyncIterator[Store]:
    s = backend.store(resolve_window_s=WINDOW_S)
    await s.open()
    yield s
    await s.close()


async def test_held_usage_is_resolved_by_a_later_span_of_its_trace_once(
        held_store: Store, backend: Backend) -> None:
    store = held_store
    result, _ = await store.commit(traced([held_call(1, 3, 2)]), now_ns=T0)
    assert (result.spans, result.held, result.held_now, result.resolved) == (1, 1, 1, 0)
    assert rows(backend) == {} and held_state(backend) == (1, 1)
    # A retry of the held span is a duplicate, not held twice.
    result, _ = await store.commit(traced([held_call(1, 3, 2)]), now_ns=T0 + SECOND)
    assert (result.duplicates, result.held, result.held_now) == (1, 0, 1)
    # A bridge (span 2, no session, child of 1), then the agent span naming the session.
    bridge = TraceLink((1).to_bytes(16, "big"), (2).to_bytes(8, "big"), (1).to_bytes(8, "big"),
                       None)
    result, _ = await store.commit(traced(links=[bridge]), now_ns=T0 + SECOND)
    assert (result.resolved, result.held_now) == (0, 1)
    result, _ = await store.commit(traced(links=[agent_span(1, 1, "sess")]),
                                   now_ns=T0 + 2 * SECOND)
    assert (result.spans, result.resolved, result.resolved_by_window, result.held_now) == (
        0, 1, 0, 0)
    row = rows(backend)["sess"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["model"], row["cost_cents"]) == (
        100, 7, "gpt-4o", 0.25)
    assert held_state(backend) == (0, 0)
    assert [(u[0], u[1], u[4]) for u in backend.reader.read_usage(group="session")] == [
        ("sess", "gpt-4o", 100)]
    # After that, still a duplicate.
    result, _ = await store.commit(traced([held_call(1, 3, 2)]), now_ns=T0 + 3 * SECOND)
    assert (result.duplicates, result.held) == (1, 0)
    assert rows(backend)["sess"]["prompt_tokens"] == 100


async def test_held_usage_and_a_usage_span_naming_the_session_in_one_batch(
        held_store: Store, backend: Backend) -> None:
    # Span 1 is usage naming its session; its key makes it a link of a trace with held usage.
    parent = held_call(1, 1, None).usage._replace(session_id="from-key", turns=1)
    b = traced([held_call(1, 3, 2)], [TraceLink((1).to_bytes(16, "big"),
                                                (2).to_bytes(8, "big"),
                                                (1).to_bytes(8, "big"), None)])
    b.add([parent])
    result, _ = await held_store.commit(b, now_ns=T0)
    assert (result.spans, result.held, result.resolved, result.held_now) == (2, 1, 1, 0)
    assert rows(backend)["from-key"]["prompt_tokens"] == 200
    # Links of traces without held usage (and not anchors) leave no row.
    await held_store.commit(traced(links=[TraceLink((9).to_bytes(16, "big"),
                                                    (2).to_bytes(8, "big"), b"", None)]),
                            now_ns=T0)
    assert backend.query("SELECT count(*) FROM collector_trace_links "
                         f"WHERE trace_id = {_blob(backend, (9).to_bytes(16, 'big'))}"
                         ) == [(0,)]


def _blob(backend: Backend, value: bytes) -> str:
    return f"x'{value.hex()}'" if backend.name == "sqlite" else f"'\\x{value.hex()}'::bytea"


async def test_two_stores_holding_and_resolving_at_once_count_each_span_once(
        held_store: Store, backend: Backend) -> None:
    """One store holds the calls of 40 traces while the other, at the same moment, commits the
    agent spans naming their sessions (half of them before, half after, in several flushes);
    then the rest wait for the window's end and both stores try to resolve them at once."""
    other = backend.store(resolve_window_s=WINDOW_S)
    await other.open()
    try:
        traces = range(1, 41)
        for step in range(4):
            mine = [held_call(t, 10 + step, 1, prompt=t) for t in traces]
            theirs = [agent_span(t, 1, f"s{t}") for t in traces if t % 4 == step]
            await asyncio.gather(
                held_store.commit(traced(mine), now_ns=T0 + step * MS),
                other.commit(traced(links=theirs), now_ns=T0 + step * MS))
        # Traces 41..60 never name a session: held until the window ends.
        await held_store.commit(traced([held_call(t, 10, 1, prompt=1) for t in range(41, 61)]),
                                now_ns=T0)
        # Whatever a race left held is resolved by the next touch; the window's end then
        # resolves the rest, by either store, each once.
        end = T0 + WINDOW_S * SECOND + 10 * MS
        results = await asyncio.gather(held_store.commit(Batch(), now_ns=end),
                                       other.commit(Batch(), now_ns=end))
        by_window = sum(r.resolved_by_window for r, _ in results)
    finally:
        await other.close()
    assert held_state(backend) == (0, 0)
    stored = rows(backend)
    for t in traces:
        assert stored[f"s{t}"]["prompt_tokens"] == 4 * t, t
    for t in range(41, 61):
        assert stored[(t).to_bytes(16, "big").hex()]["prompt_tokens"] == 1
    assert by_window >= 20
    total = backend.query("SELECT sum(prompt_tokens) FROM agent_sessions")[0][0]
    assert int(total) == 4 * sum(traces) + 20


async def test_held_usage_waits_the_window_then_goes_to_the_traces_session(
        backend: Backend) -> None:
    first = backend.store(resolve_window_s=WINDOW_S)
    await first.open()
    await first.commit(traced([held_call(7, 3, 2)]), now_ns=T0)
    await first.close()
    # Another store (another collector, or this one restarted) finishes it.
    second = backend.store(resolve_window_s=WINDOW_S)
    await second.open()
    try:
        assert second.held_now == 1
        result, _ = await second.commit(Batch(), now_ns=T0 + (WINDOW_S - 1) * SECOND)
        assert (result.resolved_by_window, result.held_now) == (0, 1)
        result, _ = await second.commit(Batch(), now_ns=T0 + WINDOW_S * SECOND)
        assert (result.resolved_by_window, result.held_now) == (1, 0)
        assert rows(backend)[(7).to_bytes(16, "big").hex()]["prompt_tokens"] == 100
        # A link seen more than two windows ago no longer resolves anything.
        await second.commit(traced(links=[agent_span(8, 1, "old")]), now_ns=T0)
        await second.commit(traced([held_call(8, 3, 1)]), now_ns=T0 + 3 * WINDOW_S * SECOND)
        assert "old" not in rows(backend)
        assert held_state(backend) == (1, 1)
    finally:
        await second.close()


async def test_a_flush_mixing_unchanged_and_changed_sessions_adds_every_sum_once(
        store: Store, backend: Backend) -> None:
    """Many sessions in one flush, more than one statement's worth of rows (SQLite binds 512
    a statement and pads the last chunk), where most sessions change nothing but their times
    and sums and some change an indexed value: model, status (set, or revived from unknown),
    created_at, agent. SQLite upserts these in two steps (only the rows with a change take the
    second); whichever step takes a row, its sums are added exactly once."""
    n = 600

    def labelled(key: int, session: int, t: int, agent: str, **kw: Any) -> SpanUsage:
        return rec(key, f"s{session:03d}", t=t, **kw)._replace(agent=agent, host="h")

    def first(i: int) -> SpanUsage:
        # Sessions 4 mod 5 end after the sweep's threshold below and stay active.
        t = T0 + (3 if i % 5 == 4 else 1) * SECOND
        return labelled(i, i, t, "a", model="m", prompt=i + 1)

    await store.commit(batch(*(first(i) for i in range(n))), now_ns=T0)
    await store.commit(batch(), now_ns=T0, sweep_before_ns=T0 + 2 * SECOND)
    later = T0 + 10 * SECOND

    def second(i: int) -> SpanUsage:
        if i % 5 == 1:  # a newer model
            return labelled(n + i, i, later, "a", model="m2", prompt=3)
        if i % 5 == 2:  # an earlier start: created_at moves back; still unknown (older end)
            return labelled(n + i, i, T0 - SECOND, "a", model=None, prompt=3)
        if i % 5 == 3:  # a status, and another agent
            return labelled(n + i, i, later, "b", status="completed", prompt=3)
        if i % 5 == 4:  # nothing but its last activity and sums
            return labelled(n + i, i, later, "a", model="m", prompt=3)
        return labelled(n + i, i, later, "a", model="m", prompt=3)  # revived from unknown

    await store.commit(batch(*(second(i) for i in range(n))), now_ns=T0)
    got = rows(backend)
    assert len(got) == n
    for i in range(n):
        row = got[f"s{i:03d}"]
        assert (row["turns"], row["prompt_tokens"]) == (2, i + 1 + 3), i
        assert row["model"] == ("m2" if i % 5 == 1 else "m"), i
        assert row["status"] == ("unknown" if i % 5 == 2 else
                                 "completed" if i % 5 == 3 else "active"), i
        assert row["created_at"] == {2: "2025-12-31T23:59:59.000Z",
                                     4: "2026-01-01T00:00:03.000Z"}.get(
                                         i % 5, "2026-01-01T00:00:01.000Z"), i
        assert row["last_active_at"] == ("2026-01-01T00:00:01.001Z" if i % 5 == 2
                                         else "2026-01-01T00:00:10.001Z"), i
    agents = dict(backend.query("SELECT id, agent FROM collector_session_labels"))
    assert agents == {f"s{i:03d}": "b" if i % 5 == 3 else "a" for i in range(n)}
    # The daily rollup follows the agents: session sums per agent, nothing lost or doubled.
    daily = dict(backend.query("SELECT agent, sum(prompt_tokens) FROM collector_usage_daily "
                               "GROUP BY agent"))
    expected: dict[str, int] = {}
    for i in range(n):
        agent = "b" if i % 5 == 3 else "a"
        expected[agent] = expected.get(agent, 0) + i + 1 + 3
    assert {k: int(v) for k, v in daily.items()} == expected


# -- turns across a trace (collector.accounting.turns): decided once, whichever store --------

def span_rec(trace: int, span: int, session: str, role: int, *, start: int = T0,
             prompt: int = 0) -> SpanUsage:
    """A span's record as the mapping gives it: key = end time + trace id + span id."""
    end = start + MS
    key = end.to_bytes(8, "big") + trace.to_bytes(16, "big") + span.to_bytes(8, "big")
    return SpanUsage(key, session, start, end, 0 if role == ROLE_CALL else 1, prompt, 1, 0, 0,
                     0, 0.0, True, "m", None, None, None, None, role=role)


def trace_root(trace: int, span: int, start: int, end: int) -> TraceRoot:
    return TraceRoot(end.to_bytes(8, "big") + trace.to_bytes(16, "big")
                     + span.to_bytes(8, "big"), start, end)


def with_roots(*roots: TraceRoot, records: tuple[SpanUsage, ...] = ()) -> Batch:
    b = batch(*records)
    b.hold((), (), roots)
    return b


def turn_states(backend: Backend) -> int:
    return int(backend.query("SELECT count(*) FROM collector_trace_turns")[0][0])


async def test_a_root_arriving_last_is_the_turn_of_its_trace_once_with_its_times(
        store: Store, backend: Backend) -> None:
    """LangGraph's create_agent: model calls under a parent first, the CHAIN root last."""
    calls = [span_rec(1, 10 + i, "s", ROLE_CALL, start=T0 + i * SECOND, prompt=10)
             for i in range(3)]
    await store.commit(batch(*calls), now_ns=T0 + 3 * SECOND)
    row = rows(backend)["s"]
    assert (row["turns"], row["prompt_tokens"]) == (0, 30)
    assert turn_states(backend) == 1
    root = trace_root(1, 1, T0 - SECOND, T0 + 5 * SECOND)
    result, _ = await store.commit(with_roots(root), now_ns=T0 + 5 * SECOND)
    assert result.spans == 0  # the root's turn is no span of its own
    row = rows(backend)["s"]
    assert (row["turns"], row["prompt_tokens"]) == (1, 30)
    assert (row["created_at"], row["last_active_at"]) == (
        "2025-12-31T23:59:59.000Z", "2026-01-01T00:00:05.000Z")
    # The root again (an exporter's retry), alone and with a retried call: nothing more.
    await store.commit(with_roots(root), now_ns=T0 + 6 * SECOND)
    await store.commit(with_roots(root, records=(calls[0],)), now_ns=T0 + 6 * SECOND)
    assert (rows(backend)["s"]["turns"], rows(backend)["s"]["prompt_tokens"]) == (1, 30)
    # A root of a trace that carried no usage makes no session; it is remembered (one row
    # per trace's root beside the sessions' states) for usage of its trace arriving later.
    await store.commit(with_roots(trace_root(2, 1, T0, T0 + SECOND)), now_ns=T0 + 7 * SECOND)
    assert set(rows(backend)) == {"s"} and turn_states(backend) == 3


async def test_a_root_arriving_first_is_the_turn_of_usage_arriving_later_once(
        store: Store, backend: Backend) -> None:
    """Spans sent one by one, roots first (a child's export retried after its root's): the
    root is remembered and gives its turn and times to each session its trace's usage reaches
    later, once, whichever commit or retry brings it."""
    root = trace_root(1, 1, T0 - SECOND, T0 + 5 * SECOND)
    for _ in range(2):  # the root, then its retry
        result, _ = await store.commit(with_roots(root), now_ns=T0)
        assert result.sessions == 0
    assert rows(backend) == {}
    call = span_rec(1, 10, "s", ROLE_CALL, start=T0 + SECOND, prompt=10)
    agent = span_rec(1, 11, "s", ROLE_TURN, start=T0 + 2 * SECOND, prompt=5)
    other = span_rec(1, 12, "t", ROLE_CALL, start=T0 + 3 * SECOND, prompt=7)
    for b in (batch(call), batch(call), batch(agent), with_roots(root, records=(agent,)),
              batch(other), batch(other)):
        await store.commit(b, now_ns=T0 + 6 * SECOND)
    got = rows(backend)
    assert (got["s"]["turns"], got["s"]["prompt_tokens"]) == (1, 15)
    assert (got["t"]["turns"], got["t"]["prompt_tokens"]) == (1, 7)
    for session in ("s", "t"):
        assert (got[session]["created_at"], got[session]["last_active_at"]) == (
            "2025-12-31T23:59:59.000Z", "2026-01-01T00:00:05.000Z")


async def test_nested_agent_spans_are_one_turn_across_commits_and_retries(
        store: Store, backend: Backend) -> None:
    """The agent's span first, then the workflow's root agent span around it (each committed
    twice); a sub-agent naming its own session keeps its own turn."""
    inner = span_rec(1, 2, "s", ROLE_TURN, start=T0 + MS)
    sub = span_rec(1, 3, "sub", ROLE_TURN, start=T0 + 2 * MS)
    outer = span_rec(1, 1, "s", ROLE_TURN, start=T0)
    for b in (batch(inner, sub), batch(inner, sub), batch(outer), batch(outer)):
        await store.commit(b, now_ns=T0 + SECOND)
    stored = rows(backend)
    assert (stored["s"]["turns"], stored["sub"]["turns"]) == (1, 1)
    # Graph nodes marked AGENT under a CHAIN root, the root in the same batch: one turn.
    nodes = [span_rec(5, 10 + i, "g", ROLE_TURN, start=T0 + i * SECOND) for i in range(3)]
    await store.commit(with_roots(trace_root(5, 1, T0 - SECOND, T0 + 9 * SECOND),
                                  records=tuple(nodes)), now_ns=T0 + 9 * SECOND)
    row = rows(backend)["g"]
    assert (row["turns"], row["created_at"], row["last_active_at"]) == (
        1, "2025-12-31T23:59:59.000Z", "2026-01-01T00:00:09.000Z")


async def test_a_second_store_or_a_restart_receiving_the_root_counts_its_turn_once(
        backend: Backend) -> None:
    first = backend.store()
    await first.open()
    await first.commit(batch(span_rec(1, 2, "a", ROLE_CALL, prompt=5),
                             span_rec(2, 2, "b", ROLE_CALL, prompt=5)), now_ns=T0)
    other = backend.store()
    await other.open()
    try:
        await other.commit(with_roots(trace_root(1, 1, T0 - MS, T0 + SECOND)),
                           now_ns=T0 + SECOND)
        await first.close()
        restarted = backend.store()
        await restarted.open()
        try:
            await restarted.commit(with_roots(trace_root(2, 1, T0 - MS, T0 + SECOND)),
                                   now_ns=T0 + SECOND)
            # Both collectors see a retried root at once: still one turn each.
            await asyncio.gather(
                other.commit(with_roots(trace_root(1, 1, T0 - MS, T0 + SECOND)),
                             now_ns=T0 + 2 * SECOND),
                restarted.commit(with_roots(trace_root(1, 1, T0 - MS, T0 + SECOND)),
                                 now_ns=T0 + 2 * SECOND))
        finally:
            await restarted.close()
    finally:
        await other.close()
    stored = rows(backend)
    assert {s: (stored[s]["turns"], stored[s]["prompt_tokens"]) for s in stored} == {
        "a": (1, 5), "b": (1, 5)}


async def test_a_held_root_resolves_at_once_to_the_session_its_model_calls_named(
        held_store: Store, backend: Backend) -> None:
    """opencode's turn span names no session, its model calls (earlier, under it) do: the
    turn is resolved when it arrives, not at the end of the window."""
    await held_store.commit(batch(span_rec(3, 2, "oc", ROLE_CALL, prompt=40)), now_ns=T0)
    turn = held_call(3, 1, None, prompt=0)
    turn = turn._replace(usage=turn.usage._replace(turns=1))
    result, _ = await held_store.commit(traced([turn]), now_ns=T0 + SECOND)
    assert (result.held, result.resolved, result.resolved_by_window, result.held_now) == (
        1, 1, 0, 0)
    row = rows(backend)["oc"]
    assert (row["turns"], row["prompt_tokens"]) == (1, 40)


async def test_migrate_sqlite_carries_what_a_trace_waits_for_its_turn(
        tmp_path: Path, pg_server: Any) -> None:
    path = tmp_path / "old.sqlite"
    old = SQLiteStore(path, retention_s=100)
    await old.open()
    await old.commit(batch(span_rec(1, 2, "s", ROLE_CALL, prompt=5),
                           span_rec(2, 2, "t", ROLE_TURN)), now_ns=T0)
    await old.close()
    options = ConnectOptions(pg_server.new_database())
    moved = await asyncio.to_thread(postgres.migrate_sqlite, path, options, retention_s=100)
    assert moved.sessions == 2
    store = PostgresStore(options, retention_s=100, commit_timeout_s=30)
    await store.open()
    try:
        await store.commit(with_roots(trace_root(1, 1, T0 - MS, T0 + SECOND),
                                      trace_root(2, 1, T0 - MS, T0 + SECOND)),
                           now_ns=T0 + SECOND)
        await store.commit(batch(span_rec(2, 1, "t", ROLE_TURN, start=T0 - MS)),
                           now_ns=T0 + SECOND)
    finally:
        await store.close()
    stored = {r["id"]: r for r in PostgresReader(options).read_sessions()}
    assert {s: (r["turns"], r["prompt_tokens"]) for s, r in stored.items()} == {
        "s": (1, 5), "t": (1, 0)}
