"""The agents people run, end to end: their captured payloads replayed through the real
receivers over real sockets (HTTP protobuf, HTTP JSON in chunks, gRPC), every request sent
twice, and the whole row read back from the database.

The expected rows follow from what the stand-in model APIs billed per call (see each capture's
README.txt): Claude Code 1234 input + 5000 cache read + 600 cache write + 77 output at
$0.008607; Codex and Copilot 1234 input including 500 cached, 77 output including 33
reasoning; Gemini CLI 1234 input including 500 cached, 77 output and 33 thoughts billed as
output.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse

from collector.accounting.pricing import Pricer
from collector.receivers.otlp import JSON, PROTOBUF, WIRES
from tests.conftest import Daemon
from tests.replay import Export, exports
from tests.test_receivers import post

TRANSPORTS = ("http-protobuf", "http-json", "grpc")
# The captures are days old: keep the stale sweep from presuming their sessions dead.
NOT_STALE = "[sessions]\nstale_after_s = 1000000000\n"
CLAUDE_197 = ["claude-code-2.1.197/session_2prompts_tooluse_delta_run4.json"]
CLAUDE_328 = [f"claude-code-2.1.328/run1_{s}_http-protobuf_decoded.json"
              for s in ("logs", "traces", "metrics")]
CODEX = [f"codex-0.169.0/run1_{s}_http-protobuf_decoded.json"
         for s in ("logs", "traces", "metrics")]
GEMINI = ["gemini-cli-0.61.0/logs.traces_enabled.json",
          "gemini-cli-0.61.0/traces.traces_enabled.json", "gemini-cli-0.61.0/metrics.json"]
GEMINI_GRPC = [f"gemini-cli-0.61.0-grpc/run1_traces-on_{s}_grpc_decoded.json"
               for s in ("logs", "traces", "metrics")]
COPILOT = [f"copilot-1.0.102/run1_{s}_http-protobuf_decoded.json" for s in ("traces", "metrics")]


def cents(model: str, uncached: int, cache_read: int, cache_write: int, output: int) -> float:
    value = Pricer({}).cost_cents(model, "", uncached, cache_read, cache_write, output)
    assert value is not None
    return value


def row(session: str, model: str, created: str, last: str, turns: int, prompt: int,
        completion: int, reasoning: int, cost: float) -> dict[str, Any]:
    return {"id": session, "kind": "interactive", "status": "active", "channel": "cli",
            "model": model, "created_at": created, "last_active_at": last, "turns": turns,
            "prompt_tokens": prompt, "completion_tokens": completion,
            "reasoning_tokens": reasoning, "cost_cents": pytest.approx(cost, rel=1e-12),
            "goal_text": None}


CASES: dict[str, tuple[list[str], dict[str, Any]]] = {
    "claude-code-2.1.197": (CLAUDE_197, row(
        "56f110ec-4435-4f35-8d03-f7f16d749614", "claude-sonnet-4-5",
        "2026-11-24T07:24:43.585Z", "2026-11-24T07:24:48.177Z", 2, 3 * 6834, 3 * 77, 0,
        3 * 0.8607)),
    "claude-code-2.1.328": (CLAUDE_328, row(
        "dbe57f53-a362-4811-8105-ac81484a64ef", "claude-sonnet-4-5",
        "2026-11-29T07:42:58.698Z", "2026-11-29T07:42:58.802Z", 1, 6834, 77, 0, 0.8607)),
    "codex-0.169.0": (CODEX, row(
        "01a22640-fc06-7421-934b-1ba2e2fb92cf", "gpt-5-codex", "2026-11-29T07:42:02.884Z",
        "2026-11-29T07:42:02.911Z", 1, 1234, 77, 33, cents("gpt-5-codex", 734, 500, 0, 77))),
    "gemini-cli-0.61.0": (GEMINI, row(
        "21d3ad85-c647-45c7-ab42-8696147e209a", "gemini-2.5-flash",
        "2026-11-24T07:13:12.120Z", "2026-11-24T07:13:12.235Z", 1, 1234, 110, 33,
        cents("gemini-2.5-flash", 734, 500, 0, 110))),
    "gemini-cli-0.61.0-grpc": (GEMINI_GRPC, row(
        "220fcdd3-1d0b-4a28-b5cf-950dd1af0e83", "gemini-2.5-flash",
        "2026-11-29T07:43:23.539Z", "2026-11-29T07:43:23.750Z", 1, 1234, 110, 33,
        cents("gemini-2.5-flash", 734, 500, 0, 110))),
    "copilot-1.0.102": (COPILOT, row(
        "6158067a-1eb4-4433-ae03-9ee1331058f0", "gpt-5", "2026-11-29T07:44:45.846Z",
        "2026-11-29T07:44:45.910Z", 1, 1234, 77, 33, cents("gpt-5", 734, 500, 0, 77))),
}


def send(daemon: Daemon, item: Export, transport: str) -> None:
    """One export as an agent's exporter sends it, answered success."""
    wire = WIRES[item.signal]
    if transport == "grpc":
        with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
            method = channel.unary_unary(f"/{wire.service}/Export", request_serializer=None,
                                         response_deserializer=None)
            method(item.protobuf(), timeout=20)
        return
    if transport == "http-json":
        status, _, body = post(daemon, item.json_bytes(), content_type=JSON, path=wire.path,
                               chunked=True)
    else:
        status, _, body = post(daemon, item.protobuf(), content_type=PROTOBUF, path=wire.path)
    assert status == 200, body


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """One daemon per transport, so the same captures can be replayed on each."""
    started: dict[str, Daemon] = {}
    try:
        for transport in TRANSPORTS:
            started[transport] = Daemon(tmp_path_factory.mktemp(transport), NOT_STALE).start()
        yield started
    finally:
        for daemon in started.values():
            daemon.kill()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("agent", list(CASES))
def test_each_agent_gives_its_exact_row(daemons: dict[str, Daemon], agent: str,
                                        transport: str) -> None:
    """All the agent's signals, every request sent twice: each call and turn counted once."""
    daemon = daemons[transport]
    names, expected = CASES[agent]
    for item in exports(*names):
        send(daemon, item, transport)
        send(daemon, item, transport)
    assert daemon.row(expected["id"]) == expected


def test_restart_between_a_prompts_log_records_and_its_spans(start_daemon: Any) -> None:
    """Claude Code's logs arrive, the collector restarts, then the spans that repeat them."""
    items = exports(*CLAUDE_197)
    first_span = next(i for i, item in enumerate(items) if item.signal.value == "traces")
    daemon = start_daemon(NOT_STALE)
    for item in items[:first_span]:
        send(daemon, item, "http-protobuf")
    assert daemon.stop() == 0
    daemon.start()
    for item in items[first_span:]:
        send(daemon, item, "http-protobuf")
    assert daemon.row(CASES["claude-code-2.1.197"][1]["id"]) == CASES["claude-code-2.1.197"][1]


# -- cumulative metrics as the source of truth ---------------------------------------------------

GEMINI_FROM_METRICS = '[dialects.gemini_cli]\nsource = "metrics"\n'
GEMINI_METRICS_SESSION = "d1db6261-2362-42ba-9969-30fda4d96db8"
SECOND = 1_000_000_000


def gemini_metrics(scale: int, later_s: int, new_start: bool = False) -> Export:
    """gemini-cli-0.61.0/metrics.json with its token counters at `scale` times their value,
    `later_s` seconds later; `new_start`: the process restarted (a new start time)."""
    item = exports("gemini-cli-0.61.0/metrics.json")[0]
    body = copy.deepcopy(item.body)
    for rm in body["resourceMetrics"]:
        for sm in rm["scopeMetrics"]:
            for metric in sm["metrics"]:
                for point in metric.get("sum", {}).get("dataPoints", []):
                    if "asInt" in point:
                        point["asInt"] = str(int(point["asInt"]) * scale)
                    point["timeUnixNano"] = str(int(point["timeUnixNano"]) + later_s * SECOND)
                    if new_start:
                        point["startTimeUnixNano"] = str(
                            int(point["startTimeUnixNano"]) + later_s * SECOND)
    return Export(item.signal, json.loads(json.dumps(body)))


def usage_of(daemon: Daemon) -> tuple[int, int, int, int, float]:
    r = daemon.row(GEMINI_METRICS_SESSION)
    return (r["turns"], r["prompt_tokens"], r["completion_tokens"], r["reasoning_tokens"],
            r["cost_cents"])


def test_cumulative_metrics_across_a_restart_and_a_reset(start_daemon: Any) -> None:
    one_call = cents("gemini-2.5-flash", 734, 500, 0, 110)
    daemon = start_daemon(GEMINI_FROM_METRICS + NOT_STALE)
    send(daemon, gemini_metrics(1, 0), "http-protobuf")
    turns, prompt, completion, reasoning, cost = usage_of(daemon)
    assert (turns, prompt, completion, reasoning) == (0, 1234, 110, 33)
    assert cost == pytest.approx(one_call, rel=1e-9)
    # The same cumulative values again (an exporter's retry, a repeated export): nothing.
    send(daemon, gemini_metrics(1, 0), "grpc")
    assert daemon.stop() == 0
    daemon.start()
    # After the restart the stored value is the baseline: three calls in all now adds two.
    send(daemon, gemini_metrics(3, 60), "http-json")
    send(daemon, gemini_metrics(1, 0), "http-protobuf")  # a late, older export: nothing
    assert usage_of(daemon)[:4] == (0, 3 * 1234, 3 * 110, 3 * 33)
    # The agent restarted: its counters start over at a new start time and count in full.
    send(daemon, gemini_metrics(2, 120, new_start=True), "http-protobuf")
    send(daemon, gemini_metrics(2, 120, new_start=True), "http-protobuf")
    turns, prompt, completion, reasoning, cost = usage_of(daemon)
    assert (turns, prompt, completion, reasoning) == (0, 5 * 1234, 5 * 110, 5 * 33)
    assert cost == pytest.approx(5 * one_call, rel=1e-9)


def test_delta_metrics_as_the_source_count_each_point_once(start_daemon: Any) -> None:
    """Claude Code told to count from its delta metrics: its cost metric is the cost, its
    logs and spans (whose request ids metrics do not carry) only give the turns."""
    daemon = start_daemon('[dialects.claude_code]\nsource = "metrics"\n' + NOT_STALE)
    for item in exports(*CLAUDE_197):
        send(daemon, item, "http-protobuf")
        send(daemon, item, "grpc")
    expected = CASES["claude-code-2.1.197"][1]
    got = daemon.row(expected["id"])
    assert {k: got[k] for k in ("turns", "prompt_tokens", "completion_tokens", "model")} == {
        "turns": 2, "prompt_tokens": 3 * 6834, "completion_tokens": 3 * 77,
        "model": "claude-sonnet-4-5"}
    assert got["cost_cents"] == pytest.approx(3 * 0.8607, rel=1e-9)


def test_metrics_are_not_usage_while_logs_are_the_source(daemons: dict[str, Daemon]) -> None:
    send(daemons["grpc"], gemini_metrics(7, 0), "grpc")
    assert GEMINI_METRICS_SESSION not in daemons["grpc"].rows()


def test_a_renamed_attribute_handled_by_a_config_dialect(start_daemon: Any) -> None:
    items = exports(*CODEX[:1])
    text = json.dumps(items[0].body).replace('"input_token_count"', '"input_tokens_v2"')
    renamed = Export(items[0].signal, json.loads(text))
    daemon = start_daemon('[dialects.codex.attributes]\ninput = ["input_tokens_v2"]\n'
                          + NOT_STALE)
    send(daemon, renamed, "http-protobuf")
    assert daemon.row(CASES["codex-0.169.0"][1]["id"]) == CASES["codex-0.169.0"][1]


def test_who_spends_is_recorded_from_each_dialect(daemons: dict[str, Daemon]) -> None:
    """The agent (service.name) and the dialect's user attribute, per session, for the fleet
    view and `collector report agent|user`."""
    daemon = daemons["http-protobuf"]
    for name in ("claude-code-2.1.328", "codex-0.169.0", "gemini-cli-0.61.0"):
        for item in exports(*CASES[name][0]):
            send(daemon, item, "http-protobuf")  # duplicates if already sent: no new usage
    conn = sqlite3.connect(daemon.db_path)
    try:
        labels = {row[0]: row[1:] for row in conn.execute(
            "SELECT id, agent, user_name FROM collector_session_labels")}
    finally:
        conn.close()
    assert labels[CASES["claude-code-2.1.328"][1]["id"]] == (
        "claude-code", "9cbb8c88fe1a46a266a5b81e99c3cb0835e77403457b38d338c993b84ac5f470")
    assert labels[CASES["codex-0.169.0"][1]["id"]][0] == "codex_exec"
    assert labels[CASES["gemini-cli-0.61.0"][1]["id"]] == (
        "gemini-cli", "84816f56-3e6d-436d-aa19-c232b0cab64f")
    assert daemon.row(CASES["codex-0.169.0"][1]["id"]) == CASES["codex-0.169.0"][1]


def test_a_bad_log_record_is_rejected_and_the_rest_accounted(start_daemon: Any) -> None:
    """Partial success names rejected_log_records with a message; the other records count."""
    item = exports(CLAUDE_328[0])[0]
    text = json.dumps(item.body).replace('"intValue": "1234"', '"stringValue": "lots"', 1)
    bad = Export(item.signal, json.loads(text))
    daemon = start_daemon(NOT_STALE)
    status, _, body = post(daemon, bad.protobuf(), path="/v1/logs")
    assert status == 200
    answer = ExportLogsServiceResponse.FromString(body)
    assert answer.partial_success.rejected_log_records == 1
    assert "input_tokens must be an integer" in answer.partial_success.error_message
    got = daemon.row(CASES["claude-code-2.1.328"][1]["id"])
    assert (got["turns"], got["prompt_tokens"]) == (1, 0)  # the prompt counted, not the call
