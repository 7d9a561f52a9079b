"""Pricing: configured prices first, then the genai-prices library, tiers delegated exactly."""

from __future__ import annotations

import pytest
from genai_prices import Usage, calc_price

from collector.accounting.pricing import Pricer
from collector.config import ModelPrice


def cost(pricer: Pricer, model: str, *, uncached: int = 0, read: int = 0, write: int = 0,
         out: int = 0, request_model: str | None = None) -> float | None:
    return pricer.cost_cents(model, request_model or "", uncached, read, write, out)


def library_cents(model: str, *, uncached: int = 0, read: int = 0, write: int = 0,
                  out: int = 0) -> float:
    usage = Usage(input_tokens=uncached + read + write, output_tokens=out,
                  cache_read_tokens=read or None, cache_write_tokens=write or None)
    return float(calc_price(usage, model).total_price * 100)


def test_configured_price_wins_over_the_library() -> None:
    pricer = Pricer({"gpt-4o": ModelPrice(input=1, output=1, cache_read=1, cache_write=1)})
    assert cost(pricer, "gpt-4o", uncached=1_000_000) == pytest.approx(100.0)


@pytest.mark.parametrize("model", ["gpt-4o", "o3", "claude-sonnet-4-5", "gemini-2.5-pro"])
def test_library_rates_equal_the_library_below_tiers(model: str) -> None:
    pricer = Pricer({})
    got = cost(pricer, model, uncached=5000, read=3000, write=1000, out=700)
    assert got == pytest.approx(library_cents(model, uncached=5000, read=3000, write=1000,
                                              out=700))


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gemini-2.5-pro"])
def test_tiered_prices_above_the_tier_come_from_the_library(model: str) -> None:
    pricer = Pricer({})
    got = cost(pricer, model, uncached=250_000, out=1000)
    assert got == pytest.approx(library_cents(model, uncached=250_000, out=1000))
    below = cost(pricer, model, uncached=100_000, out=1000)
    assert got is not None and below is not None and got > below * 2


def test_unknown_model_is_none_and_request_model_is_tried() -> None:
    pricer = Pricer({"house": ModelPrice(input=3, output=3, cache_read=3, cache_write=3)})
    assert cost(pricer, "no-such-model-anywhere", uncached=10) is None
    assert cost(pricer, "house-v2-2026", uncached=1_000_000, request_model="house") == 300.0


def test_library_can_be_switched_off() -> None:
    assert cost(Pricer({}, use_library=False), "gpt-4o", uncached=10) is None


def test_preload_resolves_the_library_at_start_up_only_when_it_is_used() -> None:
    from collector.accounting.pricing import PRELOAD_MODEL

    used = Pricer({})
    used.preload()
    assert used._library.get(PRELOAD_MODEL) is not None  # resolved and cached, not on demand
    unused = Pricer({}, use_library=False)
    unused.preload()
    assert unused._library == {}
