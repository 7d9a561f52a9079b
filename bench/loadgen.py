"""OTLP load generator: pre-encoded 512-span requests over keep-alive HTTP or gRPC.

Runs in its own process, so its CPU is not the server's. Two ways to drive the load:

* closed loop (default): `--concurrency` workers, each sending its next request as soon as the
  previous one is answered; this finds the sustained rate, because a request is answered only
  once its spans are committed;
* open loop (`--rate` spans/s): requests are started on a fixed schedule whatever the answers
  do, and latency is measured from the scheduled start, so a server falling behind shows up as
  latency instead of silently slowing the sender (no coordinated omission).

Reports acknowledged spans/s, per-request ack latency percentiles, the server's peak RSS
(VmHWM of `--pid`), and, with `--verify-db`, whether the committed per-session sums equal
exactly what the acknowledged requests carried.

Example: python -m bench.loadgen --transport http --target 127.0.0.1:4318 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import uvloop

from bench.payload import (
    DEFAULT_SESSIONS,
    LAYOUTS,
    SPANS_PER_REQUEST,
    Layout,
    RequestFactory,
    Sums,
    expected_sums,
)
from bench.verify import verify

HOST = "127.0.0.1"
GRPC_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
PROTOBUF = "application/x-protobuf"
REQUEST_TIMEOUT_S = 60.0
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
RSS_SAMPLE_PERIOD_S = 0.1
FAILURE_PAUSE_S = 0.1
# Hard bounds on any run, whatever the arguments say.
MAX_RUN_S = 900.0
MAX_REQUESTS = 1_000_000

Send = Callable[[bytes], Awaitable[None]]


class SendFailed(Exception):
    """The server answered with a refusal (or did not answer); the reason is the message."""


def _identity(data: bytes) -> bytes:
    return data


class HttpSender:
    """POST /v1/traces over a pool of keep-alive connections, one per concurrent request."""

    def __init__(self, target: str, connections: int) -> None:
        self._url = f"http://{target}/v1/traces"
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpSender:
        connector = aiohttp.TCPConnector(limit=self._connections, keepalive_timeout=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            headers={"Content-Type": PROTOBUF})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, body: bytes) -> None:
        assert self._session is not None
        async with self._session.post(self._url, data=body) as response:
            await response.read()
            if response.status != 200:
                raise SendFailed(f"http {response.status}")


class GrpcSender:
    """TraceService/Export with raw bytes (identity serializers) on one HTTP/2 channel."""

    def __init__(self, target: str) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ])
        self._export = self._channel.unary_unary(
            GRPC_METHOD, request_serializer=_identity, response_deserializer=_identity)

    async def __aenter__(self) -> GrpcSender:
        await asyncio.wait_for(self._channel.channel_ready(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._channel.close()

    async def send(self, body: bytes) -> None:
        try:
            await self._export(body, timeout=REQUEST_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise SendFailed(f"grpc {exc.code().name}") from None


@dataclass(slots=True)
class Tally:
    """What happened, shared by all senders of one run."""

    acked: list[int] = field(default_factory=list)  # request numbers answered with success
    latencies_s: list[float] = field(default_factory=list)  # measured requests only
    window_acks: int = 0  # requests acknowledged inside the measurement window
    failures: Counter[str] = field(default_factory=Counter)
    late_starts: int = 0  # open loop: requests that could not start on schedule

    def ack(self, number: int, started: float, done: float,
            window: tuple[float, float]) -> None:
        """Record a success; its latency counts only if it started inside the window."""
        self.acked.append(number)
        if window[0] <= done <= window[1]:
            self.window_acks += 1
        if started >= window[0]:
            self.latencies_s.append(done - started)


class RssSampler:
    """Samples VmRSS of a process; VmHWM (its lifetime peak) is read at the end."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.max_rss_kb = 0

    def _field(self, name: str) -> int:
        if self.pid is None:
            return 0
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith(name):
                        return int(line.split()[1])
        except OSError:
            return 0
        return 0

    async def run(self, until: asyncio.Event) -> None:
        while not until.is_set() and self.pid is not None:
            self.max_rss_kb = max(self.max_rss_kb, self._field("VmRSS:"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), RSS_SAMPLE_PERIOD_S)

    def peak_kb(self) -> int:
        return max(self._field("VmHWM:"), self.max_rss_kb)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far (all its threads)."""
        user, system = self.cpu_split()
        return user + system

    def cpu_split(self) -> tuple[float, float]:
        """User and system CPU time of the process so far, apart: what the kernel spends
        for it (its writes, its sockets) can grow with what it stores while its own code
        does not."""
        if self.pid is None:
            return 0.0, 0.0
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            return 0.0, 0.0
        # After the command name: state is field 3, utime field 14, stime field 15.
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no values."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass(frozen=True, slots=True)
class Plan:
    requests: int | None  # stop after this many requests (no warm-up), or
    duration_s: float  # measure for this long after `warmup_s`
    warmup_s: float
    concurrency: int
    rate_spans_s: float | None  # open loop when set
    first_request: int


async def _closed_loop(send: Send, factory: RequestFactory, plan: Plan, tally: Tally,
                       t0: float, window: tuple[float, float]) -> None:
    next_number = plan.first_request
    last = plan.first_request + (plan.requests if plan.requests is not None else MAX_REQUESTS)
    hard_stop = t0 + MAX_RUN_S

    async def worker() -> None:
        nonlocal next_number
        while next_number < last:
            now = time.perf_counter()
            if now >= window[1] or now >= hard_stop:
                return
            number = next_number
            next_number += 1
            body = factory.request(number)
            started = time.perf_counter()
            try:
                await send(body)
            except (SendFailed, aiohttp.ClientError, TimeoutError) as exc:
                tally.failures[str(exc) or type(exc).__name__] += 1
                # A refusing or dead server must not turn this into a busy loop.
                await asyncio.sleep(FAILURE_PAUSE_S)
                continue
            tally.ack(number, started, time.perf_counter(), window)

    await asyncio.gather(*(worker() for _ in range(plan.concurrency)))


async def _open_loop(send: Send, factory: RequestFactory, plan: Plan, tally: Tally,
                     t0: float, window: tuple[float, float]) -> None:
    assert plan.rate_spans_s is not None
    period = SPANS_PER_REQUEST / plan.rate_spans_s
    total = min(int((window[1] - t0) / period), MAX_REQUESTS)
    if plan.requests is not None:
        total = min(total, plan.requests)
    slots = asyncio.Semaphore(plan.concurrency)

    async def one(number: int, scheduled: float) -> None:
        async with slots:
            body = factory.request(number)
            if time.perf_counter() - scheduled > period:
                tally.late_starts += 1
            try:
                await send(body)
            except (SendFailed, aiohttp.ClientError, TimeoutError) as exc:
                tally.failures[str(exc) or type(exc).__name__] += 1
                return
        tally.ack(number, scheduled, time.perf_counter(), window)

    tasks: list[asyncio.Task[None]] = []
    for i in range(total):
        scheduled = t0 + i * period
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(plan.first_request + i, scheduled)))
    await asyncio.gather(*tasks)


async def _cpu_at(sampler: RssSampler, moments: tuple[float, float]
                  ) -> list[tuple[float, float]]:
    """The server's CPU seconds (user, system) at each of `moments` (perf_counter times)."""
    marks: list[tuple[float, float]] = []
    for moment in moments:
        await asyncio.sleep(max(0.0, moment - time.perf_counter()))
        marks.append(sampler.cpu_split())
    return marks


async def run_load(transport: str, target: str, plan: Plan, *, sessions: int,
                   pid: int | None, tagged: bool = False, layout: Layout = "span"
                   ) -> tuple[dict[str, Any], Tally]:
    factory = RequestFactory(sessions, tagged=tagged, layout=layout)
    tally = Tally()
    sampler = RssSampler(pid)
    sampling_done = asyncio.Event()
    sender: HttpSender | GrpcSender = (HttpSender(target, plan.concurrency)
                                       if transport == "http" else GrpcSender(target))
    async with sender:
        sampling = asyncio.create_task(sampler.run(sampling_done))
        server_cpu0, own_cpu0 = sampler.cpu_seconds(), time.process_time()
        t0 = time.perf_counter()
        if plan.requests is not None and plan.rate_spans_s is None:
            window = (t0, t0 + MAX_RUN_S)
        else:
            window = (t0 + plan.warmup_s, t0 + plan.warmup_s + plan.duration_s)
        drive = _open_loop if plan.rate_spans_s is not None else _closed_loop
        # The server's CPU within the window, beside its CPU over the whole run.
        in_window = asyncio.create_task(_cpu_at(sampler, window))
        await drive(sender.send, factory, plan, tally, t0, window)
        finished = time.perf_counter()
        window_cpu = window_system = None
        if finished >= window[1]:
            marks = await in_window
            window_system = marks[1][1] - marks[0][1]
            window_cpu = marks[1][0] - marks[0][0] + window_system
        else:  # ended early (a --requests run, or the hard stop): no window figure
            in_window.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await in_window
        server_cpu, own_cpu = sampler.cpu_seconds() - server_cpu0, time.process_time() - own_cpu0
        sampling_done.set()
        await sampling
    if plan.requests is not None and plan.rate_spans_s is None:
        seconds = finished - t0
        measured_spans = len(tally.acked) * SPANS_PER_REQUEST
    else:
        seconds = min(finished, window[1]) - window[0]
        measured_spans = tally.window_acks * SPANS_PER_REQUEST
    latencies = sorted(tally.latencies_s)

    def in_window_per_span(cpu_s: float | None) -> float | None:
        """CPU seconds spent within the window, in µs a span acknowledged in it."""
        if cpu_s is None or not tally.window_acks:
            return None
        return round(cpu_s * 1e6 / (tally.window_acks * SPANS_PER_REQUEST), 3)

    result: dict[str, Any] = {
        "transport": transport,
        "target": target,
        "plan": asdict(plan),
        "sessions": sessions,
        "tagged": tagged,
        "layout": layout,
        "requests_acked": len(tally.acked),
        "spans_acked": len(tally.acked) * SPANS_PER_REQUEST,
        "failures": dict(tally.failures),
        "late_starts": tally.late_starts,
        "seconds": round(seconds, 3),
        "wall_seconds": round(finished - t0, 3),
        "spans_per_s": round(measured_spans / seconds, 1) if seconds > 0 else 0.0,
        "latency_ms": {
            "count": len(latencies),
            "p50": round(percentile(latencies, 0.50) * 1000, 1),
            "p90": round(percentile(latencies, 0.90) * 1000, 1),
            "p99": round(percentile(latencies, 0.99) * 1000, 1),
            "max": round((latencies[-1] if latencies else 0.0) * 1000, 1),
        },
        "server_peak_rss_kb": sampler.peak_kb(),
        "server_max_sampled_rss_kb": sampler.max_rss_kb,
        # CPU use over the whole run (warm-up included), in cores: 1.0 is one core busy.
        "server_cpu_cores": round(server_cpu / (finished - t0), 2),
        "loadgen_cpu_cores": round(own_cpu / (finished - t0), 2),
        "server_cpu_us_per_span": round(server_cpu * 1e6 / max(len(tally.acked), 1)
                                        / SPANS_PER_REQUEST, 2),
        # The same within the measurement window only (no warm-up); None without one.
        "server_window_cpu_us_per_span": in_window_per_span(window_cpu),
        # Its system (kernel) part.
        "server_window_system_us_per_span": in_window_per_span(window_system),
    }
    return result, tally


def _carried(path: Path, expected: Sums) -> Sums:
    """`expected` plus the sums saved at `path` by earlier runs, saved there in turn."""
    total: Sums = {}
    if path.exists():
        total = {sid: (row[0], row[1], row[2], row[3])
                 for sid, row in json.loads(path.read_text()).items()}
    for sid, row in expected.items():
        before = total.get(sid, (0, 0, 0, 0))
        total[sid] = (before[0] + row[0], before[1] + row[1], before[2] + row[2],
                      before[3] + row[3])
    path.write_text(json.dumps(total))
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OTLP load generator (see module docstring)")
    parser.add_argument("--transport", choices=("http", "grpc"), required=True)
    parser.add_argument("--target", required=True, help="host:port; must be 127.0.0.1")
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS)
    parser.add_argument("--concurrency", type=int, default=32,
                        help="requests in flight (closed loop) or at most in flight (open loop)")
    parser.add_argument("--requests", type=int, help="send exactly this many requests")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds measured (after --warmup) when --requests is not given")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rate", type=float, help="open loop: spans per second")
    parser.add_argument("--first-request", type=int, default=0,
                        help="number of the first request (ids stay unique across runs)")
    parser.add_argument("--tagged", action="store_true",
                        help="spans also carry dimension tags (team.id, department, "
                        "cost_center, project; see bench.payload.TAGS)")
    parser.add_argument("--layout", choices=LAYOUTS, default="span",
                        help="span: one resource, a session per span (tags on spans); "
                        "resource: 16 resources of one session each (tags on resources)")
    parser.add_argument("--pid", type=int, help="server process, for its peak RSS")
    parser.add_argument("--verify-db", type=Path, help="collector SQLite file to check sums in")
    parser.add_argument("--carry", type=Path,
                        help="with --verify-db: the sums of earlier runs into the same "
                        "database, read from this JSON file (when it exists) and added to this "
                        "run's before the check, then the total written back for the next")
    parser.add_argument("--json-out", type=Path, help="write the result here (else stdout)")
    args = parser.parse_args(argv)
    if not args.target.startswith(f"{HOST}:"):
        parser.error(f"--target must be on {HOST}")
    if not 1 <= args.concurrency <= 4096:
        parser.error("--concurrency must be 1..4096")
    if args.requests is not None and not 1 <= args.requests <= MAX_REQUESTS:
        parser.error(f"--requests must be 1..{MAX_REQUESTS}")
    if args.duration + args.warmup > MAX_RUN_S:
        parser.error(f"--duration + --warmup must be at most {MAX_RUN_S} s")
    plan = Plan(requests=args.requests, duration_s=args.duration,
                warmup_s=args.warmup if args.requests is None else 0.0,
                concurrency=args.concurrency, rate_spans_s=args.rate,
                first_request=args.first_request)
    result, tally = uvloop.run(run_load(args.transport, args.target, plan,
                                        sessions=args.sessions, pid=args.pid,
                                        tagged=args.tagged, layout=args.layout))
    if args.verify_db is not None:
        # Every acknowledged request is committed (the collector answers after commit), so
        # the database can be checked now, with the daemon still running.
        expected = expected_sums(tally.acked, args.sessions, args.layout)
        if args.carry is not None:
            expected = _carried(args.carry, expected)
        result["verification"] = verify(args.verify_db, expected).as_dict()
    text = json.dumps(result, indent=2)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n")
    else:
        print(text)
    print(f"{args.transport}: {result['spans_per_s']:,.0f} spans/s, p50 "
          f"{result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms, "
          f"failures {result['failures'] or 0}", file=sys.stderr)
    verification = result.get("verification")
    return 1 if verification is not None and not verification["ok"] else 0


if __name__ == "__main__":
    sys.exit(main())
