"""Who spends by team, department, cost centre and project ([attribution]), end to end.

Agents are tagged as their monitoring guides say, with OTEL_RESOURCE_ATTRIBUTES read by the
OpenTelemetry SDK's own resource detection, and export through the SDK's exporters (and a
captured Claude Code export, retagged) to a real daemon on each backend. The reports, the API,
the CSV and the page are compared with agent_sessions over the same sessions.
"""

from __future__ import annotations

import calendar
import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource

from collector import cli
from collector.config import ConfigError, load_config
from collector.config.attribution import DEFAULT_DIMENSIONS
from collector.report import format_usd
from collector.signals.traces import SpanUsage
from collector.store.base import held_usage, usage_json
from tests.conftest import Daemon, make_span
from tests.replay import Export, exports
from tests.test_agents import CASES, CLAUDE_328, NOT_STALE, send
from tests.test_web import db, get, get_json

# (tags as OTEL_RESOURCE_ATTRIBUTES holds them, service name, sessions)
FLEET = (
    ("team.id=platform,department=engineering,cost_center=eng-123,project=collector",
     "support-bot", 4),
    # `team` and `project.name`: the second attribute of each dimension.
    ("team=growth,department=marketing,cost_center=mkt-7,project.name=site", "triage-agent", 3),
    ("", "review-agent", 2),  # untagged: the '' line of every dimension report
)
XSS = "<img src=x onerror=alert(1)>"
# A monthly budget per team (UTC): every team value its own instance.
TEAM_BUDGET = ('[[budgets]]\nname = "team-monthly"\ndimension = "team"\nvalue = "*"\n'
               'amount_usd = 1000\nthresholds = [0.8, 1.0]\n')
DIMENSIONS = ("team", "department", "cost_center", "project")
_trace = iter(range(1, 10**9))


def tagged(tags: str, service: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The resource the SDK builds for a process started with these tags."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", tags)
    return dict(Resource.create({"service.name": service}).attributes)


def call(session: str, resource: dict[str, Any], at: int, cost: float,
         **attrs: Any) -> Any:
    return make_span(trace_id=next(_trace), span_id=1, resource=resource, start=at,
                     end=at + 1_000_000,
                     attrs={"gen_ai.operation.name": "chat", "gen_ai.conversation.id": session,
                            "gen_ai.request.model": "test-model",
                            "gen_ai.usage.input_tokens": 1000, "gen_ai.usage.output_tokens": 200,
                            "gen_ai.usage.cost": cost, **attrs})


def claude_logs_tagged(team: str) -> Export:
    """Claude Code's captured log export with its resource tagged as its guide shows."""
    item = exports(CLAUDE_328[0])[0]
    body = json.loads(json.dumps(item.body))
    for rl in body["resourceLogs"]:
        rl["resource"].setdefault("attributes", []).append(
            {"key": "team.id", "value": {"stringValue": team}})
    return Export(item.signal, body)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    monkeypatch = pytest.MonkeyPatch()
    url = None if request.param == "sqlite" else \
        request.getfixturevalue("pg_server").new_database()
    daemon = Daemon(tmp_path_factory.mktemp("dims"), NOT_STALE + TEAM_BUDGET, postgres_url=url)
    daemon.start()
    try:
        now = time.time_ns()
        spans = []
        for f, (tags, service, sessions) in enumerate(FLEET):
            resource = tagged(tags, service, monkeypatch)
            for i in range(sessions):
                for k in range(1 + i % 3):
                    spans.append(call(f"dim-{f}-{i}", resource, now - (i + 1) * 3_600 * 10**9
                                      + k * 1000, 0.01 * (f + 1) + 0.001 * i))
        # A later call of one platform session names its own team: the latest value wins.
        platform = tagged(FLEET[0][0], FLEET[0][1], monkeypatch)
        spans.append(call("dim-0-0", platform, now, 0.5, **{"team.id": "security"}))
        # A value that is markup, shown as text everywhere.
        spans.append(call("dim-xss", tagged(f"team.id={XSS}", "x", monkeypatch), now, 0.02))
        daemon.export_http(spans[: len(spans) // 2])
        daemon.export_grpc(spans[len(spans) // 2:])
        send(daemon, claude_logs_tagged("platform"), "http-protobuf")
        yield daemon
    finally:
        monkeypatch.undo()
        daemon.kill()


CLAUDE_SESSION = CASES["claude-code-2.1.328"][1]["id"]


def stored(daemon: Daemon) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for sid, name, value in db(daemon, "SELECT session_id, dimension, value "
                                       "FROM collector_session_dimensions"):
        out.setdefault(sid, {})[name] = value
    return out


def test_each_session_keeps_its_latest_tags(fleet: Daemon) -> None:
    got = stored(fleet)
    assert got["dim-0-1"] == {"team": "platform", "department": "engineering",
                              "cost_center": "eng-123", "project": "collector"}
    assert got["dim-1-0"] == {"team": "growth", "department": "marketing",
                              "cost_center": "mkt-7", "project": "site"}
    assert got["dim-0-0"]["team"] == "security"
    assert got[CLAUDE_SESSION] == {"team": "platform"}
    assert "dim-2-0" not in got
    assert got["dim-xss"] == {"team": XSS}


def expected_by(daemon: Daemon, dimension: str) -> dict[str, float]:
    """agent_sessions' cost summed per the sessions' value of `dimension` (the oracle)."""
    rows = db(daemon, "SELECT s.id, s.cost_cents FROM agent_sessions s")
    values = {sid: d.get(dimension, "") for sid, d in stored(daemon).items()}
    out: dict[str, float] = {}
    for sid, cents in rows:
        key = values.get(sid, "")
        out[key] = out.get(key, 0.0) + cents
    return out


def report_json(daemon: Daemon, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert cli.main(["report", *args, "--config", str(daemon.config_path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("dimension", DIMENSIONS)
def test_reports_per_dimension_equal_agent_sessions(fleet: Daemon, dimension: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = report_json(fleet, capsys, dimension)
    got = {line[dimension]: line["cost_usd"] * 100 for line in data["lines"]}
    assert got == pytest.approx(expected_by(fleet, dimension))
    (total,) = db(fleet, "SELECT sum(cost_cents) FROM agent_sessions")[0]
    assert data["totals"]["cost_usd"] * 100 == pytest.approx(total)
    (turns,) = db(fleet, "SELECT sum(turns) FROM agent_sessions")[0]
    assert data["totals"]["turns"] == turns
    # By model, the same sums split; the API gives what the command prints.
    split = report_json(fleet, capsys, dimension, "--breakdown")
    assert split["totals"] == data["totals"]
    assert {line["model"] for line in split["lines"]} >= {"test-model"}
    api = get_json(fleet, f"/api/who/{dimension}")
    for line in api["lines"]:
        line.pop("cost_text")
    api["totals"].pop("cost_text")
    assert api == data


def test_report_window_and_zone_apply_to_dimensions(fleet: Daemon,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    future = report_json(fleet, capsys, "team", "--since", "2100-01-01", "--timezone",
                         "Asia/Tokyo")
    assert future["lines"] == [] and future["timezone"] == "Asia/Tokyo"
    everything = report_json(fleet, capsys, "team", "--since", "2000-01-01")
    assert everything["totals"] == report_json(fleet, capsys, "team")["totals"]


def test_an_unknown_report_kind_names_the_choices(fleet: Daemon,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "squad", "--config", str(fleet.config_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown kind 'squad'" in err and "cost_center" in err
    status, _, body = get(fleet.web_url + "/api/who/squad")
    assert status == 400 and b"team" in body


def test_filters_search_and_csv_per_dimension(fleet: Daemon) -> None:
    got = stored(fleet)
    platform = {sid for sid, d in got.items() if d.get("team") == "platform"}
    listed = get_json(fleet, "/api/sessions?team=platform&limit=500")
    assert {s["id"] for s in listed["sessions"]} == platform
    assert listed["total"] == len(platform) and listed["total_exact"]
    both = get_json(fleet, "/api/sessions?team=platform&cost_center=eng-123")
    assert {s["id"] for s in both["sessions"]} == {
        sid for sid in platform if got[sid].get("cost_center") == "eng-123"}
    assert all(s["dimensions"] == got.get(s["id"], {}) for s in listed["sessions"])
    filters = get_json(fleet, "/api/filters")
    assert filters["dimensions"] == list(DIMENSIONS)
    assert set(filters["team"]) == {"platform", "growth", "security", XSS}
    found = get_json(fleet, "/api/filters/search?field=team&q=plat")
    assert found["values"] == ["platform"]
    assert get_json(fleet, "/api/filters/search?field=team&q=CURI")["values"] == ["security"]
    detail = get_json(fleet, "/api/session?id=dim-1-0")
    assert detail["session"]["dimensions"]["project"] == "site"
    status, _, body = get(fleet.web_url + "/api/sessions.csv")
    assert status == 200
    table = list(csv.DictReader(io.StringIO(body.decode())))
    assert list(table[0])[-4:] == list(DIMENSIONS)
    by_id = {r["id"]: r for r in table}
    assert len(by_id) == len(db(fleet, "SELECT id FROM agent_sessions"))
    for sid, row in by_id.items():
        assert {d: row[d] for d in DIMENSIONS if row[d]} == got.get(sid, {})


def test_the_page_has_a_who_spends_page_and_filter_per_dimension(fleet: Daemon,
                                                                 page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(fleet.web_url + "/")
    nav = page.locator("header nav a[data-nav=cost_center]")
    expect(nav).to_have_text("cost center")
    nav.click()
    table = page.get_by_test_id("who-table")
    table.wait_for()
    expected = expected_by(fleet, "cost_center")
    rows = table.locator("tbody tr")
    expect(rows).to_have_count(len(expected))
    shown = {rows.nth(i).get_attribute("data-key"): rows.nth(i).locator(
        "td[data-col=cost]").inner_text() for i in range(rows.count())}
    assert shown == {(k or "(none)"): format_usd(v) for k, v in expected.items()}
    # The markup value is text, and its link filters the sessions by it.
    page.goto(fleet.web_url + "/#/who/team")
    cell = page.locator(f'tr[data-key="{XSS}"] td a')
    expect(cell).to_have_text(XSS)
    assert page.locator("img[src=x]").count() == 0
    page.locator('tr[data-key="platform"] td a').click()
    sessions = page.locator("[data-testid=sessions-table] tbody tr")
    platform = {sid for sid, d in stored(fleet).items() if d.get("team") == "platform"}
    expect(sessions).to_have_count(len(platform))
    assert page.locator("input[data-filter=team]").input_value() == "platform"
    page.goto(fleet.web_url + "/#/session?id=dim-1-0")
    expect(page.locator('[data-fact="project"]')).to_have_text("site")


# -- config ---------------------------------------------------------------------------------

def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return path


def test_the_defaults_are_the_tags_the_agents_guides_name(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).dimensions == DEFAULT_DIMENSIONS
    assert [d.name for d in DEFAULT_DIMENSIONS] == list(DIMENSIONS)
    config = load_config(write(tmp_path, '[attribution.dimensions]\nsquad = ["squad.id"]\n'
                                         'region = "cloud.region"\n'))
    assert [(d.name, d.attributes) for d in config.dimensions] == [
        ("squad", ("squad.id",)), ("region", ("cloud.region",))]


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('[attribution]\nteams = 1\n', "attribution.teams", "unknown key"),
    ('[attribution.dimensions]\nagent = ["x"]\n', "attribution.dimensions.agent", "built in"),
    ('[attribution.dimensions]\nstatus = ["x"]\n', "attribution.dimensions.status",
     "built in"),
    ('[attribution.dimensions]\n"Team" = ["x"]\n', "attribution.dimensions.Team", "lowercase"),
    ('[attribution.dimensions]\nteam = []\n', "attribution.dimensions.team", "list of 1"),
    ('[attribution.dimensions]\nteam = [1]\n', "attribution.dimensions.team", "non-empty"),
    ('[attribution.dimensions]\nteam = ["a", "a"]\n', "attribution.dimensions.team", "twice"),
    ('[attribution]\ndimensions = "team"\n', "attribution.dimensions", "table"),
])
def test_bad_attribution_names_the_key_and_the_file(tmp_path: Path, text: str, key: str,
                                                    problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key == key and problem in caught.value.problem
    assert str(path) in str(caught.value)


def test_held_usage_keeps_its_dimensions() -> None:
    usage = SpanUsage(b"k" * 32, "\x00unresolved", 1, 2, 1, 10, 5, 0, 0, 0, 0.5, True, "m",
                      None, None, None, None, "bot", None, None, None, 1, None,
                      (("team", "platform"),))
    back = held_usage(usage.key, "s", usage_json(usage))
    assert back == usage._replace(session_id="s")
    # A row held before dimensions existed decodes with none.
    old = json.dumps(list(usage[2:-1]))
    assert held_usage(usage.key, "s", old).dimensions == ()


def test_a_budget_per_team_spends_what_each_team_spent_this_month(
        fleet: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    """From the rollup's hours since the month began (UTC), by each session's latest team
    when its usage was committed, as `collector budgets` and /api/budgets show it."""
    month = time.strftime("%Y-%m-01T00:00:00.000Z", time.gmtime())
    expected: dict[str, float] = {}
    rows = db(fleet, "SELECT h.session_id, h.cost_cents FROM collector_usage_hourly h "
                     "WHERE h.hour >= ?", month)
    teams = {sid: d["team"] for sid, d in stored(fleet).items() if "team" in d}
    # Each session's team never changed between its commits except dim-0-0's: its last call
    # (security) committed with the second half of the spans; count it from the table itself.
    month_ns = calendar.timegm(time.strptime(month[:10], "%Y-%m-%d")) * 10**9
    spend = dict(db(fleet, "SELECT scope_value, spend_cents FROM collector_budget_spend "
                           "WHERE budget = 'team-monthly' AND period_start_ns = ?", month_ns))
    for sid, cents in rows:
        if sid in teams and sid != "dim-0-0":
            expected[teams[sid]] = expected.get(teams[sid], 0.0) + cents
    dim00 = sum(c for sid, c in rows if sid == "dim-0-0")
    assert spend.get("platform", 0) + spend.get("security", 0) == pytest.approx(
        expected.get("platform", 0) + expected.get("security", 0) + dim00)
    for team in ("growth", XSS):
        assert spend[team] == pytest.approx(expected[team])
    assert cli.main(["budgets", "--config", str(fleet.config_path), "--json"]) == 0
    printed = {line["value"]: line["spend_usd"]
               for line in json.loads(capsys.readouterr().out)["budgets"]}
    assert printed == pytest.approx({team: cents / 100 for team, cents in spend.items()})
    status, _, body = get(fleet.web_url + "/api/budgets")
    assert status == 200
    assert {line["value"]: line["spend_usd"]
            for line in json.loads(body)["budgets"]} == pytest.approx(printed)
