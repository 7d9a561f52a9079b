"""The pure budget status (collector.budgets.status): current periods in each budget's zone,
zero lines for budgets without spend, projection, crossings of the current period only; the
budget metric families built from it; config.toml's commented example."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from collector.budgets import period_of
from collector.budgets.status import budget_status, current_periods, to_json
from collector.config import parse_config
from collector.config.budgets import Budget

NOW = int(datetime(2026, 12, 11, 12, tzinfo=UTC).timestamp()) * 1_000_000_000
FLEET = Budget(name="fleet", amount_usd=100.0)
USERS = Budget(name="users", amount_usd=10.0, dimension="user", value="*", period="day",
               timezone="Europe/Berlin", thresholds=(0.5, 1.0))
ALICE = Budget(name="alice", amount_usd=5.0, dimension="user", value="alice")


def test_every_budget_has_a_line_and_only_the_current_period_counts() -> None:
    budgets = (FLEET, USERS, ALICE)
    periods = dict(current_periods(budgets, NOW))
    assert periods["fleet"] == int(datetime(2026, 12, 1, tzinfo=UTC).timestamp()) * 10**9
    # Berlin's day began at 23:00 UTC the evening before.
    assert periods["users"] == int(datetime(2026, 12, 10, 23, tzinfo=UTC).timestamp()) * 10**9
    day = periods["users"]
    spend = [("users", "bo", day, 600.0), ("users", "ana", day, 250.0),
             ("users", "ana", day - 86_400 * 10**9, 9999.0),  # yesterday: not shown
             ("gone", "", 0, 5.0)]  # a budget no longer configured
    crossings = [("users", "bo", day, 0.5), ("users", "bo", day - 86_400 * 10**9, 1.0)]
    status = budget_status(budgets, spend, crossings, NOW)
    lines = [(s.budget, s.scope, s.spend_cents, s.alerted, s.reached) for s in status.instances]
    assert lines == [("fleet", "fleet", 0.0, (), ()),
                     ("users", "user=bo", 600.0, (0.5,), (0.5,)),
                     ("users", "user=ana", 250.0, (), ()),
                     ("alice", "user=alice", 0.0, (), ())]
    bo = status.instances[1]
    # 13 of the day's 24 hours have passed: 600 cents project to 600 * 24 / 13.
    assert bo.projected_cents == round(600 * 24 / 13)
    assert bo.share == 0.6
    doc = to_json(status)
    first = doc["budgets"][1]  # type: ignore[index]
    assert first["period_start"] == "2026-12-11T00:00:00+01:00"
    assert first["spend_usd"] == 6.0 and first["limit_usd"] == 10.0


def test_a_glob_without_values_shows_once_and_a_cap_counts_the_rest() -> None:
    start = period_of(USERS, NOW).start_ns
    assert [s.scope for s in budget_status((USERS,), [], [], NOW).instances] == [
        "user (no value yet)"]
    spend = [("users", f"u{i}", start, float(i)) for i in range(10)]
    status = budget_status((USERS,), spend, [], NOW, max_instances=3)
    assert [s.value for s in status.instances] == ["u9", "u8", "u7"]
    assert status.omitted == {"users": 7}


def test_config_toml_budget_example_uncommented_is_valid(tmp_path: Path) -> None:
    """config.toml's commented budgets and sinks, uncommented, are accepted as they are."""
    text = (Path(__file__).resolve().parent.parent / "config.toml").read_text()
    block = text[text.index("# [[budgets]]"):text.index("# Dialects:")]
    toml = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                     for line in block.splitlines())
    (tmp_path / "alert-secret.txt").write_text("s3cret\n")
    config = parse_config(tomllib.loads(toml), source="config.toml", base_dir=tmp_path)
    assert [(b.name, b.dimension, b.period) for b in config.budgets] == [
        ("fleet-monthly", None, "month"), ("per-user-daily", "user", "day")]
    assert [(s.name, s.kind, s.secret) for s in config.alert_sinks] == [
        ("finops-slack", "slack", None), ("finops-hook", "webhook", "s3cret")]


def test_metric_families_bound_a_glob_and_skip_budgets_without_an_instance() -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from collector.budgets.delivery import DeliveryStats
    from collector.web.ops import METRICS_BUDGET_INSTANCES, BudgetCollector, BudgetGauges

    start = period_of(USERS, NOW).start_ns
    spend = [("users", f"u{i:03d}", start, float(i)) for i in range(METRICS_BUDGET_INSTANCES + 7)]
    many = budget_status((FLEET, USERS), spend, [], NOW, max_instances=METRICS_BUDGET_INSTANCES)
    none_yet = budget_status((USERS,), [], [], NOW)
    for status, delivery in ((many, DeliveryStats(3, 2, 5 * 10**9)), (none_yet, None)):
        registry = CollectorRegistry()
        registry.register(BudgetCollector(lambda s=status: BudgetGauges(s, 4), delivery))
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in
                   text_string_to_metric_families(generate_latest(registry).decode())
                   for s in f.samples}
        spends = {k: v for k, v in samples.items() if k[0] == "collector_budget_spend_usd"}
        if status is many:
            assert len(spends) == 1 + METRICS_BUDGET_INSTANCES
            top = f"user=u{METRICS_BUDGET_INSTANCES + 6:03d}"
            assert spends[("collector_budget_spend_usd",
                           (("budget", "users"), ("scope", top)))] == pytest.approx(
                (METRICS_BUDGET_INSTANCES + 6) / 100)
            assert samples[("collector_budget_instances_not_exported",
                            (("budget", "users"),))] == 7
            assert samples[("collector_alert_delivery_failures_total", ())] == 2
            assert samples[("collector_alert_last_success_timestamp_seconds", ())] == 5.0
        else:
            assert spends == {}  # a glob nobody matched: no series with a made-up scope
            assert samples[("collector_alert_deliveries_total", ())] == 0
        assert samples[("collector_alert_outbox_pending", ())] == 4
