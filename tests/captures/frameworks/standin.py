"""A stand-in OpenAI API and an OTLP capture receiver, both on loopback, for capture.py.

The API answers Chat Completions and Responses, streamed or not, always with the same usage
(USAGE below), so every row a capture gives can be derived by hand. A request that offers
tools and carries no tool result yet gets a tool call; every other request gets text. Two
agent runs in one conversation therefore make three model calls: call, tool call answered,
and the second run's single call over the whole history.

The receiver keeps each request body as sent (protobuf) with its path and content type.
Standard library only: the driver runs it under any Python.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MODEL = "gpt-5"
INPUT_TOKENS = 1234  # includes CACHED_TOKENS, as OpenAI bills
CACHED_TOKENS = 500
OUTPUT_TOKENS = 77  # includes REASONING_TOKENS
REASONING_TOKENS = 33
TOOL_NAME = "get_weather"
TOOL_ARGUMENTS = '{"city": "Paris"}'
ANSWER = "It is sunny and 21 C in Paris; no umbrella needed."

CHAT_USAGE = {
    "prompt_tokens": INPUT_TOKENS, "completion_tokens": OUTPUT_TOKENS,
    "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
    "prompt_tokens_details": {"cached_tokens": CACHED_TOKENS, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": REASONING_TOKENS, "audio_tokens": 0,
                                  "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}
RESPONSES_USAGE = {
    "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS,
    "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
    "input_tokens_details": {"cached_tokens": CACHED_TOKENS},
    "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
}


def wants_tool_call(body: dict[str, Any]) -> bool:
    """Offer tools and no tool result in the history yet: the first step of a run."""
    if not body.get("tools"):
        return False
    if body.get("previous_response_id"):
        return False
    for message in body.get("messages") or []:
        if message.get("role") == "tool":
            return False
    items = body.get("input")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and item.get("type") == "function_call_output":
                return False
    return True


@dataclass
class CallLog:
    """What the API was asked, in order: endpoint, streamed, answered with a tool call."""

    calls: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **entry: Any) -> int:
        with self.lock:
            self.calls.append(entry)
            return len(self.calls)


def _chat(body: dict[str, Any], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A Chat Completion and the chunks that stream it."""
    created = int(time.time())
    base = {"id": f"chatcmpl-standin{n}", "created": created, "model": MODEL,
            "system_fingerprint": "fp_standin"}
    if wants_tool_call(body):
        call = {"id": f"call_standin{n}", "type": "function",
                "function": {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS}}
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
        finish = "tool_calls"
        deltas: list[dict[str, Any]] = [
            {"role": "assistant", "content": None,
             "tool_calls": [{"index": 0, **call}]}]
    else:
        message = {"role": "assistant", "content": ANSWER}
        finish = "stop"
        half = len(ANSWER) // 2
        deltas = [{"role": "assistant", "content": ANSWER[:half]}, {"content": ANSWER[half:]}]
    whole = {**base, "object": "chat.completion", "usage": CHAT_USAGE,
             "choices": [{"index": 0, "message": message, "finish_reason": finish,
                          "logprobs": None}]}
    chunk = {**base, "object": "chat.completion.chunk"}
    chunks = [{**chunk, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
              for d in deltas]
    chunks.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    chunks.append({**chunk, "choices": [], "usage": CHAT_USAGE})
    return whole, chunks


def _responses(body: dict[str, Any], n: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A Response and the events that stream it."""
    rid = f"resp_standin{n}"
    if wants_tool_call(body):
        item: dict[str, Any] = {"type": "function_call", "id": f"fc_standin{n}",
                                "call_id": f"call_standin{n}", "name": TOOL_NAME,
                                "arguments": TOOL_ARGUMENTS, "status": "completed"}
    else:
        item = {"type": "message", "id": f"msg_standin{n}", "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": ANSWER, "annotations": []}]}
    response: dict[str, Any] = {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
        "model": MODEL, "output": [item], "usage": RESPONSES_USAGE, "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": body.get("tools") or [], "error": None,
        "incomplete_details": None, "instructions": body.get("instructions"),
        "metadata": {}, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}},
        "reasoning": {"effort": None, "summary": None}, "truncation": "disabled",
        "previous_response_id": body.get("previous_response_id"), "store": True,
    }
    started = {**response, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": started},
        {"type": "response.in_progress", "response": started},
    ]
    if item["type"] == "function_call":
        events += [
            {"type": "response.output_item.added", "output_index": 0,
             "item": {**item, "arguments": "", "status": "in_progress"}},
            {"type": "response.function_call_arguments.delta", "output_index": 0,
             "item_id": item["id"], "delta": TOOL_ARGUMENTS},
            {"type": "response.function_call_arguments.done", "output_index": 0,
             "item_id": item["id"], "arguments": TOOL_ARGUMENTS},
        ]
    else:
        part = {"type": "output_text", "text": "", "annotations": []}
        events += [
            {"type": "response.output_item.added", "output_index": 0,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", "output_index": 0, "content_index": 0,
             "item_id": item["id"], "part": part},
            {"type": "response.output_text.delta", "output_index": 0, "content_index": 0,
             "item_id": item["id"], "delta": ANSWER, "logprobs": []},
            {"type": "response.output_text.done", "output_index": 0, "content_index": 0,
             "item_id": item["id"], "text": ANSWER, "logprobs": []},
            {"type": "response.content_part.done", "output_index": 0, "content_index": 0,
             "item_id": item["id"], "part": {**part, "text": ANSWER}},
        ]
    events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
               {"type": "response.completed", "response": response}]
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return response, events


class _ApiHandler(BaseHTTPRequestHandler):
    server: _ApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        path = self.path.split("?")[0].rstrip("/")
        stream = bool(body.get("stream"))
        if path.endswith("/chat/completions"):
            endpoint, build = "chat.completions", _chat
        elif path.endswith("/responses"):
            endpoint, build = "responses", _responses
        else:
            self.send_error(404)
            return
        tool_call = wants_tool_call(body)
        n = self.server.log.add(endpoint=endpoint, stream=stream, tool_call=tool_call,
                                model=body.get("model"))
        whole, parts = build(body, n)
        if not stream:
            data = json.dumps(whole).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for part in parts:
            head = f"event: {part['type']}\n" if endpoint == "responses" else ""
            self.wfile.write(f"{head}data: {json.dumps(part)}\n\n".encode())
            self.wfile.flush()
        if endpoint == "chat.completions":
            self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, log: CallLog) -> None:
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.log = log


@dataclass
class Received:
    """One OTLP request as the exporter sent it."""

    path: str
    content_type: str
    headers: dict[str, str]
    body: bytes


class _ReceiverHandler(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.server.add(Received(self.path, self.headers.get("content-type", ""),
                                 {k.lower(): v for k, v in self.headers.items()}, body))
        # An empty Export*ServiceResponse is an empty protobuf message: success.
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.received: list[Received] = []
        self.lock = threading.Lock()

    def add(self, item: Received) -> None:
        with self.lock:
            self.received.append(item)


class Servers:
    """The stand-in API and the receiver, serving in threads until closed."""

    def __init__(self) -> None:
        self.log = CallLog()
        self.api = _ApiServer(self.log)
        self.receiver = _Receiver()
        for server in (self.api, self.receiver):
            threading.Thread(target=server.serve_forever, daemon=True).start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api.server_address[1]}/v1"

    @property
    def otlp_url(self) -> str:
        return f"http://127.0.0.1:{self.receiver.server_address[1]}"

    def take(self) -> tuple[list[dict[str, Any]], list[Received]]:
        """What was asked and received since the last take."""
        with self.log.lock, self.receiver.lock:
            calls, self.log.calls = self.log.calls, []
            received, self.receiver.received = self.receiver.received, []
        return calls, received

    def close(self) -> None:
        for server in (self.api, self.receiver):
            server.shutdown()
            server.server_close()
