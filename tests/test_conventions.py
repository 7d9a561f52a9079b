"""The conventions' other names for reasoning and cache counts (collector/signals/slots.py
CONVENTION_ALIASES): each read as the GenAI count it stands for, never counted twice.

Run with both attribute readers, like tests/test_mapping.py: the compiled one and its Python
twin must agree on the aliases too.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from collector.accounting.pricing import Pricer
from collector.config import ModelPrice
from collector.signals.scan import COMPILED_AVAILABLE
from collector.signals.slots import ATTRIBUTE_SLOTS, CONVENTION_ALIASES
from collector.signals.traces import MappingOptions, SpanUsage, map_request
from tests.conftest import T0, make_span

# Per million tokens; the cache rates are distinct so a misread cache count changes the cost.
PRICER = Pricer({"m": ModelPrice(input=1.0, output=2.0, cache_read=0.5, cache_write=4.0)},
                use_library=False)
READERS = [
    pytest.param(True, id="compiled", marks=pytest.mark.skipif(
        not COMPILED_AVAILABLE, reason="collector.signals._scan is not built")),
    pytest.param(False, id="python"),
]
TARGET_FIELD = {
    "gen_ai.usage.reasoning.output_tokens": "reasoning_tokens",
    "gen_ai.usage.cache_read.input_tokens": "cache_read_tokens",
    "gen_ai.usage.cache_creation.input_tokens": "cache_write_tokens",
    "llm.token_count.prompt_details.cache_read": "cache_read_tokens",
}


def call(compiled: bool, attrs: dict[str, Any], **options: Any) -> SpanUsage:
    """One model call on session s with 1000 input and 100 output tokens, plus `attrs`."""
    span = make_span(attrs={"gen_ai.operation.name": "chat", "session.id": "s",
                            "gen_ai.request.model": "m", "gen_ai.usage.input_tokens": 1000,
                            "gen_ai.usage.output_tokens": 100, **attrs})
    result = map_request(encode_spans([span]), MappingOptions(
        pricer=PRICER, compiled_scanner=compiled, **options), now_ns=T0)
    assert (result.rejected, len(result.records)) == (0, 1), result.errors
    return result.records[0]


TOTAL_HINT = "gen_ai.usage.total_tokens"  # read, never counted: tested on its own below
COUNT_ALIASES = {name: target for name, target in CONVENTION_ALIASES.items()
                 if target != TOTAL_HINT}


def test_every_alias_stands_for_a_known_count() -> None:
    assert set(COUNT_ALIASES.values()) <= set(TARGET_FIELD)
    assert all(target in ATTRIBUTE_SLOTS for target in CONVENTION_ALIASES.values())
    assert not set(CONVENTION_ALIASES) & set(ATTRIBUTE_SLOTS)


@pytest.mark.parametrize("compiled", READERS)
@pytest.mark.parametrize("name", sorted(COUNT_ALIASES))
def test_each_name_is_read_as_its_count(compiled: bool, name: str) -> None:
    got = call(compiled, {name: 40})
    field = TARGET_FIELD[CONVENTION_ALIASES[name]]
    assert getattr(got, field) == 40
    counts = {f: getattr(got, f) for f in set(TARGET_FIELD.values())}
    assert counts == {f: 40 if f == field else 0 for f in counts}
    # Inside input and output, as the GenAI names: the totals stay as reported.
    assert (got.prompt_tokens, got.completion_tokens) == (1000, 100)
    uncached = 1000 - got.cache_read_tokens - got.cache_write_tokens
    cents = (uncached * 1.0 + got.cache_read_tokens * 0.5 + got.cache_write_tokens * 4.0
             + 100 * 2.0) / 1e6 * 100
    assert got.cost_cents == pytest.approx(cents, rel=1e-12)


@pytest.mark.parametrize("compiled", READERS)
def test_pydantic_ai_call_counts_its_reasoning_and_cache_once(compiled: bool) -> None:
    """Pydantic AI's chat span: first-class cache names, repeated under details.*, and
    reasoning only under details.*: reasoning 33 of the 100 output, cache 500 once."""
    got = call(compiled, {"gen_ai.usage.cache_read.input_tokens": 500,
                          "gen_ai.usage.details.cache_read_tokens": 500,
                          "gen_ai.usage.details.reasoning_tokens": 33,
                          "gen_ai.usage.details.audio_tokens": 0})
    assert (got.prompt_tokens, got.cache_read_tokens, got.completion_tokens,
            got.reasoning_tokens) == (1000, 500, 100, 33)
    assert got.cost_cents == pytest.approx((500 * 1.0 + 500 * 0.5 + 100 * 2.0) / 1e4,
                                           rel=1e-12)


@pytest.mark.parametrize("compiled", READERS)
@pytest.mark.parametrize("alias_first", [True, False])
def test_the_known_name_wins_over_an_alias_in_either_order(compiled: bool,
                                                           alias_first: bool) -> None:
    pairs = [("gen_ai.usage.reasoning_tokens", 99), ("gen_ai.usage.reasoning.output_tokens", 30)]
    got = call(compiled, dict(pairs if alias_first else pairs[::-1]))
    assert got.reasoning_tokens == 30


@pytest.mark.parametrize("compiled", READERS)
def test_a_config_alias_of_the_same_name_replaces_the_built_in(compiled: bool) -> None:
    slots = MappingOptions.slots_for(
        {"gen_ai.usage.reasoning_tokens": "gen_ai.usage.cache_read.input_tokens"})
    got = call(compiled, {"gen_ai.usage.reasoning_tokens": 40}, alias_slots=slots)
    assert (got.cache_read_tokens, got.reasoning_tokens) == (40, 0)


def cents_of(uncached: int, cache_read: int, output: int) -> float:
    return (uncached * 1.0 + cache_read * 0.5 + output * 2.0) / 1e6 * 100


@pytest.mark.parametrize("compiled", READERS)
@pytest.mark.parametrize("total_name", ["gen_ai.usage.total_tokens", "llm.token_count.total",
                                        "llm.usage.total_tokens"])
def test_a_total_with_the_cache_added_says_the_cache_was_beside_input(
        compiled: bool, total_name: str) -> None:
    """Strands on Bedrock or Anthropic: input 1000 without its cache read of 400 (less than
    input, so the counts alone cannot tell), total 1000 + 100 + 400."""
    got = call(compiled, {"gen_ai.usage.cache_read.input_tokens": 400, total_name: 1500})
    assert (got.prompt_tokens, got.cache_read_tokens) == (1400, 400)
    assert got.cost_cents == pytest.approx(cents_of(1000, 400, 100), rel=1e-12)


@pytest.mark.parametrize("compiled", READERS)
@pytest.mark.parametrize("total", [1100, 1133, 1234, "1500"])
def test_a_total_of_input_and_output_or_of_neither_keeps_the_cache_inside(
        compiled: bool, total: Any) -> None:
    """OpenAI's shape (total = input + output, reasoning inside or beside), a total that fits
    neither reading, and a total that is no plain count: the GenAI reading, span accepted."""
    got = call(compiled, {"gen_ai.usage.cache_read.input_tokens": 400,
                          "gen_ai.usage.reasoning.output_tokens": 33,
                          "gen_ai.usage.total_tokens": total})
    assert (got.prompt_tokens, got.cache_read_tokens, got.completion_tokens) == (1000, 400, 100)
    assert got.cost_cents == pytest.approx(cents_of(600, 400, 100), rel=1e-12)
