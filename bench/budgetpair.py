"""A and B in the daemon, paired: what 20 budgets and 1,000 teams' tags cost a collector
process, its CPU a span and its spans/s, in rounds of one run of each.

bench.run's budgets phase runs A and B one after the other on floating CPUs, each against its
own parse-only baseline; there B/A moved from 0.79 to 1.06 between neighbouring rounds. Here
the collector's CPU time a span is read from /proc within the measured window only (not its
start or warm-up), and the processes are pinned. A is a collector without [[budgets]] fed
requests without tags; B one with bench.budgets' 20 budgets and a webhook sink on a closed
port (every delivery fails and backs off, as a dead sink's would), fed the tags of 1,000
teams (`--b tags`: the tags alone; `--b none`: A again, a control for the harness's own bias).
Each run: a fresh collector and SQLite file, a load generator (closed loop, `--concurrency`
requests in flight) for `--warmup` then `--seconds` measured, its sums checked exact, and
B's budgets against its sessions (bench.budgets.check_budgets).

In turns (the default) a round runs A and B one after the other, A first in even rounds, the
collector alone on the last CPU and its load generator on the first, as a collector serving
exporters on other machines would be. `--together` runs both at once, each collector and its
load generator sharing a CPU, the two pairs' CPUs swapped every round: the machine's drift
is then shared, but two collectors and two generators compete for the caches, which costs the
one with more in memory more than running alone would. Rounds report B/A, with their median
and the ratio of the sums (pooled); the verdict is the mean over pairs of processes of each
pair's pooled B/A, with an interval over the pairs (block_ratios says why).

Run: python -m bench.budgetpair [--layout resource|span] [--transport http|grpc]
     [--rounds N] [--seconds S] [--warmup S] [--concurrency N] [--b budgets|tags|none]
     [--together] [--no-pin] [--alternate [--blocks K] [--slice-warmup S]]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.budgets import budgets_toml, check_budgets
from bench.payload import LAYOUTS, Layout
from bench.run import (
    FULL,
    RESULTS_DIR,
    Server,
    free_port,
    load_result,
    loadgen,
    start_collector,
)

CONFIGS = ("none", "budgets")
# What B may be instead: the tags alone (no [[budgets]]), or A again (a control: B/A then
# shows the harness's own bias and spread).
B_CHOICES = ("budgets", "tags", "none")
TRANSPORTS = ("http", "grpc")


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Processes started inside run on `cpu` only, every thread of theirs (a child inherits
    its parent's CPU mask); None leaves them to the scheduler."""
    if cpu is None:
        yield
        return
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mask)


def one_round(work: Path, number: int, layout: Layout, transport: str, *, seconds: float,
              warmup: float, concurrency: int, sessions: int, b: str = "budgets",
              together: bool = False, pin: bool = True) -> dict[str, Any]:
    """One run of A and one of B; each one's load generator's result, and B's budget check.
    `b` is what B is (B_CHOICES); its results are filed under "budgets" whatever it is.
    In turns (the default), one collector at a time, pinned to a CPU of its own and its load
    generator to the others, A first in even rounds. `together`, both at once; with `pin`,
    each collector and its load generator share one CPU, A's and B's swapped every round (the
    two CPUs' own speeds then cancel over an even number of rounds)."""
    order = CONFIGS if number % 2 == 0 else CONFIGS[::-1]
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        place: dict[str, tuple[int | None, int | None]] = {n: (None, None) for n in CONFIGS}
    elif together:
        place = {n: (cpus[(i + number) % 2],) * 2 for i, n in enumerate(CONFIGS)}
    else:
        place = {n: (cpus[-1], cpus[0]) for n in CONFIGS}
    results: dict[str, Any] = {}
    if together:
        _run(work, number, order, place, layout, transport, seconds=seconds, warmup=warmup,
             concurrency=concurrency, sessions=sessions, b=b, into=results)
    else:
        for name in order:
            _run(work, number, (name,), place, layout, transport, seconds=seconds,
                 warmup=warmup, concurrency=concurrency, sessions=sessions, b=b,
                 into=results)
    return results


def _start(work: Path, tag: str, name: str, b: str, cpu: int | None) -> Server:
    """Collector `name` ("none" or "budgets") on `cpu`: B with bench.budgets' budgets and a
    sink on a closed port when `b` is "budgets", else as A."""
    extra = budgets_toml(free_port()) if name == "budgets" and b == "budgets" else ""
    with pinned(cpu):
        return start_collector(work, tag, FULL, extra_toml=extra)


def _tagged(name: str, b: str) -> bool:
    """Whether collector `name` is sent the teams' tags."""
    return name == "budgets" and b != "none"


def _budget_check(servers: dict[str, Server]) -> dict[str, Any]:
    """B's budgets against its sessions (bench.budgets.check_budgets)."""
    db = servers["budgets"].db
    assert db is not None
    return check_budgets(db).as_dict()


def _run(work: Path, number: int, names: Sequence[str],
         place: dict[str, tuple[int | None, int | None]], layout: Layout, transport: str, *,
         seconds: float, warmup: float, concurrency: int, sessions: int, b: str,
         into: dict[str, Any]) -> None:
    """Collectors `names` driven at once, each on its (collector, load generator) CPUs."""
    servers: dict[str, Server] = {}
    runs: dict[str, subprocess.Popen[bytes]] = {}
    tags = {name: f"pair-{layout}-{transport}-{number}-{name}" for name in names}
    try:
        for name in names:
            servers[name] = _start(work, tags[name], name, b, place[name][0])
        for name in names:
            server = servers[name]
            with pinned(place[name][1]):
                run = loadgen(work, tags[name], server, transport, concurrency=concurrency,
                              sessions=sessions, duration_s=seconds, warmup_s=warmup,
                              verify_db=server.db, tagged=_tagged(name, b), layout=layout,
                              background=True)
            assert isinstance(run, subprocess.Popen)
            runs[name] = run
        for name, run in runs.items():
            run.wait(timeout=warmup + seconds + 300)
            into[name] = load_result(work, tags[name])
        if "budgets" in servers and b == "budgets":
            into["budget_check"] = _budget_check(servers)
    finally:
        for server in servers.values():
            server.stop()


def alternating(work: Path, layout: Layout, transport: str, *, slices: int, seconds: float,
                warmup: float, slice_warmup: float, concurrency: int, sessions: int,
                b: str = "budgets", block: int = 0, pin: bool = True
                ) -> Iterator[dict[str, Any]]:
    """A and B started once, warmed for `warmup` each, then driven in turn, `slices` times
    each (A first in even slices), by a load generator pinned apart from them: the pairs of
    neighbouring slices are seconds apart, so the machine's drift over a round of fresh
    processes does not come between A and B. Every slice's sums are checked exact against
    the whole run so far. Each slice's `slice_warmup` refills the caches the other collector
    used. B folds its journal on a timer, so it folds about twice as often a span as when it
    runs alone: that is counted against B. Yields each slice pair as one_round would.
    A process keeps its own luck for its life (where its heap and hash seeds put things
    against the caches: a collector against itself came out 2 % apart over 12 slices), so
    main() runs `--blocks` of these, each with fresh collectors (`block` names its files).
    `pin` False leaves the collectors and load generators to the scheduler: a collector's
    writer thread and event loop may then run on different cores, as they would in service."""
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, load_cpu = (cpus[-1], cpus[0]) if pin and len(cpus) >= 2 else (None, None)
    base = f"alt-{layout}-{transport}-{block}"
    servers: dict[str, Server] = {}
    try:
        for name in CONFIGS:
            servers[name] = _start(work, f"{base}-{name}", name, b, server_cpu)
        for number in range(-1, slices):  # -1: the warm-up, not measured
            run: dict[str, Any] = {}
            for name in CONFIGS if number % 2 == 0 else CONFIGS[::-1]:
                server = servers[name]
                with pinned(load_cpu):
                    result = loadgen(work, f"{base}-{name}-{number}", server, transport,
                                     concurrency=concurrency, sessions=sessions,
                                     duration_s=seconds if number >= 0 else warmup,
                                     warmup_s=slice_warmup, verify_db=server.db,
                                     carry=work / f"{base}-{name}-sums.json",
                                     tagged=_tagged(name, b), layout=layout)
                assert isinstance(result, dict)
                run[name] = result
            if number < 0:
                continue
            if number == slices - 1 and b == "budgets":
                run["budget_check"] = _budget_check(servers)
            run["block"] = block
            yield run
    finally:
        for server in servers.values():
            server.stop()


def cpu(run: dict[str, Any], name: str) -> float:
    """A round's collector `name` ("none" or "budgets"): its CPU µs a span in the window."""
    value: float = run[name]["server_window_cpu_us_per_span"]
    return value


def system(run: dict[str, Any], name: str) -> float:
    """The kernel's part of cpu(run, name)."""
    value: float = run[name]["server_window_system_us_per_span"]
    return value


def bootstrap_interval(values: Sequence[float], statistic: Callable[[list[float]], float], *,
                       resamples: int = 2000, level: float = 0.9) -> tuple[float, float]:
    """A bootstrap interval of `statistic` over `values`: percentiles of its value over
    resamples, with a fixed seed, so a saved run's interval can be recomputed."""
    rng = random.Random(0)
    drawn = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return drawn[int(tail * resamples)], drawn[int((1 - tail) * resamples) - 1]


def median_interval(values: Sequence[float]) -> tuple[float, float]:
    """How far apart the rounds leave their median, which a median alone does not say."""
    return bootstrap_interval(values, statistics.median)


def block_ratios(rounds: Sequence[dict[str, Any]]) -> list[float]:
    """Per pair of processes (a block of --alternate, else a round: each has fresh ones), B's
    CPU a span summed over its slices against A's. The pairs, not the slices, are what is
    independent: a pair keeps its luck against the caches for its life, so its slices lean
    together, and an interval over slices is narrower than the data allow."""
    per: dict[int, list[float]] = {}
    for number, r in enumerate(rounds):
        sums = per.setdefault(r.get("block", number), [0.0, 0.0])
        sums[0] += cpu(r, "budgets")
        sums[1] += cpu(r, "none")
    return [b / a for b, a in per.values()]


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """How far apart the pairs leave their mean."""
    return bootstrap_interval(values, statistics.fmean)


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round B over A (CPU a span in the window; spans/s), their medians and ranges; and
    per pair of processes (block_ratios), their mean with an interval over the pairs, the
    verdict's statistic since the eighth pass."""
    ratios = [cpu(r, "budgets") / cpu(r, "none") for r in rounds]
    rate = [r["budgets"]["spans_per_s"] / r["none"]["spans_per_s"] for r in rounds]
    low, high = median_interval(ratios)
    blocks = block_ratios(rounds)
    block_low, block_high = mean_interval(blocks) if len(blocks) > 1 else (blocks[0],) * 2
    return {
        "block_ratios": blocks,
        "cpu_increase_blocks_mean": statistics.fmean(blocks) - 1,
        "cpu_increase_blocks_mean_90": (block_low - 1, block_high - 1),
        "cpu_ratios": ratios, "rate_ratios": rate,
        "cpu_increase_median": statistics.median(ratios) - 1,
        "cpu_increase_median_90": (low - 1, high - 1),
        "loss_median": 1 - statistics.median(rate),
        # Over all rounds together: B's CPU per span summed over A's.
        "cpu_increase_pooled": sum(cpu(r, "budgets") for r in rounds)
        / sum(cpu(r, "none") for r in rounds) - 1,
        "exact": all(r[n]["verification"]["ok"] for r in rounds for n in CONFIGS),
        "budgets_ok": all(r["budget_check"]["ok"] for r in rounds if "budget_check" in r),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=LAYOUTS, action="append")
    parser.add_argument("--transport", choices=TRANSPORTS, action="append")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured, each round")
    parser.add_argument("--warmup", type=float, default=4.0,
                        help="seconds first (B's planner meets the 1,000 teams in them)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight, per load generator")
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--together", action="store_true",
                        help="A and B at once, each with its load generator, not in turns")
    parser.add_argument("--alternate", action="store_true",
                        help="A and B started once and driven in turn, --rounds slices of "
                        "--seconds each (see alternating())")
    parser.add_argument("--blocks", type=int, default=1,
                        help="with --alternate: this many runs of --rounds slices, each with "
                        "fresh collectors")
    parser.add_argument("--slice-warmup", type=float, default=0.5,
                        help="with --alternate: seconds unmeasured at each slice's start")
    parser.add_argument("--no-pin", action="store_true",
                        help="leave every process to the scheduler")
    parser.add_argument("--b", choices=B_CHOICES, default="budgets",
                        help="what B is: the budgets and tags, the tags alone, or A again")
    args = parser.parse_args()
    print("| tags on | transport | rounds | A CPU µs/span (median) | B CPU µs/span (median) "
          "| B/A CPU by round | B/A CPU, median (90 % interval) | pooled "
          "| pairs | B/A CPU, mean of pairs (90 % interval over pairs) "
          "| loss (1 - B/A spans/s), median | B/A spans/s by round | sums | budgets |\n"
          "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|---|", flush=True)
    ok = True
    mode = ("alternating" if args.alternate else "together" if args.together
            else "in turns")
    saved: dict[str, Any] = {"args": vars(args), "results": {}}
    with tempfile.TemporaryDirectory(prefix="budgetpair-") as tmp:
        work = Path(tmp)
        for layout in args.layout or ["resource"]:
            for transport in args.transport or list(TRANSPORTS):
                rounds: list[dict[str, Any]] = []
                if args.alternate:
                    each: Iterator[dict[str, Any]] = itertools.chain.from_iterable(
                        alternating(work, layout, transport, slices=args.rounds,
                                    seconds=args.seconds, warmup=args.warmup,
                                    slice_warmup=args.slice_warmup,
                                    concurrency=args.concurrency, sessions=args.sessions,
                                    b=args.b, block=block, pin=not args.no_pin)
                        for block in range(args.blocks))
                else:
                    each = (one_round(work, number, layout, transport, seconds=args.seconds,
                                      warmup=args.warmup, concurrency=args.concurrency,
                                      sessions=args.sessions, b=args.b,
                                      together=args.together, pin=not args.no_pin)
                            for number in range(args.rounds))
                started = time.monotonic()
                for number, last in enumerate(each):
                    rounds.append(last)
                    print(f"  {layout} {transport} round {number + 1}: B/A CPU "
                          f"{cpu(last, 'budgets') / cpu(last, 'none'):.3f}, system µs/span "
                          f"A {system(last, 'none'):.2f} B {system(last, 'budgets'):.2f} "
                          f"({time.monotonic() - started:.0f} s)", flush=True)
                    started = time.monotonic()
                s = summary(rounds)
                ok = ok and s["exact"] and s["budgets_ok"]
                a = statistics.median(cpu(r, "none") for r in rounds)
                b = statistics.median(cpu(r, "budgets") for r in rounds)
                saved["results"][f"{layout}/{transport}"] = {"rounds": rounds, "summary": s}
                print(f"| {layout}s, B = {args.b}, {mode} | {transport} | {len(rounds)} | "
                      f"{a:.2f} | {b:.2f} | "
                      f"{' '.join(f'{x:.3f}' for x in s['cpu_ratios'])} | "
                      f"{s['cpu_increase_median']:+.1%} "
                      f"({s['cpu_increase_median_90'][0]:+.1%} … "
                      f"{s['cpu_increase_median_90'][1]:+.1%}) | "
                      f"{s['cpu_increase_pooled']:+.1%} | "
                      f"{len(s['block_ratios'])} | "
                      f"{s['cpu_increase_blocks_mean']:+.1%} "
                      f"({s['cpu_increase_blocks_mean_90'][0]:+.1%} … "
                      f"{s['cpu_increase_blocks_mean_90'][1]:+.1%}) | "
                      f"{s['loss_median']:.1%} | "
                      f"{' '.join(f'{x:.3f}' for x in s['rate_ratios'])} | "
                      f"{'exact' if s['exact'] else 'NOT EXACT'} | "
                      f"{'ok' if s['budgets_ok'] else 'FAILED'} |", flush=True)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"budgetpair-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"raw results: {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
