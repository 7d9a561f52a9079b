"""What committed usage adds to each budget instance's period, pure: the flush's part of
collector.store.budgets, kept apart from the alerts and their bodies in collector.budgets.

A flush's cost is first summed per (dimension, value, usage hour): a few rows however many
budgets there are. Spreading those sums over the budget instances (every budget of the
dimension whose glob takes the value, in that hour's period) is the costly step, a spend row
per instance: 20 budgets over 1,000 teams touch about 8,000 rows. So it is not done at every
flush. A flush whose sums cannot reach any threshold writes them as one journal row instead,
in its own transaction (durable with the usage, so nothing is lost); the next flush that may
reach a threshold, or that comes FOLD_INTERVAL_NS after the last fold, folds the whole
journal into the spend rows and records the crossings, in its transaction.

Whether a flush may reach a threshold is told by headroom: after each fold, for every
(dimension, value) it touched, the least distance in cents from a current-period total to
that instance's next threshold, valid for the usage hours all those periods share; per
dimension, the least headroom of its values is its room. Each flush that does not fold counts
its cost per dimension against the room (the cost of any one value is at most that); a flush
folds when a dimension's cost since the last fold may have used up its room, when it meets a
(dimension, value) without headroom, or a usage hour outside it. Checking per dimension keeps
a flush to a few set and sum operations; while some value is close to a threshold, its
dimension folds more often, which is correct, only costlier. With one collector on a
database the totals are exact and every crossing is recorded in the transaction of the usage
that crossed it. With several, another collector's journal is not in this one's headroom: a
crossing they reach together is recorded by the next fold of either (within FOLD_INTERVAL_NS
while usage flows, and at the latest when a store closes), still exactly once, since a
crossing is a primary key.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import translate

from collector.accounting.aggregate import HOUR_NS, HourDelta, HourKey, SessionDelta
from collector.budgets import NS_PER_S, period_of, threshold_cents
from collector.config.budgets import Budget

# (budget name, scope value, period start ns): one budget instance's period.
SpendKey = tuple[str, str, int]
# A flush's cost per dimension ("" for the fleet), usage hour and value ("" for the fleet).
# Nested, not keyed by (value, hour): a flush nearly always has one hour, and the inner dicts'
# text keys are what summing, the fold check and the journal's encoding then work on whole
# (a key tuple per (value, hour) was a third of their cost).
Sums = dict[str, dict[int, dict[str, float]]]
FLEET = ""
# A built-in dimension's field of collector.accounting.aggregate.SessionDelta; every other
# dimension is one of the session's tags.
LABEL_FIELDS = {"agent": "agent", "user": "user", "host": "host", "credential": "credential"}
# The longest the journal waits for a fold while usage flows. A fold at 1,000 teams rewrites
# some 8,000 spend rows (about 45 ms in the daemon): every 5 s that cost as much as all the
# flushes' own budget work at full load; every 30 s, a sixth of that. Only a crossing several
# collectors reach together waits for it (one collector's own is recorded by the flush that
# reaches it), and budgets run over days to months.
FOLD_INTERVAL_NS = 30 * NS_PER_S
# Headroom this close to zero counts as used up: totals are float sums, added in another
# order by the database than here.
HEADROOM_MARGIN_CENTS = 0.01


def encode(sums: Sums) -> str:
    """A journal row's text: per (dimension, hour), its values and their cents as the hex of
    packed doubles. Exact (every bit of each float), and formatting floats as decimal text
    cost more than the rest of a flush's journaling together."""
    return json.dumps([[d, hour, list(per), struct.pack(f"<{len(per)}d", *per.values()).hex()]
                       for d, by_hour in sums.items() for hour, per in by_hour.items()],
                      separators=(",", ":"))


# Per (dimension, hour): its values and their cents.
JournalRow = list[tuple[str, int, list[str], tuple[float, ...]]]


def _parsed(text: str) -> JournalRow:
    """A journal row's text checked whole; ValueError when the text is not one (nothing of
    it is then added anywhere). Also reads the first layout, [dimension, [[value, hour],
    ...], cents], which builds before the nested sums wrote and a crash may have left."""
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError("not a budget journal row: not a list")
    parsed: JournalRow = []
    try:
        for row in rows:
            if len(row) == 3:
                dimension, keys, cents = row
                values = struct.unpack(f"<{len(keys)}d", bytes.fromhex(cents))
                for (value, hour), one in zip(keys, values, strict=True):
                    parsed.append((dimension, hour, [value], (one,)))
                continue
            dimension, hour, names, cents = row
            parsed.append((dimension, hour, names,
                           struct.unpack(f"<{len(names)}d", bytes.fromhex(cents))))
    except (TypeError, struct.error) as exc:
        raise ValueError(f"not a budget journal row: {exc}") from exc
    for dimension, hour, names, _ in parsed:
        if not (dimension.__class__ is str and hour.__class__ is int
                and names.__class__ is list and all(v.__class__ is str for v in names)):
            raise ValueError("not a budget journal row: not [text, hour, [text, ...], cents]")
    return parsed


def _add(into: Sums, parsed: JournalRow) -> None:
    for dimension, hour, names, values in parsed:
        per = into.setdefault(dimension, {}).setdefault(hour, {})
        for value, cents in zip(names, values, strict=True):
            per[value] = per.get(value, 0.0) + cents


def decode(text: str) -> Sums:
    """A journal row's sums; ValueError when the text is not one."""
    sums: Sums = {}
    _add(sums, _parsed(text))
    return sums


def journal_total(texts: Iterable[str], into: Sums | None = None) -> tuple[Sums, int]:
    """The journal rows' sums added into `into` (or new sums), and how many rows were not
    journal rows (skipped, for the caller to report: one unreadable row, written by who knows
    what, must not stop every flush after it)."""
    total: Sums = {} if into is None else into
    bad = 0
    for text in texts:
        try:
            parsed = _parsed(text)
        except ValueError:
            bad += 1
            continue
        _add(total, parsed)
    return total, bad


class SpendPlanner:
    """Sums, their spread over budget instances, and the fold policy, for one store's
    budgets. What a flush would otherwise recompute is remembered between flushes: each
    budget's glob, compiled once, and its answer per value; each budget's period per usage
    hour (a glob over 1,000 teams tried afresh per (budget, value) each flush cost more than
    the rest of the flush's budget work together). Every memo is bounded (cleared when
    full)."""

    MAX_REMEMBERED = 100_000

    def __init__(self, budgets: Iterable[Budget]) -> None:
        self.budgets = tuple(budgets)
        self._matchers = [_matcher(b) for b in self.budgets]
        self._matched: list[dict[str, bool]] = [{} for _ in self.budgets]
        self._starts: list[dict[int, int]] = [{} for _ in self.budgets]
        self._dimensions = sorted({_key(b) for b in self.budgets})
        # The dimensions the budgets name, whose values a flush looks up per session.
        self.dimensions = tuple(d for d in self._dimensions if d != FLEET)
        # Those a session's delta has a field for, and those its tags give.
        self._labels = tuple((d, LABEL_FIELDS[d]) for d in self.dimensions if d in LABEL_FIELDS)
        self._configured = tuple(d for d in self.dimensions if d not in LABEL_FIELDS)
        # What a fold looks up per (dimension, value), worked out once: each dimension's
        # budgets and each budget's thresholds in cents.
        self._dimension_of = {b.name: _key(b) for b in self.budgets}
        self._of_dimension: dict[str, list[int]] = {}
        for index, budget in enumerate(self.budgets):
            self._of_dimension.setdefault(_key(budget), []).append(index)
        self._cents = [tuple(threshold_cents(b, t) for t in b.thresholds) for b in self.budgets]
        # Since the last fold (module docstring): per (dimension, value) the cents to its
        # nearest threshold and the usage hours [lo, hi) that holds for; per dimension the
        # least of those and the cost journaled since; per (dimension, hour) the values seen
        # within their hours.
        self._headroom: dict[tuple[str, str], float] = {}
        self._windows: dict[tuple[str, str], tuple[int, int]] = {}
        self._room: dict[str, float] = {}
        self._spent: dict[str, float] = {}
        self._known: dict[tuple[str, int], set[str]] = {}
        self._last_fold_ns: int | None = None

    def sums(self, hours: Mapping[HourKey, HourDelta], sessions: Mapping[str, SessionDelta]
             ) -> tuple[Sums, list[tuple[str, str]]]:
        """A batch's cost per dimension a budget names, per (value, hour), each session's
        counted under the values its batch carries (its latest record's: its usage was tagged
        with them, so its cost counts there even when a later record, committed before, says
        otherwise); and the (dimension, session id) pairs the batch carries no value for,
        which the caller reads back from the store and adds with add_read_back. One pass over
        the batch's hours, no list of pairs built per session: this runs at every flush, for
        every session in it."""
        # Per usage hour, each dimension's {value: cents} (the dicts the result holds).
        levels: dict[int, dict[str, dict[str, float]]] = {}
        missing: list[tuple[str, str]] = []
        fleet = FLEET in self._of_dimension
        labels, configured = self._labels, self._configured
        last_hour: int | None = None
        level: dict[str, dict[str, float]] = {}
        for (session_id, _, hour), delta in hours.items():
            cost = delta.cost_cents
            if not cost:
                continue
            if hour != last_hour:
                if hour not in levels:
                    levels[hour] = {d: {} for d in self._dimensions}
                level, last_hour = levels[hour], hour
            if fleet:
                per = level[FLEET]
                per[FLEET] = per.get(FLEET, 0.0) + cost
            session = sessions.get(session_id)
            if session is None:
                missing.extend((d, session_id) for d in self.dimensions)
                continue
            for dimension, field in labels:
                value = getattr(session, field)
                if value is None:
                    missing.append((dimension, session_id))
                else:
                    per = level[dimension]
                    per[value] = per.get(value, 0.0) + cost
            if configured:
                found = 0
                tags = session.latest_tags()
                for dimension, value in tags:
                    of = level.get(dimension)
                    if of is not None:
                        of[value] = of.get(value, 0.0) + cost
                        found += 1
                if found < len(configured):
                    named = {d for d, _ in tags}
                    missing.extend((d, session_id) for d in configured if d not in named)
        sums: Sums = {}
        for hour, level in levels.items():
            for dimension, per in level.items():
                if per:
                    sums.setdefault(dimension, {})[hour] = per
        # A session in several (model, hour) keys is missing a value once.
        return sums, list(dict.fromkeys(missing))

    @staticmethod
    def add_read_back(sums: Sums, hours: Mapping[HourKey, HourDelta],
                      values: Mapping[str, Sequence[tuple[str, str]]]) -> None:
        """The values read back from the store (session id -> (dimension, value) pairs) for
        what sums() found missing: each such session's cost added under them too."""
        for (session_id, _, hour), delta in hours.items():
            pairs = values.get(session_id)
            if not pairs or not delta.cost_cents:
                continue
            for dimension, value in pairs:
                per = sums.setdefault(dimension, {}).setdefault(hour, {})
                per[value] = per.get(value, 0.0) + delta.cost_cents

    def spread(self, sums: Sums) -> dict[SpendKey, float]:
        """Sums over the budget instances they count towards, in cents per instance period.
        Costs only the sums' values and hours, never a scan."""
        out: dict[SpendKey, float] = {}
        for index, budget in enumerate(self.budgets):
            by_hour = sums.get(_key(budget))
            if not by_hour:
                continue
            name = budget.name
            matched, starts = self._matched[index], self._starts[index]
            for hour, per in by_hour.items():
                start = starts.get(hour)
                if start is None:
                    start = self._start(index, hour)
                for value, cost in per.items():
                    takes = matched.get(value)
                    if takes is None:
                        takes = self._takes(index, value)
                    if not takes:
                        continue
                    spend_key = (name, value, start)
                    out[spend_key] = out.get(spend_key, 0.0) + cost
        return out

    def must_fold(self, sums: Sums, now_ns: int) -> bool:
        """Whether a flush with these sums folds the journal (module docstring). When it
        need not, its cost is counted against its dimensions' headroom, as the caller
        journals it. Checked per dimension, not per value, so that a flush costs a few set
        and sum operations: each dimension's room is the least headroom of its values, a
        flush folds when the dimension's cost since the last fold may have used it up."""
        if self._last_fold_ns is None or now_ns - self._last_fold_ns >= FOLD_INTERVAL_NS:
            return True
        costs: list[tuple[str, float]] = []
        for dimension, by_hour in sums.items():
            cost = 0.0
            for hour, per in by_hour.items():
                known = self._known.get((dimension, hour))
                if known is None:
                    known = self._known[(dimension, hour)] = set()
                if not per.keys() <= known:
                    for value in per.keys() - known:
                        window = self._windows.get((dimension, value))
                        if window is None or not window[0] <= hour < window[1]:
                            return True
                        known.add(value)
                cost += sum(per.values())
            if self._spent.get(dimension, 0.0) + cost >= \
                    self._room.get(dimension, math.inf) - HEADROOM_MARGIN_CENTS:
                return True
            costs.append((dimension, cost))
        for dimension, cost in costs:
            self._spent[dimension] = self._spent.get(dimension, 0.0) + cost
        return False

    def folded(self, totals: Mapping[SpendKey, float], now_ns: int) -> None:
        """After a fold: `totals`, every instance period it added to, with its new total.
        Each (dimension, value) among them gets its headroom afresh when the total of each of
        its budgets' current periods is known, and is forgotten otherwise; the values it did
        not touch keep theirs (nothing was added to them since)."""
        self._last_fold_ns = now_ns
        if len(self._windows) > self.MAX_REMEMBERED:
            self._windows.clear()
            self._headroom.clear()
        # Per budget: its current period's start, and the usage hours filed under it (those
        # starting in it).
        periods = []
        for budget in self.budgets:
            period = period_of(budget, now_ns)
            periods.append((period.start_ns, -(-period.start_ns // HOUR_NS),
                            -(-period.end_ns // HOUR_NS)))
        dimension_of = self._dimension_of
        touched = {(dimension_of[name], value) for name, value, _ in totals}
        for key in touched:
            learned = self._headroom_of(key, totals, periods)
            if learned is None:
                self._windows.pop(key, None)
                self._headroom.pop(key, None)
            else:
                self._headroom[key], self._windows[key] = learned[0], learned[1:]
        room: dict[str, float] = {}
        for (dimension, _), left in self._headroom.items():
            room[dimension] = min(left, room.get(dimension, math.inf))
        self._room = room
        self._spent = {}
        self._known = {}

    def _headroom_of(self, key: tuple[str, str], totals: Mapping[SpendKey, float],
                     periods: Sequence[tuple[int, int, int]]) -> tuple[float, int, int] | None:
        dimension, value = key
        left, lo, hi, seen = math.inf, 0, 0, False
        for index in self._of_dimension.get(dimension, ()):
            if not self._takes(index, value):
                continue
            start_ns, first, end = periods[index]
            total = totals.get((self.budgets[index].name, value, start_ns))
            if total is None:
                return None  # this period's total is not known here: fold when next seen
            for cents in self._cents[index]:
                if cents > total and cents - total < left:
                    left = cents - total
            lo, hi = (max(lo, first), min(hi, end)) if seen else (first, end)
            seen = True
        return (left, lo, hi) if seen else None

    def _takes(self, index: int, value: str) -> bool:
        matched = self._matched[index]
        ok = matched.get(value)
        if ok is None:
            if len(matched) > self.MAX_REMEMBERED:
                matched.clear()
            ok = matched[value] = self._matchers[index](value)
        return ok

    def _start(self, index: int, hour: int) -> int:
        starts = self._starts[index]
        start = starts.get(hour)
        if start is None:
            if len(starts) > self.MAX_REMEMBERED:
                starts.clear()
            start = starts[hour] = period_of(self.budgets[index], hour * HOUR_NS).start_ns
        return start


def _key(budget: Budget) -> str:
    return FLEET if budget.dimension is None else budget.dimension


def _matcher(budget: Budget) -> Callable[[str], bool]:
    """Whether a value of the budget's dimension (the fleet's "" included) counts towards
    it: one instance per matching value, for a glob (fnmatch) as for a literal. Decided
    without fnmatch's per-call pattern lookup: `*` matches all, a literal is equality, a glob
    its compiled fnmatch pattern (the same translation fnmatchcase uses, so the same
    answers)."""
    if budget.dimension is None or budget.value == "*":
        return lambda value: True
    if not budget.is_glob:
        return budget.value.__eq__
    match = re.compile(translate(budget.value)).match
    return lambda value: match(value) is not None
