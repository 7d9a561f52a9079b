"""What 20 budgets and 1,000 teams' tags cost the ingest path, counted in instructions by
valgrind's callgrind rather than timed: the same count on a busy machine as on an idle one, so
a difference of a fraction of a percent between A and B is a difference in the code.

bench.budgetprof times the comparison; on this shared machine its rounds still move by a few
percent, about the size of the goal (5 %). Here each configuration (A: no budgets, no tags;
the tags alone; B: bench.budgets' 20 budgets and the tags of 1,000 teams) runs in a child
process under callgrind twice, `--warmup` flushes and then none, and `--warmup` flushes and
then `--rounds`; the difference over `--rounds` is one flush's instructions, whatever the
child's start-up, imports, price table and request building cost (both runs build the same
requests, all before their first flush). The requests are the same bytes in every run (one
nonce and one time), the hash seed is fixed, and the flush clock is simulated: it advances
by what a flush's spans take at ASSUMED_SPANS_PER_S, so the journal's folds and the tags' end
times fall due as in the daemon at full load, not as under valgrind's slowdown.

What a count does not see: the kernel's work (the write and fsync of the WAL, the journal
row's pages among them), cycles lost to cache misses (but see --cache-sim), and what falls
due less often than the measured window reaches: a fold every FOLD_INTERVAL_NS and a tag's
owed end time every TAG_TIME_LAG_NS. bench.budgetprof's CPU time over all its rounds counts
those.

With `--cache-sim` callgrind also simulates the data caches (their sizes the host's, first and
last level) and counts their misses: where B's extra instructions are few, what it costs more
may be memory it touches.

Run: python -m bench.budgetcount [--layout resource|span] [--rounds N] [--warmup N]
     [--batch REQUESTS] [--cache-sim] [--keep DIR]
     (about 30 minutes for both layouts on 2 cores; needs valgrind)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.payload import LAYOUTS, SPANS_PER_REQUEST, Layout

CONFIGS = ("none", "tags", "budgets")  # as bench.budgetprof.CONFIGS, without importing it here
BATCH_REQUESTS = 4  # requests a flush by default, as bench.budgetprof's
# The daemon's rate at full load on this machine, about (BENCHMARKS.md): what a simulated
# flush clock advances by per span.
ASSUMED_SPANS_PER_S = 100_000
NONCE = 0x5EED
ROOT = Path(__file__).resolve().parent.parent
# What valgrind prints at exit: instructions, and with --cache-sim the simulated cache's
# data misses (first level, and last level: the host's sizes).
EVENTS = {"instructions": re.compile(r"Collected\s*:\s*([\d,]+)"),
          "D1 misses": re.compile(r"D1\s+misses:\s*([\d,]+)"),
          "LL misses": re.compile(r"LL misses:\s*([\d,]+)")}


def child(name: str, layout: Layout, warmup: int, rounds: int, now_ns: int,
          batch: int = BATCH_REQUESTS) -> None:
    """One configuration's flushes, in this process (run under callgrind by main)."""
    # Imported here: the parent needs none of the collector.
    from bench.budgetprof import ingest, setup
    from collector.daemon import tune_garbage_collector
    from collector.store import sqlite as store

    parts = setup(layout, nonce=NONCE, now_ns=now_ns)
    factory = parts.factories[name]
    flushes = [[factory.request(number * batch + i) for i in range(batch)]
               for number in range(warmup + rounds)]
    step_ns = batch * SPANS_PER_REQUEST * 1_000_000_000 // ASSUMED_SPANS_PER_S
    tune_garbage_collector()  # as the daemon, once loaded
    with tempfile.TemporaryDirectory() as tmp:
        into = store.SQLiteStore(Path(tmp) / "count.db", retention_s=86400,
                                 budgets=parts.budgets[name])
        db = into._open()
        commit_ns = now_ns
        for bodies in flushes:
            commit_ns += step_ns
            ingest(into, db, bodies, parts.options[name], now_ns, commit_ns)
        db.close()


def count(name: str, layout: Layout, warmup: int, rounds: int, batch: int, now_ns: int,
          keep: Path | None, cache_sim: bool = False) -> dict[str, int]:
    """The events of one child run under callgrind (EVENTS: those it printed)."""
    out = (keep / f"callgrind.{layout}.{name}.{rounds}" if keep is not None
           else Path(os.devnull))
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            f"--cache-sim={'yes' if cache_sim else 'no'}",
            sys.executable, "-m", "bench.budgetcount", "--child", name, "--layout", layout,
            "--warmup", str(warmup), "--rounds", str(rounds), "--batch", str(batch),
            "--now", str(now_ns)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True,
                          check=False)
    found = {event: pattern.findall(done.stderr) for event, pattern in EVENTS.items()}
    if done.returncode != 0 or not found["instructions"]:
        raise RuntimeError(f"callgrind run failed ({' '.join(argv)}):\n{done.stderr[-2000:]}")
    return {event: int(values[-1].replace(",", "")) for event, values in found.items()
            if values}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, action="append")
    parser.add_argument("--rounds", type=int, default=10, help="measured flushes")
    parser.add_argument("--warmup", type=int, default=20,
                        help="flushes first (the planner meets the 1,000 teams in them)")
    parser.add_argument("--batch", type=int, default=BATCH_REQUESTS,
                        help="requests of 512 spans a flush (the daemon's flushes at full "
                        "load take about 32)")
    parser.add_argument("--cache-sim", action="store_true",
                        help="also count the simulated data cache's misses (about 2x slower)")
    parser.add_argument("--keep", type=Path, help="keep callgrind's files here")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--now", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, (args.layout or ["resource"])[0], args.warmup, args.rounds,
              args.now, args.batch)
        return 0
    if args.rounds < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1, --warmup at least 0")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    layouts: list[Layout] = args.layout or list(LAYOUTS)
    now_ns = time.time_ns()
    jobs = [(layout, name, rounds) for layout in layouts for name in CONFIGS
            for rounds in (0, args.rounds)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = dict(zip(jobs, pool.map(
            lambda job: count(job[1], job[0], args.warmup, job[2], args.batch, now_ns,
                              args.keep, args.cache_sim), jobs),
            strict=True))
    spans = args.rounds * args.batch * SPANS_PER_REQUEST
    print(f"A span's events (callgrind; {args.warmup} flushes of {args.batch} x "
          f"{SPANS_PER_REQUEST} spans, then {args.rounds} counted)\n\n"
          "| tags on | event | A | tags, no budgets | B | tags only / A | B / A |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for layout in layouts:
        for event in EVENTS:
            if event not in counts[(layout, "none", 0)]:
                continue
            per = {name: (counts[(layout, name, args.rounds)][event]
                          - counts[(layout, name, 0)][event]) / spans for name in CONFIGS}
            print(f"| {layout}s | {event} | {per['none']:,.1f} | {per['tags']:,.1f} "
                  f"| {per['budgets']:,.1f} | {per['tags'] / per['none'] - 1:+.2%} "
                  f"| {per['budgets'] / per['none'] - 1:+.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
