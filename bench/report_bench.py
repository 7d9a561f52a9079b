"""How fast `collector report` answers over a database of 1,000,000 turns.

    .venv/bin/python -m bench.report_bench               # both shapes, 1,000,000 turns each
    .venv/bin/python -m bench.report_bench --turns 100000 --repeat 3

It measures the report, not ingestion: rows are written straight into `collector_usage_hourly`
(and the matching `agent_sessions` rows) with sqlite3, in the schema the daemon creates. Two
shapes of the same number of turns:

* fleet: 20 turns per session, each session active over a few hours with one or two models,
  sessions spread over 90 days. The rollup then holds far fewer rows than turns, as in use.
* worst: every turn in a (session, model, hour) of its own, so the rollup has one row per turn:
  the most a rollup can hold for this many turns.

Each report (daily, monthly, session, model; plain and --breakdown, UTC and another zone) is
timed as users run it: the `collector report` command in a fresh process, best and median of
`--repeat` runs, plus the in-process query-and-fold time without interpreter start-up. Every
report's totals are checked against the sums of agent_sessions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from collector import report
from collector.cli import REPORT_GROUPS
from collector.store.sqlite import SCHEMA, iso_utc, read_usage

HOUR_NS = 3600 * 1_000_000_000
START_NS = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
DAYS = 90
MODELS = ("claude-sonnet-4-5", "gpt-4o", "gemini-2.5-pro", "o3", "claude-haiku-4-5", "")
RUNS = [
    ("daily",),
    ("daily", "--breakdown"),
    ("daily", "--timezone", "America/New_York"),
    ("monthly",),
    ("monthly", "--breakdown"),
    ("model",),
    ("session", "--since", "2026-03-01", "--until", "2026-03-07"),
    ("session",),
]
INSERT_HOURLY = "INSERT INTO collector_usage_hourly VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"


def rollup_rows(shape: str, turns: int, rng: random.Random) -> Iterator[tuple[Any, ...]]:
    """(hour, session, model, turns, prompt, completion, reasoning, cache_read, cache_write,
    cents) rows adding up to `turns` turns."""
    per_session = 20 if shape == "fleet" else 1
    for s in range(turns // per_session):
        session = f"session-{s:07d}"
        start_hour = START_NS // HOUR_NS + rng.randrange(DAYS * 24)
        if shape == "worst":
            # One turn per row: distinct sessions make every (hour, session, model) distinct.
            yield _usage(start_hour, session, rng.choice(MODELS), 1, rng)
            continue
        models = rng.sample(MODELS[:5], rng.choice((1, 1, 2)))
        hours = rng.randint(1, 4)
        left = per_session
        for h in range(hours):
            n = left if h == hours - 1 else rng.randint(1, left - (hours - h - 1))
            left -= n
            for i, model in enumerate(models):
                share = n if len(models) == 1 else (n // 2 if i == 0 else n - n // 2)
                if share:
                    yield _usage(start_hour + h, session, model, share, rng)


def _usage(hour: int, session: str, model: str, turns: int,
           rng: random.Random) -> tuple[Any, ...]:
    prompt = turns * rng.randint(2_000, 40_000)
    cache_read = prompt * rng.randint(0, 80) // 100
    cache_write = (prompt - cache_read) * rng.randint(0, 20) // 100
    completion = turns * rng.randint(100, 3_000)
    reasoning = completion * rng.randint(0, 50) // 100
    cents = (prompt * 0.0003 + completion * 0.0015) * rng.random()
    return (iso_utc(hour * HOUR_NS), session, model, turns, prompt, completion, reasoning,
            cache_read, cache_write, cents)


def build(path: Path, shape: str, turns: int) -> dict[str, int]:
    """Write the database; returns its row counts."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    conn.executemany(INSERT_HOURLY, rollup_rows(shape, turns, random.Random(7)))
    # The sessions table the daemon keeps beside it: the rollup summed per session.
    conn.execute("""
        INSERT INTO agent_sessions (id, model, created_at, last_active_at, turns, prompt_tokens,
            completion_tokens, reasoning_tokens, cost_cents)
        SELECT session_id, max(model), min(hour), max(hour), sum(turns), sum(prompt_tokens),
            sum(completion_tokens), sum(reasoning_tokens), sum(cost_cents)
        FROM collector_usage_hourly GROUP BY session_id""")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {
        "turns": conn.execute("SELECT sum(turns) FROM collector_usage_hourly").fetchone()[0],
        "rollup_rows": conn.execute("SELECT count(*) FROM collector_usage_hourly").fetchone()[0],
        "sessions": conn.execute("SELECT count(*) FROM agent_sessions").fetchone()[0],
    }
    conn.close()
    return counts


def session_sums(path: Path) -> tuple[int, int, int, int, float]:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT sum(turns), sum(prompt_tokens), sum(completion_tokens), "
                           "sum(reasoning_tokens), sum(cost_cents) FROM agent_sessions")
        turns, prompt, completion, reasoning, cents = row.fetchone()
        return turns, prompt, completion, reasoning, cents
    finally:
        conn.close()


def check(totals: dict[str, Any], expected: tuple[int, int, int, int, float]) -> None:
    turns, prompt, completion, reasoning, cents = expected
    got = (totals["turns"], totals["input_tokens"] + totals["cache_read_tokens"]
           + totals["cache_write_tokens"], totals["output_tokens"], totals["reasoning_tokens"])
    if got != (turns, prompt, completion, reasoning) or abs(
            totals["cost_usd"] * 100 - cents) > 1e-6 * max(cents, 1):
        raise SystemExit(f"report totals {totals} differ from agent_sessions {expected}")


def in_process(path: Path, args: tuple[str, ...]) -> float:
    """Seconds to read the rollup and fold it into report lines, without process start-up."""
    kind = args[0]
    zone = args[args.index("--timezone") + 1] if "--timezone" in args else "UTC"
    tz = ZoneInfo(zone)
    since = until = None
    if "--since" in args:
        since = dt.date.fromisoformat(args[args.index("--since") + 1])
        until = dt.date.fromisoformat(args[args.index("--until") + 1])
    started = time.perf_counter()
    lo, hi = report.hour_bounds(since, until, tz)
    rows = read_usage(path, group=REPORT_GROUPS[kind], lo=lo, hi=hi)
    result = report.build_report(kind, (report.RollupRow(*r) for r in rows), tz=tz,
                                 timezone=zone, breakdown="--breakdown" in args, since=since,
                                 until=until)
    report.to_table(result, tz)
    return time.perf_counter() - started


def command(config: Path, args: tuple[str, ...]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "collector", "report", *args, "--config",
                           str(config), "--json"], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--shape", choices=("fleet", "worst"), action="append")
    opts = parser.parse_args()
    baseline = min(_timed_help() for _ in range(opts.repeat))
    print(f"`collector report --help` (interpreter and import start-up): "
          f"{baseline * 1000:.0f} ms\n")
    for shape in opts.shape or ["fleet", "worst"]:
        with tempfile.TemporaryDirectory() as tmp:
            db = Path(tmp) / "report.db"
            config = Path(tmp) / "collector.toml"
            config.write_text(f'[storage]\nsqlite_path = "{db}"\n')
            started = time.perf_counter()
            counts = build(db, shape, opts.turns)
            size_mb = db.stat().st_size / 1e6
            print(f"### {shape}: {counts['turns']:,} turns, {counts['sessions']:,} sessions, "
                  f"{counts['rollup_rows']:,} rollup rows, {size_mb:.0f} MB "
                  f"(built in {time.perf_counter() - started:.0f} s)\n")
            print("| report | lines | command, best | command, median | query + fold |")
            print("|---|---:|---:|---:|---:|")
            expected = session_sums(db)
            for args in RUNS:
                if shape == "worst" and args == ("session",):
                    continue  # a million one-turn sessions: a million lines, not a report
                times = []
                data: dict[str, Any] = {}
                for _ in range(opts.repeat):
                    seconds, data = command(config, args)
                    times.append(seconds)
                if "--since" not in args:
                    check(data["totals"], expected)
                inner = min(in_process(db, args) for _ in range(opts.repeat))
                print(f"| `{' '.join(args)}` | {len(data['lines']):,} | "
                      f"{min(times) * 1000:.0f} ms | {statistics.median(times) * 1000:.0f} ms | "
                      f"{inner * 1000:.0f} ms |")
            print()
    return 0


def _timed_help() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "collector", "report", "--help"], capture_output=True,
                   check=True)
    return time.perf_counter() - started


if __name__ == "__main__":
    sys.exit(main())
