"""What committed usage adds to each budget instance's period, pure: the flush's part of
collector.store.budgets, kept apart from the alerts and their bodies in collector.budgets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from fnmatch import translate

from collector.accounting.aggregate import HOUR_NS, HourDelta, HourKey
from collector.budgets import period_of
from collector.config.budgets import Budget

# (budget name, scope value, period start ns): one budget instance's period.
SpendKey = tuple[str, str, int]


class SpendPlanner:
    """What an applied batch adds to each budget instance's period, with what a flush would
    otherwise recompute remembered between flushes: each budget's glob, compiled once, and its
    answer per value; each budget's period per usage hour. A flush's batch holds few hours and
    values, but a glob over 1,000 teams tried afresh per (budget, value) each flush cost more
    than the rest of the flush's budget work together. Both memos are bounded (cleared when
    full); a planner belongs to one store, for the budgets it was built with."""

    MAX_REMEMBERED = 100_000

    def __init__(self, budgets: Iterable[Budget]) -> None:
        self.budgets = tuple(budgets)
        self._matchers = [_matcher(b) for b in self.budgets]
        self._matched: list[dict[str, bool]] = [{} for _ in self.budgets]
        self._starts: list[dict[int, int]] = [{} for _ in self.budgets]

    def deltas(self, hours: Mapping[HourKey, HourDelta],
               values: Mapping[tuple[str, str], str | None]) -> dict[SpendKey, float]:
        """In cents, per instance period. `values`: (dimension, session id) -> the session's
        value as committed (the latest wins, as for the model), for every dimension a budget
        names. Costs only the batch's hours, never a scan."""
        # Many budgets share a dimension, and a batch holds many session hours but few hours
        # and values: each dimension's cost is summed per (value, hour) once, then each budget
        # walks those sums.
        sums: dict[str | None, dict[tuple[str | None, int], float]] = {}
        for dimension in {b.dimension for b in self.budgets}:
            per_value: dict[tuple[str | None, int], float] = {}
            for (session_id, _, hour), delta in hours.items():
                cost = delta.cost_cents
                if not cost:
                    continue
                key = (None if dimension is None else values.get((dimension, session_id)),
                       hour)
                per_value[key] = per_value.get(key, 0.0) + cost
            sums[dimension] = per_value
        out: dict[SpendKey, float] = {}
        for budget, matcher, matched, starts in zip(self.budgets, self._matchers,
                                                    self._matched, self._starts, strict=True):
            name = budget.name
            fleet = budget.dimension is None
            if len(matched) > self.MAX_REMEMBERED:
                matched.clear()
            if len(starts) > self.MAX_REMEMBERED:
                starts.clear()
            for (value, hour), cost in sums[budget.dimension].items():
                if fleet:
                    value = ""
                elif value is None:
                    continue  # a session without a value counts only towards fleet budgets
                else:
                    ok = matched.get(value)
                    if ok is None:
                        ok = matched[value] = matcher(value)
                    if not ok:
                        continue
                start = starts.get(hour)
                if start is None:
                    start = starts[hour] = period_of(budget, hour * HOUR_NS).start_ns
                spend_key = (name, value, start)
                out[spend_key] = out.get(spend_key, 0.0) + cost
        return out


def _matcher(budget: Budget) -> Callable[[str], bool]:
    """scope_matches for a value of the budget's dimension, decided without fnmatch's
    per-call pattern lookup: `*` matches all, a literal is equality, a glob its compiled
    fnmatch pattern (the same translation fnmatchcase uses, so the same answers)."""
    if budget.value == "*":
        return lambda value: True
    if not budget.is_glob:
        return budget.value.__eq__
    match = re.compile(translate(budget.value)).match
    return lambda value: match(value) is not None
