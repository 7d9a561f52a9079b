"""What 20 budgets and 1,000 teams' tags cost the ingest path, in one process, without the
network: the same comparison as bench.run's budgets phase, at a precision the daemon runs
cannot give on a shared machine (their spans/s move by ±15 % between neighbouring runs).

For a layout of bench.payload (tags on the resources or on every span), each round builds
`--batch` requests into one batch and commits it, its CPU time taken whole (decode, read, map,
fold and commit on this thread, as the daemon's ingest path and writer share one interpreter;
CPU, not wall time, so that the fsync's wait on a shared disk does not blur it), for
A (no budgets, no tags) and B (bench.budgets' 20 budgets, tags of 1,000 teams), into
SQLite files of their own (WAL, synchronous = FULL) kept across rounds so that they grow
alike; a third configuration, the tags without budgets, tells the two costs apart. Rounds
alternate the three (each round starting with the next), each µs figure is the median over
rounds, and each increase the median over rounds of that round's ratio to its own A; the
last column is B's CPU over A's summed over all rounds, the folds' rounds included (a median
leaves them out), with the folds counted beside it. The first `--warmup` rounds are not
measured, as bench.run's daemons are not in their first seconds: in them the planner meets
the 1,000 teams for the first time, and each flush's new teams are a fold (about 16 of them
at 64 sessions a flush). A fold falls due every FOLD_INTERVAL_NS, so a run shorter than that
(--rounds 300 is about 20 s) sees none of those: --rounds 1000 sees two.
The garbage collector is tuned as the daemon tunes it once it has loaded
(collector.daemon.tune_garbage_collector): with Python's defaults a young collection runs every
700 allocations and B, which allocates more, pays for collections the daemon does not make
(about half of B's extra instructions, counted). `--python-gc` keeps the defaults.
`--profile` adds a cProfile of B's budget work.

Run: python -m bench.budgetprof [--layout resource|span] [--rounds N] [--warmup N]
     [--batch REQUESTS] [--python-gc] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.budgets import budgets_toml
from bench.payload import LAYOUTS, SPANS_PER_REQUEST, Layout, RequestFactory
from collector.accounting.aggregate import Batch
from collector.accounting.pricing import Pricer
from collector.config.attribution import DEFAULT_DIMENSIONS, dimension_names
from collector.config.budgets import Budget, parse_budgets
from collector.daemon import tune_garbage_collector
from collector.receivers.otlp import decode_protobuf
from collector.signals import Signal
from collector.signals.traces import MappingOptions, map_request
from collector.store import budgets as store_budgets
from collector.store import sqlite as store


def bench_budgets() -> tuple[Budget, ...]:
    parsed: Any = tomllib.loads(budgets_toml(9))["budgets"]
    return parse_budgets(parsed, source="bench", dimensions=(
        *dimension_names(DEFAULT_DIMENSIONS), "agent", "user", "host", "credential"))


# A: neither; the tags alone; B: the tags and the budgets.
CONFIGS = ("none", "tags", "budgets")


@dataclass(frozen=True, slots=True)
class Setup:
    """What each configuration ingests, and with which budgets, as the daemon would map it
    (the default [attribution]). Each configuration has its own MappingOptions, as each
    daemon has: sharing one would share its compiled reader's cache of decoded strings, and
    B's tag values would then evict A's session ids there, making A slower than alone."""

    options: dict[str, MappingOptions]
    factories: dict[str, RequestFactory]
    budgets: dict[str, tuple[Budget, ...]]


def setup(layout: Layout, sessions: int = 1000, *, nonce: int | None = None,
          now_ns: int | None = None) -> Setup:
    """`nonce` and `now_ns` fix the requests' ids and times (the same bytes in every run)."""
    pricer = Pricer({})
    pricer.preload()
    options = {name: MappingOptions(pricer=pricer, dimensions=tuple(
        (d.name, d.attributes) for d in DEFAULT_DIMENSIONS)) for name in CONFIGS}
    plain = RequestFactory(sessions, layout=layout, nonce=nonce, now_ns=now_ns)
    tagged = RequestFactory(sessions, tagged=True, layout=layout, nonce=nonce, now_ns=now_ns)
    return Setup(options, {"none": plain, "tags": tagged, "budgets": tagged},
                 {"none": (), "tags": (), "budgets": bench_budgets()})


def ingest(into: store.SQLiteStore, db: Any, bodies: list[bytes], options: MappingOptions,
           now_ns: int, commit_ns: int) -> None:
    """The daemon's ingest path for one flush of `bodies`, on this thread: decode, read,
    map, fold, and commit at `commit_ns` (budget journal, folds and tag rows included)."""
    batch = Batch()
    for body in bodies:
        batch.add(map_request(decode_protobuf(body, Signal.TRACES), options, now_ns,
                              body).records)
    into._commit(db, batch, commit_ns, None)


def measure(layout: Layout, *, rounds: int, batch_requests: int, warmup: int = 20,
            sessions: int = 1000, profile: cProfile.Profile | None = None,
            daemon_gc: bool = True) -> dict[str, Any]:
    """Median µs a span of the whole ingest path for A and B, and of record_budgets in B."""
    parts = setup(layout, sessions)
    options, factories, budgets = parts.options, parts.factories, parts.budgets
    per_span: dict[str, list[float]] = {name: [] for name in (*factories, "record_budgets")}
    inside = [0.0]
    folds: list[float] = []  # CPU ms of each of B's folds in the measured rounds
    measuring = [False]  # past the warm-up rounds: what the round and its folds cost counts
    real_record, real_fold = store_budgets.record_budgets, store_budgets.fold_budgets

    def timed_fold(*a: Any, **k: Any) -> int:
        started = time.process_time()
        try:
            return real_fold(*a, **k)
        finally:
            if measuring[0]:
                folds.append((time.process_time() - started) * 1e3)

    def timed_record(*a: Any, **k: Any) -> int:
        started = time.process_time()
        if profile is not None:
            profile.enable()
        try:
            return real_record(*a, **k)
        finally:
            if profile is not None:
                profile.disable()
            inside[0] += time.process_time() - started

    # The store calls record_budgets by the name it imported; it folds through the budgets
    # module's own name.
    vars(store)["record_budgets"] = timed_record
    store_budgets.fold_budgets = timed_fold
    spans = batch_requests * SPANS_PER_REQUEST
    if daemon_gc:
        tune_garbage_collector()
    now = time.time_ns()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            stores = {name: store.SQLiteStore(Path(tmp) / f"{name}.db", retention_s=86400,
                                              budgets=budgets[name]) for name in budgets}
            dbs = {name: s._open() for name, s in stores.items()}
            names = list(CONFIGS)
            for number in range(-warmup, rounds):
                measuring[0] = number >= 0
                # Each round starts with the next configuration: none pays for its place.
                for name in names[number % 3:] + names[:number % 3]:
                    factory = factories[name]
                    bodies = [factory.request((warmup + number) * batch_requests + i)
                              for i in range(batch_requests)]
                    inside[0] = 0.0
                    started = time.process_time()
                    # The clock as the daemon's: the journal's folds and the tags' end
                    # times are due by it.
                    ingest(stores[name], dbs[name], bodies, options[name], now, time.time_ns())
                    elapsed = time.process_time() - started
                    if measuring[0]:
                        per_span[name].append(elapsed * 1e6 / spans)
                        if name == "budgets":
                            per_span["record_budgets"].append(inside[0] * 1e6 / spans)
            for db in dbs.values():
                db.close()
    finally:
        vars(store)["record_budgets"] = real_record
        store_budgets.fold_budgets = real_fold
    medians = {name: statistics.median(values) for name, values in per_span.items()}
    # Each round's B against its own A, measured moments apart: the machine's speed drifts
    # between rounds far more than within one.
    ratios = [b / a for a, b in zip(per_span["none"], per_span["budgets"], strict=True)]
    tag_ratios = [t / a for a, t in zip(per_span["none"], per_span["tags"], strict=True)]
    # Medians leave out the rounds with a fold (one every FOLD_INTERVAL_NS, as in the
    # daemon); the ratio of the sums over all rounds counts them, and every outlier too.
    return {"layout": layout, "rounds": rounds, "batch_requests": batch_requests,
            "us_per_span": medians,
            "increase": statistics.median(ratios) - 1,
            "tags_increase": statistics.median(tag_ratios) - 1,
            "total_increase": sum(per_span["budgets"]) / sum(per_span["none"]) - 1,
            "folds_ms": folds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, action="append")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured rounds first")
    parser.add_argument("--batch", type=int, default=4, help="requests of 512 spans a batch")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--python-gc", action="store_true",
                        help="keep Python's garbage collector settings, not the daemon's")
    args = parser.parse_args()
    print("| tags on | batch | A µs/span | tags, no budgets | B µs/span | B - A "
          "| of which record_budgets | tags only / A | B / A | B / A, all rounds summed "
          "| B's folds (ms each) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    profile = cProfile.Profile() if args.profile else None
    for layout in args.layout or LAYOUTS:
        r = measure(layout, rounds=args.rounds, batch_requests=args.batch,
                    warmup=args.warmup, profile=profile, daemon_gc=not args.python_gc)
        m = r["us_per_span"]
        folds = ", ".join(f"{ms:.0f}" for ms in r["folds_ms"])
        print(f"| {layout}s | {args.batch} x {SPANS_PER_REQUEST} | {m['none']:.2f} | "
              f"{m['tags']:.2f} | {m['budgets']:.2f} | {m['budgets'] - m['none']:+.2f} | "
              f"{m['record_budgets']:.2f} | {r['tags_increase']:+.1%} | {r['increase']:+.1%} "
              f"| {r['total_increase']:+.1%} | {len(r['folds_ms'])} ({folds or '-'}) |")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
