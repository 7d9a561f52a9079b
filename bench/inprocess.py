"""Per-stage CPU cost of a span, in one process, on the benchmark's own requests.

Where the load benchmark (bench.run) says how fast the whole daemon is, this says which stage
costs what: upb's decode, the attribute reader (compiled and Python), the mapping, the fold,
and the parse-only baseline's own work on the same bytes. Best of several passes over the same
requests; no network, no storage.

Run: python -m bench.inprocess [--requests N] [--repeat N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from bench.baseline import Counter
from bench.payload import SPANS_PER_REQUEST, RequestFactory
from collector.accounting.aggregate import Batch
from collector.accounting.pricing import Pricer
from collector.config.attribution import DEFAULT_DIMENSIONS
from collector.receivers.otlp import decode_protobuf
from collector.signals import Signal
from collector.signals.scan import COMPILED_AVAILABLE, Scanner
from collector.signals.traces import MappingOptions, map_request


def decode_traces(body: bytes) -> object:
    return decode_protobuf(body, Signal.TRACES)


def per_span_us(bodies: list[bytes], work: Callable[[bytes], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        for body in bodies:
            work(body)
        best = min(best, time.perf_counter() - started)
    return best / (len(bodies) * SPANS_PER_REQUEST) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    factory = RequestFactory(sessions=1000)
    bodies = [factory.request(i) for i in range(args.requests)]
    pricer = Pricer({})
    pricer.preload()
    # The daemon's default [attribution] dimensions (their attributes are absent from these
    # spans, as from most agents'): what the extra slots cost an untagged span.
    dimensions = tuple((d.name, d.attributes) for d in DEFAULT_DIMENSIONS)
    readers = {"compiled": MappingOptions(pricer=pricer),
               "compiled, default dimensions": MappingOptions(pricer=pricer,
                                                              dimensions=dimensions),
               "python": MappingOptions(pricer=pricer, compiled_scanner=False)}
    if not COMPILED_AVAILABLE:
        del readers["compiled"], readers["compiled, default dimensions"]

    rows: list[tuple[str, float]] = [
        ("baseline: decode + Python attribute loop + dict sum",
         per_span_us(bodies, Counter().consume, args.repeat)),
        ("upb decode (ParseFromString)", per_span_us(bodies, decode_traces, args.repeat)),
    ]
    decoded = {id(body): decode_protobuf(body, Signal.TRACES) for body in bodies}
    for name, options in readers.items():

        def scan(body: bytes, scanner: Scanner = options.scanner) -> object:
            return scanner.scan(decoded[id(body)], body)

        def decode_map(body: bytes, options: MappingOptions = options) -> object:
            return map_request(decode_protobuf(body, Signal.TRACES), options, 0, body)

        def decode_map_fold(body: bytes, options: MappingOptions = options) -> object:
            batch = Batch()
            batch.add(map_request(decode_protobuf(body, Signal.TRACES), options, 0, body).records)
            return batch

        rows += [(f"{name} reader: read attributes", per_span_us(bodies, scan, args.repeat)),
                 (f"{name} reader: decode + read + map", per_span_us(bodies, decode_map,
                                                                     args.repeat)),
                 (f"{name} reader: decode + read + map + fold",
                  per_span_us(bodies, decode_map_fold, args.repeat))]
    print(f"{args.requests} requests x {SPANS_PER_REQUEST} spans, best of {args.repeat}\n")
    print("| stage | µs per span |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
