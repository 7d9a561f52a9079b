"""Where a flush into many sessions spends its time, statement by statement, in one process.

The scaling phase of bench.run measures a flush into 100,000 sessions at ~22 µs a span
(22,000 sessions a flush, one span each). This replays that shape without the network: the
benchmark's requests over 100,000 sessions are mapped and folded into batches of `--batch`
requests, and each batch is committed to a fresh SQLite file (WAL, synchronous = FULL) on this
thread, with every stage of SQLiteStore._commit timed on its own. Nothing else runs, so the
figures are the commit's own cost, not its cost beside a busy event loop.

Run: python -m bench.flushprof [--sessions N] [--batches N] [--batch REQUESTS]
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.payload import RequestFactory
from collector.accounting.aggregate import Batch
from collector.accounting.pricing import Pricer
from collector.receivers.otlp import decode_protobuf
from collector.signals import Signal
from collector.signals.traces import MappingOptions, map_request
from collector.store import sqlite as store


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch", type=int, default=44, help="requests of 512 spans a batch")
    args = parser.parse_args()
    factory = RequestFactory(sessions=args.sessions)
    pricer = Pricer({})
    pricer.preload()
    options = MappingOptions(pricer=pricer)
    seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        seconds[name] += time.perf_counter() - started

    names = {id(store.UPSERT_SESSION_PLAIN): "sessions (plain)",
             id(store.UPSERT_SESSION): "sessions",
             id(store.UPSERT_MARKS_PLAIN): "marks (plain)", id(store.UPSERT_MARKS): "marks",
             id(store.UPSERT_LABELS): "labels", id(store.UPSERT_HOURLY): "hourly"}

    def execute(db: sqlite3.Connection, statement: store.RowsStatement,
                rows: Iterable[tuple[Any, ...]]) -> int:
        """RowsStatement.run, with its three parts timed apart."""
        name = names[id(statement)]
        with stage(f"{name}: params"):
            built = list(rows)
        with stage(f"{name}: bind"):
            chunks = [built[i:i + store.MAX_ROWS_PER_STATEMENT]
                      for i in range(0, len(built), store.MAX_ROWS_PER_STATEMENT)]
            bound = [(len(chunk), *statement.bind(chunk)) for chunk in chunks]
        with stage(f"{name}: SQLite"):
            return sum(statement.execute(db, *args) for args in bound)

    spans = 0
    sessions = 0
    with tempfile.TemporaryDirectory() as tmp:
        s = store.SQLiteStore(Path(tmp) / "f.db", retention_s=86400)
        db = s._open()
        now = time.time_ns()
        request = 0
        for _ in range(args.batches):
            batch = Batch()
            for _ in range(args.batch):
                body = factory.request(request)
                result = map_request(decode_protobuf(body, Signal.TRACES), options, now, body)
                request += 1
                batch.add(result.records)
            spans += len(batch)
            sessions += len(batch.sessions)
            started = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            with stage("span ids (_record_seen)"):
                applied = store._record_seen(db, batch)
            store.write_sessions(db, applied, execute)
            with stage("COMMIT (fsync)"):
                db.execute("COMMIT")
            seconds["total"] += time.perf_counter() - started
        db.close()
    print(f"{args.batches} flushes, {spans:,} spans, {sessions:,} session rows "
          f"({sessions / args.batches:,.0f} a flush) over {args.sessions:,} sessions\n")
    print("| stage | ms a flush | µs a span | share |")
    print("|---|---:|---:|---:|")
    total = seconds["total"]
    seconds["rest: Python (Batch.totals, session rows)"] = total - sum(
        v for k, v in seconds.items() if k != "total")
    for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        if name != "total":
            print(f"| {name} | {value * 1000 / args.batches:.1f} | "
                  f"{value * 1e6 / spans:.2f} | {100 * value / total:.0f} % |")
    print(f"| **whole commit** | {total * 1000 / args.batches:.1f} | "
          f"{total * 1e6 / spans:.2f} | 100 % |")
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
