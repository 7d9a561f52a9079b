"""Budgets, pure: which period a usage hour falls in, which thresholds a spend crosses, and
the alert each crossing becomes. No I/O here; the stores and the delivery task call in.

Spend is kept in integer cents per (budget, scope value, period start) so that sums added in
any order, by any number of collectors, agree exactly and a threshold is crossed at one
well-defined commit.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from collector.config.budgets import AlertSink, Budget

NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class Period:
    """[start_ns, end_ns) in UTC nanoseconds; `start_ns` keys the budget's stored rows."""

    start_ns: int
    end_ns: int


@functools.cache
def zone(name: str) -> ZoneInfo:
    """A budget's time zone. ZoneInfo's own cache holds only 8 zones for sure: budgets in
    more zones than that (the benchmark's 20 use 10) read a zone file again on nearly every
    fold. The names come from the config, so this cache is as small as the config."""
    return ZoneInfo(name)


def period_of(budget: Budget, ts_ns: int) -> Period:
    """The budget period containing `ts_ns`, its boundaries at local midnight in the budget's
    time zone (a day around a DST change is 23 or 25 hours long, as its people live it)."""
    tz = zone(budget.timezone)
    local = datetime.fromtimestamp(ts_ns / NS_PER_S, tz=UTC).astimezone(tz)
    day = local.date()
    if budget.period == "day":
        start, end = day, day + timedelta(days=1)
    elif budget.period == "week":  # ISO weeks: Monday first
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)

    def ns(d: date) -> int:
        return int(datetime(d.year, d.month, d.day, tzinfo=tz).timestamp()) * NS_PER_S

    return Period(ns(start), ns(end))


def threshold_cents(budget: Budget, threshold: float) -> int:
    """The spend, in cents, at which `threshold` is reached (rounded up: 80 % of $0.05 is
    reached at 4 cents, never before)."""
    exact = round(budget.amount_usd * 100 * threshold, 6)
    whole = int(exact)
    return whole if whole == exact else whole + 1


def reached(budget: Budget, spend_cents: float) -> tuple[float, ...]:
    """Every threshold a period's spend has reached. The store inserts each into its
    crossings table with ON CONFLICT DO NOTHING, so the ones already recorded cost nothing and
    only the newly inserted become alerts: exactly once however commits interleave."""
    return tuple(t for t in budget.thresholds if spend_cents >= threshold_cents(budget, t))


def alert_id(budget: str, value: str, period_start_ns: int, threshold: float, sink: str) -> str:
    """Stable across retries, restarts and collectors: a sink dedupes deliveries on it."""
    text = f"{budget}|{value}|{period_start_ns}|{threshold!r}|{sink}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def projected_cents(spend_cents: int, period: Period, now_ns: int) -> int:
    """End-of-period spend at the current burn rate (spend / elapsed * period length)."""
    length = period.end_ns - period.start_ns
    elapsed = min(max(now_ns - period.start_ns, 0), length)
    if elapsed == 0:
        return spend_cents
    return round(spend_cents * length / elapsed)


def backoff_s(attempts: int, *, base_s: float = 1.0, cap_s: float = 300.0,
              jitter: float = 0.0) -> float:
    """Delay before the next delivery attempt after `attempts` failures: exponential with a
    cap; `jitter` in [0, 1) (a random draw supplied by the caller) spreads collectors apart."""
    delay = min(cap_s, base_s * (2 ** max(attempts - 1, 0)))
    return float(delay * (1 - jitter / 2))


def slack_escape(text: str) -> str:
    """Slack mrkdwn's three control characters; agent-controlled text (a team name, a user)
    could otherwise mention @channel or forge a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@dataclass(frozen=True, slots=True)
class Alert:
    """What a crossing tells a sink; built once, when the crossing is recorded."""

    id: str
    budget: str
    dimension: str | None
    value: str
    period: Period
    threshold: float
    spend_cents: int
    limit_usd: float
    top: dict[str, list[tuple[str, float]]]  # "sessions"/"users"/"models" -> (name, cents)


def webhook_body(alert: Alert) -> dict[str, object]:
    def iso(ns: int) -> str:
        return datetime.fromtimestamp(ns / NS_PER_S, tz=UTC).isoformat()

    spend = alert.spend_cents / 100
    return {
        "id": alert.id,
        "budget": alert.budget,
        "scope": "fleet" if alert.dimension is None else alert.dimension,
        "value": alert.value if alert.dimension is not None else None,
        "period": {"start": iso(alert.period.start_ns), "end": iso(alert.period.end_ns)},
        "spend_usd": spend,
        "limit_usd": alert.limit_usd,
        "share": round(spend / alert.limit_usd, 4),
        "threshold": alert.threshold,
        "top": {k: [{"name": n, "spend_usd": c / 100} for n, c in v]
                for k, v in alert.top.items()},
    }


def slack_body(alert: Alert) -> dict[str, object]:
    scope = ("the fleet" if alert.dimension is None
             else f"{alert.dimension} {slack_escape(alert.value)}")
    spend = alert.spend_cents / 100
    lines = [f"*Budget {slack_escape(alert.budget)}*: {scope} has spent ${spend:,.2f} of "
             f"${alert.limit_usd:,.2f} ({spend / alert.limit_usd:.0%}; threshold "
             f"{alert.threshold:.0%})."]
    for kind, rows in alert.top.items():
        if rows:
            lines.append(f"Top {kind}: " + ", ".join(
                f"{slack_escape(n)} ${c / 100:,.2f}" for n, c in rows))
    return {"text": "\n".join(lines)}


def top_n(rows: Iterable[tuple[str, float]], n: int = 5) -> list[tuple[str, float]]:
    """The largest n by spend, ties by name so every collector builds the same alert."""
    return sorted(rows, key=lambda r: (-r[1], r[0]))[:n]


def outbox_rows(budget: Budget, value: str, period_start_ns: int, threshold: float,
                spend_cents: float, sinks: Iterable[AlertSink], *,
                top: Mapping[str, list[tuple[str, float]]] | None = None
                ) -> list[tuple[str, str, str]]:
    """(id, sink name, JSON body) per sink for one newly recorded crossing. The body is fixed
    here, inside the crossing's transaction, so every redelivery sends the same bytes. `top`:
    the instance's largest spenders of the period, as of that transaction."""
    period = period_of(budget, period_start_ns)
    rows = []
    for sink in sinks:
        alert = Alert(id=alert_id(budget.name, value, period_start_ns, threshold, sink.name),
                      budget=budget.name, dimension=budget.dimension, value=value,
                      period=period, threshold=threshold, spend_cents=round(spend_cents),
                      limit_usd=budget.amount_usd, top=dict(top or {}))
        body = webhook_body(alert) if sink.kind == "webhook" else slack_body(alert)
        rows.append((alert.id, sink.name, json.dumps(body, sort_keys=True)))
    return rows
