"""Run by tests/test_wheel.py with the Python of a venv that has the wheel installed, inside a
private network namespace (so the documented default ports are free whatever else runs on the
host), from a working directory outside the checkout. Uses only the standard library and the
installed package's own dependencies (opentelemetry-proto), never the checkout.

Without any --config: starts `collector serve`, exports one span as OTLP/HTTP protobuf to the
default 4318, reads the default ops (8888) and web (8889) listeners, starts a second
`collector serve` on the same defaults (it must refuse before starting anything), stops the
first, then runs `collector sessions --json` and `collector report session --json`. Prints
what it saw as one JSON object on stdout; the test judges it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

BIN = Path(sys.executable).parent
READY_LINE = "collector ready"
START_TIMEOUT_S = 60.0
SESSION = "defaults-session"
T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


def status(url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, headers={
        "Content-Type": "application/x-protobuf"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            code: int = answer.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def export_body() -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id = bytes(range(1, 17))
    span.span_id = bytes(range(1, 9))
    span.name = "chat gpt-4o"
    span.start_time_unix_nano = T0
    span.end_time_unix_nano = T0 + 1_000_000
    for key, value in (("session.id", SESSION), ("gen_ai.response.model", "gpt-4o")):
        attribute = span.attributes.add()
        attribute.key = key
        attribute.value.string_value = value
    for key, count in (("gen_ai.usage.input_tokens", 120), ("gen_ai.usage.output_tokens", 7)):
        attribute = span.attributes.add()
        attribute.key = key
        attribute.value.int_value = count
    return request.SerializeToString()


def wait_ready(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while READY_LINE not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("collector serve did not start:\n" + log.read_text())
        time.sleep(0.05)


def main() -> int:
    work = Path.cwd()
    first, second = work / "first", work / "second"
    first.mkdir()
    second.mkdir()
    seen: dict[str, Any] = {}
    log = first / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([str(BIN / "collector"), "serve"], cwd=first,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_ready(log, proc)
        seen["export"] = status("http://127.0.0.1:4318/v1/traces", export_body())
        seen["readyz"] = status("http://127.0.0.1:8888/readyz")
        seen["web"] = status("http://127.0.0.1:8889/")
        clash = subprocess.run([str(BIN / "collector"), "serve"], cwd=second,
                               capture_output=True, text=True, timeout=120)
        seen["second"] = {"code": clash.returncode, "stderr": clash.stderr,
                          "left": sorted(p.name for p in second.iterdir())}
        seen["readyz_after_second"] = status("http://127.0.0.1:8888/readyz")
        proc.send_signal(signal.SIGTERM)
        seen["serve_exit"] = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    seen["database"] = sorted(p.name for p in (first / "data").iterdir())
    for name, argv in (("sessions", ["sessions", "--json"]),
                       ("report", ["report", "session", "--json"])):
        result = subprocess.run([str(BIN / "collector"), *argv], cwd=first,
                                capture_output=True, text=True, timeout=120)
        seen[name] = {"code": result.returncode, "stdout": result.stdout,
                      "stderr": result.stderr}
    print(json.dumps(seen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
