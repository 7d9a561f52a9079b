"""Parse-only OTLP receivers: the floor the collector is compared against.

Same network stacks as the collector (aiohttp on uvloop for HTTP, grpc.aio with a generic
raw-bytes handler for gRPC), the same protobuf decode, and the least useful work on top: take
the session id and the five token counts of each span and add them to a dict. No validation, no
pricing, no storage, no durability: an answer means "parsed", not "committed". What the
collector does beyond this is what its ratio to the baseline costs.

Run: python -m bench.baseline --http-port P --grpc-port Q. On SIGTERM it prints one JSON line
with what it counted (spans, requests, token totals) so the runner can check it did the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

import grpc
import uvloop
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

HOST = "127.0.0.1"
TRACES_PATH = "/v1/traces"
GRPC_METHOD_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
PROTOBUF = "application/x-protobuf"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the collector's default max_request_bytes
STOP_GRACE_S = 5.0

SESSION_KEYS = ("gen_ai.conversation.id", "session.id")
# key -> index in the per-session sums list; GenAI names only, the minimum a consumer reads.
TOKEN_KEYS = {
    "gen_ai.usage.input_tokens": 0,
    "gen_ai.usage.output_tokens": 1,
    "gen_ai.usage.reasoning.output_tokens": 2,
    "gen_ai.usage.cache_read.input_tokens": 3,
    "gen_ai.usage.cache_creation.input_tokens": 4,
}
EMPTY_RESPONSE: bytes = ExportTraceServiceResponse().SerializeToString()


class Counter:
    """Per-session token sums, in memory only."""

    def __init__(self) -> None:
        self.sessions: dict[str, list[int]] = {}
        self.spans = 0
        self.requests = 0

    def consume(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.requests += 1
        sessions = self.sessions
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans += 1
                    session = ""
                    counts = [0, 0, 0, 0, 0]
                    for kv in span.attributes:
                        key = kv.key
                        slot = TOKEN_KEYS.get(key)
                        if slot is not None:
                            counts[slot] = kv.value.int_value
                        elif not session and key in SESSION_KEYS:
                            session = kv.value.string_value
                    if not session:
                        continue
                    sums = sessions.get(session)
                    if sums is None:
                        sessions[session] = counts
                    else:
                        for i in range(5):
                            sums[i] += counts[i]

    def summary(self) -> dict[str, Any]:
        totals = [0, 0, 0, 0, 0]
        for sums in self.sessions.values():
            for i in range(5):
                totals[i] += sums[i]
        return {"requests": self.requests, "spans": self.spans,
                "sessions": len(self.sessions), "token_totals": totals}


async def _http_handler(counter: Counter, request: web.Request) -> web.Response:
    counter.consume(await request.read())
    return web.Response(body=EMPTY_RESPONSE, content_type=PROTOBUF)


async def serve(http_port: int, grpc_port: int) -> dict[str, Any]:
    counter = Counter()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    app = web.Application(client_max_size=MAX_MESSAGE_BYTES)

    async def http_handler(request: web.Request) -> web.Response:
        return await _http_handler(counter, request)

    app.router.add_post(TRACES_PATH, http_handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, HOST, http_port).start()

    async def grpc_export(body: bytes, context: Any) -> bytes:
        counter.consume(body)
        return EMPTY_RESPONSE

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        GRPC_METHOD_SERVICE, {"Export": grpc.unary_unary_rpc_method_handler(grpc_export)}),))
    server.add_insecure_port(f"{HOST}:{grpc_port}")
    await server.start()
    print("baseline ready", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop(STOP_GRACE_S)
        await runner.cleanup()
    return counter.summary()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    args = parser.parse_args()
    summary = uvloop.run(serve(args.http_port, args.grpc_port))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
