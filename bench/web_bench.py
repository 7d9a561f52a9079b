"""How fast the fleet view's endpoints answer over 1,000,000 turns in 100,000 sessions, and
whether a page polling them slows ingestion.

    .venv/bin/python -m bench.web_bench                  # 1,000,000 turns, 100,000 sessions
    .venv/bin/python -m bench.web_bench --turns 100000 --repeat 5
    .venv/bin/python -m bench.web_bench --only poll      # the ingestion ratio alone
    .venv/bin/python -m bench.web_bench --flood --only flood --turns 1000000

--flood gives every session a model of its own, one user per 20 sessions and one host per 100
(what a flood of distinct values from agents leaves); `--only flood` then measures what such a
fleet costs the view: /api/filters' size, a CSV export's size, time and the daemon's peak
memory growth while it runs (VmHWM, reset first), and how long /api/overview takes while
FLOOD_DOWNLOADS CSV exports are in flight.

The database is written straight with sqlite3 in the daemon's schema, triggers included
(rollup rows, sessions, labels; the daily table follows from the triggers), all of it inside
the overview's 30-day window, the worst case for the overview: every rollup row is in range.
Then `collector serve` opens it and each endpoint is timed over HTTP as a browser calls it
(best and median of --repeat), on the real listener.

Then ingestion: bench.loadgen sends 512-span requests to the same daemon (closed loop) in
alternating rounds without and with a poller that fetches /api/overview, /api/sessions and
/api/filters every --poll-interval seconds, as an open page does; the ratio of the two rates,
measured in the same run, is the goal's number (1.0 = unchanged).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from collector.store.sqlite import SCHEMA_SCRIPT, iso_utc
from collector.web.queries import encode_cursor

HOUR_NS = 3600 * 1_000_000_000
DAYS = 30
TURNS_PER_SESSION = 10
MODELS = ("claude-sonnet-4-5", "gpt-4o", "gemini-2.5-pro", "o3", "claude-haiku-4-5")
AGENTS = ("claude-code", "codex", "gemini-cli", "copilot", "opencode")
STATUSES = ("active", "completed", "completed", "failed", "unknown")
ENDPOINTS = (
    "/api/overview",
    "/api/sessions",
    "/api/sessions?status=active",
    "/api/sessions?agent=codex",
    "/api/sessions?user=user-017%40example.com",
    "/api/sessions?model=o3&sort=cost",
    "/api/sessions?sort=cost&order=desc",
    "/api/sessions?sort=tokens&order=asc",
    "/api/sessions?q=session-00042",
    "/api/sessions?q=session-0004",
    "/api/sessions?q=nothing-like-it",
    "/api/sessions?host=host-03&sort=turns",
    "/api/sessions?user=user-017%40example.com&agent=codex&status=failed&sort=created_at",
    "/api/sessions?status=cancelled",
    "/api/sessions?model=o3&status=active&sort=tokens&order=desc",
    "/api/sessions?sort=created_at&order=asc",
    "/api/sessions?sort=turns&order=desc",
    "/api/sessions?sort=id&order=asc",
    "/api/filters",
)
# Pages deep in the table: the cursor of the row at DEEP_ROW in each order.
DEEP_ROW = 50_000
DEEP_SORTS = {"last_active_at": "last_active_at", "cost": "cost_cents", "turns": "turns",
              "tokens": "(prompt_tokens + completion_tokens)", "created_at": "created_at"}
GOAL_MS = 100
POLLED = ("/api/overview", "/api/sessions", "/api/filters")
POLL_INTERVAL_S = 1.0
ROUND_S = 10.0
ROUNDS = 4  # rounds of one run without and one with the poller


FLOOD_DOWNLOADS = 4
FLOOD_USERS_PER = 20  # sessions per distinct user (and 100 per host) with --flood


def rows(turns: int, rng: random.Random, flood: bool = False) -> Iterator[tuple[Any, ...]]:
    now_hour = time.time_ns() // HOUR_NS
    for s in range(turns // TURNS_PER_SESSION):
        session = f"session-{s:07d}"
        start = now_hour - rng.randrange(DAYS * 24 - 4)
        model = f"model-{s:07d}" if flood else rng.choice(MODELS)
        left = TURNS_PER_SESSION
        hours = rng.randint(1, 3)
        for h in range(hours):
            # The last hour takes what is left, so every session has exactly its turns.
            n = left if h == hours - 1 else rng.randint(1, left - (hours - 1 - h))
            left -= n
            prompt = n * rng.randint(2_000, 40_000)
            cache_read = prompt * rng.randint(0, 80) // 100
            completion = n * rng.randint(100, 3_000)
            yield (iso_utc((start + h) * HOUR_NS), session, model, n, prompt, completion,
                   completion // 4, cache_read, 0, (prompt * 0.0003 + completion * 0.0015))


def build(path: Path, turns: int, flood: bool = False) -> dict[str, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(SCHEMA_SCRIPT)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO collector_usage_hourly VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     rows(turns, random.Random(7), flood))
    conn.execute("""
        INSERT INTO agent_sessions (id, status, model, created_at, last_active_at, turns,
            prompt_tokens, completion_tokens, reasoning_tokens, cost_cents)
        SELECT session_id, 'active', max(model), min(hour), max(hour), sum(turns),
            sum(prompt_tokens), sum(completion_tokens), sum(reasoning_tokens), sum(cost_cents)
        FROM collector_usage_hourly GROUP BY session_id""")
    rng = random.Random(8)
    ids = [r[0] for r in conn.execute("SELECT id FROM agent_sessions")]
    users = max(len(ids) // FLOOD_USERS_PER, 1) if flood else 50
    hosts = max(len(ids) // (5 * FLOOD_USERS_PER), 1) if flood else 20
    conn.executemany("UPDATE agent_sessions SET status = ? WHERE id = ?",
                     ((rng.choice(STATUSES), i) for i in ids))
    conn.executemany(
        "INSERT INTO collector_session_labels (id, agent, agent_ns, agent_version, "
        "agent_version_ns, user_name, user_ns, host, host_ns) VALUES (?, ?, 1, '1.0', 1, ?, 1, "
        "?, 1)",
        ((i, rng.choice(AGENTS), f"user-{rng.randrange(users):03d}@example.com",
          f"host-{rng.randrange(hosts):02d}") for i in ids))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {
        "turns": conn.execute("SELECT sum(turns) FROM collector_usage_hourly").fetchone()[0],
        "rollup_rows": conn.execute("SELECT count(*) FROM collector_usage_hourly").fetchone()[0],
        "sessions": len(ids),
    }
    conn.close()
    return counts


def deep_endpoints(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        out = []
        for sort, expr in DEEP_SORTS.items():
            row = conn.execute(f"SELECT {expr}, id FROM agent_sessions ORDER BY {expr} DESC, "
                               "id DESC LIMIT 1 OFFSET ?", (DEEP_ROW,)).fetchone()
            if row is not None:
                cursor = urllib.parse.quote(encode_cursor(row[0], row[1]))
                out.append(f"/api/sessions?sort={sort}&cursor={cursor}")
        return out
    finally:
        conn.close()


def time_endpoints(web: int, endpoints: list[str], repeat: int) -> None:
    print(f"\n| endpoint | best ms | median ms | within {GOAL_MS} ms |")
    print("|---|---:|---:|---|")
    for endpoint in endpoints:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{web}{endpoint}",
                                        timeout=60) as response:
                response.read()
            times.append((time.perf_counter() - t) * 1000)
        median = statistics.median(times)
        shown = endpoint if "cursor=" not in endpoint else endpoint.split("&cursor=")[0] + (
            f"&cursor=(row {DEEP_ROW:,})")
        print(f"| `{shown}` | {min(times):.1f} | {median:.1f} | "
              f"{'yes' if median <= GOAL_MS else 'no'} |", flush=True)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _fetch(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    size = 0
    with urllib.request.urlopen(url, timeout=600) as response:
        while chunk := response.read(1 << 16):
            size += len(chunk)
    return size, time.perf_counter() - started


def flood_costs(web: int, pid: int) -> None:
    """What a flood of distinct values costs the view (see the module's docstring)."""
    base = f"http://127.0.0.1:{web}"
    size, took = _fetch(base + "/api/filters")
    print(f"\n/api/filters: {size:,} bytes in {took * 1000:.0f} ms")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss = _status_kib(pid, "VmRSS")
    size, took = _fetch(base + "/api/sessions.csv")
    peak = _status_kib(pid, "VmHWM")
    print(f"/api/sessions.csv: {size:,} bytes in {took:.1f} s; daemon RSS {rss / 1024:.0f} MiB "
          f"before, peak {peak / 1024:.0f} MiB during (+{(peak - rss) / 1024:.0f} MiB)")
    downloads = [threading.Thread(target=_fetch, args=(base + "/api/sessions.csv",))
                 for _ in range(FLOOD_DOWNLOADS)]
    for d in downloads:
        d.start()
    time.sleep(0.5)  # the downloads are under way
    _, took = _fetch(base + "/api/overview")
    alive = sum(d.is_alive() for d in downloads)
    for d in downloads:
        d.join()
    print(f"/api/overview during {FLOOD_DOWNLOADS} CSV downloads: {took * 1000:.0f} ms "
          f"({alive} downloads still running when it answered)")


class Poller:
    """A page left open: fetches what it shows every interval, on its own thread."""

    def __init__(self, web: int, interval: float) -> None:
        self.web = web
        self.interval = interval
        self.stop = threading.Event()
        self.times: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            started = time.perf_counter()
            for endpoint in POLLED:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.web}{endpoint}",
                                            timeout=60) as response:
                    response.read()
            elapsed = time.perf_counter() - started
            self.times.append(elapsed * 1000)
            self.stop.wait(max(self.interval - elapsed, 0.0))

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def ingest(http: int, seconds: float, tmp: Path, first_request: int) -> float:
    """Spans/s acknowledged by the daemon over `seconds` (bench.loadgen, its own process)."""
    out = tmp / f"load-{first_request}.json"
    subprocess.run([sys.executable, "-m", "bench.loadgen", "--transport", "http",
                    "--target", f"127.0.0.1:{http}", "--duration", str(seconds),
                    "--warmup", "2", "--concurrency", "8", "--first-request",
                    str(first_request), "--json-out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return float(json.loads(out.read_text())["spans_per_s"])


def poll_ratio(web: int, http: int, tmp: Path, interval: float, rounds: int) -> None:
    """Ingestion without and with a polling page, alternating (A B B A ...), so drift in the
    machine's load and the database's growth fall on both sides."""
    without: list[float] = []
    with_poll: list[float] = []
    polls: list[float] = []
    first = 0
    print("\n| round | without poller spans/s | with poller spans/s | ratio | "
          "poll median ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in range(rounds):
        # Odd rounds go the other way round (A B B A): no side always runs second.
        for polled in ((False, True) if r % 2 == 0 else (True, False)):
            if polled:
                with Poller(web, interval) as poller:
                    with_poll.append(ingest(http, ROUND_S, tmp, first))
                polls += poller.times
            else:
                without.append(ingest(http, ROUND_S, tmp, first))
            first += 100_000
        print(f"| {r + 1} | {without[-1]:,.0f} | {with_poll[-1]:,.0f} | "
              f"{with_poll[-1] / without[-1]:.2f} | {statistics.median(poller.times):.0f} |",
              flush=True)
    ratio = sum(with_poll) / sum(without)
    print(f"\ningestion with a page polling every {interval:g} s: {ratio:.2f}x of without "
          f"(sum over {rounds} rounds; {len(polls)} polls of {', '.join(POLLED)}, median "
          f"{statistics.median(polls):.0f} ms, max {max(polls):.0f} ms)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--only", choices=("endpoints", "poll", "flood"))
    parser.add_argument("--flood", action="store_true",
                        help="a model per session, a user per 20, a host per 100")
    parser.add_argument("--poll-interval", type=float, default=POLL_INTERVAL_S)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "web.db"
        started = time.perf_counter()
        counts = build(path, args.turns, args.flood)
        print(f"built {counts} in {time.perf_counter() - started:.1f} s")
        deep = deep_endpoints(path)
        web = free_port()
        http = free_port()
        config = Path(tmp) / "c.toml"
        config.write_text(
            f'[receivers.otlp]\ngrpc_endpoint = ""\nhttp_endpoint = "127.0.0.1:{http}"\n'
            f'[storage]\nsqlite_path = "{path}"\n[ops]\nendpoint = ""\n'
            f'[web]\nendpoint = "127.0.0.1:{web}"\n')
        daemon = subprocess.Popen([sys.executable, "-m", "collector", "serve", "--config",
                                   str(config)], stderr=subprocess.PIPE, text=True)
        try:
            assert daemon.stderr is not None
            for line in daemon.stderr:
                if "collector ready" in line:
                    break
            threading.Thread(target=lambda: [None for _ in daemon.stderr or ()],
                             daemon=True).start()  # keep the pipe drained
            if args.only == "flood":
                flood_costs(web, daemon.pid)
            if args.only in (None, "endpoints"):
                time_endpoints(web, [*ENDPOINTS, *deep], args.repeat)
            if args.only in (None, "poll"):
                poll_ratio(web, http, Path(tmp), args.poll_interval, args.rounds)
        finally:
            daemon.terminate()
            daemon.wait(30)
        with open("/proc/loadavg") as f:
            print(f"load average at end: {' '.join(f.read().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
