"""Budgets: config validation and the pure core (periods, crossings, alert bodies)."""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from collector import budgets
from collector.accounting.aggregate import HOUR_NS, HourDelta, SessionDelta
from collector.budgets import (
    Alert,
    Period,
    alert_id,
    backoff_s,
    period_of,
    projected_cents,
    reached,
    slack_body,
    threshold_cents,
    webhook_body,
    zone,
)
from collector.budgets.spend import SpendPlanner
from collector.config import Config, ConfigError, parse_config
from collector.config.budgets import Budget


def _ns(*args: int, tz: object = UTC) -> int:
    return int(datetime(*args, tzinfo=tz).timestamp()) * 1_000_000_000  # type: ignore[arg-type]


def _config(doc: dict[str, object], tmp_path: Path) -> Config:
    return parse_config(doc, source="budgets.toml", base_dir=tmp_path)


GOOD = {
    "budgets": [
        {"name": "fleet", "scope": "fleet", "period": "month", "amount_usd": 1000},
        {"name": "teams", "dimension": "user", "value": "*", "period": "week",
         "timezone": "Europe/Berlin", "amount_usd": 50.5, "thresholds": [1.0, 0.5, 0.8]},
    ],
    "alerts": {"sinks": [
        {"name": "hook", "kind": "webhook", "url": "http://127.0.0.1:9/x",
         "headers": {"X-Team": "ops"}},
        {"name": "chat", "kind": "slack", "url": "https://hooks.slack.com/services/T/B/C"},
    ]},
}


def test_budgets_and_sinks_parse(tmp_path: Path) -> None:
    config = _config(GOOD, tmp_path)
    budgets = config.budgets
    assert budgets[0] == Budget(name="fleet", amount_usd=1000.0)
    assert budgets[1].thresholds == (0.5, 0.8, 1.0) and budgets[1].is_glob
    assert budgets[1].timezone == "Europe/Berlin" and budgets[1].period == "week"
    sinks = config.alert_sinks
    assert [s.kind for s in sinks] == ["webhook", "slack"]
    assert "ops" not in repr(sinks[0])  # header values may be credentials


def test_budgets_are_accepted_with_postgres_storage(tmp_path: Path) -> None:
    doc = {**GOOD, "storage": {"backend": "postgres",
                               "postgres_url": "postgresql://u@127.0.0.1:5432/db"}}
    config = _config(doc, tmp_path)
    assert config.storage_backend == "postgres" and len(config.budgets) == 2


def test_secret_file_is_read_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    doc = {"alerts": {"sinks": [{"name": "h", "kind": "webhook", "url": "https://e.com/",
                                 "secret_file": "secret"}]}}
    sink = _config(doc, tmp_path).alert_sinks[0]
    assert sink.secret == "s3cret" and "s3cret" not in repr(sink)


def _budget(**over: object) -> dict[str, object]:
    return {"budgets": [{"name": "b", "scope": "fleet", "amount_usd": 10, **over}]}


@pytest.mark.parametrize(("doc", "key", "words"), [
    ({"budgets": [{"name": "b", "dimension": "squad", "value": "x", "amount_usd": 1}]},
     "budgets[0].dimension", "unknown dimension 'squad'"),
    (_budget(amount_usd=-5), "budgets[0].amount_usd", "must be a number > 0"),
    (_budget(amount_usd=0), "budgets[0].amount_usd", "must be a number > 0"),
    ({"budgets": [{"name": "b", "scope": "fleet"}]}, "budgets[0].amount_usd", "missing"),
    (_budget(thresholds=[0.8, 10.5]), "budgets[0].thresholds", "(0, 10]"),
    (_budget(thresholds=[0]), "budgets[0].thresholds", "(0, 10]"),
    (_budget(thresholds=[]), "budgets[0].thresholds", "non-empty"),
    (_budget(timezone="Mars/Olympus"), "budgets[0].timezone", "not an IANA time zone"),
    (_budget(period="year"), "budgets[0].period", "must be one of day, week, month"),
    (_budget(scope="everyone"), "budgets[0].scope", 'must be "fleet"'),
    (_budget(colour="red"), "budgets[0].colour", "unknown key"),
    ({"budgets": [{"scope": "fleet", "amount_usd": 1}]}, "budgets[0].name", "missing"),
    ({"budgets": [{"name": "b", "scope": "fleet", "amount_usd": 1}] * 2},
     "budgets[1].name", "names another budget"),
    ({"budgets": [{"name": "b", "amount_usd": 1}]}, "budgets[0].dimension", "missing"),
    ({"alerts": {"sinks": [{"name": "h", "kind": "webhook", "url": "ftp://e.com/"}]}},
     "alerts.sinks[0].url", "http:// or https://"),
    ({"alerts": {"sinks": [{"name": "h", "kind": "webhook", "url": "file:///etc/passwd"}]}},
     "alerts.sinks[0].url", "http:// or https://"),
    ({"alerts": {"sinks": [{"name": "h", "kind": "email", "url": "https://e.com/"}]}},
     "alerts.sinks[0].kind", "must be one of webhook, slack"),
    ({"alerts": {"sinks": [{"name": "h", "kind": "slack", "url": "https://e.com/",
                            "secret_file": "nope"}]}},
     "alerts.sinks[0].secret_file", "cannot read"),
    ({"alerts": {"digest": True}}, "alerts.digest", "unknown key"),
])
def test_bad_budget_config_names_key_and_file(doc: dict[str, object], key: str, words: str,
                                              tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _config(doc, tmp_path)
    assert info.value.key == key
    assert words in info.value.problem
    assert "budgets.toml" in str(info.value)


def test_a_bad_url_error_does_not_echo_the_url(tmp_path: Path) -> None:
    doc = {"alerts": {"sinks": [{"name": "h", "kind": "slack",
                                 "url": "ftp://hooks.example/T0KEN"}]}}
    with pytest.raises(ConfigError) as info:
        _config(doc, tmp_path)
    assert "T0KEN" not in str(info.value)


def test_periods_follow_the_budget_time_zone() -> None:
    berlin = Budget(name="b", amount_usd=1, period="month", timezone="Europe/Berlin")
    # 23:30 UTC on 31 January is already 1 February in Berlin.
    p = period_of(berlin, _ns(2026, 1, 31, 23, 30))
    assert p == Period(_ns(2026, 1, 31, 23), _ns(2026, 2, 28, 23))
    utc = Budget(name="b", amount_usd=1, period="month")
    assert period_of(utc, _ns(2026, 1, 31, 23, 30)).start_ns == _ns(2026, 1, 1)
    assert period_of(utc, _ns(2026, 12, 31, 23)).end_ns == _ns(2027, 1, 1)
    week = Budget(name="b", amount_usd=1, period="week")
    assert period_of(week, _ns(2026, 12, 3, 6)) == Period(_ns(2026, 11, 30), _ns(2026, 12, 7))
    # A day across the end of summer time is 25 hours long.
    day = Budget(name="b", amount_usd=1, period="day", timezone="Europe/Berlin")
    p = period_of(day, _ns(2026, 10, 25, 12))
    assert p.end_ns - p.start_ns == 25 * 3600 * 1_000_000_000


def test_a_budget_zone_is_read_once_however_many_zones_the_budgets_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ZoneInfo keeps 8 zones for sure; budgets in more must not read a zone file each fold."""
    read: list[str] = []

    def counting(name: str) -> ZoneInfo:
        read.append(name)
        return ZoneInfo(name)

    monkeypatch.setattr(budgets, "ZoneInfo", counting)
    zone.cache_clear()
    names = ("UTC", "Asia/Tokyo", "Asia/Kolkata", "America/New_York", "America/Chicago",
             "America/Los_Angeles", "America/Sao_Paulo", "Australia/Sydney",
             "Pacific/Auckland", "Africa/Nairobi", "Europe/London")
    for _ in range(3):
        for name in names:
            period_of(Budget(name="b", amount_usd=1, timezone=name), _ns(2026, 1, 31, 23))
    assert sorted(read) == sorted(names)
    zone.cache_clear()  # the real ZoneInfo again for later tests


def test_thresholds_are_reached_at_whole_cents() -> None:
    b = Budget(name="b", amount_usd=0.05, thresholds=(0.8, 1.0))
    assert threshold_cents(b, 0.8) == 4 and threshold_cents(b, 1.0) == 5
    assert reached(b, 3) == () and reached(b, 4) == (0.8,) and reached(b, 9) == (0.8, 1.0)
    big = Budget(name="b", amount_usd=100, thresholds=(0.1, 0.7))
    assert threshold_cents(big, 0.7) == 7000 and threshold_cents(big, 0.1) == 1000


def test_scopes_and_glob_instances() -> None:
    """The fleet takes every session under the value "", a session without a value too; a
    glob takes the values it matches, each its own instance, and no session without one."""
    fleet = Budget(name="f", amount_usd=1)
    plat = Budget(name="p", amount_usd=1, dimension="user", value="plat*")
    hour = int(datetime(2026, 3, 2, 10, tzinfo=UTC).timestamp()) * 10**9 // HOUR_NS
    hours = {(sid, "m", hour): HourDelta(cost_cents=cents)
             for sid, cents in (("a", 1.0), ("b", 2.0), ("c", 4.0))}
    planner = SpendPlanner([fleet, plat])
    sessions = {sid: SessionDelta(sid, 0, 0, user=user)
                for sid, user in (("a", "platform"), ("b", "web"), ("c", None))}
    sums, missing = planner.sums(hours, sessions)
    assert missing == [("user", "c")]  # read back from the store by the caller
    spread = planner.spread(sums)
    assert spread == {("f", "", period_of(fleet, hour * HOUR_NS).start_ns): 7.0,
                      ("p", "platform", period_of(plat, hour * HOUR_NS).start_ns): 1.0}


GLOBS = ("*", "plat*", "platform", "team-[0-4]?", "team-[!0-4]*", "a?c", "[*]", "x[", "")
VALUES = ("platform", "plat", "web", "team-01", "team-55", "team-5", "abc", "a?c", "*", "x[",
          "", "PLATFORM")


def _plain_instance(budget: Budget, value: str | None) -> str | None:
    """The plain rule, by fnmatch: the instance value a session with `value` counts under
    (the fleet's "", or the value its glob matches), None when it counts towards none."""
    if budget.dimension is None:
        return ""
    return value if value is not None and fnmatchcase(value, budget.value) else None


def test_the_planner_matches_as_fnmatch_does_and_sums_per_instance_period() -> None:
    """Its compiled globs and memos give the answers of the plain rule (fnmatch, period_of),
    first time and remembered, and after its memos are cleared."""
    budgets = [Budget(name=f"b{i}", amount_usd=1, dimension="team", value=glob,
                      period=period, timezone=zone)
               for i, (glob, period, zone) in enumerate(
                   (g, p, z) for g in GLOBS for p, z in (("day", "Asia/Kolkata"),
                                                        ("week", "America/New_York")))]
    budgets.append(Budget(name="fleet", amount_usd=1, period="month"))
    first_hour = int(datetime(2026, 3, 29, tzinfo=UTC).timestamp()) * 10**9 // HOUR_NS
    hours = {(f"s{i}", "m", first_hour + i % 30): HourDelta(cost_cents=1.0 + i)
             for i in range(len(VALUES) + 1)}
    values = {("team", f"s{i}"): v for i, v in enumerate(VALUES)}  # the last one has none
    sessions = {sid: SessionDelta(sid, 0, 0, tags=((d, v),)) for (d, sid), v in values.items()}
    expected: dict[tuple[str, str, int], float] = {}
    for b in budgets:
        for (sid, _, hour), delta in hours.items():
            instance = _plain_instance(b, values.get(("team", sid)))
            if instance is not None:
                key = (b.name, instance, period_of(b, hour * HOUR_NS).start_ns)
                expected[key] = expected.get(key, 0.0) + delta.cost_cents
    planner = SpendPlanner(budgets)
    assert planner.spread(planner.sums(hours, sessions)[0]) == expected
    assert planner.spread(planner.sums(hours, sessions)[0]) == expected  # remembered
    planner.MAX_REMEMBERED = 0  # every memo is cleared before its next use
    assert planner.spread(planner.sums(hours, sessions)[0]) == expected
    assert expected[("fleet", "", period_of(budgets[-1], first_hour * HOUR_NS).start_ns)] \
        == sum(d.cost_cents for d in hours.values())


def test_spend_statements_come_in_a_handful_of_sizes_in_order() -> None:
    from collector.store.budgets import SPEND_CHUNK, spend_chunks

    sizes: set[int] = set()
    for n in (0, 1, 2, 3, 255, 256, 257, 1000, 3 * SPEND_CHUNK + 77):
        rows = list(range(n))
        chunks = list(spend_chunks(rows))
        assert [r for c in chunks for r in c] == rows
        sizes.update(len(c) for c in chunks)
    assert sizes <= {SPEND_CHUNK >> k for k in range(SPEND_CHUNK.bit_length())}


def test_alert_ids_are_stable_and_distinct() -> None:
    a = alert_id("b", "platform", 5, 0.8, "hook")
    assert a == alert_id("b", "platform", 5, 0.8, "hook")
    assert len({a, alert_id("b", "platform", 6, 0.8, "hook"),
                alert_id("b", "platform", 5, 1.0, "hook"),
                alert_id("b", "platform", 5, 0.8, "chat")}) == 4


def test_projection_and_backoff() -> None:
    p = Period(0, 100)
    assert projected_cents(250, p, 25) == 1000
    assert projected_cents(250, p, 0) == 250 and projected_cents(250, p, 500) == 250
    assert [backoff_s(n, cap_s=10) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert backoff_s(3, jitter=0.5) == 3.0


def _alert() -> Alert:
    return Alert(id="abc", budget="teams", dimension="team", value="<!channel> & co",
                 period=Period(_ns(2026, 12, 1), _ns(2027, 1, 1)), threshold=0.8,
                 spend_cents=8050, limit_usd=100.0,
                 top={"users": [("<@U1>", 5000)], "models": [("m", 8050)]})


def test_webhook_body() -> None:
    body = webhook_body(_alert())
    assert body["id"] == "abc" and body["spend_usd"] == 80.5 and body["share"] == 0.805
    assert body["period"] == {"start": "2026-12-01T00:00:00+00:00",
                              "end": "2027-01-01T00:00:00+00:00"}
    assert body["top"] == {"users": [{"name": "<@U1>", "spend_usd": 50.0}],
                           "models": [{"name": "m", "spend_usd": 80.5}]}


def test_slack_text_escapes_agent_text() -> None:
    text = str(slack_body(_alert())["text"])
    assert "<!channel>" not in text and "<@U1>" not in text
    assert "&lt;!channel&gt; &amp; co" in text and "$80.50 of $100.00" in text


def test_journal_rows_keep_every_bit_of_each_sum_and_refuse_what_is_not_one() -> None:
    from collector.budgets.spend import decode, encode, journal_total

    sums = {"": {7: {"": 0.1 + 0.2}}, "team": {7: {"plat\u00e9\"form": 1e-300},
                                              8: {"web": 123456.789012345, "api": 2.5}}}
    assert decode(encode(sums)) == sums
    assert journal_total([encode(sums)], decode(encode(sums)))[0]["team"][8]["web"] == \
        2 * 123456.789012345
    # The first layout, per dimension its [value, hour] keys, reads as the same sums.
    first = json.dumps([["team", [["web", 8], ["api", 8]],
                         struct.pack("<2d", 123456.789012345, 2.5).hex()]])
    assert decode(first) == {"team": {8: {"web": 123456.789012345, "api": 2.5}}}
    for bad in ("{}", "[[1]]", '[["team", 7, ["v"], "zz"]]', '[["team", 7, ["v"], ""]]',
                '[["team", 7, [7], "000000000000f03f"]]', '[["team", "7", ["v"], '
                '"000000000000f03f"]]', '[[7, 7, ["v"], "000000000000f03f"]]',
                '[["team", [["v", 7]], "zz"]]', '[["team", [[7, 7]], "000000000000f03f"]]',
                "not json"):
        with pytest.raises(ValueError):
            decode(bad)


def test_a_flush_takes_every_tag_its_batch_carries_even_from_spans_with_partial_sets() -> None:
    """A session whose spans give its tags in two parts (a team and a department, then a
    project and a cost centre) carries all four from the batch: none is left to be read back
    from the store."""
    from collector.accounting.aggregate import Batch
    from collector.signals.traces import SpanUsage

    def span(key: int, end: int, tags: tuple[tuple[str, str], ...]) -> SpanUsage:
        return SpanUsage(key.to_bytes(32, "big"), "s", end - 1, end, 1, 10, 2, 0, 0, 0, 1.0,
                         True, "m", None, None, None, None, user="alice", dimensions=tags)

    batch = Batch()
    batch.add([span(1, 10, (("team", "platform"), ("department", "eng"))),
               span(2, 20, (("project", "web"), ("cost_center", "cc-1")))])
    named = ("team", "project", "department", "cost_center", "user", "host")
    planner = SpendPlanner([Budget(name=d, amount_usd=1, dimension=d, value="*")
                            for d in named])
    sums, missing = planner.sums(batch.hours, batch.sessions)
    cost = sum(h.cost_cents for h in batch.hours.values())
    assert cost > 0 and {h for _, _, h in batch.hours} == {0}
    assert sums == {"cost_center": {0: {"cc-1": cost}}, "department": {0: {"eng": cost}},
                    "project": {0: {"web": cost}}, "team": {0: {"platform": cost}},
                    "user": {0: {"alice": cost}}}
    assert missing == [("host", "s")]
