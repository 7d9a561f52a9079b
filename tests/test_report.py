"""Usage reports: the pure folding, and `collector report` on a running daemon's database."""

from __future__ import annotations

import datetime as dt
import json
import random
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from collector import cli
from collector.report import (
    RollupRow,
    build_report,
    format_usd,
    hour_bounds,
    json_report,
    json_text,
    to_json,
    to_table,
)
from collector.store.sqlite import read_usage
from tests.conftest import MS, T0, Daemon, make_span
from tests.test_daemon import NO_SWEEP, PRICES
from tests.test_receivers import new_trace

ROOT = Path(__file__).resolve().parent.parent
StartDaemon = Callable[..., Daemon]
HOUR = 3600 * 1_000_000_000
MINUTE = 60 * 1_000_000_000
UTC = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")


def row(group: str, model: str = "m", *, turns: int = 1, prompt: int = 100,
        completion: int = 10, reasoning: int = 2, cache_read: int = 30, cache_write: int = 20,
        cents: float = 1.0, last: str | None = None) -> RollupRow:
    return RollupRow(group, model, last or group, turns, prompt, completion, reasoning,
                     cache_read, cache_write, cents)


# -- pure ---------------------------------------------------------------------------------------

def test_daily_lines_sum_rows_by_local_day_and_split_input_from_cache() -> None:
    rows = [row("2026-01-01T01:00:00.000Z"), row("2026-01-01T23:00:00.000Z", "n", cents=5.0),
            row("2026-01-02T02:00:00.000Z")]
    utc = build_report("daily", rows, tz=UTC, timezone="UTC")
    assert [(line.key, sorted(line.models)) for line in utc.lines] == [
        ("2026-01-01", ["m", "n"]), ("2026-01-02", ["m"])]
    first = utc.lines[0].usage
    assert (first.turns, first.input_tokens, first.cache_read_tokens,
            first.cache_write_tokens) == (2, 100, 60, 40)
    assert (first.output_tokens, first.reasoning_tokens, first.cost_cents) == (20, 4, 6.0)
    assert first.total_tokens == 100 + 60 + 40 + 20  # reasoning is inside output
    assert utc.totals.turns == 3 and utc.totals.cost_cents == 7.0
    # New York is UTC-5 in January: 01:00Z is the evening before, 02:00Z on the 2nd too.
    ny = build_report("daily", rows, tz=NEW_YORK, timezone="America/New_York")
    assert [(line.key, line.usage.turns) for line in ny.lines] == [("2025-12-31", 1),
                                                                    ("2026-01-01", 2)]


def test_half_hour_zones_count_an_hour_in_the_day_it_starts() -> None:
    # 18:00Z is 23:30 in Kolkata: the whole hour (to 00:30 local) counts on the 1st.
    rows = [row("2026-01-01T18:00:00.000Z"), row("2026-01-01T19:00:00.000Z")]
    report = build_report("daily", rows, tz=KOLKATA, timezone="Asia/Kolkata")
    assert [line.key for line in report.lines] == ["2026-01-01", "2026-01-02"]
    # The filter follows the same rule, so filtered lines equal unfiltered ones.
    assert hour_bounds(dt.date(2026, 1, 2), dt.date(2026, 1, 2), KOLKATA) == (
        "2026-01-01T18:30:00.000Z", "2026-01-02T18:30:00.000Z")
    assert "2026-01-01T18:00:00.000Z" < "2026-01-01T18:30:00.000Z" <= "2026-01-01T19:00:00.000Z"


def test_hour_bounds_are_local_midnights_in_utc() -> None:
    assert hour_bounds(None, None, UTC) == (None, None)
    assert hour_bounds(dt.date(2026, 1, 1), dt.date(2026, 1, 31), UTC) == (
        "2026-01-01T00:00:00.000Z", "2026-02-01T00:00:00.000Z")
    # Across the start of daylight saving time (8 March 2026 in New York): -5 then -4.
    assert hour_bounds(dt.date(2026, 3, 7), dt.date(2026, 3, 8), NEW_YORK) == (
        "2026-03-07T05:00:00.000Z", "2026-03-09T04:00:00.000Z")


def test_monthly_breakdown_splits_by_model_most_expensive_first() -> None:
    rows = [row("2026-01-05T00:00:00.000Z", "cheap", cents=1.0),
            row("2026-01-06T00:00:00.000Z", "dear", cents=9.0),
            row("2026-02-01T00:00:00.000Z", "cheap", cents=2.0)]
    report = build_report("monthly", rows, tz=UTC, timezone="UTC", breakdown=True)
    assert [(line.key, line.model, line.usage.cost_cents) for line in report.lines] == [
        ("2026-01", "dear", 9.0), ("2026-01", "cheap", 1.0), ("2026-02", "cheap", 2.0)]
    assert report.totals.cost_cents == 12.0


def test_sessions_are_ordered_by_last_activity_and_models_by_cost() -> None:
    rows = [row("old", "a", last="2026-01-01T00:00:00.000Z", cents=50.0),
            row("new", "a", last="2026-01-03T00:00:00.000Z"),
            row("new", "", last="2026-01-02T00:00:00.000Z", cents=3.0)]
    sessions = build_report("session", rows, tz=UTC, timezone="UTC")
    assert [(line.key, line.last_hour) for line in sessions.lines] == [
        ("new", "2026-01-03T00:00:00.000Z"), ("old", "2026-01-01T00:00:00.000Z")]
    models = build_report("model", [RollupRow("", *r[1:]) for r in rows], tz=UTC,
                          timezone="UTC", breakdown=True)  # breakdown means nothing here
    assert [(line.key, line.usage.cost_cents) for line in models.lines] == [("a", 51.0),
                                                                             ("", 3.0)]
    assert not models.breakdown


def test_table_and_json_show_the_same_numbers() -> None:
    rows = [row("s-1", "", cents=123.456, last="2026-01-01T05:00:00.000Z")]
    report = build_report("session", rows, tz=NEW_YORK, timezone="America/New_York")
    table = to_table(report, NEW_YORK)
    assert table.headers[:3] == ("session", "models", "last active")
    assert table.rows == [("s-1", "(none)", "2026-01-01 00:00", "1", "50", "30", "20", "10",
                           "2", "110", "$1.23")]
    assert table.totals[0] == "Total" and table.totals[-1] == "$1.23"
    data = to_json(report, NEW_YORK)
    assert data["lines"] == [{"session": "s-1", "models": [""], "last_active": "2026-01-01 00:00",
                              "turns": 1, "input_tokens": 50, "cache_read_tokens": 30,
                              "cache_write_tokens": 20, "output_tokens": 10,
                              "reasoning_tokens": 2, "total_tokens": 110, "cost_usd": 1.23456}]
    assert data["totals"]["cost_usd"] == 1.23456
    assert json.loads(json_text(data)) == data  # one line per report line, same document
    empty = to_json(build_report("daily", [], tz=UTC, timezone="UTC"), UTC)
    assert json.loads(json_text(empty)) == empty and empty["totals"]["turns"] == 0


def reference_lines(kind: str, rows: list[RollupRow], breakdown: bool) -> list[Any]:
    """What a report's lines are, the slow and obvious way: sum each line's rows, then order."""
    keys: dict[tuple[str, str | None], list[RollupRow]] = {}
    for r in rows:
        keys.setdefault((r.group, r.model if breakdown else None), []).append(r)
    last = {group: max(r.last_hour for r in rows if r.group == group) for group, _ in keys}
    lines = []
    for (group, model), mine in keys.items():
        cents = 0.0
        for r in mine:
            cents += r.cost_cents
        lines.append((group, model, sorted({r.model for r in mine}),
                      max(r.last_hour for r in mine), sum(r.turns for r in mine),
                      sum(r.prompt_tokens - r.cache_read_tokens - r.cache_write_tokens
                          for r in mine), cents))
    if kind == "session":
        lines.sort(key=lambda line: (line[0], -line[6], line[1] or ""))
        lines.sort(key=lambda line: last[line[0]], reverse=True)
    return lines


def random_rows(seed: int, count: int) -> list[RollupRow]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        hour = f"2026-01-{rng.randint(1, 9):02d}T{rng.randint(0, 23):02d}:00:00.000Z"
        rows.append(row(f"s-{rng.randint(0, 30)}", rng.choice(["a", "b", "c", "d", ""]),
                        turns=rng.randint(1, 5), prompt=rng.randint(100, 1000),
                        cache_read=rng.randint(0, 50), cache_write=rng.randint(0, 50),
                        cents=rng.random() * 10, last=hour))
    return rows


@pytest.mark.parametrize("breakdown", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_session_lines_equal_a_plain_fold_in_any_row_order(seed: int, breakdown: bool) -> None:
    rows = random_rows(seed, 300)  # repeated (session, model) pairs, unordered, tied hours
    report = build_report("session", rows, tz=UTC, timezone="UTC", breakdown=breakdown)
    assert [(line.key, line.model, sorted(line.models), line.last_hour, line.usage.turns,
             line.usage.input_tokens, line.usage.cost_cents) for line in report.lines] == (
        reference_lines("session", rows, breakdown))
    cents = 0.0
    for r in rows:
        cents += r.cost_cents
    assert report.totals.cost_cents == cents  # the same float: rows are added in turn
    assert report.totals.turns == sum(r.turns for r in rows)


@pytest.mark.parametrize("kind", ["daily", "monthly", "session", "model"])
@pytest.mark.parametrize("breakdown", [False, True])
def test_json_report_is_json_text_of_to_json(kind: str, breakdown: bool) -> None:
    rows = [*random_rows(1, 50), row('say "hi"\\ \u00e9\u2603 \U0001f600\x1f', "\u00e9",
                                          last="2026-01-01T00:00:00.000Z"),
            *(row(name, "x", cents=cents, last="2026-01-02T03:00:00.000Z")
              for name, cents in (("nan", float("nan")), ("inf", float("-inf")), ("zero", -0.0)))]
    if kind != "session":
        rows = [RollupRow(r.last_hour, *r[1:]) for r in rows]
    for zone in (UTC, KOLKATA):
        report = build_report(kind, rows, tz=zone, timezone=str(zone), breakdown=breakdown,
                              since=dt.date(2026, 1, 1))
        assert json_report(report, zone) == json_text(to_json(report, zone))
        empty = build_report(kind, [], tz=zone, timezone=str(zone), breakdown=breakdown)
        assert json_report(empty, zone) == json_text(to_json(empty, zone))


def test_plain_columns_align_numbers_right_and_text_left() -> None:
    assert cli._aligned(("key", "n"), (False, True), [("a", "1,234"), ("{x}", ""),
                                                       ("Total", "5")]) == [
        "key        n", "a      1,234", "{x}", "Total      5"]


def test_small_costs_stay_visible() -> None:
    assert (format_usd(0), format_usd(0.34), format_usd(12345.6)) == ("$0.00", "$0.0034",
                                                                      "$123.46")


# -- end to end ---------------------------------------------------------------------------------

def turn(session: str, at: int, *, model: str | None = "test-model", **extra: Any) -> Any:
    attrs: dict[str, Any] = {"session.id": session, "gen_ai.usage.input_tokens": 1000,
                             "gen_ai.usage.cache_read.input_tokens": 300,
                             "gen_ai.usage.cache_creation.input_tokens": 100,
                             "gen_ai.usage.output_tokens": 200,
                             "gen_ai.usage.reasoning.output_tokens": 50, **extra}
    if model is not None:
        attrs["gen_ai.response.model"] = model
    return make_span(trace_id=new_trace(), start=at, end=at + MS, attrs=attrs)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon fed turns across sessions, models, hours, days and months, then stopped."""
    daemon = Daemon(tmp_path_factory.mktemp("report"), PRICES + NO_SWEEP)
    daemon.start()
    jan31 = T0 + 30 * 24 * HOUR
    spans = [
        turn("s-a", T0 + HOUR),  # 2026-01-01T01:00Z
        turn("s-a", T0 + 23 * HOUR + 30 * MINUTE, model="other-model",
             **{"gen_ai.usage.cost": 0.25}),
        turn("s-b", T0 + 26 * HOUR),  # 2026-01-02T02:00Z
        # A session whose spans never name a model: its usage shows as "(none)". (A turn
        # without a model in a session with model calls counts under their model: test_store.)
        turn("s-d", T0 + 27 * HOUR, model=None),
        turn("s-c", jan31 + 23 * HOUR),  # 2026-01-31T23:00Z
        turn("s-c", jan31 + 25 * HOUR),  # 2026-02-01T01:00Z
        make_span(trace_id=new_trace(), start=T0 + 2 * HOUR,  # a session update: no usage
                  attrs={"session.id": "s-a", "agent.session.status": "completed"}),
    ]
    daemon.export_grpc(spans[:4])
    daemon.export_http(spans[2:])  # two of them again: duplicates count once
    rows = daemon.rows()
    assert daemon.stop() == 0
    return daemon, rows


def report(daemon: Daemon, capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """`collector report ... --json`, in-process (the CLI itself runs in test_report_cli)."""
    code = cli.main(["report", *args, "--config", str(daemon.config_path), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


def assert_equal_to_sessions(usage: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    assert usage["turns"] == sum(r["turns"] for r in rows)
    assert (usage["input_tokens"] + usage["cache_read_tokens"]
            + usage["cache_write_tokens"]) == sum(r["prompt_tokens"] for r in rows)
    assert usage["output_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert usage["reasoning_tokens"] == sum(r["reasoning_tokens"] for r in rows)
    assert usage["cost_usd"] * 100 == pytest.approx(sum(r["cost_cents"] for r in rows))


KEYS = {"daily": "date", "monthly": "month", "session": "session", "model": "model"}


@pytest.mark.parametrize("kind", ["daily", "monthly", "session", "model"])
@pytest.mark.parametrize("zone", ["UTC", "America/New_York", "Asia/Kolkata"])
@pytest.mark.parametrize("breakdown", [False, True])
def test_every_report_sums_to_agent_sessions(fleet: Any, capsys: pytest.CaptureFixture[str],
                                             kind: str, zone: str, breakdown: bool) -> None:
    daemon, rows = fleet
    args = [kind, "--timezone", zone] + (["--breakdown"] if breakdown else [])
    data = report(daemon, capsys, *args)
    assert_equal_to_sessions(data["totals"], list(rows.values()))
    lines = data["lines"]
    for field in ("turns", "input_tokens", "cache_read_tokens", "cache_write_tokens",
                  "output_tokens", "reasoning_tokens", "total_tokens"):
        assert sum(line[field] for line in lines) == data["totals"][field], field
    if kind == "session":
        for session, session_row in rows.items():
            assert_equal_to_sessions(
                {f: sum(line[f] for line in lines if line["session"] == session)
                 for f in data["totals"]}, [session_row])


@pytest.mark.parametrize(("kind", "zone", "keys"), [
    ("daily", "UTC", ["2026-01-01", "2026-01-02", "2026-01-31", "2026-02-01"]),
    ("daily", "America/New_York", ["2025-12-31", "2026-01-01", "2026-01-31"]),
    ("daily", "Asia/Kolkata", ["2026-01-01", "2026-01-02", "2026-02-01"]),
    ("monthly", "UTC", ["2026-01", "2026-02"]),
    ("monthly", "America/New_York", ["2025-12", "2026-01"]),
    ("session", "UTC", ["s-c", "s-d", "s-b", "s-a"]),
])
def test_report_lines_follow_the_time_zone(fleet: Any, capsys: pytest.CaptureFixture[str],
                                           kind: str, zone: str, keys: list[str]) -> None:
    data = report(fleet[0], capsys, kind, "--timezone", zone)
    assert [line[KEYS[kind]] for line in data["lines"]] == keys


def test_session_rows_come_ordered_by_session_and_model(fleet: Any) -> None:
    usage = read_usage(fleet[0].db_path, group="session")
    assert len(usage) == 5 and usage == sorted(usage, key=lambda r: (r[0], r[1]))


def test_model_report_and_breakdown(fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    daemon, _ = fleet
    models = report(daemon, capsys, "model")["lines"]
    assert {line["model"]: line["turns"] for line in models} == {
        "test-model": 4, "other-model": 1, "": 1}
    assert models[0]["model"] == "other-model"  # $0.25, the most expensive
    daily = report(daemon, capsys, "daily", "--breakdown")["lines"]
    assert [(line["date"], line["model"]) for line in daily][:2] == [
        ("2026-01-01", "other-model"), ("2026-01-01", "test-model")]


def test_since_and_until_select_local_days(fleet: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    daemon, rows = fleet
    data = report(daemon, capsys, "daily", "--since", "2026-01-02", "--until", "2026-01-31")
    assert [line["date"] for line in data["lines"]] == ["2026-01-02", "2026-01-31"]
    assert data["totals"]["turns"] == 3 and (data["since"], data["until"]) == (
        "2026-01-02", "2026-01-31")
    january = report(daemon, capsys, "session", "--since", "2026-01-01", "--until", "2026-01-31")
    assert {line["session"]: line["turns"] for line in january["lines"]} == {
        "s-a": 2, "s-b": 1, "s-c": 1, "s-d": 1}
    everything = report(daemon, capsys, "session", "--since", "2025-01-01")
    assert_equal_to_sessions(everything["totals"], list(rows.values()))


def run_report(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", "report", *args, "--config",
                           str(daemon.config_path)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def test_report_cli_prints_plain_columns_when_piped(fleet: Any) -> None:
    daemon, _ = fleet
    result = run_report(daemon, "monthly", "--breakdown")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["month", "model", "turns"]
    assert lines[1].split()[:3] == ["2026-01", "other-model", "1"]
    assert lines[-1].split()[:2] == ["Total", "6"]
    assert "\x1b[" not in result.stdout  # no terminal styling in a pipe
    plain = run_report(daemon, "model")
    assert "(none)" in plain.stdout


def test_report_cli_errors(tmp_path: Path, fleet: Any) -> None:
    daemon, _ = fleet
    bad_zone = run_report(daemon, "daily", "--timezone", "Mars/Olympus")
    assert bad_zone.returncode == 2 and "unknown time zone" in bad_zone.stderr
    backwards = run_report(daemon, "daily", "--since", "2026-02-01", "--until", "2026-01-01")
    assert backwards.returncode == 2 and "after --until" in backwards.stderr
    config = tmp_path / "c.toml"
    config.write_text('[storage]\nsqlite_path = "missing.db"\n')
    missing = subprocess.run([sys.executable, "-m", "collector", "report", "daily", "--config",
                              str(config)], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no database at" in missing.stderr



def test_report_while_the_daemon_writes(start_daemon: StartDaemon,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    daemon = start_daemon(NO_SWEEP)
    daemon.export_grpc([turn("live", T0)])
    assert report(daemon, capsys, "session")["lines"][0]["turns"] == 1
    daemon.export_http([turn("live", T0 + HOUR)])
    assert report(daemon, capsys, "session")["lines"][0]["turns"] == 2


def test_a_database_without_the_rollup_gets_a_hint(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()  # a database this version of the daemon never opened
    config = tmp_path / "c.toml"
    config.write_text(f'[storage]\nsqlite_path = "{db}"\n')
    assert cli.main(["report", "daily", "--config", str(config)]) == 1
    assert "start this version of the daemon once" in capsys.readouterr().err
