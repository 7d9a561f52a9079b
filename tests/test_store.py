"""The SQLite store on a real file: whole-or-nothing commits, exactly-once ids, schema rules.
The rules every backend shares are also in tests/test_store_contract.py, which runs on SQLite
too; the tests that were the same there were dropped here."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from collector.accounting.aggregate import Batch
from collector.signals.traces import SpanUsage
from collector.store.sqlite import (
    BATCH_ROWS,
    BATCH_WITH,
    RowsStatement,
    SchemaError,
    SQLiteStore,
    StorageError,
    iso_utc,
    read_usage,
)
from tests.conftest import MS, SECOND, T0, read_rows


def rec(key: int, session: str = "s", *, t: int = T0, turns: int = 1, prompt: int = 10,
        model: str | None = "m", status: str | None = None) -> SpanUsage:
    return SpanUsage(key.to_bytes(32, "big"), session, t, t + MS, turns, prompt, 2, 1, 0, 0,
                     0.5, True, model, None, status, None, None)


def batch(*records: SpanUsage) -> Batch:
    b = Batch()
    b.add(records)
    return b


@pytest.fixture
async def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "sub" / "db.sqlite", retention_s=100)
    await s.open()
    yield s  # type: ignore[misc]
    await s.close()


def test_iso_utc_is_fixed_width_milliseconds() -> None:
    assert iso_utc(T0) == "2026-01-01T00:00:00.000Z"
    assert iso_utc(T0 + 1_234_567_890) == "2026-01-01T00:00:01.234Z"
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(2**64 - 1) == "2554-07-21T23:34:33.709Z"


async def test_file_is_owner_only_in_wal_mode(store: SQLiteStore) -> None:
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(agent_sessions)")}
    conn.close()
    assert {"agent_sessions_status", "agent_sessions_last_active_at"} <= indexes


async def test_a_second_store_on_the_same_file_shares_the_dedupe(store: SQLiteStore,
                                                                  tmp_path: Path) -> None:
    await store.commit(batch(rec(1)), now_ns=T0)
    other = SQLiteStore(store.path, retention_s=100)
    await other.open()
    try:
        result, _ = await other.commit(batch(rec(1), rec(2)), now_ns=T0)
    finally:
        await other.close()
    assert (result.spans, result.duplicates) == (1, 1)
    assert read_rows(store.path)["s"]["turns"] == 2


async def test_a_locked_database_commits_nothing_and_the_retry_commits_once(
        store: SQLiteStore) -> None:
    blocker = sqlite3.connect(store.path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    pending = batch(rec(1), rec(2))
    with pytest.raises(StorageError, match="locked"):
        await store.commit(pending, now_ns=T0)
    blocker.rollback()
    blocker.close()
    assert read_rows(store.path) == {}
    await store.commit(pending, now_ns=T0)
    assert read_rows(store.path)["s"]["turns"] == 2


async def test_disk_full_midway_rolls_back_the_whole_batch(store: SQLiteStore) -> None:
    await store.commit(batch(rec(1)), now_ns=T0)
    db = store._db
    assert db is not None

    async def pragma(sql: str) -> Any:  # on the writer's own thread, which owns the connection
        return await store._in_writer(lambda: db.execute(sql).fetchone()[0])

    pages = await pragma("PRAGMA page_count")
    await pragma(f"PRAGMA max_page_count = {pages}")
    big = batch(*(rec(i, f"session-{i}") for i in range(2, 3000)))
    with pytest.raises(StorageError, match="full"):
        await store.commit(big, now_ns=T0)
    rows = read_rows(store.path)
    assert set(rows) == {"s"} and rows["s"]["turns"] == 1
    await pragma("PRAGMA max_page_count = 1073741823")
    result, _ = await store.commit(big, now_ns=T0)
    assert result.spans == 2998 and len(read_rows(store.path)) == 2999


async def test_sweep_marks_only_active_sessions_unknown(store: SQLiteStore) -> None:
    await store.commit(batch(rec(1, "a"), rec(2, "done", status="completed"),
                             rec(3, "fresh", t=T0 + 10 * SECOND)), now_ns=T0)
    result, _ = await store.commit(batch(), now_ns=T0, sweep_before_ns=T0 + 5 * SECOND)
    assert result.swept == 1
    rows = read_rows(store.path)
    assert {k: v["status"] for k, v in rows.items()} == {
        "a": "unknown", "done": "completed", "fresh": "active"}


async def test_other_columns_are_a_schema_error(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE agent_sessions (id TEXT PRIMARY KEY, cost REAL)")
    conn.close()
    with pytest.raises(SchemaError, match=r"agent_sessions has columns \(id TEXT, cost REAL\)"):
        await SQLiteStore(path, retention_s=100).open()


def rollup(path: Path) -> dict[tuple[str, str, str], tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return {(r[0], r[1], r[2]): r[3:] for r in conn.execute(
            "SELECT hour, session_id, model, turns, prompt_tokens, completion_tokens, "
            "reasoning_tokens, cache_read_tokens, cache_write_tokens, cost_cents "
            "FROM collector_usage_hourly")}
    finally:
        conn.close()


async def test_hourly_rollup_commits_with_the_sessions_and_only_once(store: SQLiteStore) -> None:
    hour = 3600 * SECOND
    await store.commit(batch(rec(1), rec(2, model=None), rec(3, t=T0 + hour + 5 * SECOND)),
                       now_ns=T0)
    # A retry of span 3 (already accounted) and a session update carrying no usage.
    update = SpanUsage((4).to_bytes(32, "big"), "s", T0, T0, 0, 0, 0, 0, 0, 0, 0.0, True, None,
                       None, "completed", None, None)
    await store.commit(batch(rec(3, t=T0 + hour + 5 * SECOND), update), now_ns=T0)
    # The span naming no model counts under the session's model (see the next test).
    assert rollup(store.path) == {
        ("2026-01-01T00:00:00.000Z", "s", "m"): (2, 20, 4, 2, 0, 0, 1.0),
        ("2026-01-01T01:00:00.000Z", "s", "m"): (1, 10, 2, 1, 0, 0, 0.5),
    }
    usage = read_usage(store.path, group="session")
    assert usage == [("s", "m", "2026-01-01T01:00:00.000Z", 3, 30, 6, 3, 0, 0, 1.5)]
    assert read_rows(store.path)["s"]["status"] == "completed"
    assert read_usage(store.path, group="hour", lo="2026-01-01T00:30:00.000Z") == [
        ("2026-01-01T01:00:00.000Z", "m", "2026-01-01T01:00:00.000Z", 1, 10, 2, 1, 0, 0, 0.5)]
    blocker = sqlite3.connect(store.path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StorageError):
        await store.commit(batch(rec(5)), now_ns=T0)
    blocker.rollback()
    blocker.close()
    assert len(rollup(store.path)) == 2  # a failed flush adds no rollup either


async def test_dedupe_window_counts_follow_commits_rotation_and_reopen(
        store: SQLiteStore) -> None:
    await store.commit(batch(rec(1), rec(2)), now_ns=T0)
    await store.commit(batch(rec(2), rec(3)), now_ns=T0)
    assert (store.seen_current, store.seen_previous, store.dedupe_window) == (3, 0, 3)
    await store.commit(batch(rec(4)), now_ns=T0 + 100 * SECOND)  # rotates first
    assert (store.seen_current, store.seen_previous) == (1, 3)
    again = SQLiteStore(store.path, retention_s=100)
    await again.open()
    await again.close()
    assert (again.seen_current, again.seen_previous) == (1, 3)


async def test_a_database_from_before_the_rollup_is_backfilled(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    first = SQLiteStore(path, retention_s=100)
    await first.open()
    await first.commit(batch(rec(1, "old", t=T0 + 7200 * SECOND), rec(2, "old")), now_ns=T0)
    await first.close()
    conn = sqlite3.connect(path)
    conn.execute("DROP TABLE collector_usage_hourly")  # as an older collector left it
    conn.commit()
    conn.close()
    reopened = SQLiteStore(path, retention_s=100)
    await reopened.open()
    await reopened.close()
    # All of the session's sums, at the hour of its last activity.
    assert rollup(path) == {("2026-01-01T02:00:00.000Z", "old", "m"): (2, 20, 4, 2, 0, 0, 1.0)}


async def test_a_turn_counts_under_the_model_of_its_model_calls(store: SQLiteStore) -> None:
    """Agent spans name no model; their turn goes to the session's latest model call's model
    as of the commit, whether the calls came in an earlier flush or in the same one (in any
    order). Only a session without any model call keeps it under ''."""
    hour = "2026-01-01T00:00:00.000Z"
    # Same flush, the agent span first: its children still decide.
    await store.commit(batch(rec(1, "a", turns=1, prompt=0, model=None),
                             rec(2, "a", turns=0, model="m1")), now_ns=T0)
    # The model calls in one flush, the agent span that parents them in the next.
    await store.commit(batch(rec(3, "b", turns=0, model="m1"),
                             rec(4, "b", t=T0 + SECOND, turns=0, model="m2")), now_ns=T0)
    await store.commit(batch(rec(5, "b", t=T0 + 2 * SECOND, turns=1, prompt=0, model=None)),
                       now_ns=T0)
    # No model call at all.
    await store.commit(batch(rec(6, "c", turns=1, prompt=0, model=None)), now_ns=T0)
    got = {(k[1], k[2]): v[0] for k, v in rollup(store.path).items() if k[0] == hour}
    assert got == {("a", "m1"): 1, ("b", "m1"): 0, ("b", "m2"): 1, ("c", ""): 1}


async def test_who_spends_is_stored_beside_the_session_latest_value_wins(
        store: SQLiteStore) -> None:
    def labelled(key: int, t: int, **labels: str) -> SpanUsage:
        return rec(key, t=t)._replace(**labels)

    await store.commit(batch(labelled(1, T0 + 5 * SECOND, agent="a-new", user="u1"),
                             labelled(2, T0, agent="a-old", host="h1", agent_version="1")),
                       now_ns=T0)
    # A later flush: an older span never overwrites; an absent label never resets.
    await store.commit(batch(labelled(3, T0 + SECOND, agent="a-older", user="u-older"),
                             labelled(4, T0 + 9 * SECOND, host="h2")), now_ns=T0)
    await store.commit(batch(rec(5, "unlabelled")), now_ns=T0)
    conn = sqlite3.connect(store.path)
    rows = conn.execute("SELECT id, agent, agent_version, user_name, host FROM "
                        "collector_session_labels").fetchall()
    columns = [r[1] for r in conn.execute("PRAGMA table_info(agent_sessions)")]
    conn.close()
    assert rows == [("s", "a-new", "1", "u1", "h2")]
    assert len(columns) == 13


async def test_plain_and_full_session_rows_follow_the_same_latest_value_rules(
        store: SQLiteStore) -> None:
    """A session whose spans set only a model, times and sums goes through the narrower
    statements (UPSERT_SESSION_PLAIN, UPSERT_MARKS_PLAIN); one whose spans set a status goes
    through the full ones. Mixed in one flush and across flushes, a later span's value wins
    and an older one's never does, whichever statement carried either."""
    await store.commit(batch(rec(1, "x", t=T0 + 5 * SECOND, model="m-new", status="completed"),
                             rec(2, "y", model="m1"),
                             rec(3, "z", model="m1")), now_ns=T0)
    # x: an older plain span keeps neither its model nor a status; y: a full row after plain.
    await store.commit(batch(rec(4, "x", t=T0 + SECOND, model="m-old"),
                             rec(5, "y", t=T0 + 2 * SECOND, model="m2", status="failed")),
                       now_ns=T0)
    # z goes silent and is swept; an older plain span does not revive it, a later one does.
    await store.commit(batch(), now_ns=T0, sweep_before_ns=T0 + 3 * SECOND)
    await store.commit(batch(rec(6, "z", t=T0 - SECOND, model="m0")), now_ns=T0)
    assert read_rows(store.path)["z"]["status"] == "unknown"
    await store.commit(batch(rec(7, "z", t=T0 + 4 * SECOND, model="m3")), now_ns=T0)
    rows = read_rows(store.path)
    got = {k: (v["model"], v["status"], v["kind"], v["channel"], v["turns"], v["created_at"])
           for k, v in rows.items()}
    assert got == {
        "x": ("m-new", "completed", "interactive", "cli", 2, "2026-01-01T00:00:01.000Z"),
        "y": ("m2", "failed", "interactive", "cli", 2, "2026-01-01T00:00:00.000Z"),
        "z": ("m3", "active", "interactive", "cli", 3, "2025-12-31T23:59:59.000Z"),
    }
    assert rows["x"]["last_active_at"] == "2026-01-01T00:00:05.001Z"


def test_rows_statement_pads_each_chunk_and_reads_only_real_rows() -> None:
    """Chunks are padded with NULL rows to a power of two (few statement texts to prepare);
    the padding is never read, a row of the wrong width is refused, and a run over more rows
    than a chunk holds inserts each row once."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (id TEXT PRIMARY KEY, n INTEGER NOT NULL, tag TEXT NOT NULL)")
    statement = RowsStatement("id, n, tag", f"INSERT INTO t (id, n, tag) {BATCH_WITH} "
                              f"SELECT * FROM {BATCH_ROWS} WHERE true",
                              constants={"tag": "'c'"})
    sql, params = statement.bind([("a", 1), ("b", 2), ("c", 3)])
    assert params == ["a", 1, "b", 2, "c", 3, None, None]
    assert sql == statement.bind([("x", 0)] * 4)[0] != statement.bind([("x", 0)] * 5)[0]
    with pytest.raises(ValueError, match="2 values"):
        statement.bind([("a", 1, "extra")])
    rows = [(f"r{i:04d}", i) for i in range(1100)]  # chunks of 512, 512 and 76 (padded to 128)
    assert statement.run(db, rows) == 1100
    assert db.execute("SELECT count(*), sum(n), min(tag), max(tag) FROM t").fetchone() == (
        1100, sum(range(1100)), "c", "c")
    assert db.execute("SELECT count(*) FROM t WHERE id IS NULL").fetchone() == (0,)
