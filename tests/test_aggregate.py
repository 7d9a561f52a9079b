"""Per-session folding: sums add, latest values follow span time, each key counts once."""

from __future__ import annotations

import random

from collector.accounting.aggregate import NO_TIME, Batch
from collector.signals.traces import SpanUsage
from tests.conftest import MS, T0


def rec(key: int, session: str = "s", *, start: int = T0, end: int | None = None,
        model: str | None = None, status: str | None = None, kind: str | None = None,
        goal: str | None = None, prompt: int = 1) -> SpanUsage:
    return SpanUsage(key.to_bytes(32, "big"), session, start, end or start + MS, 1, prompt, 2,
                     1, 3, 4, 0.25, True, model, kind, status, None, goal)


def test_sums_and_time_bounds() -> None:
    b = Batch()
    b.add([rec(1, start=T0 + 5 * MS), rec(2, start=T0, end=T0 + 9 * MS), rec(3, "t")])
    d, t = b.sessions["s"], b.totals()["s"]
    assert (t.turns, t.prompt_tokens, t.completion_tokens, t.reasoning_tokens) == (2, 2, 4, 2)
    assert (t.cache_read_tokens, t.cache_write_tokens, t.cost_cents) == (6, 8, 0.5)
    assert (d.created_ns, d.last_ns) == (T0, T0 + 9 * MS)
    assert b.totals()["t"].turns == 1
    assert len(b) == 3 and set(b.sessions) == {"s", "t"}


def test_latest_value_is_the_one_with_the_latest_end_time() -> None:
    b = Batch()
    b.add([rec(1, end=T0 + 9 * MS, model="late", status="completed"),
           rec(2, end=T0 + 1 * MS, model="early", status="failed", kind="acp"),
           rec(3, end=T0 + 20 * MS)])
    d = b.sessions["s"]
    assert (d.model, d.model_ns, d.status, d.status_ns) == ("late", T0 + 9 * MS, "completed",
                                                            T0 + 9 * MS)
    assert (d.kind, d.kind_ns, d.goal, d.goal_ns) == ("acp", T0 + MS, None, NO_TIME)


def test_a_key_is_counted_once_per_batch() -> None:
    b = Batch()
    b.add([rec(1), rec(1), rec(2)])
    b.add([rec(2)])
    assert (len(b), b.duplicates, b.totals()["s"].turns) == (2, 2, 2)


def test_without_refolds_exactly() -> None:
    b = Batch()
    b.add([rec(1, prompt=10, model="a", end=T0 + 5 * MS), rec(2, prompt=20, model="b"),
           rec(3, "other")])
    rest = b.without({(1).to_bytes(32, "big"), (3).to_bytes(32, "big")})
    assert set(rest.sessions) == {"s"}
    d, t = rest.sessions["s"], rest.totals()["s"]
    assert (t.prompt_tokens, t.turns, d.model) == (20, 1, "b")
    assert rest.duplicates == 2


def test_absorb_keeps_failed_batch_first_and_dedupes() -> None:
    failed = Batch()
    failed.add([rec(1), rec(2)])
    later = Batch()
    later.add([rec(2), rec(3), rec(3)])
    failed.absorb(later)
    assert len(failed) == 3
    assert failed.duplicates == 2  # one inside `later`, one across the two
    assert failed.totals()["s"].turns == 3


HOUR = 3600 * 1_000_000_000


def test_hours_fold_per_session_model_and_hour_of_the_end() -> None:
    b = Batch()
    b.add([rec(1, model="a"), rec(2, model="a", start=T0 + 30 * MS),
           rec(3, model="b"), rec(4, end=T0 + HOUR + MS),  # no model, next hour
           rec(5, "t", model="a")])
    hour0 = T0 // HOUR
    assert set(b.hours) == {("s", "a", hour0), ("s", "b", hour0), ("s", "", hour0 + 1),
                            ("t", "a", hour0)}
    h = b.hours[("s", "a", hour0)]
    assert (h.turns, h.prompt_tokens, h.completion_tokens, h.reasoning_tokens) == (2, 2, 4, 2)
    assert (h.cache_read_tokens, h.cache_write_tokens, h.cost_cents) == (6, 8, 0.5)
    # A session's totals are its hours added up, whatever the split.
    t = b.totals()
    assert set(t) == {"s", "t"}
    assert (t["s"].turns, t["s"].prompt_tokens, t["s"].cost_cents) == (4, 4, 1.0)
    assert (t["t"].turns, t["t"].completion_tokens, t["t"].cache_write_tokens) == (1, 2, 4)


def test_without_refolds_hours_exactly_and_empty_hours_are_marked() -> None:
    b = Batch()
    b.add([rec(1, model="a"), rec(2, model="a"), rec(3, model="b")])
    rest = b.without({(2).to_bytes(32, "big"), (3).to_bytes(32, "big")})
    hour0 = T0 // HOUR
    assert list(rest.hours) == [("s", "a", hour0)]
    assert rest.hours[("s", "a", hour0)].turns == 1
    update = Batch()
    update.add([SpanUsage((9).to_bytes(32, "big"), "s", T0, T0, 0, 0, 0, 0, 0, 0, 0.0, True,
                          None, None, "completed", None, None)])
    assert all(h.is_empty() for h in update.hours.values())
    assert not rest.hours[("s", "a", hour0)].is_empty()


def labelled(key: int, end: int, **labels: str | None) -> SpanUsage:
    return rec(key, end=end)._replace(**labels)


def test_who_spends_follows_the_latest_span_per_label() -> None:
    b = Batch()
    b.add([labelled(1, T0 + 9 * MS, agent="late", user="u-late"),
           labelled(2, T0 + 5 * MS, agent="early", agent_version="1.0", host="h-early"),
           labelled(3, T0 + 7 * MS, host="h-mid")])
    d = b.sessions["s"]
    assert (d.agent, d.agent_version, d.user, d.host) == ("late", "1.0", "u-late", "h-mid")
    assert (d.agent_ns, d.agent_version_ns, d.user_ns, d.host_ns) == (
        T0 + 9 * MS, T0 + 5 * MS, T0 + 9 * MS, T0 + 7 * MS)
    assert d.has_labels()
    unlabelled = Batch()
    unlabelled.add([rec(4)])
    assert not unlabelled.sessions["s"].has_labels()
    assert unlabelled.sessions["s"].agent_ns == NO_TIME


def test_each_dimension_keeps_its_latest_value_in_any_arrival_order() -> None:
    """The fold's shortcut for a repeated set of tags gives what a plain per-name fold does."""
    same = (("team", "a"), ("project", "p"))
    tag_sets = [same, (("team", "b"),), (("project", "q"),), tuple(list(same)), (),
                (("cost_center", "c"), ("team", "b"))]
    rng = random.Random(7)
    for _ in range(600):
        # Half the sessions mostly repeat one set (the fold's shortcut), now and then
        # another set, an equal one in another object, or none.
        weights = [30, 1, 1, 2, 2, 1] if rng.random() < 0.5 else None
        spans = [(rng.randrange(1, 40) * MS, rng.choices(tag_sets, weights)[0])
                 for _ in range(rng.randrange(1, 12))]
        batch = Batch()
        batch.add(rec(i, end=T0 + t)._replace(dimensions=tags)
                  for i, (t, tags) in enumerate(spans))
        expected: dict[str, tuple[str, int]] = {}
        for t, tags in spans:  # ties go to the later arrival, as for every latest value
            for name, value in tags:
                if name not in expected or T0 + t >= expected[name][1]:
                    expected[name] = (value, T0 + t)
        d = batch.sessions["s"]
        assert d.latest_dimensions() == expected
        assert dict(d.latest_tags()) == {n: v for n, (v, _) in expected.items()}
        if d.tags:  # the set's end time: the latest span that gave all of it
            assert d.tags_ns == max(T0 + t for t, tags in spans if tags == d.tags)


def test_a_session_repeating_one_set_of_tags_keeps_it_whole_in_any_order() -> None:
    """Spans of one resource carry the same tags; arriving out of order, they still leave the
    set whole (SessionDelta.tags: the shortcut every later flush step takes) with the latest
    end time."""
    tags = (("team", "a"), ("project", "p"))
    batch = Batch()
    batch.add(rec(i, end=T0 + t * MS)._replace(dimensions=tags)
              for i, t in enumerate([5, 9, 2, 9, 7]))
    d = batch.sessions["s"]
    assert (d.tags, d.tags_ns) == (tags, T0 + 9 * MS)
    assert not d.dimensions  # no name kept apart from the set
