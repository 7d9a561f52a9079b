"""The fleet view under a flood of distinct values, on both backends: /api/filters stays
bounded, a search finds what it leaves out, CSV exports stream exactly the table's rows, and a
paused download holds no reader while the rest of the API answers.

The flood is written straight into a running daemon's database (thousands of sessions, each
with its own model, hundreds of users and hosts): what agents would send, without spending the
test's time on OTLP for each.
"""

from __future__ import annotations

import csv
import http.client
import io
import json
import socket
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from collector.web import queries
from tests.conftest import Daemon
from tests.test_web import db, get, get_json, turn

FLOOD = 3000  # sessions, each with a model of its own
USERS = 600
HOSTS = 1000
AGENTS = 3
SMALL_RCVBUF = 4096  # a client that reads slowly: the kernel holds little for it
CSV_WAIT_S = 60.0


def flood_rows(n: int, *, prefix: str = "flood", pad: str = "") -> Iterator[tuple[Any, ...]]:
    """Sessions and their labels: session i spends i cents, last active i seconds ago."""
    now = time.time()
    for i in range(n):
        at = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - i))
        yield (f"{prefix}-{i:05d}", f"model-{i:05d}{pad}", at, at, 1 + i % 7, 100 * i, 10 * i,
               float(i), f"agent-{i % AGENTS}", f"user-{i % USERS:03d}@example.com{pad}",
               f"host-{i % HOSTS:04d}")


SESSION_INSERT = ("INSERT INTO agent_sessions (id, model, created_at, last_active_at, turns, "
                  "prompt_tokens, completion_tokens, cost_cents) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
LABEL_INSERT = ("INSERT INTO collector_session_labels (id, agent, agent_ns, user_name, user_ns, "
                "host, host_ns) VALUES (?, ?, 1, ?, 1, ?, 1)")


def seed(daemon: Daemon, rows: Sequence[tuple[Any, ...]]) -> None:
    """Write sessions and labels into the daemon's database (its schema is the daemon's)."""
    sessions = [r[:8] for r in rows]
    labels = [(r[0], *r[8:]) for r in rows]
    if daemon.postgres_url is not None:
        import psycopg

        with psycopg.connect(daemon.postgres_url, autocommit=True) as pg, pg.cursor() as cur:
            cur.executemany(SESSION_INSERT.replace("?", "%s"), sessions)
            cur.executemany(LABEL_INSERT.replace("?", "%s"), labels)
        return
    conn = sqlite3.connect(daemon.db_path, timeout=30)
    try:
        with conn:
            conn.executemany(SESSION_INSERT, sessions)
            conn.executemany(LABEL_INSERT, labels)
    finally:
        conn.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def flood(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("pg_server").new_database()
    daemon = Daemon(tmp_path_factory.mktemp("flood"), "[sessions]\nstale_after_s = 86400000\n",
                    postgres_url=url)
    daemon.start()
    try:
        seed(daemon, list(flood_rows(FLOOD)))
        yield daemon
    finally:
        daemon.stop()


def test_filters_offer_the_top_values_not_every_value(flood: Daemon) -> None:
    status, _, body = get(flood.web_url + "/api/filters")
    assert status == 200
    data = json.loads(body)
    # The costliest FILTER_TOP of each field: session i spends i cents, so the newest
    # thousands' values, highest first.
    assert data["model"] == [f"model-{i:05d}" for i in range(FLOOD - 1, FLOOD - 51, -1)]
    assert len(data["model"]) == len(data["user"]) == len(data["host"]) == queries.FILTER_TOP
    users = dict(db(flood, "SELECT l.user_name, sum(s.cost_cents) FROM agent_sessions s JOIN "
                           "collector_session_labels l ON l.id = s.id GROUP BY l.user_name"))
    assert data["user"] == sorted(users, key=lambda u: (-users[u], u))[:queries.FILTER_TOP]
    assert sorted(data["agent"]) == [f"agent-{i}" for i in range(AGENTS)]
    # The default dimensions are offered too; nothing was tagged, so their (empty) lists are
    # complete.
    assert data["complete"] == {"status": True, "model": False, "agent": True, "user": False,
                                "host": False, "team": True, "department": True,
                                "cost_center": True, "project": True}
    # Bounded: about FILTER_TOP short values per field, whatever the number of sessions.
    assert len(body) < 4 * queries.FILTER_TOP * 40 + 500


def test_search_finds_values_outside_the_top(flood: Daemon) -> None:
    def search(**params: str) -> dict[str, Any]:
        from urllib.parse import urlencode

        found: dict[str, Any] = get_json(flood, "/api/filters/search?" + urlencode(params))
        return found

    top = get_json(flood, "/api/filters")["model"]
    assert "model-00007" not in top
    assert search(field="model", q="model-00007")["values"] == ["model-00007"]
    # A prefix, in order and bounded; `more` says others match.
    found = search(field="model", q="model-0", limit="5")
    assert found["values"] == [f"model-{i:05d}" for i in range(5)] and found["more"] is True
    # Anywhere in the value, in any case.
    found = search(field="model", q="DEL-0012")
    assert found["values"] == [f"model-{i:05d}" for i in range(120, 130)]
    assert found["more"] is False
    found = search(field="user", q="user-017")
    assert found["values"] == ["user-017@example.com"]
    assert search(field="host", q="st-099")["values"] == [f"host-{i:04d}" for i in
                                                           range(990, 1000)]
    assert search(field="agent", q="nothing like it") == {
        "field": "agent", "q": "nothing like it", "values": [], "more": False}
    # What a search finds filters the table.
    page = get_json(flood, "/api/sessions?model=model-00007")
    assert [s["id"] for s in page["sessions"]] == ["flood-00007"] and page["total"] == 1


def csv_rows(body: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body.decode())))


def test_csv_export_streams_exactly_the_table(flood: Daemon) -> None:
    assert FLOOD > 2 * queries.EXPORT_CHUNK  # several chunks, so the keyset is exercised
    status, headers, body = get(flood.web_url + "/api/sessions.csv?sort=id&order=asc")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert headers.get("Transfer-Encoding") == "chunked"  # streamed, not built whole
    rows = csv_rows(body)
    expected = db(flood, "SELECT id, turns, prompt_tokens + completion_tokens, cost_cents, model "
                         "FROM agent_sessions ORDER BY id")
    assert [(r["id"], int(r["turns"]), int(r["total_tokens"]), float(r["cost_usd"]), r["model"])
            for r in rows] == [(i, t, n, round(c / 100, 8), m) for i, t, n, c, m in expected]
    # Filtered and in another order (ties of cost broken by id, as in the table).
    _, _, body = get(flood.web_url + "/api/sessions.csv?agent=agent-1&sort=turns&order=desc")
    expected = db(flood, "SELECT s.id FROM agent_sessions s JOIN collector_session_labels l "
                         "ON l.id = s.id WHERE l.agent = 'agent-1' ORDER BY s.turns DESC, "
                         "s.id DESC")
    assert [r["id"] for r in csv_rows(body)] == [r[0] for r in expected]


# -- a paused download does not block the API -----------------------------------------------

def kernel_send_buffer_max() -> int:
    return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])


class SlowDownload:
    """A CSV download whose client reads its headers and a few bytes, then pauses."""

    def __init__(self, daemon: Daemon, path: str) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        sock.settimeout(CSV_WAIT_S)
        sock.connect(("127.0.0.1", daemon.web_port))
        self.conn = http.client.HTTPConnection("127.0.0.1", daemon.web_port,
                                               timeout=CSV_WAIT_S)
        self.conn.sock = sock
        self.conn.request("GET", path)
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.start = self.response.read(64)

    def finish(self) -> bytes:
        body = self.start + self.response.read()
        self.conn.close()
        return body


def test_paused_csv_downloads_hold_no_reader(tmp_path: Path) -> None:
    """More paused downloads than reader threads: the overview, a page and the filters still
    answer, and each download, resumed afterwards, carries a session committed while it was
    paused (it reads its rows as the client takes them, not all at the start)."""
    daemon = Daemon(tmp_path, "[sessions]\nstale_after_s = 86400000\n")
    daemon.start()
    try:
        # Rows of about 700 bytes, so a download is several times what the kernel can buffer.
        pad = "-" + "x" * 300
        n = 3 * kernel_send_buffer_max() // 700 + queries.EXPORT_CHUNK
        seed(daemon, list(flood_rows(n, prefix="big", pad=pad)))
        path = "/api/sessions.csv?sort=id&order=asc"
        from collector.web.app import READER_THREADS

        downloads = [SlowDownload(daemon, path) for _ in range(READER_THREADS + 2)]
        # While every download is paused mid-way, the rest of the API answers.
        for endpoint in ("/api/overview", "/api/sessions?limit=5", "/api/filters",
                         "/api/filters/search?field=model&q=model-0000"):
            status, _, _ = get(daemon.web_url + endpoint)
            assert status == 200, endpoint
        # A session that sorts last, committed now: downloads still running will include it.
        daemon.export_http(turn("~late", 0, time.time_ns(), cost=0.5))
        deadline = time.monotonic() + CSV_WAIT_S
        while not db(daemon, "SELECT 1 FROM agent_sessions WHERE id = '~late'"):
            assert time.monotonic() < deadline, "the late session was never committed"
            time.sleep(0.05)
        ids = [r[0] for r in db(daemon, "SELECT id FROM agent_sessions ORDER BY id")]
        assert ids[-1] == "~late" and len(ids) == n + 1
        for download in downloads:
            body = download.finish()
            assert len(body) > 2 * kernel_send_buffer_max()
            assert [r["id"] for r in csv_rows(body)] == ids
    finally:
        daemon.stop()
