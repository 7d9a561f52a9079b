"""Budgets as people see them, against a real daemon fed over OTLP: `collector budgets`,
/api/budgets, /metrics and the page in Chromium all give each instance's spend as the sum of
its sessions' cost_cents in agent_sessions, and show agent-chosen values (a user id of markup
or terminal escapes) as text. Alerts go to a real loopback webhook and to a dead port."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from collector.report import format_usd
from tests.conftest import UI_TIMEOUT_MS, Daemon, free_port, make_span
from tests.test_auth import READ, READ_SHA
from tests.test_cli import on_terminal
from tests.test_daemon import wait_for
from tests.test_ops import metric, scrape
from tests.test_web import db, get, get_json

ROOT = Path(__file__).resolve().parent.parent
MARKUP_USER = "<img src=x onerror=alert(1)>"
ANSI_USER = "\x1b[31mred\x1b[0m"
ANSI_SHOWN = "\\x1b[31mred\\x1b[0m"
# (user, USD) per session: the fleet's $1.05 crosses 0.8 and 1.0 of its $1; of the users'
# $0.50 a day, bo's $0.45 crosses 0.8 only.
SPEND = (("ana@example.com", 0.30), ("bo@example.com", 0.25), ("bo@example.com", 0.20),
         (MARKUP_USER, 0.20), (ANSI_USER, 0.10))
CROSSINGS = 3
BUDGETS = """
[sessions]
stale_after_s = 315360000
[[budgets]]
name = "fleet-monthly"
scope = "fleet"
amount_usd = 1.0
[[budgets]]
name = "per-user"
dimension = "user"
value = "*"
period = "day"
timezone = "Europe/Berlin"
amount_usd = 0.5
[[budgets]]
name = "nobody"
dimension = "user"
value = "nobody@example.com"
amount_usd = 3
"""


class Hook(http.server.BaseHTTPRequestHandler):
    """A webhook sink answering 204 and keeping each delivery's Idempotency-Key."""

    received: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        Hook.received.append(self.headers["Idempotency-Key"])
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


def sinks(hook_port: int) -> str:
    return (f'[[alerts.sinks]]\nname = "hook"\nkind = "webhook"\n'
            f'url = "http://127.0.0.1:{hook_port}/hook"\n'
            f'headers = {{ X-Hook-Token = "hook-header-secret" }}\n'
            f'[[alerts.sinks]]\nname = "dead"\nkind = "slack"\n'
            f'url = "http://127.0.0.1:{free_port()}/services/T0/B0/slack-path-secret"\n')


def usage_span(session: str, user: str, usd: float, at: int, trace: int) -> Any:
    return make_span(trace_id=trace, span_id=1, start=at, end=at + 1_000_000, attrs={
        "gen_ai.operation.name": "chat", "gen_ai.conversation.id": session,
        "gen_ai.request.model": "gpt-5", "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.output_tokens": 10, "gen_ai.usage.cost": usd},
        resource={"service.name": "budget-agent", "user.email": user})


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    Hook.received = []
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=hook.serve_forever, daemon=True)
    thread.start()
    daemon = Daemon(tmp_path_factory.mktemp("budgets"), BUDGETS + sinks(hook.server_port))
    daemon.start()
    try:
        now = time.time_ns()
        daemon.export_http([usage_span(f"b-{i}", user, usd, now - (60 - i) * 10**9, 7000 + i)
                            for i, (user, usd) in enumerate(SPEND)])
        yield daemon
    finally:
        daemon.kill()
        hook.shutdown()
        hook.server_close()


def spend_by_scope(daemon: Daemon) -> dict[str, float]:
    """The database's own answer: cost_cents summed over each scope's sessions."""
    rows = db(daemon, "SELECT s.cost_cents, l.user_name FROM agent_sessions AS s "
                      "JOIN collector_session_labels AS l ON l.id = s.id")
    out = {"fleet": sum(r[0] for r in rows)}
    for cents, user in rows:
        out[f"user={user}"] = out.get(f"user={user}", 0.0) + cents
    return out


def budgets_cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", "budgets", "--config",
                           str(daemon.config_path), *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def by_key(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(b["budget"], b["scope"]): b for b in doc["budgets"]}


def assert_numbers(doc: dict[str, Any], daemon: Daemon) -> None:
    spent = spend_by_scope(daemon)
    assert spent["fleet"] == pytest.approx(sum(usd for _, usd in SPEND) * 100)
    lines = by_key(doc)
    users = {u for u, _ in SPEND}
    assert set(lines) == {("fleet-monthly", "fleet"), ("nobody", "user=nobody@example.com"),
                          *(("per-user", f"user={u}") for u in users)}
    fleet = lines[("fleet-monthly", "fleet")]
    assert fleet["spend_usd"] == pytest.approx(spent["fleet"] / 100)
    assert (fleet["limit_usd"], fleet["period"], fleet["timezone"]) == (1.0, "month", "UTC")
    assert fleet["share"] == pytest.approx(spent["fleet"] / 100)
    assert fleet["alerted"] == fleet["reached"] == [0.8, 1.0]
    assert fleet["projected_usd"] >= fleet["spend_usd"]  # the rest of the month at this rate
    for user in users:
        line = lines[("per-user", f"user={user}")]
        assert line["value"] == user and line["dimension"] == "user"
        assert line["spend_usd"] == pytest.approx(spent[f"user={user}"] / 100)
        assert line["limit_usd"] == 0.5
        assert line["period_start"].endswith(("T00:00:00+01:00", "T00:00:00+02:00"))
        assert line["alerted"] == ([0.8] if user == "bo@example.com" else [])
    nobody = lines[("nobody", "user=nobody@example.com")]
    assert (nobody["spend_usd"], nobody["limit_usd"], nobody["alerted"]) == (0.0, 3.0, [])
    # Config order, then the largest spender first.
    assert doc["budgets"][0]["budget"] == "fleet-monthly"
    assert doc["budgets"][1]["scope"] == "user=bo@example.com"


def test_cli_json_is_the_spend_in_agent_sessions(budgeted: Daemon) -> None:
    result = budgets_cli(budgeted, "--json")
    assert result.returncode == 0, result.stderr
    assert_numbers(json.loads(result.stdout), budgeted)


def test_api_gives_the_same_numbers(budgeted: Daemon) -> None:
    doc = get_json(budgeted, "/api/budgets")
    assert_numbers(doc, budgeted)
    cli_doc = json.loads(budgets_cli(budgeted, "--json").stdout)
    keep = ("spend_usd", "limit_usd", "share", "alerted", "period_start", "period_end")
    assert {k: {f: v[f] for f in keep} for k, v in by_key(doc).items()} == {
        k: {f: v[f] for f in keep} for k, v in by_key(cli_doc).items()}
    fleet = by_key(doc)[("fleet-monthly", "fleet")]
    assert fleet["spend_text"] == format_usd(spend_by_scope(budgeted)["fleet"])


def test_metrics_export_spend_limit_and_the_outbox(budgeted: Daemon) -> None:
    spent = spend_by_scope(budgeted)
    samples = scrape(budgeted)
    for budget, scope, limit in (("fleet-monthly", "fleet", 1.0),
                                 ("per-user", "user=bo@example.com", 0.5),
                                 ("per-user", f"user={MARKUP_USER}", 0.5),
                                 ("nobody", "user=nobody@example.com", 3.0)):
        assert metric(samples, "collector_budget_spend_usd", budget=budget,
                      scope=scope) == pytest.approx(spent.get(scope, 0.0) / 100)
        assert metric(samples, "collector_budget_limit_usd", budget=budget,
                      scope=scope) == limit
    # The hook gets each crossing once it answers; the dead sink's stay pending, retried.
    wait_for(lambda: len(set(Hook.received)) == CROSSINGS, "the hook's deliveries")

    def settled() -> bool:
        s = scrape(budgeted)
        return (metric(s, "collector_alert_outbox_pending") == CROSSINGS
                and metric(s, "collector_alert_delivery_failures_total") >= 1)

    wait_for(settled, "pending and failed deliveries in /metrics", timeout=60)
    samples = scrape(budgeted)
    assert metric(samples, "collector_alert_deliveries_total") >= CROSSINGS
    last = metric(samples, "collector_alert_last_success_timestamp_seconds")
    assert 0 < last <= time.time()
    (pending,) = db(budgeted, "SELECT count(*) FROM collector_alert_outbox "
                              "WHERE delivered_ns IS NULL")[0]
    assert pending == CROSSINGS


def test_page_shows_each_budget_and_agent_text_as_text(
        budgeted: Daemon, page: Any) -> None:
    from playwright.sync_api import expect

    page.goto(budgeted.web_url + "/")
    page.get_by_role("link", name="Budgets").click()
    rows = page.locator("[data-testid=budgets-table] tbody tr")
    expect(rows).to_have_count(2 + len({u for u, _ in SPEND}), timeout=UI_TIMEOUT_MS)
    spent = spend_by_scope(budgeted)
    fleet = page.locator('tr[data-budget="fleet-monthly"]')
    assert fleet.locator('[data-col="spend"]').inner_text() == format_usd(spent["fleet"])
    assert fleet.locator('[data-col="limit"]').inner_text() == "$1.00"
    assert fleet.locator('[data-col="alerted"]').inner_text() == "80.0 %, 100.0 %"
    markup = rows.filter(has_text=MARKUP_USER)
    expect(markup).to_have_count(1)
    assert markup.get_attribute("data-scope") == f"user={MARKUP_USER}"
    assert markup.locator('[data-col="scope"]').inner_text() == f"user={MARKUP_USER}"
    assert markup.locator('[data-col="spend"]').inner_text() == format_usd(
        spent[f"user={MARKUP_USER}"])
    assert page.locator("img").count() == 0
    # The bar: spend past the limit is drawn to the limit's far side, and marked over.
    assert "over" in (fleet.get_by_test_id("bar-spent").get_attribute("class") or "")
    nobody = page.locator('tr[data-budget="nobody"]')
    assert nobody.locator('[data-col="spend"]').inner_text() == "$0.00"


def test_cli_table_prints_terminal_escapes_literally(budgeted: Daemon) -> None:
    piped = budgets_cli(budgeted)
    assert piped.returncode == 0, piped.stderr
    assert ANSI_SHOWN in piped.stdout and MARKUP_USER in piped.stdout
    assert "\x1b" not in piped.stdout.replace("\\x1b", "")
    fleet_line = next(line for line in piped.stdout.splitlines()
                      if line.startswith("fleet-monthly"))
    assert format_usd(spend_by_scope(budgeted)["fleet"]) in fleet_line
    assert fleet_line.rstrip().endswith("0.8, 1")
    code, out, err = on_terminal([sys.executable, "-m", "collector", "budgets", "--config",
                                  str(budgeted.config_path)])
    assert code == 0, err
    assert "┃" in out and ANSI_SHOWN in out
    assert "\x1b[31mred" not in out


def test_sink_secrets_are_never_printed(budgeted: Daemon) -> None:
    result = subprocess.run([sys.executable, "-m", "collector", "check-config", "--config",
                             str(budgeted.config_path)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "hook-header-secret" not in result.stdout
    assert "slack-path-secret" not in result.stdout
    shown = json.loads(result.stdout)["alert_sinks"]
    assert shown[0]["headers"] == {"X-Hook-Token": "<set>"}
    for text in ("hook-header-secret", "slack-path-secret"):
        assert text not in budgeted.log


def test_budgets_need_the_read_token(start_daemon: Any) -> None:
    daemon = start_daemon(BUDGETS + f'[[auth.tokens]]\nname = "finance"\nroles = ["read"]\n'
                                    f'sha256 = "{READ_SHA}"\n')
    status, _, _ = get(daemon.web_url + "/api/budgets")
    assert status == 401
    status, _, body = get(daemon.web_url + "/api/budgets",
                          headers={"Authorization": f"Bearer {READ}"})
    assert status == 200
    lines = by_key(json.loads(body))
    # No usage yet: every budget shows, at zero; the glob as one line without a value.
    assert lines[("fleet-monthly", "fleet")]["spend_usd"] == 0.0
    assert lines[("per-user", "user (no value yet)")]["value"] is None
    assert lines[("nobody", "user=nobody@example.com")]["limit_usd"] == 3.0


def test_without_budgets_the_cli_and_api_say_so(start_daemon: Any) -> None:
    daemon = start_daemon("")
    assert get_json(daemon, "/api/budgets") == {"budgets": [], "omitted": {}}
    result = budgets_cli(daemon)
    assert result.returncode == 0 and "no budgets configured" in result.stdout
    assert "collector_budget_spend_usd" not in str(scrape(daemon))


def test_page_follows_new_spend_live(start_daemon: Any, page: Any) -> None:
    from playwright.sync_api import expect

    daemon = start_daemon(BUDGETS)
    page.goto(daemon.web_url + "/#/budgets")
    spend = page.locator('tr[data-budget="fleet-monthly"] [data-col="spend"]')
    expect(spend).to_have_text("$0.00", timeout=UI_TIMEOUT_MS)
    expect(page.get_by_test_id("live")).to_have_text("live", timeout=UI_TIMEOUT_MS)
    daemon.export_http([usage_span("live-1", "ana@example.com", 0.42, time.time_ns(), 9001)])
    (cents,) = db(daemon, "SELECT sum(cost_cents) FROM agent_sessions")[0]
    expect(spend).to_have_text(format_usd(cents), timeout=UI_TIMEOUT_MS)
    expect(page.locator('tr[data-scope="user=ana@example.com"]')).to_have_count(1)
