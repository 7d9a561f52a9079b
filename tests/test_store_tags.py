"""The tag memo (collector.store.tags): a flush writes a session's tag row only when it says
something new, and the table still ends with each session's latest value and its end time."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.accounting.aggregate import Batch
from collector.signals.traces import SpanUsage
from collector.store.tags import TagMemo
from tests.conftest import MS, T0
from tests.test_budget_store import _backend_store, _rows, _store, tagged

S = 1_000_000_000
LAG = 5 * S


def span(key: int, session: str, end: int, **tags: str) -> SpanUsage:
    return SpanUsage(key.to_bytes(32, "big"), session, end - MS, end, 1, 10, 2, 0, 0, 0, 0.5,
                     True, "m", None, None, None, None, dimensions=tuple(tags.items()))


def batch(*records: SpanUsage) -> Batch:
    b = Batch()
    b.add(records)
    return b


def flush(memo: TagMemo, now: int, *records: SpanUsage) -> list[tuple[str, str, str, int]]:
    """What a committed flush of `records` at `now` writes."""
    plan = memo.plan(batch(*records), now)
    memo.committed(plan, now)
    return sorted(plan.rows)


def test_a_repeated_value_moves_its_end_time_only_once_the_lag_has_passed() -> None:
    memo = TagMemo(lag_ns=LAG)
    assert flush(memo, T0, span(1, "a", T0, team="web", project="p")) == [
        ("a", "project", "p", T0), ("a", "team", "web", T0)]
    # Within the lag: nothing to write, however often the value repeats.
    assert flush(memo, T0 + S, span(2, "a", T0 + S, team="web", project="p")) == []
    assert flush(memo, T0 + 2 * S, span(3, "a", T0 + 2 * S, team="web", project="p")) == []
    # An older record of the same value says nothing new either.
    assert flush(memo, T0 + 3 * S, span(4, "a", T0 - S, team="web")) == []
    # Past the lag since the row was written: the latest end time, written by the flush
    # that carries it; the project's, not in that flush, stays owed until it is due.
    assert flush(memo, T0 + LAG, span(5, "a", T0 + LAG, team="web")) == [
        ("a", "team", "web", T0 + LAG)]
    assert memo.owed_rows() == [("a", "project", "p", T0 + 2 * S)]


def test_a_new_value_is_written_at_once_and_an_older_one_never() -> None:
    memo = TagMemo(lag_ns=LAG)
    flush(memo, T0, span(1, "a", T0, team="web"))
    assert flush(memo, T0 + S, span(2, "a", T0 + 2 * S, team="web")) == []
    # Older than the latest record seen (though later than the one written): loses.
    assert flush(memo, T0 + S, span(3, "a", T0 + S, team="growth")) == []
    # Later than every record seen: written now, with its own end time.
    assert flush(memo, T0 + S, span(4, "a", T0 + 3 * S, team="growth")) == [
        ("a", "team", "growth", T0 + 3 * S)]
    # A tie with the latest goes to the later arrival, as in a batch and in the table.
    assert flush(memo, T0 + S, span(5, "a", T0 + 3 * S, team="web")) == [
        ("a", "team", "web", T0 + 3 * S)]


def test_an_owed_end_time_is_written_by_a_later_flush_of_other_sessions_or_at_close() -> None:
    memo = TagMemo(lag_ns=LAG)
    flush(memo, T0, span(1, "a", T0, team="web"), span(2, "b", T0, team="ops"))
    assert flush(memo, T0 + S, span(3, "a", T0 + S, team="web")) == []
    # Session a goes quiet: its move is due LAG after the flush that deferred it.
    assert flush(memo, T0 + 2 * S, span(4, "c", T0 + 2 * S, team="x")) == [
        ("c", "team", "x", T0 + 2 * S)]
    assert flush(memo, T0 + S + LAG, span(5, "c", T0 + 3 * S, team="x")) == [
        ("a", "team", "web", T0 + S)]
    assert memo.owed_rows() == [("c", "team", "x", T0 + 3 * S)]
    # Written LAG ago or more: b's repeat is written by the flush that carries it.
    assert flush(memo, T0 + S + LAG, span(6, "b", T0 + 4 * S, team="ops")) == [
        ("b", "team", "ops", T0 + 4 * S)]
    # At close, what is still owed; then nothing is, and c's end time is not written again.
    assert memo.owed_rows() == [("c", "team", "x", T0 + 3 * S)]
    memo.settled()
    assert memo.owed_rows() == []
    assert flush(memo, T0 + 10 * LAG, span(7, "c", T0 + 3 * S, team="x")) == []


def test_a_flush_rolled_back_plans_its_rows_again() -> None:
    memo = TagMemo(lag_ns=LAG)
    lost = memo.plan(batch(span(1, "a", T0, team="web")), T0)
    assert lost.rows == [("a", "team", "web", T0)]
    # Never committed: the retry (or the next batch) writes the row again.
    assert flush(memo, T0 + S, span(1, "a", T0, team="web")) == [("a", "team", "web", T0)]


def test_a_full_memo_forgets_what_it_owes_nothing_and_keeps_what_it_owes() -> None:
    memo = TagMemo(lag_ns=LAG, limit=4)
    flush(memo, T0, *(span(i, f"s{i}", T0, team="t") for i in range(4)))
    flush(memo, T0 + S, span(10, "s0", T0 + S, team="t"))  # s0 owes its end time
    assert len(memo) == 4
    assert flush(memo, T0 + S, span(11, "new", T0 + S, team="t")) == [
        ("new", "team", "t", T0 + S)]
    assert len(memo) == 2  # s0 (owed) and the new one
    assert memo.owed_rows() == [("s0", "team", "t", T0 + S)]
    # Forgotten rows are written as new when they come back: never lost, never wrong.
    assert flush(memo, T0 + S, span(12, "s1", T0 + S, team="t")) == [
        ("s1", "team", "t", T0 + S)]


def test_a_session_giving_another_set_or_a_part_is_kept_per_row_from_then_on() -> None:
    """A session remembered as one set of tags, then giving a different set or only part of
    it: each row still follows the latest-value rule, and an end time its set owed is still
    written (by the flush that breaks the set, when due)."""
    memo = TagMemo(lag_ns=LAG)
    flush(memo, T0, span(1, "a", T0, team="web", project="p"))
    assert flush(memo, T0 + S, span(2, "a", T0 + S, team="web", project="p")) == []
    # Once the set's end time is due, a part of it with a new team: the team now, and the
    # project's owed end time.
    assert flush(memo, T0 + S + LAG, span(3, "a", T0 + LAG, team="ops")) == [
        ("a", "project", "p", T0 + S), ("a", "team", "ops", T0 + LAG)]
    # Per row from now on: the old set again, older than the team's latest, changes nothing.
    assert flush(memo, T0 + S + LAG, span(4, "a", T0 + 2 * S, team="web", project="p")) == []
    assert flush(memo, T0 + S + LAG, span(5, "a", T0 + 2 * LAG, team="web", project="q")) == [
        ("a", "project", "q", T0 + 2 * LAG), ("a", "team", "web", T0 + 2 * LAG)]
    assert memo.owed_rows() == []


def test_the_memo_writes_what_writing_every_row_would_leave_in_the_table() -> None:
    """Random flushes of whole sets, parts and other sets, at times in and out of order,
    with a memo so small that it forgets: once the owed end times are written, the table
    (its latest-value rule applied to the rows written) is the table every row written
    would give."""
    import random

    def write(table: dict[tuple[str, str], tuple[str, int]],
              rows: list[tuple[str, str, str, int]]) -> None:
        for session, name, value, end in rows:
            stored = table.get((session, name))
            if stored is None or end >= stored[1]:
                table[(session, name)] = (value, end)

    for seed in range(40):
        rng = random.Random(seed)
        memo = TagMemo(lag_ns=LAG, limit=rng.choice((3, 6, 1000)))
        with_memo: dict[tuple[str, str], tuple[str, int]] = {}
        every_row: dict[tuple[str, str], tuple[str, int]] = {}
        now, key = T0, 0
        records: list[SpanUsage] = []
        for _ in range(60):
            now += rng.choice((0, S, 2 * S, LAG))
            for _ in range(rng.randint(1, 4)):
                key += 1
                tags = rng.choice(({"team": "web", "project": "p"}, {"team": "web"},
                                   {"team": "ops", "project": "p"}, {"project": "q"}))
                records.append(span(key, rng.choice("abc"), now - rng.choice((0, S, 3 * S)),
                                    **tags))
            b = batch(*records)
            plan = memo.plan(b, now)
            if rng.random() < 0.1:
                continue  # rolled back: its records are retried with the next flush's
            write(every_row, [(sid, name, value, end)
                              for sid, delta in b.sessions.items()
                              for name, (value, end) in delta.latest_dimensions().items()])
            write(with_memo, plan.rows)
            memo.committed(plan, now)
            records = []
        write(with_memo, memo.owed_rows())
        memo.settled()
        assert with_memo == every_row, f"seed {seed}"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_table_holds_each_latest_value_and_end_time_once_the_store_closes(
        tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    """Through a real store: a repeated value's end time reaches the table at close, a new
    later value at once, and an older record's value never."""
    store, rows = await _backend_store(backend, tmp_path, request, ())
    query = ("SELECT session_id, value, value_ns FROM collector_session_dimensions "
             "WHERE dimension = 'team' ORDER BY session_id")
    try:
        await store.commit(batch(tagged(1, "web", session="a"),
                                    tagged(2, "ops", session="b")), now_ns=T0)
        await store.commit(batch(tagged(3, "web", session="a", t=T0 + 2 * MS),
                                    tagged(4, "dev", session="b", t=T0 + 2 * MS)), now_ns=T0)
        await store.commit(batch(tagged(5, "growth", session="a", t=T0 + MS)), now_ns=T0)
        # b's new value is in the table now; a's later end time is still owed.
        assert rows(query) == [("a", "web", T0 + MS), ("b", "dev", T0 + 3 * MS)]
    finally:
        await store.close()
    assert rows(query) == [("a", "web", T0 + 3 * MS), ("b", "dev", T0 + 3 * MS)]


async def test_two_stores_on_one_file_end_with_the_latest_value(tmp_path: Path) -> None:
    """Each collector remembers only what it wrote: a later value another one wrote in the
    meantime is replaced only by a later record, whatever either remembers."""
    path = tmp_path / "db.sqlite"
    query = "SELECT value, value_ns FROM collector_session_dimensions"
    one, two = await _store(path, ()), await _store(path, ())
    try:
        await one.commit(batch(tagged(1, "web", session="a")), now_ns=T0)
        await two.commit(batch(tagged(2, "ops", session="a", t=T0 + 2 * MS)), now_ns=T0)
        # One's memo says web; its repeat, older than two's ops, must not take the row back.
        await one.commit(batch(tagged(3, "web", session="a", t=T0 + MS)), now_ns=T0 + LAG)
        await one.close()
        assert _rows(path, query) == [("ops", T0 + 3 * MS)]
        await two.commit(batch(tagged(4, "web", session="a", t=T0 + 3 * MS)), now_ns=T0)
    finally:
        await one.close()
        await two.close()
    assert _rows(path, query) == [("web", T0 + 4 * MS)]
