"""The logs path against the span path, on one collector in the same run.

Agents like Claude Code, Codex and Gemini CLI report usage as log records, read through their
dialect (collector/signals/logs.py, records.py), while apps send GenAI spans read by the
compiled attribute reader. This sends the same number of requests of each, 512 items a
request, over HTTP/protobuf from a closed loop of concurrent clients, and reports items per
second for both and their ratio. Rounds alternate (spans, logs, spans, logs, ...) so drift on
a shared machine hits both. The sums committed for the log records are checked exactly.

    .venv/bin/python -m bench.signals_bench            # 3 rounds of 100 requests each
    .venv/bin/python -m bench.signals_bench --rounds 1 --requests 40
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord

from bench.payload import SPANS_PER_REQUEST, RequestFactory
from bench.run import FULL, HOST, running, start_collector

RECORDS_PER_REQUEST = SPANS_PER_REQUEST
SESSIONS = 1000
MODEL = "claude-sonnet-4-5"
INPUT, OUTPUT, CACHE_READ, CACHE_WRITE = 1234, 77, 5000, 600
CONCURRENCY = 8


def _kv(key: str, value: str | int | float | bool) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def log_request(number: int, nonce: str) -> bytes:
    """512 Claude Code api_request records (as in tests/captures/claude-code-2.1.328), each a
    distinct call of one of SESSIONS sessions."""
    request = ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    for key, value in (("service.name", "claude-code"), ("service.version", "2.1.328"),
                       ("host.arch", "amd64"), ("os.type", "linux")):
        rl.resource.attributes.append(_kv(key, value))
    sl = rl.scope_logs.add()
    sl.scope.name = "com.anthropic.claude_code.events"
    now = time.time_ns()
    for j in range(RECORDS_PER_REQUEST):
        g = number * RECORDS_PER_REQUEST + j
        sl.log_records.append(LogRecord(
            time_unix_nano=now, observed_time_unix_nano=now,
            body=AnyValue(string_value="claude_code.api_request"),
            attributes=[
                _kv("user.id", "9cbb8c88fe1a46a266a5b81e99c3cb08"),
                _kv("session.id", f"bench-logs-{nonce}-{g % SESSIONS:07d}"),
                _kv("terminal.type", "xterm"), _kv("event.name", "api_request"),
                _kv("event.timestamp", "2026-11-29T07:42:58.802Z"),
                _kv("event.sequence", g), _kv("prompt.id", f"prompt-{g}"),
                _kv("model", MODEL), _kv("input_tokens", INPUT), _kv("output_tokens", OUTPUT),
                _kv("cache_read_tokens", CACHE_READ), _kv("cache_creation_tokens", CACHE_WRITE),
                _kv("cost_usd", 0.008607), _kv("duration_ms", 24),
                _kv("request_id", f"req_{nonce}_{g}"), _kv("speed", "normal"),
            ]))
    data: bytes = request.SerializeToString()
    return data


async def push(url: str, bodies: list[bytes], concurrency: int) -> float:
    """Send every body (closed loop, `concurrency` in flight); seconds until the last ack."""
    queue = list(reversed(bodies))
    headers = {"Content-Type": "application/x-protobuf"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            body = queue.pop()
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status}")

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.signals_bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100, help="per signal per round")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)
    nonce = os.urandom(4).hex()
    spans = RequestFactory(SESSIONS)
    with tempfile.TemporaryDirectory() as tmp, running(
            lambda: start_collector(Path(tmp), "signals", FULL)) as server:
        base = f"http://{HOST}:{server.http_port}"
        rows = []
        for round_no in range(args.rounds):
            first = round_no * args.requests
            span_bodies = [spans.request(first + i) for i in range(args.requests)]
            log_bodies = [log_request(first + i, nonce) for i in range(args.requests)]
            span_s = asyncio.run(push(f"{base}/v1/traces", span_bodies, args.concurrency))
            log_s = asyncio.run(push(f"{base}/v1/logs", log_bodies, args.concurrency))
            items = args.requests * RECORDS_PER_REQUEST
            rows.append((items / span_s, items / log_s))
            print(f"round {round_no + 1}: spans {items / span_s:,.0f}/s, log records "
                  f"{items / log_s:,.0f}/s, ratio {span_s / log_s:.2f}x", file=sys.stderr)
        assert server.db is not None
        conn = sqlite3.connect(server.db)
        got = conn.execute("SELECT sum(turns), sum(prompt_tokens), sum(completion_tokens) "
                           "FROM agent_sessions WHERE id LIKE ?",
                           (f"bench-logs-{nonce}-%",)).fetchone()
        conn.close()
    calls = args.rounds * args.requests * RECORDS_PER_REQUEST
    # api_request records are calls; the turns are the user_prompt records (not sent here).
    expected = (0, calls * (INPUT + CACHE_READ + CACHE_WRITE), calls * OUTPUT)
    exact = tuple(got) == expected
    best_spans = max(r[0] for r in rows)
    best_logs = max(r[1] for r in rows)
    print(f"| signal | items/s (best of {args.rounds}) |\n|---|---|\n"
          f"| spans (GenAI, compiled reader) | {best_spans:,.0f} |\n"
          f"| log records (Claude Code dialect) | {best_logs:,.0f} |\n"
          f"| logs / spans | {best_logs / best_spans:.2f}x |\n"
          f"sums of the log sessions exact: {exact} ({got} vs {expected})")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
