"""The whole benchmark in one command: collector vs parse-only baseline, latency, scaling, profile.

    .venv/bin/python -m bench.run            # about 5 minutes on 2 cores
    .venv/bin/python -m bench.run --quick    # about a minute; same phases, shorter

Every server and every load generator is its own subprocess on free 127.0.0.1 ports, every
collector run gets a fresh SQLite file in a temporary directory, and every collector run is
followed by an exact check of the committed sums. Headline figures are ratios to the baseline
measured in the same run, because absolute spans/s mean little across machines.

Phases:
1. throughput, per transport (HTTP protobuf, gRPC): baseline, then collector, closed loop;
2. latency at 80 % of the collector's sustained rate (open loop) vs 2 x flush interval + 50 ms;
3. scaling: the same number of spans into 100 sessions and into 100,000 sessions, with the
   collector's debug log parsed for per-flush cost; peak RSS; bytes per span id on disk;
   plus an in-process tracemalloc measure of bytes per session and per span in a batch;
4. profile: py-spy samples the collector under HTTP load (skipped if py-spy is missing);
5. sweep: closed loop at 1, 8 and 64 requests in flight, per
   transport, baseline and collector back to back at each level; ratios and the p50 ack gap.
   Twice: with the spans of a request in 512 sessions (the fan-out above) and in 8.
6. budgets: per layout (tags on the resources, as OTEL_RESOURCE_ATTRIBUTES sends them, and
   on every span) and transport, rounds of A (no budgets, no tags) and B (20 budgets and an
   alert sink, tags of 1,000 teams), interleaved, each against its own baseline; after every
   B run the fleet budget's spend (rows and journal) must equal the sessions' cost and the
   team budget must have 1,000 instances.

Results: a markdown report on stdout and, with the raw JSON, in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.budgets import BUDGETS, budgets_toml, check_budgets
from bench.payload import (
    LAYOUTS,
    RESOURCES_PER_REQUEST,
    SPANS_PER_REQUEST,
    TAGS,
    Layout,
    RequestFactory,
    decode_check,
)
from bench.verify import storage_footprint

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
PYTHON = sys.executable
HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
LOADGEN_SLACK_S = 300.0  # beyond its planned duration, before a load generator is killed
FLUSH_LINE = re.compile(
    r"flushed (\d+) spans into (\d+) sessions \((\d+) duplicates\) in ([\d.]+) ms")
# Issue 3's goal for the p99 ack at 80 % load: 2 x 200 ms flush period + 50 ms. It stays the
# bar now that a batch commits as soon as the writer is free (flush.interval_ms = 0).
LATENCY_GOAL_MS = 450
RATIO_GOAL = 0.67
# Issue 11's goals for the concurrency sweep: ratio to the baseline by requests in flight, and
# at one in flight, the most the collector's p50 ack may exceed the baseline's.
SWEEP_LEVELS = (1, 8, 64)
SWEEP_RATIO_GOALS = {8: 0.85, 64: 0.9}
SWEEP_P50_GAP_GOAL_MS = 10.0
RSS_GOAL_MB = 150
# The budgets issue's goal: 20 budgets over 1,000 dimension values cost ingestion at most 5 %.
BUDGETS_LOSS_GOAL = 0.05
BUDGET_CONFIGS = ("none", "budgets")
LATENCY_LOAD_FRACTION = 0.8
OPEN_LOOP_MAX_IN_FLIGHT = 512


@dataclass(frozen=True, slots=True)
class Settings:
    """Sizes of one benchmark run; `--quick` shrinks durations and span counts only."""

    throughput_s: float
    warmup_s: float
    latency_s: float
    scaling_spans: int
    profile_s: float
    concurrency: int
    flush_interval_ms: int
    sweep_s: float = 10
    budgets_s: float = 10
    budget_rounds: int = 5
    # Where the tags travel: on the resource (OTEL_RESOURCE_ATTRIBUTES, one session a
    # resource: the set-up the issue describes) and on every span (the costly case).
    budget_layouts: tuple[Layout, ...] = ("resource", "span")
    sessions: int = 1000
    # The sweep's request shapes: the benchmark's fan-out (a request's 512 spans in 512
    # sessions, as a gateway batching a whole fleet sends) and spans in a handful of sessions
    # (as one agent process's SDK exporter sends).
    sweep_sessions: tuple[int, ...] = (1000, 8)
    scaling_sessions: tuple[int, int] = (100, 100_000)
    collector_src: str | None = None  # a directory holding another `collector` package


FULL = Settings(throughput_s=20, warmup_s=3, latency_s=20, scaling_spans=1_000_000,
                profile_s=15, concurrency=64, flush_interval_ms=0)
QUICK = Settings(throughput_s=5, warmup_s=1, latency_s=5, scaling_spans=100_000,
                 profile_s=5, concurrency=64, flush_interval_ms=0, sweep_s=5, budgets_s=5,
                 budget_rounds=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


class Server:
    """A server subprocess: started, awaited until its ports accept, stopped with SIGTERM."""

    def __init__(self, name: str, argv: Sequence[str], *, http_port: int, grpc_port: int,
                 log: Path, db: Path | None = None, pythonpath: str | None = None,
                 cwd: Path = ROOT) -> None:
        self.name = name
        self.log = log
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.db = db  # the collector's SQLite file; None for the baseline
        ports = (http_port, grpc_port)
        self._log_file = log.open("wb")
        env = dict(os.environ)
        if pythonpath:
            # Benchmark another copy of the package (an A/B of a fix) instead of the tree's.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, (pythonpath,
                                                              env.get("PYTHONPATH"))))
        self.proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=self._log_file, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(_port_open(p) for p in ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not start; see {log}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> str:
        """SIGTERM, wait (bounded), return what it printed on stdout."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=STOP_TIMEOUT_S)
        self._log_file.close()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            print(f"warning: {self.name} exited with {self.proc.returncode}; see {self.log}",
                  file=sys.stderr)
        return out.decode(errors="replace")


@contextlib.contextmanager
def running(server_factory: Any) -> Iterator[Server]:
    server: Server = server_factory()
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


def start_baseline(work: Path, tag: str) -> Server:
    http, grpc_port = free_port(), free_port()
    return Server("baseline", [PYTHON, "-m", "bench.baseline", "--http-port", str(http),
                               "--grpc-port", str(grpc_port)],
                  http_port=http, grpc_port=grpc_port, log=work / f"baseline-{tag}.log")


def listeners_toml(grpc_port: int, http_port: int) -> str:
    """Every listener of one benchmarked collector: OTLP on its own free ports, and no ops or
    web listener. Their defaults are fixed ports (8888, 8889), so a second collector on the
    host would clash on them and refuse to start; the benchmarks measure the export path."""
    return ("[receivers.otlp]\n"
            f'grpc_endpoint = "{HOST}:{grpc_port}"\n'
            f'http_endpoint = "{HOST}:{http_port}"\n'
            '[ops]\nendpoint = ""\n'
            '[web]\nendpoint = ""\n')


def start_collector(work: Path, tag: str, settings: Settings, *,
                    log_level: str = "info", extra_toml: str = "") -> Server:
    http, grpc_port = free_port(), free_port()
    db = work / f"collector-{tag}.db"
    config = work / f"collector-{tag}.toml"
    config.write_text(
        listeners_toml(grpc_port, http) +
        "[storage]\n"
        f'sqlite_path = "{db}"\n'
        "[flush]\n"
        f"interval_ms = {settings.flush_interval_ms}\n"
        "[log]\n"
        f'level = "{log_level}"\n' + extra_toml)
    return Server("collector", [PYTHON, "-m", "collector", "serve", "--config", str(config)],
                  http_port=http, grpc_port=grpc_port, log=work / f"collector-{tag}.log", db=db,
                  pythonpath=settings.collector_src or str(ROOT),
                  # Not the tree's root: `python -m` puts the working directory first on
                  # sys.path, which would shadow --collector-src.
                  cwd=work)


def loadgen(work: Path, tag: str, server: Server, transport: str, *, concurrency: int,
            sessions: int, duration_s: float = 0, warmup_s: float = 0,
            requests: int | None = None, rate: float | None = None,
            verify_db: Path | None = None, background: bool = False, tagged: bool = False,
            layout: Layout = "span", carry: Path | None = None
            ) -> dict[str, Any] | subprocess.Popen[bytes]:
    """Run bench.loadgen in its own process; its JSON result (or the process if background).
    `carry`: earlier runs' sums into the same database (bench.loadgen's --carry)."""
    port = server.http_port if transport == "http" else server.grpc_port
    out = _load_path(work, tag)
    argv = [PYTHON, "-m", "bench.loadgen", "--transport", transport,
            "--target", f"{HOST}:{port}", "--concurrency", str(concurrency),
            "--sessions", str(sessions), "--pid", str(server.pid), "--json-out", str(out)]
    if requests is not None:
        argv += ["--requests", str(requests)]
    else:
        argv += ["--duration", str(duration_s), "--warmup", str(warmup_s)]
    if rate is not None:
        argv += ["--rate", f"{rate:.1f}"]
    if verify_db is not None:
        argv += ["--verify-db", str(verify_db)]
    if carry is not None:
        argv += ["--carry", str(carry)]
    if tagged:
        argv.append("--tagged")
    argv += ["--layout", layout]
    if background:
        return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    planned = duration_s + warmup_s + (requests or 0) * SPANS_PER_REQUEST / 5_000
    subprocess.run(argv, cwd=ROOT, check=False, timeout=planned + LOADGEN_SLACK_S)
    return load_result(work, tag)


def _load_path(work: Path, tag: str) -> Path:
    return work / f"load-{tag}.json"


def load_result(work: Path, tag: str) -> dict[str, Any]:
    """The JSON result of loadgen(work, tag, ...) once its process has ended (for a
    background one, after its wait)."""
    result: dict[str, Any] = json.loads(_load_path(work, tag).read_text())
    return result


LOADAVG_SEEN: list[float] = []  # 1-minute load average at the start of every measurement


def _say(message: str) -> None:
    """Progress on stderr; also notes the load average, since other work on the machine
    (a test suite, another benchmark) skews every figure and must show in the report."""
    with contextlib.suppress(OSError, ValueError), open("/proc/loadavg") as loadavg:
        LOADAVG_SEEN.append(float(loadavg.read().split()[0]))
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- phases --------------------------------------------------------------------------------


def phase_throughput(work: Path, s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for transport in ("http", "grpc"):
        _say(f"throughput {transport}: baseline")
        with running(lambda t=transport: start_baseline(work, f"tp-{t}")) as base:
            b = loadgen(work, f"tp-{transport}-baseline", base, transport,
                        concurrency=s.concurrency, sessions=s.sessions,
                        duration_s=s.throughput_s, warmup_s=s.warmup_s)
            summary = base.stop().strip().splitlines()
        assert isinstance(b, dict)
        b["baseline_counted"] = json.loads(summary[-1]) if summary else None
        _say(f"throughput {transport}: collector")
        with running(lambda t=transport: start_collector(work, f"tp-{t}", s)) as col:
            c = loadgen(work, f"tp-{transport}-collector", col, transport,
                        concurrency=s.concurrency, sessions=s.sessions,
                        duration_s=s.throughput_s, warmup_s=s.warmup_s,
                        verify_db=col.db)
        assert isinstance(c, dict)
        results[transport] = {"baseline": b, "collector": c,
                              "ratio": c["spans_per_s"] / b["spans_per_s"]}
    return results


def phase_latency(work: Path, s: Settings, throughput: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for transport in ("http", "grpc"):
        rate = LATENCY_LOAD_FRACTION * throughput[transport]["collector"]["spans_per_s"]
        _say(f"latency {transport}: {rate:,.0f} spans/s offered")
        with running(lambda t=transport: start_collector(work, f"lat-{t}", s)) as col:
            r = loadgen(work, f"lat-{transport}", col, transport,
                        concurrency=OPEN_LOOP_MAX_IN_FLIGHT, sessions=s.sessions,
                        duration_s=s.latency_s, warmup_s=s.warmup_s, rate=rate,
                        verify_db=col.db)
        assert isinstance(r, dict)
        r["offered_spans_per_s"] = rate
        r["goal_ms"] = LATENCY_GOAL_MS
        results[transport] = r
    return results


def phase_sweep(work: Path, s: Settings) -> dict[str, Any]:
    """Closed loop at each of SWEEP_LEVELS requests in flight, for each request shape
    (`sweep_sessions`). At each level the baseline and the collector run back to back, so the
    noise of a shared machine drifts less between the two halves of a ratio than it would
    across a whole transport's runs."""
    results: dict[str, Any] = {}
    for sessions in s.sweep_sessions:
        for transport in ("http", "grpc"):
            for level in SWEEP_LEVELS:
                tag = f"sw-{sessions}-{transport}-{level}"
                _say(f"sweep over {sessions:,} sessions, {transport}, {level} in flight: "
                     f"baseline")
                with running(lambda tag=tag: start_baseline(work, tag)) as base:
                    b = loadgen(work, f"{tag}-baseline", base, transport, concurrency=level,
                                sessions=sessions, duration_s=s.sweep_s,
                                warmup_s=s.warmup_s)
                _say(f"sweep over {sessions:,} sessions, {transport}, {level} in flight: "
                     f"collector")
                with running(lambda tag=tag: start_collector(work, tag, s)) as col:
                    c = loadgen(work, f"{tag}-collector", col, transport, concurrency=level,
                                sessions=sessions, duration_s=s.sweep_s,
                                warmup_s=s.warmup_s, verify_db=col.db)
                assert isinstance(b, dict) and isinstance(c, dict)
                results[f"{sessions}/{transport}/{level}"] = {
                    "transport": transport, "in_flight": level, "sessions": sessions,
                    "baseline": b, "collector": c,
                    "ratio": c["spans_per_s"] / b["spans_per_s"],
                    "p50_gap_ms": round(c["latency_ms"]["p50"] - b["latency_ms"]["p50"], 1)}
    return results


def phase_budgets(work: Path, s: Settings) -> dict[str, Any]:
    """Per layout and transport, `budget_rounds` rounds of A ("none": no budgets, no tags)
    then B ("budgets": bench.budgets' 20 budgets and a sink, tags of 1,000 teams on the
    resources or on every span), each run as a baseline then a collector back to back on the
    same payload, so every ratio has its own baseline and the machine's drift shows as spread
    between rounds, not as a loss. Results: layout -> transport -> rounds and means."""
    results: dict[str, Any] = {}
    for layout in s.budget_layouts:
        results[layout] = {}
        for transport in ("http", "grpc"):
            results[layout][transport] = _budget_rounds(work, s, layout, transport)
    return results


def _budget_rounds(work: Path, s: Settings, layout: Layout, transport: str
                   ) -> dict[str, Any]:
    rounds: list[dict[str, Any]] = []
    for number in range(1, s.budget_rounds + 1):
        row: dict[str, Any] = {"round": number}
        for name in BUDGET_CONFIGS:
            tagged = name == "budgets"
            tag = f"bud-{layout}-{transport}-{number}-{name}"
            what = f"budgets, tags on {layout}s, {transport}, round {number}/{s.budget_rounds}"
            _say(f"{what}, {name}: baseline")
            with running(lambda tag=tag: start_baseline(work, tag)) as base:
                b = loadgen(work, f"{tag}-baseline", base, transport,
                            concurrency=s.concurrency, sessions=s.sessions,
                            duration_s=s.budgets_s, warmup_s=s.warmup_s, tagged=tagged,
                            layout=layout)
            # Closed at once: a sink that refuses every connection, as a down one would.
            extra = budgets_toml(free_port()) if tagged else ""
            _say(f"{what}, {name}: collector")
            with running(lambda tag=tag, extra=extra: start_collector(
                    work, tag, s, extra_toml=extra)) as col:
                c = loadgen(work, f"{tag}-collector", col, transport,
                            concurrency=s.concurrency, sessions=s.sessions,
                            duration_s=s.budgets_s, warmup_s=s.warmup_s,
                            verify_db=col.db, tagged=tagged, layout=layout)
                assert isinstance(c, dict) and col.db is not None
                if tagged:
                    c["budget_check"] = check_budgets(col.db).as_dict()
            assert isinstance(b, dict)
            row[name] = {"baseline": b, "collector": c,
                         "ratio": c["spans_per_s"] / b["spans_per_s"]}
        row["b_over_a"] = row["budgets"]["ratio"] / row["none"]["ratio"]
        rounds.append(row)
    means = {name: sum(r[name]["ratio"] for r in rounds) / len(rounds)
             for name in BUDGET_CONFIGS}
    cpu = {name: sum(r[name]["collector"]["server_cpu_us_per_span"] for r in rounds)
           / len(rounds) for name in BUDGET_CONFIGS}
    return {
        "rounds": rounds, "mean_ratio": means,
        "loss": 1 - means["budgets"] / means["none"],
        "paired_b_over_a": sorted(r["b_over_a"] for r in rounds),
        "mean_cpu_us_per_span": cpu,
        "cpu_increase": cpu["budgets"] / cpu["none"] - 1,
    }


def _sweep_goal(r: dict[str, Any]) -> tuple[str, bool] | None:
    """The goal at this level and whether it was met; None where there is none."""
    if r["in_flight"] == 1:
        return (f"p50 gap ≤ {SWEEP_P50_GAP_GOAL_MS:.0f} ms",
                r["p50_gap_ms"] <= SWEEP_P50_GAP_GOAL_MS)
    goal = SWEEP_RATIO_GOALS.get(r["in_flight"])
    return None if goal is None else (f"≥ {goal}x", r["ratio"] >= goal)


def parse_flushes(log: Path) -> dict[str, Any]:
    """Per-flush figures from the collector's debug log lines."""
    spans, sessions, ms = [], [], []
    with log.open(errors="replace") as lines:
        for line in lines:
            m = FLUSH_LINE.search(line)
            if m and int(m.group(1)):
                spans.append(int(m.group(1)))
                sessions.append(int(m.group(2)))
                ms.append(float(m.group(4)))
    if not ms:
        return {"flushes": 0}
    ordered = sorted(ms)
    return {
        "flushes": len(ms),
        "total_flush_ms": round(sum(ms), 1),
        "mean_flush_ms": round(sum(ms) / len(ms), 1),
        "p50_flush_ms": ordered[len(ordered) // 2],
        "max_flush_ms": ordered[-1],
        "mean_spans_per_flush": round(sum(spans) / len(spans)),
        "mean_sessions_per_flush": round(sum(sessions) / len(sessions)),
        "us_per_span": round(sum(ms) * 1000 / sum(spans), 2),
    }


def phase_scaling(work: Path, s: Settings) -> dict[str, Any]:
    results: dict[str, Any] = {}
    requests = math.ceil(s.scaling_spans / SPANS_PER_REQUEST)
    for sessions in s.scaling_sessions:
        _say(f"scaling: {requests * SPANS_PER_REQUEST:,} spans into {sessions:,} sessions")
        tag = f"scale-{sessions}"
        with running(lambda tag=tag: start_collector(work, tag, s, log_level="debug")) as col:
            r = loadgen(work, tag, col, "http", concurrency=s.concurrency, sessions=sessions,
                        requests=requests, verify_db=col.db)
            assert isinstance(r, dict) and col.db is not None
            r["storage"] = storage_footprint(col.db)
            # Memory once the load is over: what the sessions themselves keep resident.
            r["server_rss_after_load_kb"] = _status_kb(col.pid, "VmRSS:")
        r["flush"] = parse_flushes(col.log)
        results[str(sessions)] = r
    results["memory_model"] = batch_memory()
    return results


def _status_kb(pid: int, field: str) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def batch_memory(spans: int = 100_000) -> dict[str, float]:
    """Bytes a pending batch holds per span and per session (tracemalloc, in this process).

    The collector keeps per-session state only for sessions touched since the last flush
    (collector.accounting.aggregate.Batch); a session's row lives in SQLite. So "memory per
    session" is the cost of one SessionDelta in a batch, measured here by folding the same
    records into 100 and into `spans` sessions.
    """
    from collector.accounting.aggregate import Batch
    from collector.signals.traces import SpanUsage

    def records(n_sessions: int) -> list[SpanUsage]:
        return [SpanUsage(os.urandom(24), f"bench-session-{i % n_sessions:07d}", 1, 2, 1, 300,
                          100, 10, 0, 0, 0.01, True, "gpt-4o-mini", None, None, None, None)
                for i in range(spans)]

    record_bytes: dict[int, int] = {}
    batch_bytes: dict[int, int] = {}
    for n_sessions in (100, spans):
        tracemalloc.start()
        recs = records(n_sessions)
        record_bytes[n_sessions] = tracemalloc.get_traced_memory()[0]
        batch = Batch()
        batch.add(recs)
        batch_bytes[n_sessions] = tracemalloc.get_traced_memory()[0] - record_bytes[n_sessions]
        tracemalloc.stop()
        del batch, recs
    return {
        "record_bytes_per_span": round(record_bytes[100] / spans, 1),
        "batch_bytes_per_span_excluding_records": round(batch_bytes[100] / spans, 1),
        "batch_bytes_per_session": round((batch_bytes[spans] - batch_bytes[100])
                                         / (spans - 100), 1),
    }


def phase_profile(work: Path, s: Settings) -> dict[str, Any]:
    spy = shutil.which("py-spy", path=str(Path(PYTHON).parent)) or shutil.which("py-spy")
    if spy is None:
        _say("profile: py-spy not installed; skipped (pip install py-spy)")
        return {"skipped": "py-spy not installed"}
    _say(f"profile: py-spy on the collector under HTTP load for {s.profile_s:.0f} s")
    raw = work / "profile.txt"
    with running(lambda: start_collector(work, "profile", s)) as col:
        load = loadgen(work, "profile", col, "http", concurrency=s.concurrency,
                       sessions=s.sessions, duration_s=s.profile_s + 2, warmup_s=s.warmup_s,
                       background=True)
        assert isinstance(load, subprocess.Popen)
        time.sleep(s.warmup_s)
        spy_run = subprocess.run(
            [spy, "record", "--pid", str(col.pid), "--duration", str(int(s.profile_s)),
             "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
             "--output", str(raw)],
            capture_output=True, check=False, timeout=s.profile_s + 60)
        load.wait(timeout=s.profile_s + s.warmup_s + LOADGEN_SLACK_S)
    if spy_run.returncode != 0 or not raw.exists():
        return {"skipped": f"py-spy failed: {spy_run.stderr.decode(errors='replace')[-500:]}"}
    shutil.copy(raw, RESULTS_DIR / "profile-collapsed.txt")
    return summarize_profile(raw)


# Frames at the bottom of every stack (interpreter, event loop, thread start): 100 % inclusive
# and uninformative, so left out of the inclusive ranking.
STACK_ROOTS = frozenset({"<module>", "main", "_run", "_serve", "run", "Runner.run",
                         "Thread._bootstrap", "Thread._bootstrap_inner", "Thread.run",
                         "_run_module_as_main", "_run_code"})


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)': group a function's lines together."""
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not m:
        return frame.strip()
    func, path = m.groups()
    parts = Path(path).parts
    if "site-packages" in parts:
        short = "/".join(parts[parts.index("site-packages") + 1:])
    elif "collector" in parts:
        short = "/".join(parts[parts.index("collector"):])
    else:
        short = parts[-1] if parts else path
    return f"{func} ({short})"


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares by function, from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    thread_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        names = [_frame_name(f) for f in frames if not f.startswith(("thread", "process"))]
        if not names:
            continue
        total += count
        thread_counts[thread] += count
        self_counts[names[-1]] += count
        for name in set(names):
            incl_counts[name] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        ranked = [(name, n) for name, n in counter.most_common()
                  if name.split(" (")[0] not in STACK_ROOTS][:top]
        return [(name, round(100 * n / total, 1)) for name, n in ranked]

    return {"samples": total, "threads": shares(thread_counts),
            "self": shares(self_counts), "inclusive": shares(incl_counts)}


# -- report --------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": str(os.cpu_count()), "cpu": model,
            "python": platform.python_version(), "platform": platform.platform()}


def collector_version(settings: Settings) -> str:
    """Which collector was measured: a copy given on the command line, or this tree's commit."""
    if settings.collector_src:
        return f"copy in {settings.collector_src}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "collector"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" with uncommitted changes in collector/" if dirty else "")


def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def _sums(r: dict[str, Any]) -> str:
    v = r.get("verification")
    if v is None:
        counted = r.get("baseline_counted")
        return f"n/a (parsed {counted['spans']:,} spans)" if counted else "n/a"
    if v["ok"]:
        return f"exact ({v['sessions_committed']:,} sessions)"
    return f"MISMATCH: {'; '.join(v['mismatches'][:2])}"


def report(results: dict[str, Any], s: Settings, command: str) -> str:
    out: list[str] = []
    m = results["machine"]
    out.append(f"Command: `{command}`  \nMachine: {m['nproc']} cores, {m['cpu']}, "
               f"Python {m['python']}  \nCollector: {results['collector']}  \n"
               f"Load: {SPANS_PER_REQUEST} spans/request, "
               f"16 attributes/span, {s.sessions:,} sessions, closed loop with "
               f"{s.concurrency} requests in flight, {s.warmup_s:.0f} s warm-up + "
               f"{s.throughput_s:.0f} s measured; flush.interval_ms = {s.flush_interval_ms}  \n"
               f"1-min load average at phase starts (this benchmark itself uses ~2): "
               f"{', '.join(f'{x:.1f}' for x in results.get('loadavg_at_phase_starts', []))}\n")
    names = {"http": "HTTP (protobuf)", "grpc": "gRPC"}
    for transport, t in results.get("throughput", {}).items():
        out.append(f"### Throughput, {names[transport]}\n")
        out.append("| server | spans/s | vs baseline | ack p50 ms | ack p99 ms | peak RSS MB "
                   "| server CPU (cores) | CPU µs/span | sums |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for role in ("baseline", "collector"):
            r = t[role]
            ratio = 1.0 if role == "baseline" else t["ratio"]
            out.append(f"| {role} | {r['spans_per_s']:,.0f} | {ratio:.2f}x | "
                       f"{r['latency_ms']['p50']} | {r['latency_ms']['p99']} | "
                       f"{_mb(r['server_peak_rss_kb'])} | {r['server_cpu_cores']} | "
                       f"{r['server_cpu_us_per_span']} | {_sums(r)} |")
        out.append("")
    if "latency" in results:
        out.append("### Ack latency at 80 % of the sustained collector rate (open loop)\n")
        out.append("| transport | offered spans/s | acked spans/s | p50 ms | p90 ms | p99 ms "
                   "| max ms | goal p99 ms | met | sums |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for transport, r in results["latency"].items():
            lat = r["latency_ms"]
            met = "yes" if lat["p99"] <= r["goal_ms"] else "**no**"
            out.append(f"| {names[transport]} | {r['offered_spans_per_s']:,.0f} | "
                       f"{r['spans_per_s']:,.0f} | {lat['p50']} | {lat['p90']} | {lat['p99']} | "
                       f"{lat['max']} | {r['goal_ms']} | {met} | {_sums(r)} |")
        out.append("")
    if "scaling" in results:
        sc = results["scaling"]
        out.append("### Scaling: the same spans into few vs many sessions (HTTP, debug log)\n")
        out.append("| sessions | spans | seconds | spans/s | flushes | spans/flush "
                   "| sessions/flush | mean flush ms | p50 flush ms | max flush ms "
                   "| flush µs/span | peak RSS MB | span-id bytes on disk | sums |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for key in (str(n) for n in s.scaling_sessions):
            r = sc[key]
            f = r["flush"]
            st = r["storage"]
            per_id = st["seen_bytes"] / max(st["seen_rows"], 1)
            out.append(f"| {int(key):,} | {r['spans_acked']:,} | {r['seconds']} | "
                       f"{r['spans_per_s']:,.0f} | {f.get('flushes', 0)} | "
                       f"{f.get('mean_spans_per_flush', 0):,} | "
                       f"{f.get('mean_sessions_per_flush', 0):,} | {f.get('mean_flush_ms')} | "
                       f"{f.get('p50_flush_ms')} | {f.get('max_flush_ms')} | "
                       f"{f.get('us_per_span')} | {_mb(r['server_peak_rss_kb'])} | "
                       f"{per_id:.1f} | {_sums(r)} |")
        out.append("")
        out.append("Peak RSS is dominated by requests in flight, not by sessions: after the "
                   "load, RSS is " + ", ".join(
                       f"{_mb(sc[str(n)]['server_rss_after_load_kb'])} MB with {n:,} sessions"
                       for n in s.scaling_sessions) + ".\n")
        mem = sc["memory_model"]
        big = sc[str(s.scaling_sessions[1])]
        st = big["storage"]
        session_bytes = (st.get("table:agent_sessions", 0)
                         + st.get("table:agent_sessions_status", 0)
                         + st.get("table:agent_sessions_last_active_at", 0)
                         + st.get("table:sqlite_autoindex_agent_sessions_1", 0)
                         + st.get("table:collector_session_marks", 0))
        out.append(f"- In memory, a pending batch costs {mem['batch_bytes_per_session']:.0f} "
                   f"bytes per session touched (SessionDelta + dict entry) and "
                   f"{mem['batch_bytes_per_span_excluding_records']:.0f} bytes per span "
                   f"(record list slot + key set entry) plus the record itself "
                   f"({mem['record_bytes_per_span']:.0f} bytes), measured with tracemalloc. "
                   f"Sessions not touched since the last flush cost no memory.")
        out.append(f"- On disk with {st['session_rows']:,} sessions: "
                   f"{session_bytes / max(st['session_rows'], 1):.0f} bytes per session "
                   f"(agent_sessions, its indexes, collector_session_marks); "
                   f"{st['seen_bytes'] / max(st['seen_rows'], 1):.1f} bytes per span id "
                   f"(collector_seen_*, {st['seen_rows']:,} ids); database file "
                   f"{st['db_file_bytes'] / 1e6:.1f} MB.\n")
    prof = results.get("profile")
    if prof and "samples" in prof:
        out.append(f"### Profile of the collector under HTTP load (py-spy, "
                   f"{prof['samples']:,} samples of non-idle threads)\n")
        out.append("Threads: " + ", ".join(f"{n} {p}%" for n, p in prof["threads"]) + "\n")
        out.append("| self % | function |")
        out.append("|---:|---|")
        for name, pct in prof["self"][:15]:
            out.append(f"| {pct} | `{name}` |")
        out.append("")
        out.append("| inclusive % | function |")
        out.append("|---:|---|")
        for name, pct in prof["inclusive"][:20]:
            out.append(f"| {pct} | `{name}` |")
        out.append("")
    elif prof:
        out.append(f"Profile: {prof.get('skipped')}\n")
    if "sweep" in results:
        out.append(f"### Concurrency sweep (closed loop, {s.warmup_s:.0f} s warm-up + "
                   f"{s.sweep_s:.0f} s measured per run)\n")
        out.append("Sessions: how many sessions the requests' spans cycle through; a request of "
                   f"{SPANS_PER_REQUEST} spans touches that many or {SPANS_PER_REQUEST}, "
                   "whichever is fewer.\n")
        out.append("| sessions | transport | in flight | baseline spans/s | collector spans/s "
                   "| ratio "
                   "| baseline p50 ms | collector p50 ms | p50 gap ms | collector p99 ms "
                   "| goal | met | sums |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
        for r in results["sweep"].values():
            b, c = r["baseline"], r["collector"]
            goal = _sweep_goal(r)
            met = "" if goal is None else ("yes" if goal[1] else "**no**")
            out.append(f"| {r['sessions']:,} | {names[r['transport']]} | "
                       f"{r['in_flight']} | {b['spans_per_s']:,.0f} | {c['spans_per_s']:,.0f} | "
                       f"{r['ratio']:.2f}x | {b['latency_ms']['p50']} | "
                       f"{c['latency_ms']['p50']} | {r['p50_gap_ms']} | "
                       f"{c['latency_ms']['p99']} | {goal[0] if goal else ''} | {met} | "
                       f"{_sums(c)} |")
        out.append("")
    if "budgets" in results:
        out.append(_budgets_report(results["budgets"], s, names))
    out.append("### Goals\n")
    out.append("| goal | measured | met |")
    out.append("|---|---|---|")
    for transport, t in results.get("throughput", {}).items():
        out.append(f"| {names[transport]} ≥ {RATIO_GOAL}x baseline | {t['ratio']:.2f}x | "
                   f"{'yes' if t['ratio'] >= RATIO_GOAL else '**no**'} |")
    for transport, r in results.get("latency", {}).items():
        p99 = r["latency_ms"]["p99"]
        out.append(f"| {names[transport]} p99 ≤ {r['goal_ms']} ms at 80 % load | {p99} ms | "
                   f"{'yes' if p99 <= r['goal_ms'] else '**no**'} |")
    if "scaling" in results:
        big = results["scaling"][str(s.scaling_sessions[1])]
        peak = big["server_peak_rss_kb"] / 1024
        out.append(f"| peak RSS ≤ {RSS_GOAL_MB} MB with {s.scaling_sessions[1]:,} sessions | "
                   f"{peak:.0f} MB | {'yes' if peak <= RSS_GOAL_MB else '**no**'} |")
    for r in results.get("sweep", {}).values():
        goal = _sweep_goal(r)
        if goal is not None:
            measured = (f"{r['p50_gap_ms']} ms" if r["in_flight"] == 1
                        else f"{r['ratio']:.2f}x")
            out.append(f"| {names[r['transport']]} at {r['in_flight']} in flight, "
                       f"{r['sessions']:,} sessions: {goal[0]} | "
                       f"{measured} | {'yes' if goal[1] else '**no**'} |")
    for layout, transport, t in _budget_results(results):
        met = t["loss"] <= BUDGETS_LOSS_GOAL
        out.append(f"| {names[transport]}, tags on {layout}s: {len(BUDGETS)} budgets over "
                   f"{TAGS[0][2]:,} teams lose ≤ {BUDGETS_LOSS_GOAL:.0%} vs none | "
                   f"{t['loss']:+.1%} (CPU/span {t['cpu_increase']:+.1%}) | "
                   f"{'yes' if met else '**no**'} |")
    checks = [r["budget_check"] for r in _all_runs(results) if "budget_check" in r]
    if checks:
        good = all(c["ok"] for c in checks)
        out.append(f"| fleet spend = Σ cost_cents and {TAGS[0][2]:,} team instances in every "
                   f"budgets run | {'all' if good else 'FAILED'} ({len(checks)} runs) | "
                   f"{'yes' if good else '**no**'} |")
    ok = all(r.get("verification", {}).get("ok", True) for r in _all_runs(results))
    out.append(f"| committed sums exact in every collector run | "
               f"{'all exact' if ok else 'MISMATCH'} | {'yes' if ok else '**no**'} |")
    return "\n".join(out) + "\n"


def _budget_results(results: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for layout, by_transport in results.get("budgets", {}).items():
        for transport, t in by_transport.items():
            yield layout, transport, t


def _budgets_report(budgets: dict[str, Any], s: Settings, names: dict[str, str]) -> str:
    out = [f"### Budgets: {len(BUDGETS)} budgets over {TAGS[0][2]:,} teams vs none "
           f"(closed loop, {s.concurrency} in flight, {s.warmup_s:.0f} s warm-up + "
           f"{s.budgets_s:.0f} s measured per run, rounds interleaved A B A B)\n",
           "A: no [[budgets]], no tags. B: bench/budgets.py's budgets and a webhook "
           "sink on a closed port, and tags (" + ", ".join(
               f"{key}: {count:,} values" for key, _, count in TAGS)
           + f"). Tags on resources: {RESOURCES_PER_REQUEST} resources a request, each one "
           "session's (as OTEL_RESOURCE_ATTRIBUTES sends them); tags on spans: one resource "
           f"of {SPANS_PER_REQUEST} sessions, every span tagged. Each ratio is to a baseline "
           "run just before it on the same payload.\n",
           "| tags on | transport | round | A baseline spans/s | A collector spans/s | A ratio "
           "| B baseline spans/s | B collector spans/s | B ratio | B/A | A CPU µs/span "
           "| B CPU µs/span | sums | budget check |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for layout, transport, t in _budget_results({"budgets": budgets}):
        for r in t["rounds"]:
            a, b = r["none"], r["budgets"]
            check = b["collector"].get("budget_check", {})
            check_text = ("ok: fleet {:.1f} = Σ cost {:.1f} ¢, {} team instances, {} crossings, "
                          "{} outbox rows ({} attempts)".format(
                              check["fleet_spend_cents"], check["sessions_cost_cents"],
                              check["team_instances"], check["crossings"],
                              check["outbox_rows"], check["delivery_attempts"])
                          if check.get("ok") else
                          f"**FAILED**: {'; '.join(check.get('problems', ()))}")
            sums = (_sums(b["collector"]) if a["collector"]["verification"]["ok"]
                    else f"A: {_sums(a['collector'])}")
            out.append(f"| {layout}s | {names[transport]} | {r['round']} | "
                       f"{a['baseline']['spans_per_s']:,.0f} | "
                       f"{a['collector']['spans_per_s']:,.0f} | {a['ratio']:.3f} | "
                       f"{b['baseline']['spans_per_s']:,.0f} | "
                       f"{b['collector']['spans_per_s']:,.0f} | {b['ratio']:.3f} | "
                       f"{r['b_over_a']:.3f} | "
                       f"{a['collector']['server_cpu_us_per_span']} | "
                       f"{b['collector']['server_cpu_us_per_span']} | "
                       f"{sums} | "
                       f"{check_text} |")
    out.append("")
    out.append("| tags on | transport | mean ratio A | mean ratio B | loss (1 - B/A) | "
               "B/A per round, min … max | mean CPU µs/span A → B |")
    out.append("|---|---|---:|---:|---:|---|---|")
    for layout, transport, t in _budget_results({"budgets": budgets}):
        m, cpu, paired = t["mean_ratio"], t["mean_cpu_us_per_span"], t["paired_b_over_a"]
        out.append(f"| {layout}s | {names[transport]} | {m['none']:.3f} | {m['budgets']:.3f} | "
                   f"{t['loss']:+.1%} | {paired[0]:.3f} … {paired[-1]:.3f} | "
                   f"{cpu['none']:.2f} → {cpu['budgets']:.2f} ({t['cpu_increase']:+.1%}) |")
    out.append("")
    return "\n".join(out)


def _all_runs(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for _, _, t in _budget_results(results):
        for r in t["rounds"]:
            yield r["none"]["collector"]
            yield r["budgets"]["collector"]
    for t in results.get("throughput", {}).values():
        yield t["collector"]
    for t in results.get("sweep", {}).values():
        yield t["collector"]
    yield from results.get("latency", {}).values()
    for key, r in results.get("scaling", {}).items():
        if key != "memory_model":
            yield r


def self_check() -> None:
    """The request factory must produce valid, distinct spans before anything is measured."""
    factory = RequestFactory(1000)
    a, b = decode_check(factory.request(0)), decode_check(factory.request(1))
    spans_a = a.resource_spans[0].scope_spans[0].spans
    spans_b = b.resource_spans[0].scope_spans[0].spans
    ids = {s.trace_id + s.span_id for s in spans_a} | {s.trace_id + s.span_id for s in spans_b}
    if len(spans_a) != SPANS_PER_REQUEST or len(ids) != 2 * SPANS_PER_REQUEST:
        raise RuntimeError("request factory produced duplicate or missing spans")
    if len(spans_a[0].attributes) != 16:
        raise RuntimeError("each span must carry 16 attributes")
    tagged = decode_check(RequestFactory(1000, tagged=True).request(1))
    for span in tagged.resource_spans[0].scope_spans[0].spans:
        attrs = {kv.key: kv.value.string_value for kv in span.attributes}
        if (len(attrs) != 16 + len(TAGS)
                or attrs["team.id"][-3:] != attrs["session.id"][-3:]):
            raise RuntimeError("tagged spans must carry their session's team")
    by_resource = decode_check(RequestFactory(1000, tagged=True, layout="resource").request(3))
    if len(by_resource.resource_spans) != RESOURCES_PER_REQUEST:
        raise RuntimeError(f"the resource layout must send {RESOURCES_PER_REQUEST} resources")
    for resource_spans in by_resource.resource_spans:
        tags = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
        sessions = {kv.value.string_value for span in resource_spans.scope_spans[0].spans
                    for kv in span.attributes if kv.key == "session.id"}
        if len(sessions) != 1 or tags["team.id"][-3:] != sessions.pop()[-3:]:
            raise RuntimeError("a tagged resource must be one session's, with its team")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="collector benchmark (see bench/run.py)")
    parser.add_argument("--quick", action="store_true", help="about a minute instead of ~5")
    parser.add_argument("--only", choices=("throughput", "latency", "scaling", "profile",
                                           "sweep", "budgets"),
                        action="append", help="run only these phases (latency implies "
                        "throughput, which sets its rate)")
    parser.add_argument("--concurrency", type=int, help="requests in flight (default 64)")
    parser.add_argument("--collector-src", type=Path,
                        help="run the collector package found in this directory (e.g. a "
                        "patched copy) instead of the one in this tree")
    parser.add_argument("--budget-layout", choices=LAYOUTS, action="append",
                        help="the budgets phase only with the tags on resources or on spans "
                        "(default: both)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.concurrency is not None:
        overrides["concurrency"] = args.concurrency
    if args.collector_src is not None:
        if not (args.collector_src / "collector" / "__init__.py").exists():
            parser.error(f"no collector package in {args.collector_src}")
        overrides["collector_src"] = str(args.collector_src.resolve())
    if args.budget_layout:
        overrides["budget_layouts"] = tuple(args.budget_layout)
    settings = replace(settings, **overrides)
    phases = set(args.only or ("throughput", "latency", "scaling", "profile", "sweep",
                               "budgets"))
    if "latency" in phases:
        phases.add("throughput")
    self_check()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "collector": collector_version(settings),
                               "settings": {f: getattr(settings, f) for f in settings.__slots__}}
    try:
        if "throughput" in phases:
            results["throughput"] = phase_throughput(work, settings)
        if "latency" in phases:
            results["latency"] = phase_latency(work, settings, results["throughput"])
        if "scaling" in phases:
            results["scaling"] = phase_scaling(work, settings)
        if "profile" in phases:
            results["profile"] = phase_profile(work, settings)
        if "sweep" in phases:
            results["sweep"] = phase_sweep(work, settings)
        if "budgets" in phases:
            results["budgets"] = phase_budgets(work, settings)
    finally:
        if args.keep:
            _say(f"logs and databases kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["loadavg_at_phase_starts"] = LOADAVG_SEEN
    command = "python -m bench.run" + (" --quick" if args.quick else "") + "".join(
        f" --only {phase}" for phase in args.only or ()) + "".join(
        f" --budget-layout {layout}" for layout in args.budget_layout or ())
    text = report(results, settings, command)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS_DIR / f"results-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS_DIR / f"report-{stamp}.md").write_text(text)
    print(text)
    _say(f"done in {results['elapsed_s']:.0f} s; results in {RESULTS_DIR}")
    ok = all(r.get("verification", {}).get("ok", True)
             and r.get("budget_check", {}).get("ok", True) for r in _all_runs(results))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
