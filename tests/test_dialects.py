"""Dialects: the built-ins, configured ones over them, and each agent's captured payloads read
through the mapping (pure: no daemon; tests/test_agents.py replays them over sockets)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from collector.accounting.aggregate import Batch
from collector.accounting.pricing import Pricer
from collector.config import ConfigError, parse_config
from collector.dialects import DialectSet, builtin_tables, effective_dialects
from collector.dialects.model import DialectError, merge_tables, parse_selector
from collector.pipeline import map_signal
from collector.signals import Signal
from collector.signals.traces import MappingOptions
from tests.conftest import T0
from tests.replay import Export, exports

OPTIONS = MappingOptions(pricer=Pricer({}))
CLAUDE_CALL = 1234 + 5000 + 600  # input excluding cache, plus cache read and write
CLAUDE_CALL_CENTS = 0.8607  # cost_usd 0.008607 in every api_request record


def fold(items: list[Export], options: MappingOptions = OPTIONS) -> Batch:
    """Map every export and fold the usage into one batch, which keeps each key once (as the
    store does across batches)."""
    batch = Batch()
    for item in items:
        result = map_signal(item.signal, item.request(), options, T0)
        assert not result.rejected, result.errors
        batch.add(result.records)
    return batch


def total(batch: Batch) -> dict[str, Any]:
    (session, delta), = batch.sessions.items()
    t = batch.totals()[session]
    return {"session": session, "model": delta.model, "turns": t.turns,
            "prompt": t.prompt_tokens, "completion": t.completion_tokens,
            "reasoning": t.reasoning_tokens, "cache_read": t.cache_read_tokens,
            "cache_write": t.cache_write_tokens, "cents": round(t.cost_cents, 9)}


def priced(model: str, uncached: int, cache_read: int, cache_write: int, output: int) -> float:
    cents = Pricer({}).cost_cents(model, "", uncached, cache_read, cache_write, output)
    assert cents is not None, model
    return round(cents, 9)


# -- the built-ins ----------------------------------------------------------------------------

def test_builtins_load_through_the_config_loader() -> None:
    dialects = {d.name: d for d in effective_dialects()}
    assert set(dialects) == {"claude_code", "codex", "gemini_cli", "opencode", "qwen_code",
                             "vercel_ai"}
    assert set(builtin_tables()) == set(dialects)
    claude = dialects["claude_code"]
    assert not claude.input_includes_cache and claude.reasoning_in_output
    assert dialects["gemini_cli"].input_includes_cache
    assert not dialects["gemini_cli"].reasoning_in_output
    assert [str(s) for s in dialects["codex"].calls] == [
        "logs:codex.sse_event[event.kind=response.completed]"]


def test_dialect_set_recognises_by_service_or_scope() -> None:
    found = DialectSet(effective_dialects())
    assert found.find("claude-code", "x") is not None
    assert found.find("my-app", "com.anthropic.claude_code.events") is not None
    assert found.find("my-app", "ai").name == "vercel_ai"  # type: ignore[union-attr]
    assert found.find("codex_exec", "") .name == "codex"  # type: ignore[union-attr]
    assert found.find("my-app", "my-scope") is None


def test_config_override_replaces_one_attribute_and_keeps_the_rest() -> None:
    config = parse_config({"dialects": {"codex": {"attributes": {
        "input": ["input_tokens_v2"]}}}}, source="t.toml", base_dir=Path("."))
    codex = {d.name: d for d in config.dialects}["codex"]
    assert codex.names_for("input") == ("input_tokens_v2",)
    assert codex.names_for("output") == ("output_token_count",)  # built-in kept
    assert len(config.dialects) == len(builtin_tables())


def test_merge_tables_only_merges_attributes_and_metrics() -> None:
    merged = merge_tables({"calls": ["logs:a"], "attributes": {"a": ["x"], "b": ["y"]}},
                          {"calls": ["logs:b"], "attributes": {"b": ["z"]}})
    assert merged == {"calls": ["logs:b"], "attributes": {"a": ["x"], "b": ["z"]}}


def test_a_new_configured_dialect() -> None:
    config = parse_config({"dialects": {"my_agent": {
        "service_names": ["my-agent"], "source": "logs",
        "calls": ["logs:my.call"], "turns": ["logs:my.prompt"],
        "attributes": {"session_id": ["sid"], "input": ["in"], "output": ["out"]}}}},
        source="t.toml", base_dir=Path("."))
    mine = {d.name: d for d in config.dialects}["my_agent"]
    assert mine.summary()["calls"] == ["logs:my.call"]


@pytest.mark.parametrize(("table", "key", "problem"), [
    ({"codex": {"attributes": {"inptu": ["x"]}}}, "dialects.codex.attributes.inptu",
     "unknown role"),
    ({"codex": {"source": "carrier-pigeon"}}, "dialects.codex.source", "must be one of"),
    ({"codex": {"calls": ["spans:x"]}}, "dialects.codex.calls", "expected signal:name"),
    ({"codex": {"calls": ["logs:x[event.kind]"]}}, "dialects.codex.calls",
     "conditions are [attribute=value]"),
    ({"codex": {"turns": ["metrics:x"]}}, "dialects.codex.turns", "metric points go in"),
    ({"codex": {"colour": "blue"}}, "dialects.codex.colour", "unknown key"),
    ({"codex": "yes"}, "dialects.codex", "must be a table"),
    ({"codex": {"input_includes_cache": "yes"}}, "dialects.codex.input_includes_cache",
     "true or false"),
    ({"mine": {"calls": ["logs:x"], "attributes": {"session_id": ["s"]}}}, "dialects.mine",
     "needs service_names or scope_names"),
    ({"mine": {"service_names": ["m"], "attributes": {"session_id": ["s"]}}}, "dialects.mine",
     "names no records"),
    ({"mine": {"service_names": ["m"], "calls": ["logs:x"]}},
     "dialects.mine.attributes.session_id", "missing"),
    ({"gemini_cli": {"metrics": {"m": {"field": "tokens"}}}},
     'dialects.gemini_cli.metrics."m".field', "must be one of"),
    ({"gemini_cli": {"metrics": {"m": {"type_attribute": "type", "types": {"a": "x"}}}}},
     'dialects.gemini_cli.metrics."m".types.a', "must be one of"),
    ({"gemini_cli": {"metrics": {"m": {"types": {"a": "input"}}}}},
     'dialects.gemini_cli.metrics."m".type_attribute', "missing"),
])
def test_a_bad_dialect_names_the_key_and_the_file(table: dict[str, Any], key: str,
                                                  problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"dialects": table}, source="agents.toml", base_dir=Path("."))
    assert info.value.source == "agents.toml"
    assert info.value.key == key
    assert problem in info.value.problem


def test_selector_syntax() -> None:
    selector = parse_selector("logs:codex.sse_event[event.kind=response.completed][a=b]", "k")
    assert selector.where == (("event.kind", "response.completed"), ("a", "b"))
    with pytest.raises(DialectError):
        parse_selector("logs:", "k")


# -- each agent's captured payloads -------------------------------------------------------------

def test_claude_code_all_three_signals_count_each_call_once() -> None:
    """Two prompts, three API calls, each reported by a log record, a span and metric points:
    counted once (logs and spans share request_id; metrics repeat them)."""
    batch = fold(exports("claude-code-2.1.197/session_2prompts_tooluse_delta_run4.json"))
    assert total(batch) == {
        "session": "56f110ec-4435-4f35-8d03-f7f16d749614", "model": "claude-sonnet-4-5",
        "turns": 2, "prompt": 3 * CLAUDE_CALL, "completion": 3 * 77, "reasoning": 0,
        "cache_read": 3 * 5000, "cache_write": 3 * 600,
        "cents": round(3 * CLAUDE_CALL_CENTS, 9)}
    assert batch.duplicates == 3 + 2  # each call's span and each turn's second record


@pytest.mark.parametrize("names", [
    ["claude-code-2.1.328/run1_logs_http-protobuf_decoded.json"],
    ["claude-code-2.1.328/run1_traces_http-protobuf_decoded.json"],
    ["claude-code-2.1.328/run1_logs_http-protobuf_decoded.json",
     "claude-code-2.1.328/run1_traces_http-protobuf_decoded.json",
     "claude-code-2.1.328/run1_metrics_http-protobuf_decoded.json"],
])
def test_claude_code_logs_or_spans_alone_or_together(names: list[str]) -> None:
    t = total(fold(exports(*names)))
    assert (t["turns"], t["prompt"], t["completion"], t["cache_read"], t["cache_write"]) == \
        (1, CLAUDE_CALL, 77, 5000, 600)
    # The span alone is priced from the library; the log carries the agent's own cost.
    assert t["cents"] == pytest.approx(CLAUDE_CALL_CENTS)


def test_codex_usage_from_its_sse_event_log_and_not_from_spans_or_metrics() -> None:
    batch = fold(exports("codex-0.169.0/run1_logs_http-protobuf_decoded.json",
                         "codex-0.169.0/run1_traces_http-protobuf_decoded.json",
                         "codex-0.169.0/run1_metrics_http-protobuf_decoded.json"))
    assert total(batch) == {
        "session": "01a22640-fc06-7421-934b-1ba2e2fb92cf", "model": "gpt-5-codex",
        "turns": 1, "prompt": 1234, "completion": 77, "reasoning": 33, "cache_read": 500,
        "cache_write": 0, "cents": priced("gpt-5-codex", 1234 - 500, 500, 0, 77)}


def test_gemini_cli_thoughts_are_billed_as_output_and_cache_is_inside_input() -> None:
    batch = fold(exports("gemini-cli-0.61.0/logs.traces_enabled.json",
                         "gemini-cli-0.61.0/traces.traces_enabled.json",
                         "gemini-cli-0.61.0/metrics.json"))
    assert total(batch) == {
        "session": "21d3ad85-c647-45c7-ab42-8696147e209a", "model": "gemini-2.5-flash",
        "turns": 1, "prompt": 1234, "completion": 77 + 33, "reasoning": 33, "cache_read": 500,
        "cache_write": 0, "cents": priced("gemini-2.5-flash", 1234 - 500, 500, 0, 110)}


def test_gemini_cli_grpc_capture_with_traces() -> None:
    t = total(fold(exports("gemini-cli-0.61.0-grpc/run1_traces-on_logs_grpc_decoded.json",
                           "gemini-cli-0.61.0-grpc/run1_traces-on_traces_grpc_decoded.json",
                           "gemini-cli-0.61.0-grpc/run1_traces-on_metrics_grpc_decoded.json")))
    assert (t["turns"], t["prompt"], t["completion"], t["reasoning"], t["cache_read"]) == \
        (1, 1234, 110, 33, 500)


@pytest.mark.parametrize("names", [
    ["copilot-1.0.102/run1_traces_http-protobuf_decoded.json",
     "copilot-1.0.102/run1_metrics_http-protobuf_decoded.json"],
    ["copilot-1.0.102/run2_default-json_traces_http-json_decoded.json",
     "copilot-1.0.102/run2_default-json_metrics_http-json_decoded.json"],
])
def test_copilot_cli_genai_spans_stay_exact(names: list[str]) -> None:
    """invoke_agent repeats its chat spans' totals: one turn, the chat span's tokens."""
    t = total(fold(exports(*names)))
    assert (t["model"], t["turns"], t["prompt"], t["completion"], t["reasoning"],
            t["cache_read"]) == ("gpt-5", 1, 1234, 77, 33, 500)
    assert t["cents"] == priced("gpt-5", 1234 - 500, 500, 0, 77)


def test_a_renamed_attribute_is_a_config_change() -> None:
    items = exports("codex-0.169.0/run1_logs_http-protobuf_decoded.json")
    for item in items:
        for rl in item.body["resourceLogs"]:
            for sl in rl["scopeLogs"]:
                for record in sl["logRecords"]:
                    for kv in record.get("attributes", []):
                        if kv["key"] == "input_token_count":
                            kv["key"] = "input_tokens_v2"
    before = total(fold(items))
    assert before["prompt"] == 500  # the renamed count is not read: only the cache is input
    config = parse_config({"dialects": {"codex": {"attributes": {
        "input": ["input_tokens_v2"]}}}}, source="t.toml", base_dir=Path("."))
    options = MappingOptions(pricer=Pricer({}), dialects=DialectSet(config.dialects))
    assert total(fold(items, options))["prompt"] == 1234


def test_prompt_text_is_not_kept() -> None:
    """Claude Code can send the prompt; a usage event keeps ids, model and who spends only."""
    items = exports("claude-code-2.1.328/run1_logs_http-protobuf_decoded.json")
    kept: set[str] = set()
    for item in items:
        result = map_signal(Signal.LOGS, item.request(), OPTIONS, T0)
        kept.update(v for record in result.records for v in record if isinstance(v, str))
    assert kept == {"dbe57f53-a362-4811-8105-ac81484a64ef", "claude-sonnet-4-5", "claude-code",
                    "2.1.328", "9cbb8c88fe1a46a266a5b81e99c3cb0835e77403457b38d338c993b84ac5f470"}


def test_the_documented_example_dialect_is_valid() -> None:
    """config.toml's commented example of a new dialect, uncommented, is accepted as is."""
    text = (Path(__file__).resolve().parent.parent / "config.toml").read_text()
    block = text[text.index("# [dialects.my_agent]"):]
    toml = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                     for line in block.splitlines())
    config = parse_config(tomllib.loads(toml), source="config.toml", base_dir=Path("."))
    mine = {d.name: d for d in config.dialects}["my_agent"]
    assert mine.metrics["my_agent.cost"].fixed == "cost_usd"
    assert mine.names_for("user") == ("user.email", "user.id")


def test_spans_a_dialect_does_not_count_stay_ignored_without_a_session() -> None:
    """Codex's spans carry no session id and repeat its logs' usage: resolving sessions
    across traces must not make them usage (nothing held, nothing counted)."""
    options = MappingOptions(pricer=Pricer({}))
    for export in exports("codex-0.169.0/run1_traces_http-protobuf_decoded.json"):
        result = map_signal(Signal.TRACES, export.request(), options, T0)
        assert result.spans > 0
        assert (result.records, result.held, result.rejected) == ([], [], 0)
    # A dialect whose spans are calls but whose source is the logs: a span without a
    # session or request id is not held either; with the source on traces it is.
    for source, held in (("logs", 0), ("traces", 1)):
        config = parse_config({"dialects": {"my_agent": {
            "scope_names": ["my.agent"], "source": source,
            "calls": ["traces:llm"], "attributes": {"input": ["tokens.in"],
                                                      "session_id": ["sid"]}}}},
            source="t.toml", base_dir=Path("."))
        options = MappingOptions(pricer=Pricer({}), dialects=DialectSet(config.dialects))
        request = span_request("my.agent", "llm", {"tokens.in": 5})
        result = map_signal(Signal.TRACES, request, options, T0)
        assert (len(result.held), result.records) == (held, [])
        if held:
            assert result.held[0].usage.prompt_tokens == 5


def span_request(scope: str, name: str, attrs: dict[str, Any]) -> Any:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    scope_spans.scope.name = scope
    span = scope_spans.spans.add(name=name, trace_id=b"\x01" * 16, span_id=b"\x02" * 8,
                                 parent_span_id=b"\x03" * 8, start_time_unix_nano=T0,
                                 end_time_unix_nano=T0 + 1)
    for key, value in attrs.items():
        span.attributes.append(KeyValue(key=key, value=AnyValue(int_value=value)))
    return request


# -- the Vercel AI SDK (spans of the tracer "ai") ------------------------------------------------

def vercel_request(*, call_session: str | None) -> Any:
    """ai.generateText (the turn, naming the session in its telemetry metadata) with one
    ai.generateText.doGenerate call under it; the outer span repeats the call's usage."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def kv(key: str, value: str | int) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value) if isinstance(value, str)
                        else AnyValue(int_value=value))

    usage = [kv("ai.usage.inputTokens", 900), kv("ai.usage.outputTokens", 120),
             kv("ai.usage.cachedInputTokens", 300), kv("ai.usage.reasoningTokens", 20),
             kv("ai.response.model", "gpt-4o"), kv("ai.response.id", "resp_1")]
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.append(kv("service.name", "my-next-app"))
    ss = rs.scope_spans.add()
    ss.scope.name = "ai"
    trace = bytes(range(1, 17))
    outer = ss.spans.add(name="ai.generateText", trace_id=trace, span_id=b"\x01" * 8,
                         start_time_unix_nano=T0, end_time_unix_nano=T0 + 10**9)
    outer.attributes.extend([kv("ai.telemetry.metadata.sessionId", "chat-7"), *usage])
    call = ss.spans.add(name="ai.generateText.doGenerate", trace_id=trace,
                        span_id=b"\x02" * 8, parent_span_id=b"\x01" * 8,
                        start_time_unix_nano=T0 + 1, end_time_unix_nano=T0 + 10**9 - 1)
    call.attributes.extend(usage)
    if call_session is not None:
        call.attributes.append(kv("ai.telemetry.metadata.sessionId", call_session))
    return request


def test_vercel_ai_sdk_turn_and_call() -> None:
    result = map_signal(Signal.TRACES, vercel_request(call_session="chat-7"), OPTIONS, T0)
    batch = Batch()
    batch.add(result.records)
    assert total(batch) == {
        "session": "chat-7", "model": "gpt-4o", "turns": 1, "prompt": 900, "completion": 120,
        "reasoning": 20, "cache_read": 300, "cache_write": 0,
        "cents": priced("gpt-4o", 600, 300, 0, 120)}


def test_vercel_ai_sdk_call_without_a_session_waits_for_its_trace() -> None:
    """Its calls are on one signal, so a request id is not their identity: the call is held
    (keyed by its span) until the trace names the session."""
    result = map_signal(Signal.TRACES, vercel_request(call_session=None), OPTIONS, T0)
    assert [r.turns for r in result.records] == [1]
    (held,) = result.held
    assert (held.usage.prompt_tokens, held.parent_id) == (900, b"\x01" * 8)
    assert held.usage.key[8:] == bytes(range(1, 17)) + b"\x02" * 8


def test_each_dialect_reads_its_own_attributes_of_a_shared_resource() -> None:
    """Two agents' scopes under one resource: each dialect finds the resource attributes it
    names (Claude Code's user is user.id, Gemini CLI's installation.id)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceRequest,
    )
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

    def kv(key: str, value: str) -> KeyValue:
        return KeyValue(key=key, value=AnyValue(string_value=value))

    request = ExportLogsServiceRequest()
    rl = request.resource_logs.add()
    rl.resource.attributes.extend([kv("service.name", "wrapper"), kv("user.id", "u-9"),
                                   kv("installation.id", "inst-1")])
    for scope, event, session in (("com.anthropic.claude_code.events",
                                   "claude_code.user_prompt", "s-claude"),
                                  ("gemini-cli", "gemini_cli.user_prompt", "s-gemini")):
        sl = rl.scope_logs.add()
        sl.scope.name = scope
        sl.log_records.add(time_unix_nano=T0, body=AnyValue(string_value=event),
                           attributes=[kv("session.id", session)])
    result = map_signal(Signal.LOGS, request, OPTIONS, T0)
    assert {r.session_id: r.user for r in result.records} == {"s-claude": "u-9",
                                                             "s-gemini": "inst-1"}
