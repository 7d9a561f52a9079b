"""Cost of a model call in US cents: configured prices first, then the genai-prices library.

Pure: no I/O. The library's own lookup costs tens of microseconds a call, far too slow for the
hot path, so each model name is resolved once into flat per-token rates. Tiered prices (a
higher rate above a prompt size) fall back to the library for just the calls that reach a tier,
so the answer stays the library's exact one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from collector.accounting.prices import ModelPrice

PER_MILLION = 1_000_000
CENTS_PER_USD = 100
# A cap on distinct model names remembered; the set is tiny in practice, but model names come
# from the network and must not grow memory without bound.
MAX_CACHED_MODELS = 4096


@dataclass(frozen=True, slots=True)
class Rates:
    """Cents per token for one model; `tier_from` is the prompt size where tiers start."""

    input: float
    output: float
    cache_read: float
    cache_write: float
    tier_from: int | None = None
    library_ref: str | None = None


def rates_from_config(price: ModelPrice) -> Rates:
    scale = CENTS_PER_USD / PER_MILLION
    return Rates(
        input=price.input * scale,
        output=price.output * scale,
        cache_read=price.cache_read * scale,
        cache_write=price.cache_write * scale,
    )


PRELOAD_MODEL = "gpt-4o"  # any model the library knows: resolving it loads the tables


class Pricer:
    """Maps (model, token counts) to cents; None means the model is unknown (unpriced)."""

    def __init__(self, configured: Mapping[str, ModelPrice], *, use_library: bool = True) -> None:
        self._configured = {name: rates_from_config(p) for name, p in configured.items()}
        self._use_library = use_library
        self._library: dict[str, Rates | None] = {}
        self._chosen: dict[tuple[str, str], Rates | None] = {}

    def rates_for(self, model: str) -> Rates | None:
        rates = self._configured.get(model)
        if rates is not None or not self._use_library:
            return rates
        try:
            return self._library[model]
        except KeyError:
            pass
        rates = _library_rates(model)
        if len(self._library) < MAX_CACHED_MODELS:
            self._library[model] = rates
        return rates

    def preload(self) -> None:
        """Load the price library's tables now, at start-up, not on the first request: the
        first exporter is not kept waiting, and the tables are frozen out of garbage
        collection with the rest of start-up (collector.daemon.tune_garbage_collector)."""
        if self._use_library:
            self.rates_for(PRELOAD_MODEL)

    def cost_cents(self, response_model: str, request_model: str, uncached_input: int,
                   cache_read: int, cache_write: int, output: int) -> float | None:
        """Price one call; None when neither model name has a known price.

        Configured prices win over the library for either name, so a configured request model
        beats a library price for the response model. The choice is memoised per name pair.
        """
        key = (response_model, request_model)
        try:
            rates = self._chosen[key]
        except KeyError:
            rates = self._choose(response_model, request_model)
            if len(self._chosen) < MAX_CACHED_MODELS:
                self._chosen[key] = rates
        if rates is None:
            return None
        if rates.tier_from is not None and (uncached_input + cache_read + cache_write
                                            >= rates.tier_from):
            return _library_cost(rates.library_ref or response_model or request_model,
                                 uncached_input, cache_read, cache_write, output)
        return (uncached_input * rates.input + cache_read * rates.cache_read
                + cache_write * rates.cache_write + output * rates.output)

    def _choose(self, response_model: str, request_model: str) -> Rates | None:
        names = [m for m in (response_model, request_model) if m]
        for name in names:
            if name in self._configured:
                return self._configured[name]
        for name in names:
            rates = self.rates_for(name)
            if rates is not None:
                return rates
        return None


def _library_rates(model: str) -> Rates | None:
    try:
        from genai_prices import Usage, calc_price

        calc = calc_price(Usage(input_tokens=1), model)
    except (LookupError, ValueError):
        return None
    price: Any = calc.model_price
    scale = Decimal(CENTS_PER_USD) / Decimal(PER_MILLION)
    tier_starts: list[int] = []

    def base(name: str, fallback: Decimal | None) -> Decimal | None:
        value = getattr(price, name, None)
        if value is None:
            return fallback
        if isinstance(value, Decimal):
            return value
        tiers = getattr(value, "tiers", None) or []
        tier_starts.extend(int(t.start) for t in tiers)
        return Decimal(value.base)

    input_rate = base("input_mtok", None)
    output_rate = base("output_mtok", None)
    if input_rate is None and output_rate is None:
        return None
    input_rate = input_rate or Decimal(0)
    output_rate = output_rate or Decimal(0)
    return Rates(
        input=float(input_rate * scale),
        output=float(output_rate * scale),
        cache_read=float((base("cache_read_mtok", input_rate) or input_rate) * scale),
        cache_write=float((base("cache_write_mtok", input_rate) or input_rate) * scale),
        tier_from=min(tier_starts) if tier_starts else None,
        library_ref=calc.model.id,
    )


def _library_cost(model: str, uncached: int, cache_read: int, cache_write: int,
                  output: int) -> float | None:
    from genai_prices import Usage, calc_price

    try:
        calc = calc_price(
            Usage(input_tokens=uncached + cache_read + cache_write, output_tokens=output,
                  cache_read_tokens=cache_read or None, cache_write_tokens=cache_write or None),
            model,
        )
    except (LookupError, ValueError):
        return None
    return float(calc.total_price * CENTS_PER_USD)
