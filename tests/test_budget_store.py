"""Budget spend and crossings recorded in the usage's own SQLite transaction: each threshold
once per budget instance and period, however the usage is split into commits, retried or
committed by a second store on the same file; a new period re-arms."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from collector.accounting.aggregate import Batch
from collector.config.budgets import AlertSink, Budget
from collector.signals.traces import SpanUsage
from collector.store.postgres import ConnectOptions, PostgresStore
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


# -- the same on PostgreSQL, and what an alert names -------------------------------------------

def spend(key: int, session: str, user: str | None, model: str, cents: float) -> SpanUsage:
    return rec(key, session=session, user=user, cents=cents)._replace(model=model)


def _pg_rows(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return [tuple(r) for r in conn.execute(sql).fetchall()]


async def _pg_store(url: str, budgets: tuple[Budget, ...] = (FLEET, PER_USER)) -> PostgresStore:
    s = PostgresStore(ConnectOptions(url), retention_s=100, commit_timeout_s=30,
                      budgets=budgets, sinks=SINKS)
    await s.open()
    return s


async def test_postgres_records_each_threshold_once_with_one_outbox_row_per_sink(
        pg_url: str) -> None:
    store = await _pg_store(pg_url)
    try:
        for key in range(1, 8):
            await store.commit(batch(rec(key)), now_ns=T0)
            await store.commit(batch(rec(key)), now_ns=T0)
    finally:
        await store.close()
    assert _pg_rows(pg_url, "SELECT budget, scope_value, spend_cents FROM "
                            "collector_budget_spend ORDER BY budget") == [
        ("fleet", "", 7.0), ("users", "alice", 7.0)]
    assert _pg_rows(pg_url, "SELECT budget, scope_value, threshold FROM "
                            "collector_budget_alerts ORDER BY budget, threshold") == [
        ("fleet", "", 0.8), ("fleet", "", 1.0), ("users", "alice", 1.0)]
    assert _pg_rows(pg_url, "SELECT count(DISTINCT id) FROM collector_alert_outbox") == [(6,)]


async def test_postgres_without_budgets_has_no_budget_tables(pg_url: str) -> None:
    store = await _pg_store(pg_url, ())
    try:
        await store.commit(batch(rec(1)), now_ns=T0)
    finally:
        await store.close()
    assert _pg_rows(pg_url, "SELECT count(*) FROM pg_tables "
                            "WHERE tablename LIKE 'collector_budget%'") == [(0,)]


async def test_two_postgres_stores_committing_at_once_record_each_crossing_once(
        pg_url: str) -> None:
    """Each round both stores commit a cent at the same moment, on their own writer threads
    and connections: the thresholds (0.8 at 4 cents, 1.0 at 5, per period) are crossed by
    whichever commit reaches them, and recorded once."""
    budget = Budget(name="race", amount_usd=0.05, period="day", thresholds=(0.8, 1.0))
    one, two = await _pg_store(pg_url, (budget,)), await _pg_store(pg_url, (budget,))
    try:
        for day in range(6):
            t = T0 + day * DAY
            await asyncio.gather(
                one.commit(batch(rec(2 * day + 1, t=t, cents=2.5)), now_ns=t),
                two.commit(batch(rec(2 * day + 2, t=t, cents=2.5)), now_ns=t))
    finally:
        await one.close()
        await two.close()
    assert _pg_rows(pg_url, "SELECT count(*), count(DISTINCT period_start_ns) "
                            "FROM collector_budget_spend WHERE spend_cents = 5") == [(6, 6)]
    assert _pg_rows(pg_url, "SELECT threshold, count(*) FROM collector_budget_alerts "
                            "GROUP BY 1 ORDER BY 1") == [(0.8, 6), (1.0, 6)]
    assert _pg_rows(pg_url, "SELECT sink, count(DISTINCT id), count(*) FROM "
                            "collector_alert_outbox GROUP BY 1 ORDER BY 1") == [
        ("chat", 12, 12), ("hook", 12, 12)]


async def _top_of_crossing(store: SQLiteStore | PostgresStore) -> None:
    try:
        await store.commit(batch(
            spend(1, "s1", "alice", "big", 2), spend(2, "s2", "anna", "small", 1),
            spend(3, "s3", None, "big", 1), spend(4, "s4", "bob", "small", 0.5)), now_ns=T0)
        # Crosses both budgets' thresholds: the lists are as of this commit, within scope.
        await store.commit(batch(spend(5, "s2", "anna", "small", 2)), now_ns=T0)
    finally:
        await store.close()


TOP_BUDGETS = (Budget(name="fleet", amount_usd=0.06, thresholds=(1.0,)),
               Budget(name="a-users", amount_usd=0.03, dimension="user", value="a*",
                      thresholds=(1.0,)))


def _check_top(rows: list[tuple[object, ...]]) -> None:
    hooks = {(b := json.loads(str(p)))["budget"] + "/" + str(b["value"]): b
             for s, p in rows if s == "hook"}
    assert set(hooks) == {"fleet/None", "a-users/anna"}
    fleet = hooks["fleet/None"]["top"]
    assert fleet["sessions"] == [{"name": "s2", "spend_usd": 0.03},
                                 {"name": "s1", "spend_usd": 0.02},
                                 {"name": "s3", "spend_usd": 0.01},
                                 {"name": "s4", "spend_usd": 0.005}]
    assert fleet["users"] == [{"name": "anna", "spend_usd": 0.03},
                              {"name": "alice", "spend_usd": 0.02},
                              {"name": "bob", "spend_usd": 0.005}]  # s3 has no user
    assert [m["name"] for m in fleet["models"]] == ["small", "big"]
    anna = hooks["a-users/anna"]
    assert anna["scope"] == "user" and anna["spend_usd"] == 0.03 and anna["share"] == 1.0
    assert anna["top"] == {"sessions": [{"name": "s2", "spend_usd": 0.03}],
                           "users": [{"name": "anna", "spend_usd": 0.03}],
                           "models": [{"name": "small", "spend_usd": 0.03}]}
    slack = [json.loads(str(p))["text"] for s, p in rows if s == "chat"]
    assert any("Top sessions: s2 $0.03, s1 $0.02" in text for text in slack)


async def test_an_alert_names_the_top_sessions_users_and_models_of_its_scope_sqlite(
        tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    await _top_of_crossing(await _store(path, TOP_BUDGETS))
    _check_top(_rows(path, "SELECT sink, payload FROM collector_alert_outbox"))


async def test_an_alert_names_the_top_sessions_users_and_models_of_its_scope_postgres(
        pg_url: str) -> None:
    await _top_of_crossing(await _pg_store(pg_url, TOP_BUDGETS))
    _check_top(_pg_rows(pg_url, "SELECT sink, payload FROM collector_alert_outbox"))


async def _backend_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest,
                         budgets: tuple[Budget, ...]) -> tuple[Any, Any]:
    """A store of `backend` and `rows(sql)` reading its database."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")
        return await _pg_store(url, budgets), lambda sql: _pg_rows(url, sql)
    path = tmp_path / "db.sqlite"
    return await _store(path, budgets), lambda sql: _rows(path, sql)


PER_TEAM = Budget(name="teams", amount_usd=0.03, dimension="team", value="*",
                  thresholds=(1.0,))


def tagged(key: int, team: str | None, **kwargs: Any) -> SpanUsage:
    """A record of a session tagged with a configured dimension ([attribution] team)."""
    return rec(key, **kwargs)._replace(dimensions=(("team", team),) if team else ())


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_budget_per_value_of_a_configured_dimension(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Each team is its own instance; the session's latest team takes the spend of the
    commit, and a session without a team is in no instance."""
    store, rows = await _backend_store(backend, tmp_path, request, (PER_TEAM,))
    try:
        await store.commit(batch(tagged(1, "platform", session="a", cents=2),
                                 tagged(2, "growth", session="b", cents=1),
                                 tagged(3, None, session="c", cents=5)), now_ns=T0)
        # Session b moves to platform: this commit's cent is platform's, and crosses it.
        await store.commit(batch(tagged(4, "platform", session="b", t=T0 + MS, cents=1)),
                           now_ns=T0)
    finally:
        await store.close()
    assert rows("SELECT scope_value, spend_cents FROM collector_budget_spend "
                "ORDER BY scope_value") == [("growth", 1.0), ("platform", 3.0)]
    assert rows("SELECT scope_value, threshold FROM collector_budget_alerts") == [
        ("platform", 1.0)]
    payloads = [json.loads(str(p)) for (p,) in rows(
        "SELECT payload FROM collector_alert_outbox WHERE sink = 'hook'")]
    assert [(p["scope"], p["value"], p["threshold"]) for p in payloads] == [
        ("team", "platform", 1.0)]
    # Behind it: the sessions whose team is platform now, never the untagged one.
    assert {t["name"] for t in payloads[0]["top"]["sessions"]} == {"a", "b"}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_flush_touching_many_instances_adds_to_each_once(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """More instances than one spend statement takes (SPEND_CHUNK): each gets its own cost,
    twice over two commits, and only the one past its threshold is a crossing."""
    from collector.store.budgets import SPEND_CHUNK

    per_team = Budget(name="teams", amount_usd=0.05, dimension="team", value="*",
                      thresholds=(1.0,))
    store, rows = await _backend_store(backend, tmp_path, request, (per_team,))
    n = 2 * SPEND_CHUNK + 7
    try:
        for round_ in range(2):
            await store.commit(batch(*(
                tagged(round_ * n + i + 1, f"team-{i:04d}", session=f"s{i}",
                       cents=3.0 if i == 5 else 0.5)
                for i in range(n))), now_ns=T0)
    finally:
        await store.close()
    spend = dict(rows("SELECT scope_value, spend_cents FROM collector_budget_spend"))
    assert spend == {f"team-{i:04d}": 6.0 if i == 5 else 1.0 for i in range(n)}
    assert rows("SELECT scope_value FROM collector_budget_alerts") == [("team-0005",)]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_commit_counts_towards_the_value_its_usage_carries(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """A record tagged growth spends for growth even when the session's stored team is a
    later record's platform; a record without a team spends for the stored one."""
    store, rows = await _backend_store(backend, tmp_path, request, (PER_TEAM,))
    try:
        await store.commit(batch(tagged(1, "platform", session="a", t=T0 + 2 * MS)),
                           now_ns=T0)
        await store.commit(batch(tagged(2, "growth", session="a", t=T0)), now_ns=T0)
        await store.commit(batch(tagged(3, None, session="a", t=T0 + MS, cents=0.5)),
                           now_ns=T0)
    finally:
        await store.close()
    assert rows("SELECT scope_value, spend_cents FROM collector_budget_spend "
                "ORDER BY scope_value") == [("growth", 1.0), ("platform", 1.5)]
    assert rows("SELECT value FROM collector_session_dimensions "
                "WHERE session_id = 'a' AND dimension = 'team'") == [("platform",)]


def _reader(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    from collector.store.postgres import PostgresReader
    from collector.store.sqlite import SQLiteReader

    if backend == "postgres":
        return PostgresReader(ConnectOptions(request.getfixturevalue("pg_url")))
    return SQLiteReader(tmp_path / "db.sqlite")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_flush_far_from_every_threshold_is_journaled_and_read_as_spend(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """The first flush folds (nothing is known yet); the next, 1 cent of the 3 left before
    the 0.8 threshold, is one journal row: readers count it, and a fold is due
    FOLD_INTERVAL_NS after the last, or when the store closes."""
    from collector.budgets.spend import FOLD_INTERVAL_NS
    from collector.budgets.status import read_status

    store, rows = await _backend_store(backend, tmp_path, request, (FLEET,))
    reader = _reader(backend, tmp_path, request)
    spend_sql = "SELECT spend_cents FROM collector_budget_spend"
    try:
        await store.commit(batch(rec(1)), now_ns=T0)
        await store.commit(batch(rec(2)), now_ns=T0 + 1)
        assert rows(spend_sql) == [(1.0,)]
        assert len(rows("SELECT sums FROM collector_budget_journal")) == 1
        [fleet] = read_status(reader, (FLEET,), T0).instances
        assert fleet.spend_cents == 2.0 and fleet.reached == ()
        await store.commit(batch(rec(3)), now_ns=T0 + FOLD_INTERVAL_NS)  # a fold is due
        assert rows(spend_sql) == [(3.0,)]
        assert rows("SELECT sums FROM collector_budget_journal") == []
        await store.commit(batch(rec(4, cents=0.5)), now_ns=T0 + FOLD_INTERVAL_NS + 1)
        assert rows(spend_sql) == [(3.0,)]
    finally:
        await store.close()
    assert rows(spend_sql) == [(3.5,)]  # folded at close
    assert rows("SELECT sums FROM collector_budget_journal") == []
    assert rows("SELECT count(*) FROM collector_budget_alerts") == [(0,)]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_flush_that_crosses_records_it_though_its_neighbours_were_journaled(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """One collector: its headroom is exact, so the commit that reaches 4 cents (0.8 of 5)
    folds and records the crossing, with the journaled cents before it, in its own
    transaction; the same for 5 cents."""
    store, rows = await _backend_store(backend, tmp_path, request, (FLEET,))
    crossings = "SELECT threshold FROM collector_budget_alerts ORDER BY threshold"
    try:
        await store.commit(batch(rec(1)), now_ns=T0)  # folds: 1 of 4
        for key in (2, 3):
            await store.commit(batch(rec(key)), now_ns=T0 + key)  # journaled
            assert rows(crossings) == []
        await store.commit(batch(rec(4)), now_ns=T0 + 4)
        assert rows(crossings) == [(0.8,)]
        assert rows("SELECT spend_cents FROM collector_budget_spend") == [(4.0,)]
        await store.commit(batch(rec(5, cents=0.5)), now_ns=T0 + 5)
        assert rows(crossings) == [(0.8,)]
        await store.commit(batch(rec(6, cents=0.5)), now_ns=T0 + 6)
        assert rows(crossings) == [(0.8,), (1.0,)]
    finally:
        await store.close()
    assert len(rows("SELECT id FROM collector_alert_outbox")) == 2 * len(SINKS)


async def test_a_crossing_two_collectors_journal_together_is_recorded_at_the_next_fold(
        tmp_path: Path) -> None:
    """Each store's headroom misses the other's journal: 4 cents reached in two journals is
    recorded by the next fold (here the close of one), once."""
    path = tmp_path / "db.sqlite"
    a, b = await _store(path, (FLEET,)), await _store(path, (FLEET,))
    crossings = "SELECT threshold FROM collector_budget_alerts"
    try:
        await a.commit(batch(rec(1)), now_ns=T0)  # folds: 1, a's headroom 3
        await b.commit(batch(rec(2)), now_ns=T0)  # folds: 2, b's headroom 2
        await a.commit(batch(rec(3)), now_ns=T0 + 1)  # journaled: a has 2 left
        await b.commit(batch(rec(4)), now_ns=T0 + 1)  # journaled: b has 1 left
        assert _rows(path, crossings) == []  # 4 cents in all, not yet folded
        await a.close()
        assert _rows(path, crossings) == [(0.8,)]
        assert _rows(path, "SELECT spend_cents FROM collector_budget_spend") == [(4.0,)]
    finally:
        await b.close()
    assert _rows(path, crossings) == [(0.8,)]


async def test_a_journal_row_that_is_not_one_is_dropped_not_a_stuck_flush(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever wrote it, an unreadable journal row must not fail every flush after it: the
    fold drops it (logged) and adds the rest; readers skip it too."""
    from collector.budgets.status import read_status
    from collector.store.sqlite import SQLiteReader

    path = tmp_path / "db.sqlite"
    store = await _store(path, (FLEET,))
    try:
        await store.commit(batch(rec(1)), now_ns=T0)  # folds, and makes the tables
        await store.commit(batch(rec(2)), now_ns=T0 + 1)  # journaled
        with sqlite3.connect(path) as db:
            db.execute("INSERT INTO collector_budget_journal VALUES ('x', 0, '{not json')")
        [fleet] = read_status(SQLiteReader(path), (FLEET,), T0).instances
        assert fleet.spend_cents == 2.0
        await store.commit(batch(rec(3), rec(4)), now_ns=T0 + 2)  # reaches 4: folds
    finally:
        await store.close()
    assert _rows(path, "SELECT spend_cents FROM collector_budget_spend") == [(4.0,)]
    assert _rows(path, "SELECT threshold FROM collector_budget_alerts") == [(0.8,)]
    assert "1 budget journal rows were not journal rows" in caplog.text


async def test_migrate_sqlite_carries_budget_state_so_no_threshold_fires_twice(
        tmp_path: Path, pg_url: str) -> None:
    """A SQLite collector's spend, crossings, outbox and unfolded journal move with its usage
    (`collector migrate-sqlite`): spend adds to what PostgreSQL's collectors spent, a threshold
    crossed in the file is never crossed again, an alert it delivered stays delivered, and a
    threshold the two reach together is crossed once, by the next fold."""
    from collector.budgets.spend import encode
    from collector.store.postgres import migrate_sqlite

    pg = await _pg_store(pg_url)
    try:
        await pg.commit(batch(rec(100, session="p", user="bob", cents=0.5)), now_ns=T0)
    finally:
        await pg.close()
    path = tmp_path / "old.sqlite"
    old = await _store(path)
    try:  # 4 cents: the fleet's 0.8 and alice's 1.0, each with an outbox row per sink
        await old.commit(batch(rec(1, cents=4)), now_ns=T0)
    finally:
        await old.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE collector_alert_outbox SET delivered_ns = 1, attempts = 1 "
                   "WHERE sink = 'hook' AND payload LIKE '%\"budget\": \"fleet\"%'")
        # A flush's sums its collector had not folded when it stopped (a crash leaves them).
        db.execute("INSERT INTO collector_budget_journal (id, created_ns, sums) VALUES (?, ?, ?)",
                   ("left", T0, encode({"": {T0 // (3600 * 10**9): {"": 0.25}}})))
    assert _rows(path, "SELECT count(*) FROM collector_alert_outbox "
                       "WHERE delivered_ns IS NOT NULL") == [(1,)]
    options = ConnectOptions(pg_url)
    moved = await asyncio.to_thread(migrate_sqlite, path, options, retention_s=100)
    assert moved.budget_rows == 2 + 2 + 4 + 1  # spend, crossings, outbox, journal
    again = await asyncio.to_thread(migrate_sqlite, path, options, retention_s=100)
    assert again.already and again.budget_rows == 0
    spent = "SELECT budget, scope_value, spend_cents FROM collector_budget_spend ORDER BY 1, 2"
    assert _pg_rows(pg_url, spent) == [("fleet", "", 4.5), ("users", "alice", 4.0)]
    assert _pg_rows(pg_url, "SELECT id FROM collector_budget_journal") == [("left",)]
    assert _pg_rows(pg_url, "SELECT count(*), count(delivered_ns) FROM collector_alert_outbox"
                    ) == [(4, 1)]
    pg = await _pg_store(pg_url)
    try:  # 4.5 + 0.25 journaled + 0.5: the fleet's 1.0 now, its 0.8 not again
        await pg.commit(batch(rec(101, session="p", user="bob", cents=0.5)), now_ns=T0)
    finally:
        await pg.close()
    assert _pg_rows(pg_url, spent) == [("fleet", "", 5.25), ("users", "alice", 4.0)]
    assert _pg_rows(pg_url, "SELECT budget, scope_value, threshold FROM collector_budget_alerts "
                            "ORDER BY 1, 3") == [
        ("fleet", "", 0.8), ("fleet", "", 1.0), ("users", "alice", 1.0)]
    assert _pg_rows(pg_url, "SELECT count(*) FROM collector_alert_outbox") == [(6,)]
