"""The budgets phase's collector config and its after-run checks (used by bench.run).

The goal is that budgets cost ingestion next to nothing, so the configuration is a heavy but
plausible one: 20 budgets over every scope a budget can take (the fleet, globs over the
configured dimensions, a literal, a built-in dimension), periods of a day, a week and a month
in time zones either side of UTC, so that each flush evaluates many instances and periods.
Amounts are far above what a run spends, except one small fleet budget, so a few thresholds are
crossed and the outbox and its delivery task (to a closed port: every attempt fails and backs
off) are in play while ingestion is measured, as they would be in production.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.payload import TAGS
from collector.budgets.spend import FLEET, journal_total

FLEET_BUDGET = "fleet-month"
TEAM_BUDGET = "team-month"  # team = "*": one instance per team
SMALL_BUDGET = "fleet-day-small"  # crossed early in every run: the outbox gets rows
SINK_NAME = "bench-webhook"
HUGE_USD = 1e9
TEAMS = next(count for key, _, count in TAGS if key == "team.id")
# What 20 budgets look like for a mid-sized organisation: (name, dimension or None for the
# fleet, value glob, period, time zone, USD, thresholds).
BUDGETS: tuple[tuple[str, str | None, str, str, str, float, tuple[float, ...]], ...] = (
    (FLEET_BUDGET, None, "*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("fleet-week-ny", None, "*", "week", "America/New_York", HUGE_USD, (0.5, 0.9, 1.0)),
    (SMALL_BUDGET, None, "*", "day", "Europe/Berlin", 1.0, (0.5, 1.0)),
    (TEAM_BUDGET, "team", "*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("team-week-berlin", "team", "*", "week", "Europe/Berlin", HUGE_USD, (0.75, 1.0)),
    ("team-day-tokyo", "team", "*", "day", "Asia/Tokyo", HUGE_USD, (0.9,)),
    ("team-0xx-month", "team", "bench-team-0*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("team-1xx-week", "team", "bench-team-1??", "week", "America/Los_Angeles", HUGE_USD,
     (0.5, 1.0)),
    ("team-low-day", "team", "bench-team-[0-4]*", "day", "UTC", HUGE_USD, (1.0,)),
    ("team-042", "team", "bench-team-042", "month", "Europe/London", HUGE_USD, (0.8, 1.0)),
    ("team-9xx-month-kolkata", "team", "bench-team-9*", "month", "Asia/Kolkata", HUGE_USD,
     (0.8, 1.0)),
    ("dept-month", "department", "*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("dept-week-london", "department", "bench-dept-00[0-4]", "week", "Europe/London",
     HUGE_USD, (0.9, 1.0)),
    ("dept-day-sydney", "department", "*", "day", "Australia/Sydney", HUGE_USD, (1.0,)),
    ("cc-month", "cost_center", "*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("cc-week-sao-paulo", "cost_center", "bench-cc-01?", "week", "America/Sao_Paulo",
     HUGE_USD, (0.5, 0.8, 1.0)),
    ("project-month", "project", "*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("project-day-auckland", "project", "bench-project-0*", "day", "Pacific/Auckland",
     HUGE_USD, (1.0,)),
    ("agent-month", "agent", "*", "month", "UTC", HUGE_USD, (0.8, 1.0)),
    ("agent-week", "agent", "*", "week", "UTC", HUGE_USD, (0.9, 1.0)),
)
assert len(BUDGETS) == 20 and len({b[0] for b in BUDGETS}) == 20


def budgets_toml(sink_port: int) -> str:
    """The `[[budgets]]` and `[[alerts.sinks]]` tables; `sink_port`: a closed 127.0.0.1 port."""
    out: list[str] = []
    for name, dimension, value, period, tz, usd, thresholds in BUDGETS:
        out.append("[[budgets]]")
        out.append(f'name = "{name}"')
        if dimension is None:
            out.append('scope = "fleet"')
        else:
            out.append(f'dimension = "{dimension}"')
            out.append(f'value = "{value}"')
        out.append(f'period = "{period}"')
        out.append(f'timezone = "{tz}"')
        out.append(f"amount_usd = {usd!r}")
        out.append(f"thresholds = [{', '.join(repr(t) for t in thresholds)}]")
    out.append("[[alerts.sinks]]")
    out.append(f'name = "{SINK_NAME}"')
    out.append('kind = "webhook"')
    out.append(f'url = "http://127.0.0.1:{sink_port}/alerts"')
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class BudgetCheck:
    """What the budget tables hold after a run, against agent_sessions."""

    ok: bool
    sessions_cost_cents: float
    fleet_spend_cents: float  # the fleet budget's spend, every period (one, in practice)
    fleet_periods: int
    team_instances: int
    team_instances_expected: int
    budgets_with_spend: int
    crossings: int
    outbox_rows: int
    delivery_attempts: int
    problems: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_budgets(path: Path, *, teams: int = TEAMS) -> BudgetCheck:
    """The fleet budget's spend (its rows and the journal's fleet sums) must equal the sum of
    agent_sessions.cost_cents (both are sums of the same per-hour costs, in another order:
    equal within float rounding), and the team glob must have one instance per team, folded
    or journaled. Read-only; the collector may still be running."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("BEGIN")  # one snapshot: a fold moves sums from the journal to the rows
        cost = float(conn.execute(
            "SELECT coalesce(sum(cost_cents), 0) FROM agent_sessions").fetchone()[0])
        fleet, periods = conn.execute(
            "SELECT coalesce(sum(spend_cents), 0), count(DISTINCT period_start_ns) "
            "FROM collector_budget_spend WHERE budget = ?", (FLEET_BUDGET,)).fetchone()
        team_values = [v for (v,) in conn.execute(
            "SELECT DISTINCT scope_value FROM collector_budget_spend WHERE budget = ?",
            (TEAM_BUDGET,))]
        with_spend = conn.execute(
            "SELECT count(DISTINCT budget) FROM collector_budget_spend").fetchone()[0]
        # Flushes' sums not yet folded into the spend rows (collector.budgets.spend).
        journal, unreadable = journal_total(
            str(t) for (t,) in conn.execute("SELECT sums FROM collector_budget_journal"))
        crossings = conn.execute("SELECT count(*) FROM collector_budget_alerts").fetchone()[0]
        outbox, attempts = conn.execute(
            "SELECT count(*), coalesce(sum(attempts), 0) FROM collector_alert_outbox"
        ).fetchone()
    finally:
        conn.close()
    fleet += sum(sum(per.values()) for per in journal.get(FLEET, {}).values())
    instances = len(set(team_values).union(*journal.get("team", {}).values()))
    problems: list[str] = []
    if unreadable:
        problems.append(f"{unreadable} budget journal rows are not journal rows")
    if cost <= 0:
        problems.append("agent_sessions holds no cost: the model is not priced")
    if not math.isclose(float(fleet), cost, rel_tol=1e-9, abs_tol=1e-6):
        problems.append(f"fleet spend {fleet!r} cents != sessions' cost {cost!r} cents")
    if instances != teams:
        problems.append(f"{instances} team budget instances, expected {teams}")
    if with_spend != len(BUDGETS):
        problems.append(f"{with_spend} budgets have spend, expected {len(BUDGETS)}")
    return BudgetCheck(ok=not problems, sessions_cost_cents=cost, fleet_spend_cents=float(fleet),
                       fleet_periods=int(periods), team_instances=int(instances),
                       team_instances_expected=teams, budgets_with_spend=int(with_spend),
                       crossings=int(crossings), outbox_rows=int(outbox),
                       delivery_attempts=int(attempts), problems=tuple(problems))
