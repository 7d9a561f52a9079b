"""PostgreSQL vs SQLite in one run, and two collectors on one PostgreSQL: the figures behind
the capacity model in BENCHMARKS.md.

    .venv/bin/python -m bench.pg            # about 2 minutes on 2 cores
    .venv/bin/python -m bench.pg --quick

A throwaway PostgreSQL server (tests/pg.py, fsync on, as in production) on a loopback port.
Each configuration gets a fresh database (or SQLite file) and the same closed-loop gRPC load;
two collectors get one load generator each, at the same time. Measured per configuration:
committed spans/s; collector CPU per span; PostgreSQL's CPU per span (all its processes, from
/proc), its commits, rows written and WAL bytes (pg_stat_database, pg_current_wal_lsn).
The sums of every run are checked exactly against what was acknowledged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.payload import SPANS_PER_REQUEST
from bench.run import PYTHON, ROOT, Server, free_port, listeners_toml, load_result, loadgen
from tests.pg import PgServer

CLK_TCK = os.sysconf("SC_CLK_TCK")
CONCURRENCY = 64
SESSIONS = 1000


def pg_cpu_seconds(server: PgServer) -> float:
    """User + system CPU of the postmaster and every backend it started."""
    root = server.postmaster_pid()
    children = subprocess.run(["pgrep", "-P", str(root)], capture_output=True, text=True,
                              check=False).stdout.split()
    total = 0.0
    for pid in [str(root), *children]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a backend that just ended
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def pg_counters(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0') "
            "FROM pg_stat_database WHERE datname = current_database()").fetchone()
    assert row is not None
    return {"commits": float(row[0]), "rows": float(row[1]), "wal_bytes": float(row[2])}


def start(work: Path, tag: str, storage: str) -> Server:
    http, grpc_port = free_port(), free_port()
    config = work / f"collector-{tag}.toml"
    # Listeners of its own: the two-collector runs start two at once.
    config.write_text(listeners_toml(grpc_port, http) +
                      f'[storage]\n{storage}\n[log]\nlevel = "info"\n')
    return Server("collector", [PYTHON, "-m", "collector", "serve", "--config", str(config)],
                  http_port=http, grpc_port=grpc_port, log=work / f"collector-{tag}.log",
                  pythonpath=str(ROOT), cwd=work)


def run_config(work: Path, tag: str, storages: list[str], server: PgServer | None,
               url: str | None, duration_s: float, warmup_s: float) -> dict[str, Any]:
    collectors = [start(work, f"{tag}-{i}", s) for i, s in enumerate(storages)]
    try:
        before = pg_counters(url) if url else {}
        cpu0 = pg_cpu_seconds(server) if server else 0.0
        t0 = time.perf_counter()
        procs = [loadgen(work, f"{tag}-{i}", c, "grpc", concurrency=CONCURRENCY,
                         sessions=SESSIONS, duration_s=duration_s, warmup_s=warmup_s,
                         background=True) for i, c in enumerate(collectors)]
        for p in procs:
            assert isinstance(p, subprocess.Popen)
            p.wait(duration_s + warmup_s + 300)
        wall = time.perf_counter() - t0
        pg_cpu = (pg_cpu_seconds(server) - cpu0) if server else 0.0
        after = pg_counters(url) if url else {}
    finally:
        for c in collectors:
            c.stop()
    loads = [load_result(work, f"{tag}-{i}") for i in range(len(collectors))]
    spans_acked = sum(r["spans_acked"] for r in loads)
    result: dict[str, Any] = {
        "collectors": len(collectors),
        "spans_per_s": round(sum(r["spans_per_s"] for r in loads)),
        "collector_cpu_us_per_span": round(sum(r["server_cpu_us_per_span"] for r in loads)
                                           / len(loads), 2),
        "failures": [r["failures"] for r in loads],
        "spans_acked": spans_acked,
    }
    if url:
        commits = after["commits"] - before["commits"]
        result.update({
            "pg_cpu_us_per_span": round(pg_cpu * 1e6 / spans_acked, 2),
            "pg_cpu_cores": round(pg_cpu / wall, 2),
            "pg_rows_per_s": round((after["rows"] - before["rows"]) / wall),
            "pg_commits": int(commits),
            "pg_wal_bytes_per_commit": round((after["wal_bytes"] - before["wal_bytes"])
                                             / max(commits, 1)),
            "pg_wal_bytes_per_span": round((after["wal_bytes"] - before["wal_bytes"])
                                           / spans_acked, 1),
        })
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT sum(turns) FROM agent_sessions").fetchone()
        # Every acknowledged span is committed; the loads' spans are one turn each.
        result["turns_in_db"] = int(row[0]) if row and row[0] is not None else 0
        result["sums_exact"] = result["turns_in_db"] == spans_acked
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    duration, warmup = (5.0, 1.0) if args.quick else (15.0, 3.0)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-pg-{os.getpid()}"
    work.mkdir(parents=True)
    server = PgServer(fsync=True, extra_conf="shared_buffers = 256MB\n")
    results: dict[str, Any] = {"spans_per_request": SPANS_PER_REQUEST,
                               "cpu_count": os.cpu_count()}
    try:
        print("sqlite, one collector", file=sys.stderr)
        results["sqlite_1"] = run_config(
            work, "sqlite", [f'sqlite_path = "{work / "sqlite.db"}"'], None, None,
            duration, warmup)
        for n in (1, 2):
            url = server.new_database()
            print(f"postgres, {n} collector(s)", file=sys.stderr)
            storage = f'backend = "postgres"\npostgres_url = "{url}"'
            results[f"postgres_{n}"] = run_config(work, f"pg{n}", [storage] * n, server, url,
                                                  duration, warmup)
    finally:
        server.destroy()
    base = results["sqlite_1"]["spans_per_s"]
    for key in ("postgres_1", "postgres_2"):
        results[key]["ratio_to_sqlite"] = round(results[key]["spans_per_s"] / base, 2)
    print(json.dumps(results, indent=2))
    ok = all(results[k].get("sums_exact", True) for k in ("postgres_1", "postgres_2"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
