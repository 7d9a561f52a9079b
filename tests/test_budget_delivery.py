"""Outbox delivery to a real HTTP sink on loopback: a 2xx settles an alert, a failing sink
gets it once it recovers, and a lapsed lease (a claimant killed mid-POST) sends the same id
again, never a new one. Asserts dedupe on the id, as a sink would."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from aiohttp import web

from collector.budgets.delivery import OutboxDelivery
from collector.config.budgets import AlertSink
from collector.store.postgres import ConnectOptions, PostgresStore
from collector.store.postgres import open_outbox as open_pg_outbox
from collector.store.sqlite import SQLiteStore, open_outbox
from tests.conftest import T0, free_port
from tests.pg import PgServer
from tests.test_budget_store import FLEET, batch, rec

DEADLINE_S = 30.0


class Sink:
    """A webhook endpoint answering `status` (settable) and recording every request."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[str, dict[str, object]]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((request.headers["Idempotency-Key"], await request.json()))
        return web.Response(status=self.status)

    async def __aenter__(self) -> Sink:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def _until(predicate: object) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE_S
    while not predicate():  # type: ignore[operator]
        assert loop.time() < end, "not delivered within the deadline"
        await asyncio.sleep(0.05)


async def _crossed(where: Path | str, sink: Sink) -> tuple[AlertSink, ...]:
    """Cross the fleet budget's 0.8 and 1.0 at once in a SQLite file (a Path) or a
    PostgreSQL database (a URL), with one webhook sink."""
    sinks = (AlertSink(name="hook", kind="webhook", url=sink.url),)
    store: SQLiteStore | PostgresStore = (
        SQLiteStore(where, retention_s=100, budgets=(FLEET,), sinks=sinks)
        if isinstance(where, Path) else
        PostgresStore(ConnectOptions(where), retention_s=100, commit_timeout_s=30,
                      budgets=(FLEET,), sinks=sinks))
    await store.open()
    try:
        await store.commit(batch(rec(1, cents=6)), now_ns=T0)  # 0.8 and 1.0 at once
    finally:
        await store.close()
    return sinks


@pytest.mark.parametrize(("backend", "ok_status"), [("sqlite", 204), ("postgres", 200)])
async def test_a_failing_sink_gets_each_alert_once_it_recovers(
        tmp_path: Path, backend: str, ok_status: int, request: pytest.FixtureRequest) -> None:
    where: Path | str = (tmp_path / "db.sqlite" if backend == "sqlite"
                         else request.getfixturevalue("pg_url"))
    async with Sink() as sink:
        sink.status = 500
        sinks = await _crossed(where, sink)
        outbox = (open_outbox(where) if isinstance(where, Path)
                  else open_pg_outbox(ConnectOptions(where)))
        delivery = OutboxDelivery(outbox, sinks, poll_s=0.05, backoff_base_s=0.05,
                                  backoff_cap_s=0.1)
        await delivery.start()
        try:
            await _until(lambda: delivery.stats.failed_attempts >= 2)
            sink.status = ok_status
            await _until(lambda: delivery.stats.delivered == 2)
        finally:
            await delivery.stop()
        assert delivery.pending() == 0
    ok = {key for key, _ in sink.received[-2:]}
    assert len(ok) == 2
    assert {body["threshold"] for _, body in sink.received} == {0.8, 1.0}
    assert {body["id"] for _, body in sink.received} == ok  # one stable id per threshold
    assert {key for key, _ in sink.received} == ok


async def test_a_lapsed_lease_resends_the_same_id(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with Sink() as sink:
        sinks = await _crossed(path, sink)
        with sqlite3.connect(path) as db:  # a claimant that died mid-POST: lease lapsed
            ids = {r[0] for r in db.execute("SELECT id FROM collector_alert_outbox")}
            db.execute("UPDATE collector_alert_outbox SET claimed_until_ns = 1, attempts = 1")
        delivery = OutboxDelivery(open_outbox(path), sinks, poll_s=0.05)
        await delivery.start()
        try:
            await _until(lambda: delivery.stats.delivered == 2)
            await asyncio.sleep(0.3)  # nothing further is sent once delivered
        finally:
            await delivery.stop()
    assert sorted(key for key, _ in sink.received) == sorted(ids)


async def test_a_live_lease_is_left_to_its_claimant(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    async with Sink() as sink:
        sinks = await _crossed(path, sink)
        with sqlite3.connect(path) as db:  # another collector holds both rows
            db.execute("UPDATE collector_alert_outbox SET claimed_until_ns = ?", (2**62,))
        delivery = OutboxDelivery(open_outbox(path), sinks, poll_s=0.05)
        await delivery.start()
        try:
            await asyncio.sleep(0.3)
        finally:
            await delivery.stop()
        await delivery.stop()  # a shutdown path that stops it twice: nothing raised
    assert sink.received == [] and delivery.pending() == 2


async def test_stopping_waits_for_a_claim_in_flight_before_closing_its_connection(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim waiting for the write lock (a flush holds it) when the daemon stops: the
    connection is closed after the claim returns, never beside it (closing it beside a
    running statement crashed the daemon on its way out)."""
    path = tmp_path / "db.sqlite"
    events: list[str] = []
    async with Sink() as sink:
        sinks = await _crossed(path, sink)
        outbox = open_outbox(path)
        claim, close = outbox.claim, outbox.close
        claiming = threading.Event()

        def recorded_claim(now_ns: int, lease_ns: int) -> object:
            events.append("claim")
            claiming.set()
            try:
                return claim(now_ns, lease_ns)
            finally:
                events.append("claimed")

        def recorded_close() -> None:
            events.append("close")
            close()

        monkeypatch.setattr(outbox, "claim", recorded_claim)
        monkeypatch.setattr(outbox, "close", recorded_close)
        holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # the claim's UPDATE waits for this lock
        delivery = OutboxDelivery(outbox, sinks, poll_s=0.05)
        await delivery.start()
        stopping = None
        try:
            assert await asyncio.to_thread(claiming.wait, DEADLINE_S)
            stopping = asyncio.create_task(delivery.stop())
            await asyncio.sleep(0.2)  # stop() has cancelled the task by now
            assert events == ["claim"]  # ... and closed nothing
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            await (stopping if stopping is not None else delivery.stop())
    assert events[:3] == ["claim", "claimed", "close"]
    assert delivery.pending() == 2 and sink.received == []


# -- on PostgreSQL -----------------------------------------------------------------------------

def test_postgres_claims_from_two_collectors_at_once_never_share_a_row(pg_server: PgServer,
                                                                        pg_url: str) -> None:
    """Two outboxes on their own connections claim as fast as they can, at once: every row
    is leased by exactly one of them (the lease is taken in one statement, SKIP LOCKED)."""
    asyncio.run(_crossed(pg_url, Sink()))  # makes the tables
    pg_server.execute(pg_url, "INSERT INTO collector_alert_outbox (id, sink, payload, "
                              "created_ns) SELECT 'a' || n, 'hook', '{}', n "
                              "FROM generate_series(1, 400) AS n")
    claimed: list[list[str]] = [[], []]
    start = threading.Barrier(2)

    def claim_all(index: int) -> None:
        outbox = open_pg_outbox(ConnectOptions(pg_url))
        try:
            start.wait()
            while (row := outbox.claim(T0, 10**15)) is not None:
                claimed[index].append(row.id)
        finally:
            outbox.close()

    threads = [threading.Thread(target=claim_all, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    total = pg_server.query(pg_url, "SELECT count(*) FROM collector_alert_outbox")[0][0]
    assert not set(claimed[0]) & set(claimed[1])
    assert len(claimed[0]) + len(claimed[1]) == total == 402
