"""Checks on the collector's SQLite file after a load: exact sums, and what the file costs.

A throughput figure is worthless if spans were lost or counted twice, so every collector run is
followed by an exact comparison of agent_sessions with what the acknowledged requests carried.
Reads use their own read-only connection, as any reader of the database would.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.payload import Sums

SEEN_TABLES = ("collector_seen_current", "collector_seen_previous")
MAX_REPORTED_MISMATCHES = 5


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)


@dataclass(slots=True)
class Verification:
    ok: bool
    sessions_expected: int
    sessions_committed: int
    totals_expected: tuple[int, int, int, int]
    totals_committed: tuple[int, int, int, int]
    mismatches: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _totals(sums: Sums) -> tuple[int, int, int, int]:
    t = [0, 0, 0, 0]
    for row in sums.values():
        for i in range(4):
            t[i] += row[i]
    return (t[0], t[1], t[2], t[3])


def committed_sums(path: Path) -> Sums:
    conn = _connect(path)
    try:
        rows = conn.execute("SELECT id, turns, prompt_tokens, completion_tokens, "
                            "reasoning_tokens FROM agent_sessions").fetchall()
    finally:
        conn.close()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}


def verify(path: Path, expected: Sums) -> Verification:
    """Per session and in total: turns, prompt, completion and reasoning tokens, exactly."""
    got = committed_sums(path)
    mismatches: list[str] = []
    for sid in sorted(expected.keys() | got.keys()):
        want, have = expected.get(sid), got.get(sid)
        if want != have:
            mismatches.append(f"{sid}: expected {want}, committed {have}")
            if len(mismatches) >= MAX_REPORTED_MISMATCHES:
                break
    return Verification(ok=not mismatches and _totals(got) == _totals(expected),
                        sessions_expected=len(expected), sessions_committed=len(got),
                        totals_expected=_totals(expected), totals_committed=_totals(got),
                        mismatches=mismatches)


def storage_footprint(path: Path) -> dict[str, int]:
    """Bytes on disk: the files, and per table (dbstat), notably the span-id tables."""
    sizes = {"db_file_bytes": path.stat().st_size if path.exists() else 0}
    wal = path.with_name(path.name + "-wal")
    sizes["wal_file_bytes"] = wal.stat().st_size if wal.exists() else 0
    conn = _connect(path)
    try:
        for name, pages_bytes in conn.execute(
                "SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
            sizes[f"table:{name}"] = int(pages_bytes)
        seen_rows = 0
        for table in SEEN_TABLES:
            seen_rows += conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        sizes["seen_rows"] = seen_rows
        sizes["seen_bytes"] = sum(sizes.get(f"table:{t}", 0) for t in SEEN_TABLES)
        sizes["session_rows"] = conn.execute("SELECT count(*) FROM agent_sessions").fetchone()[0]
    finally:
        conn.close()
    return sizes
