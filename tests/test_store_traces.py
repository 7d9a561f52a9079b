"""The store's held usage and trace links (collector_held_usage, collector_trace_links), on a
real SQLite file: held in the transaction that records its key, resolved in exactly one later
transaction, by a link or by the end of the window, across reopen and duplicates."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from collector.accounting.aggregate import Batch
from collector.accounting.traces import Node, Waiting, nearest_session, resolve_trace
from collector.signals.traces import UNRESOLVED, HeldUsage, SpanUsage, TraceLink
from collector.store.sqlite import SQLiteStore
from tests.conftest import MS, SECOND, T0, read_rows

WINDOW_S = 10
TRACE = bytes(range(16))
ROOT, TOOL, CALL, OTHER = (bytes([i]) * 8 for i in (1, 2, 3, 4))


def held_call(span_id: bytes, parent_id: bytes, *, prompt: int = 100,
              trace: bytes = TRACE) -> HeldUsage:
    key = (T0 + MS).to_bytes(8, "big") + trace + span_id
    usage = SpanUsage(key, UNRESOLVED, T0, T0 + MS, 0, prompt, 7, 0, 0, 0, 0.25, True,
                      "gpt-4o", None, None, None, None, "app", None, None, None)
    return HeldUsage(usage, trace, span_id, parent_id)


def commit_batch(held: list[HeldUsage] = (), links: list[TraceLink] = (),  # type: ignore[assignment]
                 records: list[SpanUsage] = ()) -> Batch:  # type: ignore[assignment]
    b = Batch()
    b.add(records)
    b.hold(held, links)
    return b


def table_count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
async def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "db.sqlite", retention_s=100_000, resolve_window_s=WINDOW_S)
    await s.open()
    yield s  # type: ignore[misc]
    await s.close()


def test_nearest_session_follows_the_chain_and_stops_at_gaps_and_cycles() -> None:
    nodes = {TOOL: Node(ROOT, None), ROOT: Node(b"", "s"), OTHER: Node(OTHER, None)}
    assert nearest_session(nodes, TOOL) == ("s", True)
    assert nearest_session({TOOL: Node(b"", None)}, TOOL) == (None, True)
    assert nearest_session({TOOL: Node(ROOT, None)}, TOOL) == (None, False)
    assert nearest_session(nodes, OTHER) == (None, False)
    waiting = [Waiting(b"k1", CALL, TOOL, False), Waiting(b"k2", CALL, OTHER, True),
               Waiting(b"k3", CALL, OTHER, False)]
    assert [(r.key, r.session_id, r.by_window) for r in
            resolve_trace(TRACE, nodes, None, waiting)] == [
        (b"k1", "s", False), (b"k2", TRACE.hex(), True)]
    assert [r.session_id for r in resolve_trace(TRACE, nodes, "first", waiting)][1] == "first"


async def test_held_with_its_dedupe_record_and_resolved_once(store: SQLiteStore) -> None:
    result, _ = await store.commit(commit_batch([held_call(CALL, ROOT)]), now_ns=T0)
    assert (result.spans, result.held, result.held_now, result.resolved) == (1, 1, 1, 0)
    assert read_rows(store.path) == {}
    # The same span again (an exporter's retry): a duplicate, not held twice.
    result, _ = await store.commit(commit_batch([held_call(CALL, ROOT)]), now_ns=T0 + SECOND)
    assert (result.duplicates, result.held, result.held_now) == (1, 0, 1)
    # Its parent names the session: resolved into it, held row gone, in one transaction.
    link = TraceLink(TRACE, ROOT, b"", "sess", True)
    result, _ = await store.commit(commit_batch(links=[link]), now_ns=T0 + 2 * SECOND)
    assert (result.resolved, result.resolved_by_window, result.held_now) == (1, 0, 0)
    row = read_rows(store.path)["sess"]
    assert (row["turns"], row["prompt_tokens"], row["completion_tokens"], row["model"]) == (
        0, 100, 7, "gpt-4o")
    assert row["cost_cents"] == 0.25
    assert table_count(store.path, "collector_held_usage") == 0
    # And again after that: still a duplicate.
    result, _ = await store.commit(commit_batch([held_call(CALL, ROOT)]), now_ns=T0 + 3 * SECOND)
    assert (result.duplicates, result.held) == (1, 0)
    assert read_rows(store.path)["sess"]["prompt_tokens"] == 100


async def test_links_are_kept_only_for_traces_with_held_usage(store: SQLiteStore) -> None:
    other_trace = bytes(16)
    plain = TraceLink(other_trace, TOOL, ROOT, None)
    await store.commit(commit_batch(links=[plain]), now_ns=T0)
    assert table_count(store.path, "collector_trace_links") == 0
    anchor = TraceLink(other_trace, ROOT, b"", "anchored", True)
    await store.commit(commit_batch(links=[anchor]), now_ns=T0)
    assert table_count(store.path, "collector_trace_links") == 1
    # A span naming a session whose key is its trace and span id is a link for a trace
    # with held usage (here held in the same batch).
    record = held_call(ROOT, b"").usage._replace(session_id="from-key", turns=1)
    result, _ = await store.commit(
        commit_batch([held_call(CALL, TOOL)], [TraceLink(TRACE, TOOL, ROOT, None)],
                     [record]), now_ns=T0)
    assert (result.held, result.resolved, result.held_now) == (1, 1, 0)
    assert read_rows(store.path)["from-key"]["prompt_tokens"] == 200


async def test_the_window_ends_in_the_trace_ids_session_across_reopen(
        store: SQLiteStore, tmp_path: Path) -> None:
    await store.commit(commit_batch([held_call(CALL, TOOL)]), now_ns=T0)
    await store.close()
    reopened = SQLiteStore(store.path, retention_s=100_000, resolve_window_s=WINDOW_S)
    await reopened.open()
    try:
        assert reopened.held_now == 1
        result, _ = await reopened.commit(Batch(), now_ns=T0 + (WINDOW_S - 1) * SECOND)
        assert (result.resolved_by_window, result.held_now) == (0, 1)
        result, _ = await reopened.commit(Batch(), now_ns=T0 + WINDOW_S * SECOND)
        assert (result.resolved_by_window, result.held_now) == (1, 0)
        assert read_rows(store.path)[TRACE.hex()]["prompt_tokens"] == 100
        # Links are forgotten two windows after they were seen.
        await reopened.commit(commit_batch(links=[TraceLink(TRACE, ROOT, b"", "s", True)]),
                              now_ns=T0 + WINDOW_S * SECOND)
        assert table_count(store.path, "collector_trace_links") == 1
        await reopened.commit(commit_batch([held_call(OTHER, b"", trace=bytes(16))]),
                              now_ns=T0 + 3 * WINDOW_S * SECOND + 1)
        assert table_count(store.path, "collector_trace_links") == 0
    finally:
        await reopened.close()


async def test_a_failed_commit_holds_and_resolves_nothing(store: SQLiteStore) -> None:
    await store.commit(commit_batch([held_call(CALL, ROOT)]), now_ns=T0)
    blocker = sqlite3.connect(store.path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Exception, match="locked"):
            await store.commit(commit_batch(links=[TraceLink(TRACE, ROOT, b"", "s", True)]),
                               now_ns=T0)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert table_count(store.path, "collector_held_usage") == 1
    assert read_rows(store.path) == {}
