"""Budgets end to end: a real `collector serve`, real OTLP/HTTP requests to it, and a real
HTTP sink on loopback that records every delivery and can be told to fail or to hold its
answer. What is asserted is what a sink deduping on the Idempotency-Key sees: one id per
(crossing, sink), each answered 2xx, through restarts, kill -9, a failing sink, a new
period, and two collectors on one PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import MS, T0, Daemon, free_port, make_span
from tests.pg import PgServer
from tests.test_daemon import wait_for
from tests.test_receivers import new_trace, post, request_bytes

StartDaemon = Callable[..., Daemon]
DAY = 24 * 3600 * 1_000_000_000
# Long enough for a lapsed lease (collector.budgets.delivery.LEASE_S) and a few backoffs.
DELIVERY_TIMEOUT_S = 90.0
HOLD_TIMEOUT_S = 120.0
# 10 USD per million input tokens: a span of 1000 input tokens costs one cent.
PRICING = '[pricing."test-model"]\ninput = 10.0\noutput = 0.0\n'
FAST_FLUSH = "[flush]\ninterval_ms = 20\n"


@dataclass(frozen=True)
class Delivery:
    path: str
    key: str
    body: dict[str, Any]
    status: int  # what the sink answered (0: held, never answered)


class Sink:
    """A webhook endpoint in a thread: answers `status`, or with `hold` set accepts a request
    and keeps its answer back until released (a sink slow to answer)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.status = 200
        self.hold = False
        self.release = threading.Event()
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Sink:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers["Idempotency-Key"]
                if sink.hold:
                    sink._record(Delivery(self.path, key, body, 0))
                    sink.release.wait(HOLD_TIMEOUT_S)
                    return  # the connection closes without an answer
                status = sink.status
                sink._record(Delivery(self.path, key, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _record(self, delivery: Delivery) -> None:
        with self._lock:
            self.deliveries.append(delivery)

    def seen(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)

    def accepted(self) -> Counter[str]:
        """2xx answers per Idempotency-Key."""
        return Counter(d.key for d in self.seen() if 200 <= d.status < 300)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.stop()


def budget_config(sink: Sink, *, amount_usd: float = 0.04, period: str = "month",
                  slack: bool = False) -> str:
    """One fleet budget with thresholds 0.5 and 1.0, one webhook sink (and a Slack one)."""
    text = (f'[[budgets]]\nname = "fleet"\nscope = "fleet"\nperiod = "{period}"\n'
            f'amount_usd = {amount_usd}\nthresholds = [0.5, 1.0]\n'
            f'[[alerts.sinks]]\nname = "hook"\nkind = "webhook"\nurl = "{sink.url()}"\n')
    if slack:
        text += f'[[alerts.sinks]]\nname = "chat"\nkind = "slack"\nurl = "{sink.url("/slack")}"\n'
    return text + PRICING + FAST_FLUSH


def spend(daemon: Daemon, cents: int, *, session: str = "s1", t: int = T0,
          user: str = "alice") -> None:
    """`cents` chat spans of one cent each, in one OTLP/HTTP request, acknowledged."""
    trace = new_trace()
    spans = [make_span(trace_id=trace, span_id=i + 1, start=t + i * MS, attrs={
        "gen_ai.conversation.id": session, "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "test-model", "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 0, "user.id": user}) for i in range(cents)]
    status, _, body = post(daemon, request_bytes(*spans))
    assert status == 200, body


def outbox_ids(daemon: Daemon) -> set[str]:
    with sqlite3.connect(daemon.db_path) as db:
        return {str(r[0]) for r in db.execute("SELECT id FROM collector_alert_outbox")}


def sqlite_rows(daemon: Daemon, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(daemon.db_path) as db:
        return db.execute(sql).fetchall()


def wait_accepted(sink: Sink, ids: set[str], daemon: Daemon | None = None) -> None:
    wait_for(lambda: set(sink.accepted()) >= ids, f"{len(ids)} alerts accepted "
             f"(log: {daemon.log if daemon else ''})", timeout=DELIVERY_TIMEOUT_S)


def test_each_threshold_fires_once_with_budget_scope_period_spend_limit_share_top(
        start_daemon: StartDaemon, sink: Sink) -> None:
    sink.start()
    daemon = start_daemon(budget_config(sink))
    for n in range(6):  # 6 cents in 6 requests: 0.5 reached at 2 cents, 1.0 at 4
        spend(daemon, 1, session=f"s{n % 2}", user=f"u{n % 2}")
    wait_for(lambda: len(outbox_ids(daemon)) == 2, "two crossings")
    ids = outbox_ids(daemon)
    wait_accepted(sink, ids, daemon)
    for _ in range(3):  # past both thresholds: nothing more fires
        spend(daemon, 1, session="s9")
    wait_for(lambda: sqlite_rows(daemon, "SELECT round(spend_cents) FROM "
                                         "collector_budget_spend") == [(9.0,)], "9 cents spent")
    assert daemon.stop() == 0
    assert outbox_ids(daemon) == ids
    assert sink.accepted() == Counter({i: 1 for i in ids})
    bodies = {d.body["threshold"]: d.body for d in sink.seen()}
    assert set(bodies) == {0.5, 1.0}
    half = bodies[0.5]
    assert {k: half[k] for k in ("budget", "scope", "value", "limit_usd")} == {
        "budget": "fleet", "scope": "fleet", "value": None, "limit_usd": 0.04}
    assert half["spend_usd"] == 0.02 and half["share"] == 0.5
    assert half["period"] == {"start": "2026-01-01T00:00:00+00:00",
                              "end": "2026-02-01T00:00:00+00:00"}
    assert half["top"] == {
        "sessions": [{"name": "s0", "spend_usd": 0.01}, {"name": "s1", "spend_usd": 0.01}],
        "users": [{"name": "u0", "spend_usd": 0.01}, {"name": "u1", "spend_usd": 0.01}],
        "models": [{"name": "test-model", "spend_usd": 0.02}]}
    assert bodies[1.0]["spend_usd"] == 0.04 and bodies[1.0]["share"] == 1.0
    assert {d.key for d in sink.seen()} == {d.body["id"] for d in sink.seen()} == ids


def test_a_restart_between_commit_and_delivery_delivers_once(
        start_daemon: StartDaemon, sink: Sink) -> None:
    daemon = start_daemon(budget_config(sink))  # the sink is down: nothing listens yet
    spend(daemon, 4)  # both thresholds in one commit
    wait_for(lambda: len(outbox_ids(daemon)) == 2, "two crossings")
    ids = outbox_ids(daemon)
    assert daemon.stop() == 0  # graceful, with both alerts undelivered
    assert sqlite_rows(daemon, "SELECT count(*) FROM collector_alert_outbox "
                               "WHERE delivered_ns IS NULL") == [(2,)]
    sink.start()
    daemon.start()
    wait_accepted(sink, ids, daemon)
    assert daemon.stop() == 0
    assert sink.accepted() == Counter({i: 1 for i in ids})


def test_kill_9_during_delivery_resends_the_same_id_and_loses_none(
        start_daemon: StartDaemon, sink: Sink) -> None:
    sink.hold = True  # takes the request, keeps its answer back
    sink.start()
    daemon = start_daemon(budget_config(sink))
    spend(daemon, 4)
    wait_for(lambda: len(sink.seen()) == 1, "a delivery in flight", timeout=DELIVERY_TIMEOUT_S)
    held = sink.seen()[0].key
    daemon.kill()  # SIGKILL mid-POST: its lease stays until it lapses
    ids = outbox_ids(daemon)
    assert held in ids and len(ids) == 2
    sink.hold = False
    sink.release.set()
    daemon.start()
    wait_accepted(sink, ids, daemon)
    assert daemon.stop() == 0
    keys = [d.key for d in sink.seen()]
    assert set(keys) == ids  # distinct ids == the crossings: none new, none lost
    assert keys.count(held) == 2  # the one in flight was sent again, under its own id
    assert sink.accepted() == Counter({i: 1 for i in ids})


def test_a_failing_sink_gets_the_alert_once_it_recovers(
        start_daemon: StartDaemon, sink: Sink) -> None:
    sink.status = 500
    sink.start()
    daemon = start_daemon(budget_config(sink))
    spend(daemon, 2)  # 0.5 only
    wait_for(lambda: len(sink.seen()) >= 2, "two failed attempts",
             timeout=DELIVERY_TIMEOUT_S)
    sink.status = 200
    ids = outbox_ids(daemon)
    assert len(ids) == 1
    wait_accepted(sink, ids, daemon)
    assert daemon.stop() == 0
    assert {d.key for d in sink.seen()} == ids
    assert sink.accepted() == Counter({i: 1 for i in ids})
    assert "alert sink hook answered 500" in daemon.log


def test_a_new_day_rearms_the_thresholds(start_daemon: StartDaemon, sink: Sink) -> None:
    sink.start()
    daemon = start_daemon(budget_config(sink, period="day"))
    spend(daemon, 4, t=T0 + 3600 * 10**9)  # day one: 0.5 and 1.0
    spend(daemon, 1, t=T0 + DAY + 3600 * 10**9)  # day two: below 0.5
    wait_for(lambda: len(sqlite_rows(daemon, "SELECT * FROM collector_budget_spend")) == 2,
             "spend on both days")
    spend(daemon, 4, t=T0 + DAY + 7200 * 10**9)  # day two: 0.5 and 1.0 again
    spend(daemon, 4, t=T0 + 7200 * 10**9)  # day one again: nothing new
    wait_for(lambda: sqlite_rows(daemon, "SELECT round(sum(spend_cents)) FROM "
                                         "collector_budget_spend") == [(13.0,)], "13 cents spent")
    ids = outbox_ids(daemon)
    wait_accepted(sink, ids, daemon)
    assert daemon.stop() == 0
    assert sorted(sqlite_rows(daemon, "SELECT period_start_ns, threshold FROM "
                                      "collector_budget_alerts")) == [
        (T0, 0.5), (T0, 1.0), (T0 + DAY, 0.5), (T0 + DAY, 1.0)]
    periods = Counter((d.body["period"]["start"], d.body["threshold"]) for d in sink.seen())
    assert periods == Counter({("2026-01-01T00:00:00+00:00", 0.5): 1,
                               ("2026-01-01T00:00:00+00:00", 1.0): 1,
                               ("2026-01-02T00:00:00+00:00", 0.5): 1,
                               ("2026-01-02T00:00:00+00:00", 1.0): 1})
    assert sink.accepted() == Counter({i: 1 for i in ids})


def test_two_collectors_on_one_postgres_cross_a_budget_once(
        start_daemon: StartDaemon, pg_server: PgServer, pg_url: str, sink: Sink) -> None:
    """Both collectors get usage at once, each request half a threshold's worth, so the
    crossings fall on whichever commit gets there; both deliver from the one outbox."""
    sink.start()
    config = budget_config(sink, amount_usd=0.4, slack=True)  # 0.5 at 20 cents, 1.0 at 40
    daemons = [start_daemon(config, postgres_url=pg_url) for _ in range(2)]
    errors: list[BaseException] = []

    def send(daemon: Daemon, index: int) -> None:
        try:
            for n in range(10):  # 10 requests of 3 cents from each collector: 60 cents
                spend(daemon, 3, session=f"c{index}-{n % 3}")
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(d, i)) for i, d in enumerate(daemons)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DELIVERY_TIMEOUT_S)
    assert not errors and not any(t.is_alive() for t in threads)
    wait_for(lambda: pg_server.query(pg_url, "SELECT round(spend_cents) FROM "
                                             "collector_budget_spend") == [(60.0,)],
             "60 cents spent")
    ids = {str(r[0]) for r in pg_server.query(pg_url, "SELECT id FROM collector_alert_outbox")}
    assert len(ids) == 4  # two thresholds, two sinks
    wait_accepted(sink, ids)
    for daemon in daemons:
        assert daemon.stop() == 0
    assert pg_server.query(pg_url, "SELECT threshold, count(*) FROM collector_budget_alerts "
                                   "GROUP BY 1 ORDER BY 1") == [(0.5, 1), (1.0, 1)]
    per_sink = Counter((d.path, d.key) for d in sink.seen() if d.status == 200)
    assert len(per_sink) == 4 and set(per_sink.values()) == {1}
    assert Counter(path for path, _ in per_sink) == Counter({"/hook": 2, "/slack": 2})
    assert {d.key for d in sink.seen()} == ids
    slack = [str(d.body["text"]) for d in sink.seen() if d.path == "/slack"]
    assert all("*Budget fleet*: the fleet has spent" in t and "Top sessions: c" in t
               for t in slack) and len(slack) == 2
