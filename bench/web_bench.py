"""How fast the fleet view's endpoints answer over 1,000,000 turns in 100,000 sessions.

    .venv/bin/python -m bench.web_bench                  # 1,000,000 turns, 100,000 sessions
    .venv/bin/python -m bench.web_bench --turns 100000 --repeat 5

The database is written straight with sqlite3 in the daemon's schema (rollup rows, sessions,
labels), all of it inside the overview's 30-day window, the worst case for the overview: every
rollup row is in range. Then `collector serve` opens it and each endpoint is timed over HTTP as
a browser calls it (best and median of --repeat), on the real listener.
"""

from __future__ import annotations

import argparse
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from collector.store.sqlite import SCHEMA, iso_utc

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
    "/api/sessions?q=00042",
    "/api/filters",
)
GOAL_MS = 100


def rows(turns: int, rng: random.Random) -> Iterator[tuple[Any, ...]]:
    now_hour = time.time_ns() // HOUR_NS
    for s in range(turns // TURNS_PER_SESSION):
        session = f"session-{s:07d}"
        start = now_hour - rng.randrange(DAYS * 24 - 4)
        model = rng.choice(MODELS)
        left = TURNS_PER_SESSION
        for h in range(rng.randint(1, 3)):
            n = left if h == 2 else rng.randint(1, left)
            left -= n
            prompt = n * rng.randint(2_000, 40_000)
            cache_read = prompt * rng.randint(0, 80) // 100
            completion = n * rng.randint(100, 3_000)
            yield (iso_utc((start + h) * HOUR_NS), session, model, n, prompt, completion,
                   completion // 4, cache_read, 0, (prompt * 0.0003 + completion * 0.0015))
            if not left:
                break


def build(path: Path, turns: int) -> dict[str, int]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.executescript(SCHEMA)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO collector_usage_hourly VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     rows(turns, random.Random(7)))
    conn.execute("""
        INSERT INTO agent_sessions (id, status, model, created_at, last_active_at, turns,
            prompt_tokens, completion_tokens, reasoning_tokens, cost_cents)
        SELECT session_id, 'active', max(model), min(hour), max(hour), sum(turns),
            sum(prompt_tokens), sum(completion_tokens), sum(reasoning_tokens), sum(cost_cents)
        FROM collector_usage_hourly GROUP BY session_id""")
    rng = random.Random(8)
    ids = [r[0] for r in conn.execute("SELECT id FROM agent_sessions")]
    conn.executemany("UPDATE agent_sessions SET status = ? WHERE id = ?",
                     ((rng.choice(STATUSES), i) for i in ids))
    conn.executemany(
        "INSERT INTO collector_session_labels (id, agent, agent_ns, agent_version, "
        "agent_version_ns, user_name, user_ns, host, host_ns) VALUES (?, ?, 1, '1.0', 1, ?, 1, "
        "?, 1)",
        ((i, rng.choice(AGENTS), f"user-{rng.randrange(50):03d}@example.com",
          f"host-{rng.randrange(20):02d}") for i in ids))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {
        "turns": conn.execute("SELECT sum(turns) FROM collector_usage_hourly").fetchone()[0],
        "rollup_rows": conn.execute("SELECT count(*) FROM collector_usage_hourly").fetchone()[0],
        "sessions": len(ids),
    }
    conn.close()
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "web.db"
        started = time.perf_counter()
        counts = build(path, args.turns)
        print(f"built {counts} in {time.perf_counter() - started:.1f} s")
        web = free_port()
        config = Path(tmp) / "c.toml"
        config.write_text(
            f'[receivers.otlp]\ngrpc_endpoint = ""\nhttp_endpoint = "127.0.0.1:{free_port()}"\n'
            f'[storage]\nsqlite_path = "{path}"\n[ops]\nendpoint = ""\n'
            f'[web]\nendpoint = "127.0.0.1:{web}"\n')
        daemon = subprocess.Popen([sys.executable, "-m", "collector", "serve", "--config",
                                   str(config)], stderr=subprocess.PIPE, text=True)
        try:
            assert daemon.stderr is not None
            for line in daemon.stderr:
                if "collector ready" in line:
                    break
            print(f"\n| endpoint | best ms | median ms | within {GOAL_MS} ms |")
            print("|---|---:|---:|---|")
            for endpoint in ENDPOINTS:
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    with urllib.request.urlopen(f"http://127.0.0.1:{web}{endpoint}",
                                                timeout=60) as response:
                        response.read()
                    times.append((time.perf_counter() - t) * 1000)
                median = statistics.median(times)
                print(f"| `{endpoint}` | {min(times):.1f} | {median:.1f} | "
                      f"{'yes' if median <= GOAL_MS else 'no'} |")
        finally:
            daemon.terminate()
            daemon.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
