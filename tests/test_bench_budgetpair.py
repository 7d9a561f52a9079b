"""bench.budgetpair's verdict statistic: B over A per pair of collectors, not per slice."""

from __future__ import annotations

from typing import Any

from bench.budgetpair import block_ratios, mean_interval, summary


def _slice(block: int | None, a_cpu: float, b_cpu: float) -> dict[str, Any]:
    run: dict[str, Any] = {
        name: {"server_window_cpu_us_per_span": cpu, "spans_per_s": 1000.0 / cpu,
               "verification": {"ok": True}}
        for name, cpu in (("none", a_cpu), ("budgets", b_cpu))}
    if block is not None:
        run["block"] = block
    return run


def test_a_pair_is_its_slices_pooled_not_their_ratios_averaged() -> None:
    # Block 0: B/A of the sums is 22/20 = 1.1; the mean of its slices' ratios would be 1.125.
    rounds = [_slice(0, 10.0, 10.0), _slice(0, 10.0, 12.0), _slice(1, 8.0, 8.0)]
    assert block_ratios(rounds) == [22.0 / 20.0, 1.0]


def test_rounds_without_blocks_are_each_their_own_pair() -> None:
    # bench.budgetpair's rounds mode starts fresh collectors every round.
    rounds = [_slice(None, 10.0, 11.0), _slice(None, 10.0, 9.0)]
    assert block_ratios(rounds) == [1.1, 0.9]


def test_the_interval_over_pairs_holds_the_mean_and_is_wider_when_pairs_disagree() -> None:
    close = [1.04, 1.05, 1.06, 1.05, 1.04, 1.06]
    apart = [0.98, 1.12, 1.00, 1.10, 0.99, 1.11]
    low, high = mean_interval(close)
    assert low <= sum(close) / len(close) <= high
    wide_low, wide_high = mean_interval(apart)
    assert wide_high - wide_low > 3 * (high - low)
    assert mean_interval(close) == (low, high)  # seeded: a saved run's interval recomputes


def test_summary_reports_the_mean_of_pairs_with_its_interval() -> None:
    rounds = [_slice(block, 10.0, 10.0 * ratio)
              for block, ratio in enumerate((1.02, 1.04, 1.06, 1.08)) for _ in range(3)]
    s = summary(rounds)
    assert len(s["block_ratios"]) == 4
    assert abs(s["cpu_increase_blocks_mean"] - 0.05) < 1e-9
    low, high = s["cpu_increase_blocks_mean_90"]
    assert 0.02 <= low <= 0.05 <= high <= 0.08
