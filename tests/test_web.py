"""The fleet view against a real daemon fed through its OTLP receivers, read back from the DB.

The API is checked number by number against SQLite; the page is loaded in a real headless
Chromium (Debian's `chromium`, driven by Playwright: no browser download) and what it shows is
compared with the database, after filters, and after a live update.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from collector import cli
from collector.report import format_usd
from collector.store.base import DAILY_TABLE
from collector.store.sqlite import DAILY_TRIGGERS, SCHEMA_SCRIPT
from collector.web import queries
from tests.conftest import (
    DAILY_FROM_ROLLUP,
    UI_TIMEOUT_MS,
    Daemon,
    assert_daily_is_the_rollup,
    make_span,
)

AGENTS = (("support-bot", "2.1.0", "ana@example.com", "build-1"),
          ("triage-agent", "0.169.0", "bo@example.com", "laptop-2"),
          ("review-agent", "0.61.0", "ana@example.com", "build-1"))
MODELS = ("claude-sonnet-4", "gpt-5", "gemini-2.5-pro")
SESSIONS = 12

_trace = iter(range(1, 10**9))


def turn(session: str, agent: int, at: int, *, cost: float, cache_read: int = 0,
         status: str | None = None) -> list[Any]:
    """An agent span and its model call, as a GenAI-instrumented agent emits them."""
    name, version, user, host = AGENTS[agent]
    resource = {"service.name": name, "service.version": version, "user.email": user,
                "host.name": host}
    trace = next(_trace)
    agent_attrs: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent",
                                   "gen_ai.conversation.id": session}
    if status:
        agent_attrs["agent.session.status"] = status
    call = {"gen_ai.operation.name": "chat", "gen_ai.conversation.id": session,
            "gen_ai.request.model": MODELS[agent], "gen_ai.usage.input_tokens": 1200,
            "gen_ai.usage.output_tokens": 300 + 10 * cache_read // 100,
            "gen_ai.usage.reasoning.output_tokens": 50,
            "gen_ai.usage.cache_read.input_tokens": cache_read, "gen_ai.usage.cost": cost}
    return [make_span(trace_id=trace, span_id=2, parent_id=1, attrs=call, resource=resource,
                      start=at, end=at + 1_000_000),
            make_span(trace_id=trace, span_id=1, attrs=agent_attrs, resource=resource,
                      start=at, end=at + 2_000_000)]


def get(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get_json(daemon: Daemon, path: str) -> Any:
    status, _, body = get(daemon.web_url + path)
    assert status == 200, body
    return json.loads(body)


def db(daemon: Daemon, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Read the daemon's database directly (the same SQL on both backends)."""
    if daemon.postgres_url is not None:
        from collector.store.postgres import ConnectOptions, QueryConnection

        pg = QueryConnection(ConnectOptions(daemon.postgres_url))
        try:
            return list(pg.execute(sql, params))
        finally:
            pg.close()
    conn = sqlite3.connect(daemon.db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A running daemon on SQLite fed, over both transports, 12 sessions of 3 agents over 3
    days (the browser tests' view)."""
    yield from _fleet(tmp_path_factory, None)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api_fleet(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The same fleet on each backend: the API's answers are checked on both."""
    if request.param == "sqlite":
        yield request.getfixturevalue("fleet")
        return
    yield from _fleet(tmp_path_factory, request.getfixturevalue("pg_server").new_database())


def _fleet(tmp_path_factory: pytest.TempPathFactory,
           postgres_url: str | None) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("web"), "[sessions]\nstale_after_s = 86400000\n",
                    postgres_url=postgres_url)
    daemon.start()
    now = time.time_ns()
    spans: list[Any] = []
    for i in range(SESSIONS):
        at = now - (i % 3) * 86_400 * 10**9 - (i + 1) * 60 * 10**9
        for k in range(1 + i % 4):
            spans += turn(f"web-{i:02d}", i % 3, at + k * 1000, cost=0.01 * (i + 1) + 0.001 * k,
                          cache_read=100 * k, status="completed" if i % 5 == 4 else None)
    daemon.export_grpc(spans[: len(spans) // 2])
    daemon.export_http(spans[len(spans) // 2:])
    try:
        yield daemon
    finally:
        daemon.stop()


# -- the API, against the database ----------------------------------------------------------

def test_overview_equals_the_database(api_fleet: Daemon) -> None:
    data = get_json(api_fleet, "/api/overview")
    (total_cents,) = db(api_fleet, "SELECT sum(cost_cents) FROM collector_usage_hourly")[0]
    (session_cents,) = db(api_fleet, "SELECT sum(cost_cents) FROM agent_sessions")[0]
    assert data["spend"]["30d"]["cost_cents"] == pytest.approx(total_cents)
    assert total_cents == pytest.approx(session_cents)
    assert data["spend"]["30d"]["cost_text"] == format_usd(total_cents)
    today = data["spend"]["today"]["since"]
    (today_cents,) = db(api_fleet, "SELECT coalesce(sum(cost_cents), 0) FROM "
                                   "collector_usage_hourly WHERE hour >= ?",
                        today + "T00:00:00.000Z")[0]
    assert data["spend"]["today"]["cost_cents"] == pytest.approx(today_cents)
    assert 0 < today_cents < total_cents
    tokens = data["tokens"]
    prompt, completion, cache_read = db(
        api_fleet, "SELECT sum(prompt_tokens), sum(completion_tokens), sum(cache_read_tokens) "
               "FROM collector_usage_hourly")[0]
    assert tokens["input_tokens"] + tokens["cache_read_tokens"] == prompt
    assert tokens["output_tokens"] == completion > 0 and tokens["cache_read_tokens"] == cache_read
    assert tokens["reasoning_tokens"] > 0
    assert tokens["cache_hit_rate"] == pytest.approx(cache_read / prompt)
    # Stacked by model and by agent: each stack sums to the same spend.
    for key in ("by_model", "by_agent"):
        assert sum(sum(s["cost_usd"]) for s in data["series"][key]) == pytest.approx(
            total_cents / 100)
    assert {s["name"] for s in data["series"]["by_agent"]} == {a[0] for a in AGENTS}
    (active,) = db(api_fleet, "SELECT count(*) FROM agent_sessions WHERE status = 'active'")[0]
    assert data["active"]["count"] == active == SESSIONS - 2
    # Turns counted under their model calls' model (agent spans name none).
    assert "(none)" not in {s["name"] for s in data["series"]["by_model"]}


def test_sessions_pages_cover_every_session_once_in_order(api_fleet: Daemon) -> None:
    for sort in ("last_active_at", "cost", "turns", "tokens", "id"):
        for order in ("desc", "asc"):
            seen: list[dict[str, Any]] = []
            cursor = ""
            while True:
                page = get_json(api_fleet, f"/api/sessions?limit=5&sort={sort}&order={order}"
                                       f"&cursor={cursor}")
                assert page["total"] == SESSIONS
                seen += page["sessions"]
                if not page["next"]:
                    break
                cursor = urllib.parse.quote(page["next"])
            assert len(seen) == SESSIONS == len({s["id"] for s in seen})
            key = {"cost": "cost_cents", "tokens": "total_tokens"}.get(sort, sort)
            values = [(s[key], s["id"]) for s in seen]
            assert values == sorted(values, reverse=order == "desc")
    rows = {r[0]: r for r in db(api_fleet,
                                "SELECT id, turns, cost_cents, model FROM agent_sessions")}
    for s in seen:
        assert (s["turns"], s["cost_cents"], s["model"]) == rows[s["id"]][1:]
        assert s["cost_text"] == format_usd(rows[s["id"]][2])


def test_session_filters_and_search(api_fleet: Daemon) -> None:
    labels = db(api_fleet, "SELECT id, agent, user_name, host FROM collector_session_labels")
    page = get_json(api_fleet, "/api/sessions?agent=triage-agent&limit=500")
    assert {s["id"] for s in page["sessions"]} == {r[0] for r in labels if r[1] == "triage-agent"}
    page = get_json(api_fleet, "/api/sessions?user=ana%40example.com&status=active&limit=500")
    statuses = dict(db(api_fleet, "SELECT id, status FROM agent_sessions"))
    assert {s["id"] for s in page["sessions"]} == {
        r[0] for r in labels if r[2] == "ana@example.com" and statuses[r[0]] == "active"}
    page = get_json(api_fleet, "/api/sessions?model=gpt-5&q=web-0")
    assert {s["id"] for s in page["sessions"]} == {"web-01", "web-04", "web-07"}
    filters = get_json(api_fleet, "/api/filters")
    assert sorted(filters["agent"]) == sorted(a[0] for a in AGENTS)
    assert filters["complete"]["agent"] is True
    for bad in ("status=sleeping", "sort=colour", "limit=0", "cursor=%%%", "order=up"):
        status, _, body = get(api_fleet.web_url + "/api/sessions?" + bad)
        assert status == 400 and json.loads(body)["error"], bad


def assert_daemon_daily_is_the_rollup(daemon: Daemon) -> None:
    assert_daily_is_the_rollup(lambda sql: db(daemon, sql))


def test_daily_table_is_the_rollup_per_day_model_and_current_agent(api_fleet: Daemon) -> None:
    assert db(api_fleet, f"SELECT count(*) FROM {DAILY_TABLE}")[0][0] > 0
    assert_daemon_daily_is_the_rollup(api_fleet)


# The random writers' statements, per backend (PostgreSQL's upsert names its conflict target
# and its table, and has greatest() for SQLite's two-argument max()).
RANDOM_WRITES = {
    "sqlite": (
        "INSERT INTO collector_usage_hourly (hour, session_id, model, turns, prompt_tokens, "
        "cache_read_tokens, cost_cents) VALUES (?, ?, ?, 1, ?, ?, ?), (?, ?, ?, 1, ?, ?, ?) "
        "ON CONFLICT DO UPDATE SET turns = turns + 1, "
        "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
        "cache_read_tokens = cache_read_tokens + excluded.cache_read_tokens, "
        "cost_cents = cost_cents + excluded.cost_cents",
        "INSERT INTO collector_session_labels (id, agent, agent_ns) VALUES (?, ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET agent = CASE WHEN excluded.agent IS NOT NULL "
        "AND excluded.agent_ns >= agent_ns THEN excluded.agent ELSE agent END, "
        "agent_ns = max(agent_ns, excluded.agent_ns)"),
    "postgres": (
        "INSERT INTO collector_usage_hourly AS h (hour, session_id, model, turns, "
        "prompt_tokens, cache_read_tokens, cost_cents) VALUES (%s, %s, %s, 1, %s, %s, %s), "
        "(%s, %s, %s, 1, %s, %s, %s) ON CONFLICT (hour, model, session_id) DO UPDATE SET "
        "turns = h.turns + 1, prompt_tokens = h.prompt_tokens + excluded.prompt_tokens, "
        "cache_read_tokens = h.cache_read_tokens + excluded.cache_read_tokens, "
        "cost_cents = h.cost_cents + excluded.cost_cents",
        "INSERT INTO collector_session_labels AS l (id, agent, agent_ns) VALUES (%s, %s, %s) "
        "ON CONFLICT (id) DO UPDATE SET agent = CASE WHEN excluded.agent IS NOT NULL "
        "AND excluded.agent_ns >= l.agent_ns THEN excluded.agent ELSE l.agent END, "
        "agent_ns = greatest(l.agent_ns, excluded.agent_ns)"),
}


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_daily_table_follows_every_write_to_the_rollup_and_labels(
        backend: str, request: pytest.FixtureRequest) -> None:
    """The triggers against a real database, under a random mix of what writers do: rollup
    upserts (two rows a statement, new or added to), labels set, changed and cleared, rows
    deleted."""
    import random

    if backend == "sqlite":
        lite = sqlite3.connect(":memory:", isolation_level=None)
        lite.executescript(SCHEMA_SCRIPT)
        run: Callable[..., Any] = lite.execute
        close = lite.close
        mark = "?"
    else:
        import asyncio

        import psycopg

        from collector.store.postgres import ConnectOptions, PostgresStore

        url = request.getfixturevalue("pg_server").new_database()
        store = PostgresStore(ConnectOptions(url), retention_s=3600, commit_timeout_s=60)
        asyncio.run(store.open())
        asyncio.run(store.close())
        pg = psycopg.connect(url, autocommit=True)
        run, close, mark = pg.execute, pg.close, "%s"

    def read(sql: str) -> list[Any]:
        return [tuple(int(v) if isinstance(v, Decimal) else v for v in r)
                for r in run(sql).fetchall()]

    upsert, label = RANDOM_WRITES[backend]
    rng = random.Random(13)
    try:
        for i in range(1000 if backend == "postgres" else 2000):
            sid = f"s{rng.randrange(30)}"
            op = rng.random()
            if op < 0.55:
                hour = f"2026-11-0{rng.randrange(1, 4)}T{rng.randrange(24):02d}:00:00.000Z"
                models = rng.sample(("m1", "m2", ""), 2)
                run(upsert, [v for m in models for v in (
                    hour, sid, m, rng.randrange(1000), rng.randrange(100), rng.random())])
            elif op < 0.85:
                run(label, (sid, rng.choice(("a", "b", None)), i))
            elif op < 0.92:
                run(f"DELETE FROM collector_session_labels WHERE id = {mark}", (sid,))
            else:
                run("DELETE FROM collector_usage_hourly WHERE session_id = "
                    f"{mark} AND hour < '2026-11-02'", (sid,))
            if i % 50 == 0:
                assert_daily_is_the_rollup(read)
        assert_daily_is_the_rollup(read)
        assert {r[0] for r in read(f"SELECT DISTINCT agent FROM {DAILY_TABLE}")} == {
            r[0] for r in read(DAILY_FROM_ROLLUP.replace(
                "SELECT substr", "SELECT DISTINCT coalesce(l.agent, ''), substr"))}
    finally:
        close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite, else a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_server").new_database())


def test_a_session_changing_agent_moves_its_spend(tmp_path: Path,
                                                  backend_url: str | None) -> None:
    """Latest agent wins for the whole session, in the overview as in `report agent`."""
    daemon = Daemon(tmp_path, "[sessions]\nstale_after_s = 86400000\n", postgres_url=backend_url)
    daemon.start()
    try:
        now = time.time_ns()
        daemon.export_http(turn("moving", 0, now - 3_600 * 10**9, cost=0.5))
        daemon.export_http(turn("staying", 2, now - 3_600 * 10**9, cost=0.25))
        by_agent = {s["name"] for s in get_json(daemon, "/api/overview")["series"]["by_agent"]}
        assert by_agent == {AGENTS[0][0], AGENTS[2][0]}
        daemon.export_grpc(turn("moving", 1, now - 60 * 10**9, cost=0.125))
        data = get_json(daemon, "/api/overview")
        spend = {s["name"]: sum(s["cost_usd"]) for s in data["series"]["by_agent"]}
        assert spend == pytest.approx({AGENTS[1][0]: 0.625, AGENTS[2][0]: 0.25})
        assert_daemon_daily_is_the_rollup(daemon)
    finally:
        daemon.stop()


def test_a_database_from_before_the_daily_table_gets_it_filled(tmp_path: Path,
                                                                backend_url: str | None) -> None:
    daemon = Daemon(tmp_path, "", postgres_url=backend_url)
    daemon.start()
    now = time.time_ns()
    daemon.export_http(turn("old-1", 0, now - 7_200 * 10**9, cost=0.75) + turn(
        "old-2", 1, now - 60 * 10**9, cost=0.5))
    daemon.stop()
    if backend_url is None:
        conn = sqlite3.connect(daemon.db_path)
        for trigger in DAILY_TRIGGERS:
            conn.execute("DROP TRIGGER " + trigger.split()[5])
        conn.execute(f"DROP TABLE {DAILY_TABLE}")
        conn.commit()
        conn.close()
    else:
        import psycopg

        from collector.store.postgres import DAILY_TRIGGERS as PG_TRIGGERS

        with psycopg.connect(backend_url, autocommit=True) as pg:
            for name, statement in PG_TRIGGERS:
                pg.execute(f"DROP TRIGGER {name} ON {statement.split(' ON ')[1].split()[0]}")
            pg.execute(f"DROP TABLE {DAILY_TABLE}")
    daemon.start()
    try:
        data = get_json(daemon, "/api/overview")
        assert data["spend"]["30d"]["cost_cents"] == pytest.approx(125)
        daemon.export_http(turn("old-2", 1, now, cost=0.25))
        assert_daemon_daily_is_the_rollup(daemon)
        assert db(daemon, f"SELECT sum(cost_cents) FROM {DAILY_TABLE}")[0][0] == pytest.approx(
            150)
    finally:
        daemon.stop()


def test_both_ways_to_a_page_give_the_same_rows(api_fleet: Daemon,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Filters matching few sessions sort their matches; broad ones walk the order's index:
    the two plans must give the same pages, and a capped count says it is one."""
    conn: Any
    if api_fleet.postgres_url is None:
        conn = sqlite3.connect(f"{Path(api_fleet.db_path).resolve().as_uri()}?mode=ro", uri=True)
    else:
        from collector.store.postgres import ConnectOptions, QueryConnection

        conn = QueryConnection(ConnectOptions(api_fleet.postgres_url))
    filters = ({}, {"status": "active"}, {"agent": "triage-agent"}, {"q": "web-0"},
               {"user": "ana@example.com", "model": "claude-sonnet-4"}, {"q": "web-1", "status":
               "completed"}, {"host": "nowhere"})

    def pages(params: dict[str, str]) -> list[list[str]]:
        out = []
        cursor = ""
        while True:
            page = queries.sessions_page(conn, queries.SessionQuery.parse(
                {**params, "limit": "3", "cursor": cursor}))
            out.append([s["id"] for s in page["sessions"]])
            if not page["next"]:
                return out
            cursor = page["next"]

    try:
        for f in filters:
            for sort in queries.SORTS:
                for order in ("asc", "desc"):
                    params = {**f, "sort": sort, "order": order}
                    monkeypatch.setattr(queries, "SMALL_MATCH", 10**9)
                    sorted_matches = pages(params)
                    monkeypatch.setattr(queries, "SMALL_MATCH", 0)
                    walked = pages(params)
                    assert sorted_matches == walked, params
        monkeypatch.setattr(queries, "COUNT_CAP", 2)
        page = queries.sessions_page(conn, queries.SessionQuery.parse({"agent": "triage-agent"}))
        assert (page["total"], page["total_exact"]) == (2, False)
        page = queries.sessions_page(conn, queries.SessionQuery.parse({}))
        assert (page["total"], page["total_exact"]) == (SESSIONS, True)
    finally:
        conn.close()


def test_session_detail_is_its_hourly_rollup(api_fleet: Daemon) -> None:
    data = get_json(api_fleet, "/api/sessions/web-03")
    assert data["session"]["agent"] == "support-bot" and data["session"]["host"] == "build-1"
    rows = db(api_fleet, "SELECT hour, model, turns, cost_cents FROM collector_usage_hourly WHERE "
                     "session_id = 'web-03' ORDER BY hour, model")
    assert [(h["hour"], h["model"], h["turns"]) for h in data["hours"]] == [r[:3] for r in rows]
    assert [h["cost_text"] for h in data["hours"]] == [format_usd(r[3]) for r in rows]
    status, _, _ = get(api_fleet.web_url + "/api/sessions/nope")
    assert status == 404


def test_csv_export_is_the_filtered_table(api_fleet: Daemon) -> None:
    status, headers, body = get(api_fleet.web_url + "/api/sessions.csv?agent=review-agent&sort=id"
                                                "&order=asc")
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    expected = db(api_fleet, "SELECT s.id, s.turns, s.cost_cents FROM agent_sessions s JOIN "
                         "collector_session_labels l ON l.id = s.id WHERE l.agent = "
                         "'review-agent' ORDER BY s.id")
    assert [(r["id"], int(r["turns"]), float(r["cost_usd"])) for r in rows] == [
        (i, t, round(c / 100, 8)) for i, t, c in expected]


def test_who_spends_api_equals_the_report_command(api_fleet: Daemon,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("agent", "user", "host"):
        data = get_json(api_fleet, f"/api/who/{kind}")
        assert cli.main(["report", kind, "--config", str(api_fleet.config_path), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out)
        for line in data["lines"]:
            line.pop("cost_text")
        data["totals"].pop("cost_text")
        assert data == printed
    users = {line["user"]: line for line in printed_user_report(api_fleet, capsys)}
    cents = dict(db(api_fleet, "SELECT l.user_name, sum(s.cost_cents) FROM agent_sessions s JOIN "
                           "collector_session_labels l ON l.id = s.id GROUP BY l.user_name"))
    assert {u: line["cost_usd"] for u, line in users.items()} == pytest.approx(
        {u: c / 100 for u, c in cents.items()})


def printed_user_report(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> list[Any]:
    assert cli.main(["report", "user", "--config", str(daemon.config_path), "--json"]) == 0
    lines: list[Any] = json.loads(capsys.readouterr().out)["lines"]
    return lines


# -- auth -----------------------------------------------------------------------------------

def test_with_a_token_the_view_asks_for_it(tmp_path: Path) -> None:
    token = "s3cret-token-for-the-view"
    (tmp_path / "token.txt").write_text(token + "\n")
    daemon = Daemon(tmp_path, f'[auth]\ntoken_file = "{tmp_path / "token.txt"}"\n')
    daemon.start()
    try:
        status, headers, _ = get(daemon.web_url + "/api/overview")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        status, _, _ = get(daemon.web_url + "/api/overview",
                           headers={"Authorization": f"Bearer {token}"})
        assert status == 200
        opener = urllib.request.build_opener(_NoRedirect)
        page = _post(opener, daemon.web_url + "/login", {"token": "wrong"})
        assert page.status == 303 and page.headers["Location"] == "/login?failed=1"
        assert "Set-Cookie" not in page.headers
        signed = _post(opener, daemon.web_url + "/login", {"token": token})
        cookie = signed.headers["Set-Cookie"]
        assert signed.status == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert token not in cookie
        value = cookie.split(";")[0]
        status, _, _ = get(daemon.web_url + "/api/overview", headers={"Cookie": value})
        assert status == 200
        status, _, _ = get(daemon.web_url + "/api/overview", headers={"Cookie": value + "x"})
        assert status == 401
        # The page itself sends the browser to the sign-in form.
        first = _open(opener, daemon.web_url + "/")
        assert first.status == 303 and first.headers["Location"] == "/login"
    finally:
        daemon.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(opener: urllib.request.OpenerDirector, url: str, form: dict[str, str]) -> Any:
    data = urllib.parse.urlencode(form).encode()
    return _open(opener, url, data)


def _open(opener: urllib.request.OpenerDirector, url: str, data: bytes | None = None) -> Any:
    try:
        return opener.open(urllib.request.Request(url, data=data), timeout=20)
    except urllib.error.HTTPError as exc:
        return exc


# -- the page in a real browser -------------------------------------------------------------

def test_overview_page_shows_the_database(fleet: Daemon, page: Any) -> None:
    page.goto(fleet.web_url + "/")
    (cents,) = db(fleet, "SELECT sum(cost_cents) FROM collector_usage_hourly")[0]
    spend = page.get_by_test_id("spend-30d")
    spend.wait_for()
    assert spend.inner_text() == format_usd(cents)
    (active,) = db(fleet, "SELECT count(*) FROM agent_sessions WHERE status = 'active'")[0]
    assert page.get_by_test_id("active-count").inner_text() == str(active)
    (prompt, cache_read, completion) = db(
        fleet, "SELECT sum(prompt_tokens), sum(cache_read_tokens), sum(completion_tokens) "
               "FROM collector_usage_hourly")[0]
    assert page.locator('[data-kind="cache read"]').inner_text() == f"{cache_read:,}"
    assert page.locator('[data-kind="output"]').inner_text() == f"{completion:,}"
    assert page.get_by_test_id("cache-hit-rate").inner_text() == (
        f"{cache_read / prompt * 100:.1f} %")
    # Both charts drew (Chart.js sized its canvas).
    for chart in ("chart-model", "chart-agent"):
        assert page.get_by_test_id(chart).bounding_box()["height"] > 100


def test_sessions_page_filters_sorts_and_opens_a_session(fleet: Daemon, page: Any) -> None:
    # Locator assertions, not wait_for_function: a string predicate that is not true at once
    # is polled through eval, which the page's Content-Security-Policy forbids.
    from playwright.sync_api import expect

    page.goto(fleet.web_url + "/#/sessions")
    rows = page.locator("[data-testid=sessions-table] tbody tr")
    page.get_by_test_id("total").wait_for()
    assert rows.count() == SESSIONS
    page.locator("input[data-filter=agent]").fill("triage-agent")
    page.locator("input[data-filter=agent]").press("Enter")
    codex = {r[0] for r in db(fleet, "SELECT id FROM collector_session_labels WHERE agent = "
                                     "'triage-agent'")}
    expect(rows).to_have_count(len(codex), timeout=UI_TIMEOUT_MS)
    assert {rows.nth(i).get_attribute("data-session") for i in range(rows.count())} == codex
    assert page.get_by_test_id("total").inner_text() == f"{len(codex)} sessions"
    page.locator("th[data-sort=cost]").click()
    expect(page).to_have_url(re.compile("sort=cost"), timeout=UI_TIMEOUT_MS)
    page.wait_for_selector("th.sorted[data-sort=cost]")
    costs = dict(db(fleet, "SELECT id, cost_cents FROM agent_sessions"))
    shown = [rows.nth(i).get_attribute("data-session") for i in range(rows.count())]
    assert shown == sorted(codex, key=lambda s: (costs[s], s), reverse=True)
    first = rows.nth(0).locator("td[data-col=cost_text]").inner_text()
    assert first == format_usd(costs[shown[0]])
    rows.nth(0).get_by_test_id("session-link").click()
    page.get_by_test_id("session-id").wait_for()
    assert page.get_by_test_id("session-id").inner_text() == shown[0]
    assert page.locator('[data-fact="cost (USD)"]').inner_text() == format_usd(costs[shown[0]])
    hours = db(fleet, "SELECT count(*) FROM collector_usage_hourly WHERE session_id = ?",
               shown[0])[0][0]
    assert page.locator("[data-testid=hours-table] tbody tr").count() == hours


def test_the_page_follows_new_commits_without_a_reload(fleet: Daemon, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(fleet.web_url + "/")
    spend = page.get_by_test_id("spend-today")
    spend.wait_for()
    page.wait_for_selector("#live.on")
    page.evaluate("window.__loaded = true")  # gone if the page reloads
    before = spend.inner_text()
    fleet.export_http(turn("web-live", 1, time.time_ns(), cost=12.5))
    (cents,) = db(fleet, "SELECT coalesce(sum(cost_cents), 0) FROM collector_usage_hourly WHERE "
                         "hour >= strftime('%Y-%m-%dT00:00:00.000Z', 'now')")[0]
    expected = format_usd(cents)
    assert expected != before
    expect(spend).to_have_text(expected, timeout=UI_TIMEOUT_MS)
    assert page.evaluate("window.__loaded") is True


def test_live_events_follow_commits_on_postgres(pg_server: Any, tmp_path: Path) -> None:
    """PostgreSQL has no data_version: the change signal is collector_meta's counter rows."""
    daemon = Daemon(tmp_path, postgres_url=pg_server.new_database())
    daemon.start()
    try:
        daemon.export_http(turn("live-0", 0, time.time_ns(), cost=0.01))
        request = urllib.request.Request(daemon.web_url + "/api/events")
        with urllib.request.urlopen(request, timeout=30) as stream:
            assert stream.readline().startswith(b"retry:")
            assert stream.readline() == b"event: hello\n"
            stream.readline(), stream.readline()  # its data line and the blank line
            # The watcher takes its first reading after the hello: commits go on (new spans,
            # from another thread) until one arrives after it and is announced.
            announced = threading.Event()

            def export_until_announced() -> None:
                at = time.time_ns()
                while not announced.wait(0.2):
                    at += 1_000_000
                    daemon.export_http(turn("live-1", 1, at, cost=0.02))

            exporter = threading.Thread(target=export_until_announced)
            exporter.start()
            try:
                while not (line := stream.readline()).startswith(b"event: commit"):
                    assert line in (b"\n", b": keep-alive\n"), line
            finally:
                announced.set()
                exporter.join()
        data = get_json(daemon, "/api/sessions?q=live-1")
        assert data["total"] == 1 and data["sessions"][0]["turns"] >= 1
    finally:
        daemon.stop()
