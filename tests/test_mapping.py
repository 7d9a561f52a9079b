"""The mapping is the specification of what a span means; these tests read like it.

Every test runs twice, once with each attribute reader (collector/scan.py): the compiled one,
which reads the request's wire bytes, and its Python twin. The mapping must not tell them apart.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from collector.accounting.pricing import Pricer
from collector.config import ModelPrice
from collector.signals.scan import COMPILED_AVAILABLE
from collector.signals.traces import (
    LABEL_SLOTS,
    N_SLOTS,
    UNRESOLVED,
    MappingOptions,
    MappingResult,
    SpanUsage,
    TraceLink,
    map_request,
)
from tests.conftest import MS, T0, make_span

PRICES = {"test-model": ModelPrice(input=1.0, output=2.0, cache_read=0.5, cache_write=4.0)}
PRICER = Pricer(PRICES, use_library=False)
_compiled_scanner = True  # set for each test by the `reader` fixture


@pytest.fixture(autouse=True, params=[
    pytest.param(True, id="compiled", marks=pytest.mark.skipif(
        not COMPILED_AVAILABLE,
        reason="collector.signals._scan is not built: only the Python reader")),
    pytest.param(False, id="python"),
])
def reader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs every test with the compiled reader and with the Python one."""
    monkeypatch.setattr(f"{__name__}._compiled_scanner", request.param)
    assert mapping_options().scanner.compiled is request.param


def mapping_options(**settings: Any) -> MappingOptions:
    """The test prices and this run's attribute reader, with `settings` on top."""
    return MappingOptions(pricer=PRICER, compiled_scanner=_compiled_scanner, **settings)


def run(*spans: Any, options: MappingOptions | None = None) -> MappingResult:
    return map_request(encode_spans(list(spans)), options or mapping_options(), now_ns=T0)


def one(*spans: Any, options: MappingOptions | None = None) -> SpanUsage:
    result = run(*spans, options=options)
    assert result.rejected == 0, result.errors
    assert len(result.records) == 1, result
    return result.records[0]


def chat(**attrs: Any) -> dict[str, Any]:
    return {"gen_ai.conversation.id": "s", "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "test-model", **attrs}


def test_root_model_call_is_a_turn_with_tokens_cost_and_model() -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.input_tokens": 1000,
                                    "gen_ai.usage.output_tokens": 500})))
    assert r.session_id == "s"
    assert (r.turns, r.prompt_tokens, r.completion_tokens) == (1, 1000, 500)
    assert r.model == "test-model"
    # 1000 x $1/M + 500 x $2/M = $0.002 = 0.2 cents
    assert r.cost_cents == pytest.approx(0.2)
    assert r.priced
    assert r.key == (T0 + MS).to_bytes(8, "big") + (1).to_bytes(16, "big") + (1).to_bytes(8, "big")
    assert (r.start_ns, r.end_ns) == (T0, T0 + MS)


def test_child_model_call_adds_tokens_but_no_turn() -> None:
    r = one(make_span(parent_id=7, attrs=chat(**{"gen_ai.usage.input_tokens": 10})))
    assert (r.turns, r.prompt_tokens) == (0, 10)


def test_agent_span_is_one_turn_and_its_rolled_up_tokens_are_not_added() -> None:
    attrs = {"gen_ai.conversation.id": "s", "gen_ai.operation.name": "invoke_agent",
             "gen_ai.usage.input_tokens": 999, "gen_ai.usage.output_tokens": 99,
             "gen_ai.usage.cost": 5.0}
    r = one(make_span(attrs=attrs))
    assert (r.turns, r.prompt_tokens, r.completion_tokens, r.cost_cents) == (1, 0, 0, 0.0)


def test_agent_span_tokens_switch_counts_agent_tokens() -> None:
    options = mapping_options(agent_span_tokens=True)
    attrs = {"session.id": "s", "openinference.span.kind": "AGENT",
             "llm.token_count.prompt": 30, "llm.token_count.completion": 3,
             "llm.model_name": "test-model"}
    r = one(make_span(attrs=attrs), options=options)
    assert (r.turns, r.prompt_tokens, r.completion_tokens) == (1, 30, 3)
    assert r.cost_cents == pytest.approx((30 * 1.0 + 3 * 2.0) / 1e6 * 100)


def test_openinference_llm_span_is_a_model_call() -> None:
    attrs = {"session.id": "oi", "openinference.span.kind": "LLM",
             "llm.model_name": "test-model", "llm.token_count.prompt": 100,
             "llm.token_count.completion": 40,
             "llm.token_count.completion_details.reasoning": 10,
             "llm.token_count.prompt_details.cache_read": 60,
             "llm.token_count.prompt_details.cache_write": 20}
    r = one(make_span(parent_id=3, attrs=attrs))
    assert (r.turns, r.prompt_tokens, r.completion_tokens, r.reasoning_tokens) == (0, 100, 40, 10)
    assert (r.cache_read_tokens, r.cache_write_tokens) == (60, 20)
    # uncached 20 x 1 + cache read 60 x 0.5 + cache write 20 x 4 + output 40 x 2, per million
    assert r.cost_cents == pytest.approx((20 + 30 + 80 + 80) / 1e6 * 100)


def test_per_turn_usage_span_of_no_known_kind_is_one_turn_plus_tokens() -> None:
    attrs = {"gen_ai.conversation.id": "s", "gen_ai.usage.input_tokens": 5,
             "gen_ai.usage.output_tokens": 6, "gen_ai.response.model": "test-model"}
    r = one(make_span(parent_id=9, attrs=attrs))
    assert (r.turns, r.prompt_tokens, r.completion_tokens) == (1, 5, 6)


def test_session_attributes_without_tokens_update_the_session_only() -> None:
    attrs = {"session.id": "s", "agent.session.kind": "autonomous",
             "agent.session.status": "completed", "agent.session.channel": "slack",
             "agent.session.goal": "ship it"}
    r = one(make_span(attrs=attrs))
    assert (r.turns, r.prompt_tokens, r.cost_cents) == (0, 0, 0.0)
    assert (r.kind, r.status, r.channel, r.goal) == ("autonomous", "completed", "slack", "ship it")


def test_spans_without_usage_are_ignored_and_usage_without_session_is_held() -> None:
    result = run(make_span(attrs={"gen_ai.usage.input_tokens": 5}),
                 make_span(span_id=2, attrs={"session.id": "s", "tool.name": "grep"}),
                 make_span(span_id=3, attrs={"tool.name": "grep"}))
    assert (result.spans, result.ignored, result.rejected, result.records) == (3, 2, 0, [])
    [held] = result.held
    assert held.usage.session_id == UNRESOLVED
    assert (held.usage.turns, held.usage.prompt_tokens) == (1, 5)
    assert (held.trace_id, held.span_id, held.parent_id) == (
        (1).to_bytes(16, "big"), (1).to_bytes(8, "big"), b"")
    # The root span naming a session is an anchor for its trace; the root tool span without
    # one says where the trace's chains end.
    assert result.links == [
        TraceLink((1).to_bytes(16, "big"), (2).to_bytes(8, "big"), b"", "s", True),
        TraceLink((1).to_bytes(16, "big"), (3).to_bytes(8, "big"), b"", None)]


@pytest.mark.parametrize("name", ["langfuse.session.id",
                                  "traceloop.association.properties.session_id",
                                  "ai.telemetry.metadata.sessionId"])
def test_session_id_under_frameworks_names(name: str) -> None:
    r = one(make_span(attrs={name: "fw-1", "gen_ai.usage.input_tokens": 3}))
    assert (r.session_id, r.prompt_tokens) == ("fw-1", 3)
    # The conventions' own names win over the frameworks'.
    r = one(make_span(attrs={name: "fw-1", "session.id": "own",
                             "gen_ai.usage.input_tokens": 3}))
    assert r.session_id == "own"


def test_held_usage_keeps_what_the_span_means() -> None:
    """A held span is mapped as if it named a session: a child model call is no turn, an
    agent span's own tokens are not counted, and intermediate spans link the chain."""
    result = run(
        make_span(span_id=5, parent_id=4, attrs={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o",
            "gen_ai.usage.input_tokens": 100, "gen_ai.usage.output_tokens": 10}),
        make_span(span_id=4, parent_id=3, name="tool", attrs={"tool.name": "search"}),
        make_span(span_id=3, parent_id=2, attrs={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.usage.input_tokens": 100}),
        make_span(span_id=2, parent_id=1, attrs={
            "gen_ai.operation.name": "invoke_agent", "gen_ai.conversation.id": "s"}))
    chat_span, agent = result.held
    assert (chat_span.usage.turns, chat_span.usage.prompt_tokens, chat_span.usage.model) == (
        0, 100, "gpt-4o")
    assert chat_span.parent_id == (4).to_bytes(8, "big")
    assert (agent.usage.turns, agent.usage.prompt_tokens) == (1, 0)
    trace = (1).to_bytes(16, "big")
    assert result.links == [
        TraceLink(trace, (4).to_bytes(8, "big"), (3).to_bytes(8, "big"), None),
        TraceLink(trace, (2).to_bytes(8, "big"), b"", "s", True)]
    assert [r.session_id for r in result.records] == ["s"]


def test_session_id_precedence_and_resource_fallback() -> None:
    both = one(make_span(attrs={"gen_ai.conversation.id": "conv", "session.id": "sess",
                                "gen_ai.usage.input_tokens": 1}))
    assert both.session_id == "conv"
    # The span's own attribute beats the resource's, even a higher-precedence key there.
    own = one(make_span(attrs={"session.id": "span-level", "gen_ai.usage.input_tokens": 1},
                        resource={"gen_ai.conversation.id": "resource-level"}))
    assert own.session_id == "span-level"
    fallback = one(make_span(attrs={"gen_ai.usage.input_tokens": 1},
                             resource={"session.id": "from-resource",
                                       "agent.session.channel": "tui"}))
    assert (fallback.session_id, fallback.channel) == ("from-resource", "tui")


def test_model_precedence_response_then_request_then_openinference() -> None:
    base = {"session.id": "s", "gen_ai.usage.input_tokens": 1}
    assert one(make_span(attrs={**base, "gen_ai.response.model": "resp",
                                "gen_ai.request.model": "req",
                                "llm.model_name": "oi"})).model == "resp"
    assert one(make_span(attrs={**base, "gen_ai.request.model": "req",
                                "llm.model_name": "oi"})).model == "req"
    assert one(make_span(attrs={**base, "llm.model_name": "oi"})).model == "oi"


def test_two_conventions_on_one_span_count_once_genai_first() -> None:
    attrs = chat(**{"gen_ai.usage.input_tokens": 100, "llm.token_count.prompt": 100,
                    "gen_ai.usage.output_tokens": 10, "llm.token_count.completion": 10,
                    "gen_ai.usage.reasoning.output_tokens": 4,
                    "llm.token_count.completion_details.reasoning": 4})
    r = one(make_span(attrs=attrs))
    assert (r.prompt_tokens, r.completion_tokens, r.reasoning_tokens) == (100, 10, 4)


def test_deprecated_genai_names_are_read() -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.prompt_tokens": 7,
                                    "gen_ai.usage.completion_tokens": 8})))
    assert (r.prompt_tokens, r.completion_tokens) == (7, 8)


def test_cache_tokens_inside_input_are_priced_at_cache_rates() -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.input_tokens": 1000,
                                    "gen_ai.usage.cache_read.input_tokens": 600,
                                    "gen_ai.usage.cache_creation.input_tokens": 100})))
    assert r.prompt_tokens == 1000
    assert r.cost_cents == pytest.approx((300 * 1.0 + 600 * 0.5 + 100 * 4.0) / 1e6 * 100)


def test_cache_tokens_reported_beside_input_are_added_to_prompt_tokens() -> None:
    # Cache exceeds input: the emitter counted them outside input (Anthropic's shape).
    r = one(make_span(attrs=chat(**{"gen_ai.usage.input_tokens": 10,
                                    "gen_ai.usage.cache_read.input_tokens": 500,
                                    "gen_ai.usage.cache_creation.input_tokens": 50})))
    assert r.prompt_tokens == 560
    assert r.cost_cents == pytest.approx((10 * 1.0 + 500 * 0.5 + 50 * 4.0) / 1e6 * 100)


def test_reasoning_is_inside_output_and_never_priced_again() -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.output_tokens": 100,
                                    "gen_ai.usage.reasoning.output_tokens": 80})))
    assert (r.completion_tokens, r.reasoning_tokens) == (100, 80)
    assert r.cost_cents == pytest.approx(100 * 2.0 / 1e6 * 100)


def test_reasoning_above_output_was_reported_beside_it() -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.output_tokens": 10,
                                    "gen_ai.usage.reasoning.output_tokens": 30})))
    assert (r.completion_tokens, r.reasoning_tokens) == (40, 30)


@pytest.mark.parametrize(("key", "value"), [("gen_ai.usage.cost", 0.25),
                                            ("llm.cost.total", 0.25),
                                            ("operation.cost", "0.25")])
def test_emitter_cost_in_usd_wins_over_prices(key: str, value: Any) -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.input_tokens": 1_000_000, key: value})))
    assert r.cost_cents == pytest.approx(25.0)


def test_unknown_model_is_unpriced_and_costs_nothing() -> None:
    result = run(make_span(attrs={"session.id": "s", "gen_ai.request.model": "mystery",
                                  "gen_ai.usage.input_tokens": 10}))
    assert result.unpriced == 1
    assert result.records[0].cost_cents == 0.0 and not result.records[0].priced


def test_configured_request_model_prices_when_response_model_is_unknown() -> None:
    r = one(make_span(attrs={"session.id": "s", "gen_ai.response.model": "test-model-2026-01",
                             "gen_ai.request.model": "test-model",
                             "gen_ai.usage.input_tokens": 1_000_000}))
    assert r.model == "test-model-2026-01"
    assert r.cost_cents == pytest.approx(100.0)


@pytest.mark.parametrize("bad", [-1, "twelve", 1.5, True, "-3"])
def test_invalid_token_counts_reject_the_span_not_the_request(bad: Any) -> None:
    result = run(make_span(span_id=1, attrs=chat(**{"gen_ai.usage.input_tokens": bad})),
                 make_span(span_id=2, attrs=chat(**{"gen_ai.usage.input_tokens": 3})))
    assert result.rejected == 1
    assert [r.prompt_tokens for r in result.records] == [3]
    assert "gen_ai.usage.input_tokens" in result.error_message
    assert "0000000000000001" in result.error_message


def test_numeric_strings_and_integral_doubles_are_accepted_as_counts() -> None:
    r = one(make_span(attrs=chat(**{"gen_ai.usage.input_tokens": "42",
                                    "gen_ai.usage.output_tokens": 7.0})))
    assert (r.prompt_tokens, r.completion_tokens) == (42, 7)


def test_negative_cost_rejects_the_span() -> None:
    result = run(make_span(attrs=chat(**{"gen_ai.usage.cost": -0.5})))
    assert result.rejected == 1 and "gen_ai.usage.cost" in result.error_message


def test_values_outside_the_sets_become_defaults_and_are_reported() -> None:
    result = run(make_span(attrs={"session.id": "s", "agent.session.kind": "robot",
                                  "agent.session.status": "Completed",
                                  "agent.session.channel": "fax"}))
    r = result.records[0]
    assert (r.kind, r.status, r.channel) == ("interactive", "completed", "cli")
    assert result.invalid_values == [("agent.session.kind", "robot"),
                                     ("agent.session.channel", "fax")]


def test_session_id_too_long_or_with_control_characters_is_rejected() -> None:
    options = mapping_options(max_session_id_length=8)
    result = run(make_span(span_id=1, attrs={"session.id": "x" * 9,
                                             "gen_ai.usage.input_tokens": 1}),
                 make_span(span_id=2, attrs={"session.id": "a\nb",
                                             "gen_ai.usage.input_tokens": 1}),
                 options=options)
    assert result.rejected == 2 and not result.records
    assert "longer than 8" in result.error_message
    assert "control characters" in result.error_message


def test_error_messages_are_capped_but_the_count_is_exact() -> None:
    spans = [make_span(span_id=i, attrs=chat(**{"gen_ai.usage.input_tokens": -1}))
             for i in range(1, 21)]
    result = run(*spans)
    assert result.rejected == 20
    assert result.error_message.endswith("(and 15 more)")


def test_missing_times_fall_back_and_reversed_times_are_ordered() -> None:
    r = one(make_span(attrs=chat(), start=T0 + 5 * MS, end=T0))
    assert (r.start_ns, r.end_ns) == (T0, T0 + 5 * MS)


def bounded(**limits: int) -> MappingOptions:
    return mapping_options(**limits)


def test_too_many_attributes_rejects_the_span() -> None:
    attrs = chat(**{f"extra.{i}": i for i in range(10)})
    result = run(make_span(attrs=attrs), options=bounded(max_attributes_per_span=8))
    assert result.rejected == 1 and "attributes exceed the limit of 8" in result.error_message


def test_too_many_resource_attributes_rejects_its_spans() -> None:
    result = run(make_span(span_id=1, attrs=chat(), resource={f"r.{i}": i for i in range(5)}),
                 options=bounded(max_attributes_per_span=4))
    assert result.rejected == 1 and result.error_message.startswith("resource: ")


def test_stored_text_over_the_byte_limit_rejects_the_span() -> None:
    result = run(make_span(span_id=1, attrs=chat(**{"gen_ai.response.model": "m" * 33})),
                 make_span(span_id=2, attrs=chat(**{"agent.session.goal": "é" * 17})),
                 make_span(span_id=3, attrs=chat(**{"agent.session.goal": "g" * 32})),
                 options=bounded(max_attribute_value_bytes=32))
    assert result.rejected == 2 and len(result.records) == 1
    assert "gen_ai.response.model is longer than 32 bytes" in result.error_message
    assert "agent.session.goal is longer than 32 bytes" in result.error_message


def test_nesting_deeper_than_the_limit_rejects_the_span() -> None:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    request = encode_spans([make_span(span_id=1, attrs=chat()),
                            make_span(span_id=2, attrs=chat())])
    spans = request.resource_spans[0].scope_spans[0].spans

    def nest(depth: int) -> AnyValue:
        value = AnyValue(string_value="leaf")
        for level in range(depth):
            outer = AnyValue()
            if level % 2:
                outer.array_value.values.append(value)
            else:
                entry = outer.kvlist_value.values.add()
                entry.key = "k"
                entry.value.CopyFrom(value)
            value = outer
        return value

    for span, depth in ((spans[0], 3), (spans[1], 4)):
        kv = span.attributes.add()
        kv.key = "payload"
        kv.value.CopyFrom(nest(depth))
    result = map_request(request, bounded(max_value_depth=3), now_ns=T0)
    assert (len(result.records), result.rejected) == (1, 1)
    assert "nests deeper than 3 levels" in result.error_message


def test_aliases_read_other_attribute_names_and_known_names_win() -> None:
    options = mapping_options(alias_slots=MappingOptions.slots_for({
        "app.thread_id": "session.id", "app.tokens_in": "gen_ai.usage.input_tokens"}))
    aliased = one(make_span(attrs={"app.thread_id": "t-1", "app.tokens_in": 12}),
                  options=options)
    assert (aliased.session_id, aliased.prompt_tokens, aliased.turns) == ("t-1", 12, 1)
    both = one(make_span(attrs={"app.tokens_in": 12, "session.id": "known",
                                "gen_ai.usage.input_tokens": 5, "app.thread_id": "alias"}),
               options=options)
    assert (both.session_id, both.prompt_tokens) == ("known", 5)


def test_values_beyond_the_storable_bounds_reject_the_span() -> None:
    result = run(make_span(span_id=1, attrs=chat(**{"gen_ai.usage.input_tokens": 10**12 + 1})),
                 make_span(span_id=2, attrs=chat(**{"gen_ai.usage.cost": 1e10})),
                 make_span(span_id=3, attrs=chat(), start=2**63, end=2**63),
                 make_span(span_id=4, attrs=chat(**{"gen_ai.usage.input_tokens": 10**12})))
    assert result.rejected == 3
    assert [r.prompt_tokens for r in result.records] == [10**12]
    assert "after the year 2262" in result.error_message


def test_a_span_without_timestamps_keeps_the_same_key_on_retry() -> None:
    span = make_span(attrs=chat(**{"gen_ai.usage.input_tokens": 1}), start=0, end=0)
    first = map_request(encode_spans([span]), mapping_options(), now_ns=T0).records[0]
    retry = map_request(encode_spans([span]), mapping_options(),
                        now_ns=T0 + 60 * 10**9).records[0]
    assert first.key == retry.key
    assert (first.start_ns, retry.start_ns) == (T0, T0 + 60 * 10**9)


def test_the_genai_operation_decides_over_the_openinference_kind() -> None:
    both = one(make_span(parent_id=5, attrs=chat(**{"openinference.span.kind": "AGENT",
                                                     "gen_ai.usage.input_tokens": 7})))
    assert (both.turns, both.prompt_tokens) == (0, 7)  # a child chat span, not an agent turn
    oi_only = one(make_span(parent_id=5, attrs={"session.id": "s",
                                                "openinference.span.kind": "AGENT",
                                                "gen_ai.usage.input_tokens": 7}))
    assert (oi_only.turns, oi_only.prompt_tokens) == (1, 0)


def test_who_spends_comes_from_the_resource_and_the_span_overrides_it() -> None:
    resource = {"service.name": "support-bot", "service.version": "2.1.0",
                "host.name": "build-7", "user.id": "u-1"}
    r = one(make_span(attrs=chat(), resource=resource))
    assert (r.agent, r.agent_version, r.user, r.host) == ("support-bot", "2.1.0", "u-1", "build-7")
    # A span's own value wins over its resource's, per field.
    r = one(make_span(attrs=chat(**{"host.name": "laptop", "enduser.id": "e-9"}),
                      resource=resource))
    assert (r.agent, r.user, r.host) == ("support-bot", "e-9", "laptop")


def test_user_is_email_then_user_id_then_enduser_id() -> None:
    every = {"user.email": "a@example.com", "user.id": "u-1", "enduser.id": "e-1"}
    assert one(make_span(attrs=chat(**every))).user == "a@example.com"
    assert one(make_span(attrs=chat(**{"user.id": 42, "enduser.id": "e-1"}))).user == "42"
    assert one(make_span(attrs=chat(), resource={"enduser.id": "e-1"})).user == "e-1"


def test_who_spends_is_none_when_not_said_or_not_text() -> None:
    r = one(make_span(attrs=chat(**{"service.name": "", "host.name": 1.5,
                                    "service.version": True})))
    assert (r.agent, r.agent_version, r.user, r.host) == (None, None, None, None)
    # An empty or unusable value on the span leaves the resource's standing.
    r = one(make_span(attrs=chat(**{"service.name": "", "user.email": b"x"}),
                      resource={"service.name": "agent", "user.id": "u-1"}))
    assert (r.agent, r.user) == ("agent", "u-1")


def test_labels_alone_do_not_make_a_span_usage() -> None:
    result = run(make_span(attrs={"session.id": "s", "service.name": "a", "user.id": "u"}))
    assert (result.records, result.ignored) == ([], 1)


def test_a_label_longer_than_the_value_limit_rejects_the_span() -> None:
    options = mapping_options(max_attribute_value_bytes=16)
    result = run(make_span(attrs=chat(), resource={"service.name": "x" * 17}), options=options)
    assert result.error_message == "resource: service.name is longer than 16 bytes"
    result = run(make_span(attrs=chat(**{"user.email": "é" * 9})), options=options)
    assert result.rejected == 1 and "user.email" in result.error_message
    assert one(make_span(attrs=chat(**{"host.name": "h" * 16})), options=options).host == "h" * 16


def test_the_label_slots_are_the_last_ones() -> None:
    """map_span compares the tail of a span's values to tell whether it names any label."""
    assert tuple(range(N_SLOTS - len(LABEL_SLOTS), N_SLOTS)) == LABEL_SLOTS


# -- dimensions ([attribution]) -------------------------------------------------------------

DIMENSIONS = (("team", ("team.id", "team")), ("project", ("project", "repository")),
              ("region", ("cloud.region",)))


def test_dimensions_come_from_the_span_then_the_resource_first_attribute_first() -> None:
    options = mapping_options(dimensions=DIMENSIONS)
    resource = {"service.name": "bot", "team.id": "platform", "team": "ignored",
                "repository": "org/repo", "cloud.region": "eu-west-1"}
    plain = one(make_span(attrs=chat(), resource=resource), options=options)
    assert plain.dimensions == (("team", "platform"), ("project", "org/repo"),
                                ("region", "eu-west-1"))
    assert plain.agent == "bot"
    # The span's own value wins for that dimension; the others still come from the resource.
    own = one(make_span(attrs=chat(team="security", project=7), resource=resource),
              options=options)
    assert own.dimensions == (("team", "security"), ("project", "7"), ("region", "eu-west-1"))
    # Without [attribution] nothing is read, and a span without any tag has none.
    assert one(make_span(attrs=chat(), resource=resource)).dimensions == ()
    assert one(make_span(attrs=chat()), options=options).dimensions == ()


def test_a_set_of_tags_read_again_is_the_same_object_and_the_sets_kept_are_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests repeating a resource's tags (every request an agent sends) give their
    records one tuple for the set, so that comparing a session's tags with what was
    remembered stops at identity; the sets kept are bounded and forgetting them changes no
    value."""
    import collector.signals.traces as traces

    options = mapping_options(dimensions=DIMENSIONS)
    resource = {"service.name": "bot", "team.id": "platform", "repository": "org/repo"}
    first = one(make_span(attrs=chat(), resource=resource), options=options)
    again = one(make_span(span_id=2, attrs=chat(), resource=dict(resource)), options=options)
    assert again.dimensions == first.dimensions == (("team", "platform"),
                                                    ("project", "org/repo"))
    assert again.dimensions is first.dimensions
    # A span's own value over the resource's: a set of its own, kept once too.
    own = [one(make_span(span_id=3 + i, attrs=chat(team="security"), resource=resource),
               options=options).dimensions for i in range(2)]
    assert own[0] == (("team", "security"), ("project", "org/repo")) and own[0] is own[1]
    monkeypatch.setattr(traces, "MAX_TAG_SETS", 3)
    sets = [one(make_span(span_id=10 + i, attrs=chat(), resource={"team": f"t{i}"}),
                options=options).dimensions for i in range(5)]
    assert sets == [(("team", f"t{i}"),) for i in range(5)]
    assert len(options._tag_sets) <= 3


def test_a_dimension_value_is_bounded_like_the_labels() -> None:
    options = mapping_options(dimensions=DIMENSIONS, max_attribute_value_bytes=64)
    result = run(make_span(attrs=chat(**{"team.id": "x" * 65})), options=options)
    assert result.rejected == 1 and "team.id" in result.errors[0]
    # Empty or non-text values are absent, as for the labels.
    assert one(make_span(attrs=chat(**{"team.id": ""}), resource={"team": "growth"}),
               options=options).dimensions == (("team", "growth"),)


def test_a_dimension_may_read_an_attribute_the_mapping_knows() -> None:
    options = mapping_options(dimensions=(("owner", ("user.id",)),))
    usage = one(make_span(attrs=chat(), resource={"user.id": "u-1"}), options=options)
    assert (usage.user, usage.dimensions) == ("u-1", (("owner", "u-1"),))
