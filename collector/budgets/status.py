"""Where each budget stands now, pure: the stored spend and crossings of its current period in,
one line per budget instance out, for `collector budgets`, /api/budgets and /metrics alike (so
the three can never disagree on a number).

A budget's current period depends on its own time zone and period, so the caller first asks
`current_periods` which (budget, period start) pairs to read, reads those rows through the
storage Reader, and hands them back to `budget_status` with the same `now_ns`; `read_status`
is that sequence, the one impure function here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from collector.budgets import NS_PER_S, Period, period_of, projected_cents, reached, zone
from collector.budgets.spend import SpendPlanner, journal_total
from collector.config.budgets import Budget

if TYPE_CHECKING:
    from collector.store.base import Reader

# (budget, scope value, period start ns, spend cents) as collector_budget_spend holds it.
SpendRow = tuple[str, str, int, float]
# (budget, scope value, period start ns, threshold) as collector_budget_alerts holds it.
CrossingRow = tuple[str, str, int, float]


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """One budget instance in its current period. `value` is "" for a fleet budget and None
    for a glob budget that no session has matched yet (shown so a configured budget is never
    silently missing)."""

    budget: str
    dimension: str | None
    value: str | None
    period: str
    timezone: str
    period_start_ns: int
    period_end_ns: int
    spend_cents: float
    limit_usd: float
    projected_cents: int
    thresholds: tuple[float, ...]
    # Thresholds the spend has reached, and the crossings recorded (their alerts queued in the
    # outbox, delivered or not). Both are written by one flush, so they differ only when the
    # config changed: a threshold added mid-period is reached here before the next flush
    # records it, and a removed one stays alerted.
    reached: tuple[float, ...]
    alerted: tuple[float, ...]

    @property
    def limit_cents(self) -> float:
        return self.limit_usd * 100

    @property
    def share(self) -> float:
        return self.spend_cents / self.limit_cents

    @property
    def projected_share(self) -> float:
        return self.projected_cents / self.limit_cents

    @property
    def scope(self) -> str:
        """How people read the instance: "fleet", "user=alice", "user (no value yet)"."""
        if self.dimension is None:
            return "fleet"
        return f"{self.dimension}={self.value}" if self.value is not None else \
            f"{self.dimension} (no value yet)"


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """Every shown instance, and how many more a cap left out (by budget name)."""

    instances: tuple[InstanceStatus, ...]
    omitted: dict[str, int]


def current_periods(budgets: Iterable[Budget], now_ns: int) -> list[tuple[str, int]]:
    """(budget name, current period start) for each budget: what the Reader must read."""
    return [(b.name, period_of(b, now_ns).start_ns) for b in budgets]


def read_status(reader: Reader, budgets: Sequence[Budget], now_ns: int,
                max_instances: int | None = None) -> BudgetStatus:
    """budget_status over what `reader` holds for the budgets' current periods. Blocks: call
    it off the event loop. Without budgets nothing is read."""
    if not budgets:
        return budget_status(budgets, [], [], now_ns, max_instances=max_instances)
    spend, crossings, journal = reader.read_budgets(current_periods(budgets, now_ns))
    return budget_status(budgets, [*spend, *journal_spend(budgets, journal)], crossings,
                         now_ns, max_instances=max_instances)


def journal_spend(budgets: Sequence[Budget], texts: Iterable[str]) -> list[SpendRow]:
    """Spend rows for what the budget journal holds, not yet folded (collector.budgets.
    spend): the same rows a fold would add to, so a reader's totals are whole at any time."""
    sums, _ = journal_total(texts)  # a row that is not one is the next fold's to report
    if not sums:
        return []
    return [(name, value, start_ns, cents)
            for (name, value, start_ns), cents in SpendPlanner(budgets).spread(sums).items()]


def budget_status(budgets: Sequence[Budget], spend: Iterable[SpendRow],
                  crossings: Iterable[CrossingRow], now_ns: int, *,
                  max_instances: int | None = None) -> BudgetStatus:
    """Each budget's instances in its current period at `now_ns`, in config order, the
    largest spend first within a budget (ties by value). Rows of other periods or of budgets
    no longer configured are ignored, so a reader may over-read safely. `max_instances`
    caps the instances shown per budget (the largest spenders are kept); a fleet or literal
    budget always has exactly one, with 0 spend before any usage."""
    periods = {b.name: period_of(b, now_ns) for b in budgets}
    spent: dict[tuple[str, str], float] = {}
    for name, value, start_ns, cents in spend:
        period = periods.get(name)
        if period is not None and period.start_ns == start_ns:
            spent[(name, value)] = spent.get((name, value), 0.0) + float(cents)
    alerted: dict[tuple[str, str], set[float]] = {}
    for name, value, start_ns, threshold in crossings:
        period = periods.get(name)
        if period is not None and period.start_ns == start_ns:
            alerted.setdefault((name, value), set()).add(float(threshold))
    instances: list[InstanceStatus] = []
    omitted: dict[str, int] = {}
    for budget in budgets:
        period = periods[budget.name]
        found = sorted(((v, cents) for (name, v), cents in spent.items()
                        if name == budget.name), key=lambda vc: (-vc[1], vc[0]))
        values: list[tuple[str | None, float]] = list(found)
        if not budget.is_glob:
            fixed = "" if budget.dimension is None else budget.value
            values = [(fixed, spent.get((budget.name, fixed), 0.0))]
        elif not values:
            values = [(None, 0.0)]
        if max_instances is not None and len(values) > max_instances:
            omitted[budget.name] = len(values) - max_instances
            values = values[:max_instances]
        for shown, total in values:
            instances.append(_instance(budget, period, shown, total, now_ns, alerted.get(
                (budget.name, shown), set()) if shown is not None else set()))
    return BudgetStatus(tuple(instances), omitted)


def _instance(budget: Budget, period: Period, value: str | None, cents: float, now_ns: int,
              alerted: set[float]) -> InstanceStatus:
    return InstanceStatus(
        budget=budget.name, dimension=budget.dimension, value=value, period=budget.period,
        timezone=budget.timezone, period_start_ns=period.start_ns, period_end_ns=period.end_ns,
        spend_cents=cents, limit_usd=budget.amount_usd,
        # Whole cents, as thresholds are judged; the projection's rate is the spend so far.
        projected_cents=projected_cents(round(cents), period, now_ns),
        thresholds=budget.thresholds, reached=reached(budget, cents),
        alerted=tuple(sorted(alerted)))


def local_iso(ns: int, timezone: str) -> str:
    """A period boundary in the budget's own zone, as its people read it."""
    return datetime.fromtimestamp(ns / NS_PER_S, tz=UTC).astimezone(
        zone(timezone)).isoformat()


def to_json(status: BudgetStatus) -> dict[str, Any]:
    """The document `collector budgets --json` prints and /api/budgets answers. Amounts in
    USD (spend to 1e-8, as reports give it); shares as fractions of the limit."""
    return {
        "budgets": [{
            "budget": s.budget,
            "scope": s.scope,
            "dimension": s.dimension,
            "value": s.value,
            "period": s.period,
            "timezone": s.timezone,
            "period_start": local_iso(s.period_start_ns, s.timezone),
            "period_end": local_iso(s.period_end_ns, s.timezone),
            "spend_usd": round(s.spend_cents / 100, 8),
            "limit_usd": s.limit_usd,
            "share": round(s.share, 6),
            "projected_usd": s.projected_cents / 100,
            "projected_share": round(s.projected_share, 6),
            "thresholds": list(s.thresholds),
            "reached": list(s.reached),
            "alerted": list(s.alerted),
        } for s in status.instances],
        "omitted": dict(sorted(status.omitted.items())),
    }
