"""Budget spend and crossings recorded in the usage's own SQLite transaction: each threshold
once per budget instance and period, however the usage is split into commits, retried or
committed by a second store on the same file; a new period re-arms."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from collector.accounting.aggregate import Batch
from collector.config.budgets import AlertSink, Budget
from collector.signals.traces import SpanUsage
from collector.store.sqlite import SQLiteStore
from tests.conftest import MS, T0

DAY = 24 * 3600 * 1_000_000_000
SINKS = (AlertSink(name="hook", kind="webhook", url="http://127.0.0.1:9/"),
         AlertSink(name="chat", kind="slack", url="http://127.0.0.1:9/"))
FLEET = Budget(name="fleet", amount_usd=0.05, thresholds=(0.8, 1.0))  # 4 and 5 cents
PER_USER = Budget(name="users", amount_usd=0.02, dimension="user", value="a*",
                  period="day", thresholds=(1.0,))


def rec(key: int, *, session: str = "s", user: str | None = "alice", t: int = T0,
        cents: float = 1.0) -> SpanUsage:
    return SpanUsage(key.to_bytes(32, "big"), session, t, t + MS, 1, 10, 2, 0, 0, 0,
                     cents, True, "m", None, None, None, None, user=user)


def batch(*records: SpanUsage) -> Batch:
    b = Batch()
    b.add(records)
    return b


async def _store(path: Path, budgets: tuple[Budget, ...] = (FLEET, PER_USER)) -> SQLiteStore:
    s = SQLiteStore(path, retention_s=100, budgets=budgets, sinks=SINKS)
    await s.open()
    return s


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


async def test_each_threshold_is_recorded_once_with_one_outbox_row_per_sink(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await _store(path)
    try:
        for key in range(1, 8):  # 1 cent per commit: 0.8 at the 4th, 1.0 at the 5th
            await store.commit(batch(rec(key)), now_ns=T0)
            await store.commit(batch(rec(key)), now_ns=T0)  # a retry: deduped, adds nothing
    finally:
        await store.close()
    assert _rows(path, "SELECT budget, scope_value, spend_cents FROM collector_budget_spend "
                       "ORDER BY budget") == [("fleet", "", 7.0), ("users", "alice", 7.0)]
    crossings = _rows(path, "SELECT budget, scope_value, threshold FROM collector_budget_alerts "
                            "ORDER BY budget, threshold")
    assert crossings == [("fleet", "", 0.8), ("fleet", "", 1.0), ("users", "alice", 1.0)]
    outbox = _rows(path, "SELECT id, sink, payload FROM collector_alert_outbox")
    assert len(outbox) == 6 and len({r[0] for r in outbox}) == 6
    hooks = [json.loads(str(p)) for _, s, p in outbox if s == "hook"]
    first = next(h for h in hooks if h["budget"] == "fleet" and h["threshold"] == 0.8)
    assert first["spend_usd"] == 0.04 and first["limit_usd"] == 0.05
    assert first["period"]["start"] == "2026-01-01T00:00:00+00:00"


async def test_two_stores_on_one_file_record_a_crossing_once(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    one, two = await _store(path, (FLEET,)), await _store(path, (FLEET,))
    try:
        await one.commit(batch(rec(1, cents=3)), now_ns=T0)
        await two.commit(batch(rec(2, cents=3)), now_ns=T0)  # crosses 0.8 and 1.0
        await one.commit(batch(rec(3, cents=3)), now_ns=T0)
    finally:
        await one.close()
        await two.close()
    assert _rows(path, "SELECT threshold FROM collector_budget_alerts ORDER BY 1") == [
        (0.8,), (1.0,)]
    assert _rows(path, "SELECT count(*) FROM collector_alert_outbox") == [(4,)]


async def test_a_new_period_rearms_and_other_values_have_their_own_instances(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await _store(path, (PER_USER,))
    try:
        await store.commit(batch(rec(1, cents=2), rec(2, session="b", user="bob", cents=9),
                                 rec(3, session="n", user=None, cents=9)), now_ns=T0)
        await store.commit(batch(rec(4, cents=2, t=T0 + DAY)), now_ns=T0 + DAY)
        await store.commit(batch(rec(5, session="a2", user="anna", cents=5)), now_ns=T0)
    finally:
        await store.close()
    assert _rows(path, "SELECT scope_value, period_start_ns FROM collector_budget_alerts "
                       "ORDER BY 2, 1") == [("alice", T0), ("anna", T0), ("alice", T0 + DAY)]


async def test_without_budgets_no_budget_tables_exist(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    store = await _store(path, ())
    try:
        await store.commit(batch(rec(1)), now_ns=T0)
    finally:
        await store.close()
    assert _rows(path, "SELECT name FROM sqlite_master WHERE name LIKE 'collector_budget%'") == []
