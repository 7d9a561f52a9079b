"""Record what opencode and Qwen Code send over OTLP, so the replay tests can be refreshed.

    .venv/bin/python tests/captures/agents_js/capture.py opencode [--version 1.18.33]
    .venv/bin/python tests/captures/agents_js/capture.py qwen-code [--version 0.24.4]

Each run installs the real agent from the npm registry into a throwaway directory, starts two
servers on loopback, and runs the agent non-interactively twice in one conversation (a prompt
that makes the model call a tool, then a follow-up continuing the same session):

- a stand-in OpenAI Chat Completions API (streamed or not) whose every answer bills the same
  fixed usage (USAGE below: cached tokens inside the prompt, reasoning tokens inside the
  completion, as OpenAI reports them), and which answers a first prompt with a call to one of
  the agent's read-only tools so that a prompt takes several model calls;
- an OTLP/HTTP receiver that keeps every request (path, content type, body) and answers
  success.

HOME, XDG directories and the working directory are temporary, so nothing of the machine's own
configuration is read or changed. The bodies are saved decoded to OTLP/JSON (ids in hex), as
the other captures in tests/captures are: strings over 500 characters elided, the temporary
paths replaced by placeholders. The files land in tests/captures/<agent>-<version>/:
exports.json (every request, in arrival order), flat.jsonl (one line per record, to read),
fake_api_requests.jsonl (what the stand-in was asked and answered) and runs.txt (the agent's
output). That folder's README.txt, written by hand, says what the capture shows.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

CAPTURES = Path(__file__).resolve().parent.parent
# What every model call bills: OpenAI's semantics (cached inside prompt, reasoning inside
# completion). The replay tests derive their expected rows from these numbers.
USAGE = {"prompt_tokens": 1234, "completion_tokens": 77, "total_tokens": 1311,
         "prompt_tokens_details": {"cached_tokens": 500},
         "completion_tokens_details": {"reasoning_tokens": 33}}
# Tools the stand-in may call, first one the agent offers wins: read-only, so no approval.
READ_TOOLS = ("read", "read_file", "list", "list_directory", "glob", "ls")
FILE_NAME = "notes.txt"
MAX_STRING = 500
REQUESTS: dict[str, Any] = {"/v1/traces": ExportTraceServiceRequest,
                            "/v1/logs": ExportLogsServiceRequest,
                            "/v1/metrics": ExportMetricsServiceRequest}
ID_KEYS = ("traceId", "spanId", "parentSpanId")
# How long an agent run may take, and how long to wait for exports after it exits.
RUN_TIMEOUT_S = 240
SETTLE_S = 3.0
SERVER_STOP_S = 20


# -- the stand-in model API ----------------------------------------------------------------------

class ModelApi:
    """OpenAI Chat Completions with fixed usage; records a summary of each request."""

    def __init__(self, model: str, file_path: str) -> None:
        self.model = model
        self.file_path = file_path
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The message to send back: a tool call for a fresh prompt that asks for one, else
        text (JSON when the agent asks for JSON, as Qwen Code's side queries do)."""
        messages = request.get("messages") or []
        tools = [t.get("function", {}).get("name") for t in request.get("tools") or []]
        last = messages[-1] if messages else {}
        text = json.dumps(last.get("content"))
        wants_tool = last.get("role") == "user" and TOOL_PROMPT in text and tools
        tool = next((t for t in READ_TOOLS if t in tools), None) if wants_tool else None
        with self.lock:
            n = len(self.calls) + 1
            self.calls.append({"n": n, "stream": bool(request.get("stream")),
                               "model": request.get("model"), "messages": len(messages),
                               "last_role": last.get("role"), "tools": len(tools),
                               "answer": f"tool_call {tool}" if tool else "text"})
        if tool is not None:
            args = {"filePath": self.file_path, "file_path": self.file_path,
                    "absolute_path": self.file_path}
            return {"id": f"chatcmpl-standin-{n}", "tool": tool, "args": json.dumps(args)}
        wanted_json = ("json" in json.dumps(request.get("response_format") or "").lower()
                       or "next_speaker" in text)
        content = (json.dumps({"reasoning": "The answer is complete.",
                               "next_speaker": "user"})
                   if wanted_json else "The file says hello. Done.")
        return {"id": f"chatcmpl-standin-{n}", "text": content}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # /v1/models
                body = json.dumps({"object": "list", "data": [
                    {"id": api.model, "object": "model", "owned_by": "standin"}]}).encode()
                self._send(200, "application/json", body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, "application/json", b'{"error": "not here"}')
                    return
                answer = api.answer(request)
                if request.get("stream"):
                    self._stream(answer)
                else:
                    self._send(200, "application/json", json.dumps(self._whole(answer)).encode())

            def _whole(self, answer: dict[str, Any]) -> dict[str, Any]:
                message: dict[str, Any] = {"role": "assistant", "content": answer.get("text")}
                if "tool" in answer:
                    message["tool_calls"] = [{"id": "call_standin_1", "type": "function",
                                              "function": {"name": answer["tool"],
                                                           "arguments": answer["args"]}}]
                return {"id": answer["id"], "object": "chat.completion",
                        "created": int(time.time()), "model": api.model,
                        "choices": [{"index": 0, "message": message,
                                     "finish_reason": "tool_calls" if "tool" in answer
                                     else "stop"}],
                        "usage": USAGE}

            def _stream(self, answer: dict[str, Any]) -> None:
                base = {"id": answer["id"], "object": "chat.completion.chunk",
                        "created": int(time.time()), "model": api.model}

                def chunk(delta: dict[str, Any], finish: str | None = None,
                          **extra: Any) -> dict[str, Any]:
                    return {**base, "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}], **extra}

                chunks = [chunk({"role": "assistant", "content": ""})]
                if "tool" in answer:
                    chunks.append(chunk({"tool_calls": [{
                        "index": 0, "id": "call_standin_1", "type": "function",
                        "function": {"name": answer["tool"], "arguments": answer["args"]}}]}))
                    chunks.append(chunk({}, "tool_calls"))
                else:
                    chunks.append(chunk({"content": answer["text"]}))
                    chunks.append(chunk({}, "stop"))
                chunks.append({**base, "choices": [], "usage": USAGE})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for c in chunks:
                    self.wfile.write(f"data: {json.dumps(c)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _send(self, status: int, ctype: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


# -- the OTLP receiver ---------------------------------------------------------------------------

class OtlpSink:
    """OTLP/HTTP on loopback: keeps each request as it came, answers an empty success."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    raw = self._chunked()
                else:
                    raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with sink.lock:
                    sink.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "raw": raw})
                ctype = self.headers.get("Content-Type", "")
                proto = "protobuf" in ctype
                body = b"" if proto else b"{}"
                self.send_response(200)
                self.send_header("Content-Type",
                                 "application/x-protobuf" if proto else "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _chunked(self) -> bytes:
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()

        return Handler


def decode(path: str, ctype: str, raw: bytes) -> dict[str, Any]:
    """The body as OTLP/JSON with ids in hex (protobuf decoded, JSON as sent)."""
    if "protobuf" in ctype:
        message = REQUESTS[path.split("?")[0]]()
        message.ParseFromString(raw)
        body: dict[str, Any] = MessageToDict(message)
        _hex_ids(body)
        return body
    parsed: dict[str, Any] = json.loads(raw)
    return parsed


def _hex_ids(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ID_KEYS and isinstance(value, str):
                node[key] = base64.b64decode(value).hex()
            else:
                _hex_ids(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids(item)


def scrub(node: Any, replace: Callable[[str], str]) -> Any:
    """Long strings elided, local paths and names replaced, everything else kept."""
    if isinstance(node, dict):
        return {k: scrub(v, replace) for k, v in node.items()}
    if isinstance(node, list):
        return [scrub(v, replace) for v in node]
    if isinstance(node, str):
        node = replace(node)
        if len(node) > MAX_STRING:
            return f"<{len(node)} characters elided>"
    return node


# Spans left out of flat.jsonl (still in exports.json): opencode's database statements, a
# third of its spans and nothing a reader of usage looks for.
FLAT_SKIPPED = ("sql.execute",)


def flat(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per span, log record and metric, for reading the capture at a glance."""
    def attrs(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {a["key"]: next(iter(a.get("value", {}).values()), None) for a in items}

    out: list[dict[str, Any]] = []
    for entry in entries:
        body = entry["body"]
        for rs in body.get("resourceSpans", []):
            for ss in rs.get("scopeSpans", []):
                for s in ss.get("spans", []):
                    if s.get("name") in FLAT_SKIPPED:
                        continue
                    out.append({"kind": "span", "scope": ss.get("scope", {}).get("name"),
                                "name": s.get("name"), "traceId": s.get("traceId"),
                                "spanId": s.get("spanId"), "parent": s.get("parentSpanId"),
                                "start": s.get("startTimeUnixNano"),
                                "end": s.get("endTimeUnixNano"),
                                "attrs": attrs(s.get("attributes", []))})
        for rl in body.get("resourceLogs", []):
            for sl in rl.get("scopeLogs", []):
                for r in sl.get("logRecords", []):
                    out.append({"kind": "log", "scope": sl.get("scope", {}).get("name"),
                                "event": r.get("eventName"), "body": r.get("body"),
                                "traceId": r.get("traceId"), "spanId": r.get("spanId"),
                                "time": r.get("timeUnixNano"),
                                "attrs": attrs(r.get("attributes", []))})
        for rm in body.get("resourceMetrics", []):
            for sm in rm.get("scopeMetrics", []):
                for m in sm.get("metrics", []):
                    kind = next((k for k in ("sum", "gauge", "histogram") if k in m), "")
                    points = m.get(kind, {}).get("dataPoints", [])
                    out.append({"kind": "metric", "scope": sm.get("scope", {}).get("name"),
                                "name": m.get("name"), "type": kind,
                                "temporality": m.get(kind, {}).get("aggregationTemporality"),
                                "points": [{"attrs": attrs(p.get("attributes", [])),
                                            "value": p.get("asInt", p.get("asDouble",
                                                                          p.get("sum")))}
                                           for p in points]})
    return out


# -- the agents ----------------------------------------------------------------------------------

TOOL_PROMPT = "Use a tool to read notes.txt"
PROMPTS = (f"{TOOL_PROMPT}, then tell me what it says.",
           "Thanks. Say it once more in one sentence.")


def install(package: str, version: str, where: Path) -> Path:
    """npm install of the agent; returns its node_modules/.bin."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "package.json").write_text('{"name": "capture", "private": true}\n')
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                    f"{package}@{version}"], cwd=where, check=True)
    return where / "node_modules" / ".bin"


@dataclass
class Plan:
    """How one agent is run: the commands in order, an optional server they attach to (kept
    running until its exports settle), and the environment they add."""

    runs: list[list[str]]
    env: dict[str, str]
    server: list[str] | None = None
    server_port: int = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def opencode_plan(bin_dir: Path, home: Path, api: ModelApi, sink: OtlpSink,
                  model: str) -> Plan:
    """`opencode run` exits without exporting its last batch of spans (the end of a prompt
    is lost), so the prompts run on an `opencode serve` that `opencode run --attach` talks
    to, as the TUI does; the server is stopped once its exports have settled."""
    config = {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "experimental": {"openTelemetry": True},
        "model": f"standin/{model}",
        "small_model": f"standin/{model}",
        "provider": {"standin": {
            "npm": "@ai-sdk/openai-compatible", "name": "Stand-in",
            "options": {"baseURL": api.url, "apiKey": "fake"},
            "models": {model: {"name": model, "tool_call": True, "reasoning": True,
                               "limit": {"context": 128000, "output": 16000}}}}},
    }
    config_dir = home / ".config" / "opencode"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "opencode.json").write_text(json.dumps(config, indent=1))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url, "OTEL_BSP_SCHEDULE_DELAY": "500",
           "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_MODELS_FETCH": "1",
           "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_SHARE": "1"}
    exe = str(bin_dir / "opencode")
    port = free_port()
    attach = ["--attach", f"http://127.0.0.1:{port}"]
    return Plan(runs=[[exe, "run", *attach, PROMPTS[0]],
                      [exe, "run", *attach, "--continue", PROMPTS[1]]],
                env=env, server=[exe, "serve", "--port", str(port)], server_port=port)


def qwen_plan(bin_dir: Path, home: Path, api: ModelApi, sink: OtlpSink, model: str) -> Plan:
    settings = {
        "telemetry": {"enabled": True, "target": "local", "otlpEndpoint": sink.url,
                      "otlpProtocol": "http", "logPrompts": False},
        "security": {"auth": {"selectedType": "openai"}},
        "model": {"name": model},
        "privacy": {"usageStatisticsEnabled": False},
        "general": {"disableAutoUpdate": True, "disableUpdateNag": True},
    }
    settings_dir = home / ".qwen"
    settings_dir.mkdir(parents=True, exist_ok=True)
    (settings_dir / "settings.json").write_text(json.dumps(settings, indent=1))
    env = {"OPENAI_API_KEY": "fake", "OPENAI_BASE_URL": api.url, "OPENAI_MODEL": model}
    exe = str(bin_dir / "qwen")
    common = ["--auth-type", "openai", "--model", model]
    return Plan(runs=[[exe, *common, "--prompt", PROMPTS[0]],
                      [exe, *common, "--continue", "--prompt", PROMPTS[1]]], env=env)


AGENTS: dict[str, tuple[str, str, str, Callable[..., Plan]]] = {
    # name: (npm package, default version, model the stand-in reports, runs)
    "opencode": ("opencode-ai", "1.18.33", "gpt-4.1-mini", opencode_plan),
    "qwen-code": ("@qwen-code/qwen-code", "0.24.4", "qwen3-coder-plus", qwen_plan),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("agent", choices=sorted(AGENTS))
    parser.add_argument("--version", help="the npm version (default: the one last captured)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--installed", type=Path,
                        help="a directory where the agent is already npm-installed")
    args = parser.parse_args()
    package, default_version, model, make_plan = AGENTS[args.agent]
    version = args.version or default_version
    out_dir = CAPTURES / f"{args.agent}-{version}"
    tmp = Path(tempfile.mkdtemp(prefix=f"capture-{args.agent}-"))
    home, work = tmp / "home", tmp / "work"
    for d in (home, work):
        d.mkdir()
    (work / FILE_NAME).write_text("hello from the capture\n")
    logs: list[str] = []
    api, sink = ModelApi(model, str(work / FILE_NAME)), OtlpSink()
    for httpd in (api.server, sink.server):
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        bin_dir = (args.installed / "node_modules" / ".bin" if args.installed
                   else install(package, version, tmp / "npm"))
        plan = make_plan(bin_dir, home, api, sink, model)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "TERM": "dumb",
               "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_DATA_HOME": str(home / ".local" / "share"),
               "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".state"),
               "NO_COLOR": "1", "CI": "1", **plan.env}
        server: subprocess.Popen[bytes] | None = None
        if plan.server is not None:
            server = subprocess.Popen(plan.server, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_for_port(plan.server_port)
        try:
            for n, argv in enumerate(plan.runs, 1):
                before = len(sink.requests)
                done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                                      timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)
                settle(sink)
                shown = " ".join([Path(argv[0]).name, *argv[1:]])
                logs.append(f"run {n}: {shown}\nexit {done.returncode}; "
                            f"{len(sink.requests) - before} OTLP requests\n"
                            f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-2000:]}\n")
                print(logs[-1], file=sys.stderr)
                if done.returncode != 0:
                    break
        finally:
            if server is not None:
                server.send_signal(signal.SIGINT)  # as a user stops it
                try:
                    server.wait(timeout=SERVER_STOP_S)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
                settle(sink)
    finally:
        api.server.shutdown()
        sink.server.shutdown()

    installed = str(args.installed.resolve()) if args.installed else str(tmp / "npm")
    places = [(installed, "/tmp/capture/npm"), (str(work), "/tmp/capture/work"),
              (str(home), "/tmp/capture/home"), (str(tmp), "/tmp/capture")]
    # Also as the agents quote them: URL-encoded, and relative to the root.
    places += [(quote(a, safe=""), quote(b, safe="")) for a, b in places]
    places += [(a.lstrip("/"), b.lstrip("/")) for a, b in places if a.startswith("/")]

    def replace(text: str) -> str:
        for needle, placeholder in places:
            text = text.replace(needle, placeholder)
        return text

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    entries = []
    for request in sink.requests:
        ctype = request["headers"].get("Content-Type", "")
        entries.append({"transport": "http", "path": request["path"],
                        "headers": {k: v for k, v in request["headers"].items()
                                    if k.lower() not in ("host",)},
                        "raw_len": len(request["raw"]),
                        "body": scrub(decode(request["path"], ctype, request["raw"]), replace)})
    (out_dir / "exports.json").write_text(json.dumps(entries, indent=1) + "\n")
    (out_dir / "flat.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in flat(entries)))
    (out_dir / "fake_api_requests.jsonl").write_text(
        "".join(json.dumps(call) + "\n" for call in api.calls))
    (out_dir / "runs.txt").write_text(replace("\n".join(logs)))
    print(f"{len(entries)} OTLP requests, {len(api.calls)} model calls -> {out_dir}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"the agent's server did not listen on {port}")


def settle(sink: OtlpSink) -> None:
    """Wait until no export has arrived for SETTLE_S (late exports after a run ends)."""
    seen, quiet_since = -1, time.monotonic()
    while time.monotonic() - quiet_since < SETTLE_S:
        if len(sink.requests) != seen:
            seen, quiet_since = len(sink.requests), time.monotonic()
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
