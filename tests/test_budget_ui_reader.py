"""Reader.read_budgets and count_alerts_pending give the same rows on both backends: SQLite as
the store records them, and PostgreSQL holding those rows in tables of the same shape (its
store records budgets in a later change; the reader's statements are plain SELECTs)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg

from collector.budgets import period_of
from collector.budgets.status import budget_status, current_periods
from collector.store.postgres import ConnectOptions, PostgresReader
from collector.store.sqlite import SQLiteReader, SQLiteStore
from tests.conftest import T0
from tests.test_budget_store import FLEET, PER_USER, SINKS, batch, rec

PG_TABLES = """
CREATE TABLE collector_budget_spend (budget TEXT NOT NULL, scope_value TEXT NOT NULL,
    period_start_ns BIGINT NOT NULL, spend_cents DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (budget, scope_value, period_start_ns));
CREATE TABLE collector_budget_alerts (budget TEXT NOT NULL, scope_value TEXT NOT NULL,
    period_start_ns BIGINT NOT NULL, threshold DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (budget, scope_value, period_start_ns, threshold));
CREATE TABLE collector_alert_outbox (id TEXT PRIMARY KEY, sink TEXT NOT NULL,
    payload TEXT NOT NULL, created_ns BIGINT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_ns BIGINT NOT NULL DEFAULT 0, claimed_until_ns BIGINT NOT NULL DEFAULT 0,
    delivered_ns BIGINT)
"""
TABLES = ("collector_budget_spend", "collector_budget_alerts", "collector_alert_outbox")
DAY = 86_400 * 10**9


async def test_both_backends_read_the_same_budget_rows(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "db.sqlite"
    pg = PostgresReader(ConnectOptions(pg_url))
    sqlite_reader = SQLiteReader(path)
    # Before any budget was recorded: no tables, nothing spent, on both.
    with sqlite3.connect(path):
        pass
    periods = current_periods((FLEET, PER_USER), T0)
    for reader in (sqlite_reader, pg):
        assert reader.read_budgets(periods) == ([], [], [])
        assert reader.count_alerts_pending() == 0
    store = SQLiteStore(path, retention_s=100, budgets=(FLEET, PER_USER), sinks=SINKS)
    await store.open()
    try:
        await store.commit(batch(rec(1, cents=3), rec(2, session="s2", user="al", cents=1),
                                 rec(3, session="s3", user="bob", cents=9)), now_ns=T0)
        await store.commit(batch(rec(4, cents=2, t=T0 + DAY)), now_ns=T0)  # the next day
    finally:
        await store.close()
    with sqlite3.connect(path) as db, psycopg.connect(pg_url) as conn:
        for statement in PG_TABLES.split(";"):
            conn.execute(statement)
        for table in TABLES:
            rows = db.execute(f"SELECT * FROM {table}").fetchall()
            marks = ", ".join(["%s"] * len(rows[0]))
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
    got = sqlite_reader.read_budgets(periods)
    assert pg.read_budgets(periods) == got
    spend, crossings, journal = got
    assert journal == []  # folded when the store closed (and no journal table in PG_TABLES)
    day = period_of(PER_USER, T0).start_ns
    # Only the asked periods: the per-user budget's next day is not read.
    assert sorted(spend) == [("fleet", "", period_of(FLEET, T0).start_ns, 15.0),
                             ("users", "al", day, 1.0), ("users", "alice", day, 3.0)]
    assert crossings == [("fleet", "", period_of(FLEET, T0).start_ns, 0.8),
                         ("fleet", "", period_of(FLEET, T0).start_ns, 1.0),
                         ("users", "alice", day, 1.0)]
    # Four crossings in all (alice's next day too), none delivered: one row per sink each.
    assert pg.count_alerts_pending() == sqlite_reader.count_alerts_pending() == 4 * len(SINKS)
    status = budget_status((FLEET, PER_USER), spend, crossings, T0)
    assert [(s.scope, s.spend_cents, s.alerted) for s in status.instances] == [
        ("fleet", 15.0, (0.8, 1.0)), ("user=alice", 3.0, (1.0,)), ("user=al", 1.0, ())]
