"""What this collector has committed of each session's tags, so that a flush writes a
(session, dimension) row only when it says something new. Pure: no database.

A row of collector_session_dimensions holds a session's latest value of one dimension and
the end time of the latest record that gave it: a different value replaces it only from a
later record, the rule the model follows. A session's records nearly always repeat their
values, and then a row changes only by its end time. Rewriting every row on every flush for
that was most of what tags cost ingestion (about 2 µs a row, four tags a session).

So each store keeps a TagMemo: per row, the value and end time it committed, when, and the
latest end time it has seen since (for a session whose records carry one whole set of tags,
once for the set: TagMemo's docstring). A flush writes
- a row it knows nothing of, and a new value, at once;
- a repeated value's later end time once TAG_TIME_LAG_NS has passed since that row was last
  written: by the next flush that carries it, else by the first flush after the move has been
  owed that long, else when the store closes;
- nothing for a record that cannot win: an older value's end time, or a different value from
  a record older than the latest one seen for the row.

What that changes: the end times in the table trail by up to TAG_TIME_LAG_NS (twice that for a
row that was just written). The values never trail, and costs never depend on them (a commit
counts towards the values its own batch carries). A record giving a different value with an
end time inside that trail is judged by this collector against what it remembers; only at
another collector on the same database, or here after a crash lost what was owed, could it
be taken as later than it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from collector.accounting.aggregate import Batch
from collector.store.base import session_dimensions

TAG_TIME_LAG_NS = 5_000_000_000
MAX_REMEMBERED = 65_536  # entries (a row, or a session's whole set); each about 200 bytes

# (session id, dimension)
TagKey = tuple[str, str]
# (value, end time committed with it, latest end time seen for it, when it was committed)
Remembered = tuple[str, int, int, int]
# A session whose rows all came as one set of tags, together: the set, and the same times
# (a list: the latest end time seen moves in place, TagMemo.plan).
SetRemembered = list[Any]


@dataclass(slots=True)
class TagPlan:
    """One flush's dimension rows, and what the memo knows once that flush commits: per
    row, and per session remembered as one set (None: the set is kept per row from now on,
    its rows among `updates`)."""

    rows: list[tuple[str, str, str, int]]
    updates: dict[TagKey, Remembered]
    sets: dict[str, SetRemembered | None]


class TagMemo:
    """The dimension rows this collector committed (module docstring).

    A session's records nearly always carry one whole set of tags, the same at every flush:
    such a session is remembered as that set, with one value and end time for all its rows,
    so that a flush costs one comparison of the set per session, not a lookup per row. A
    session that ever gives its tags otherwise (in parts, or a different set) is remembered
    per row from then on; the rows its set had owed wait one more lag at most.

    What a flush's plan writes is remembered once it commits (`committed`), except the
    usual case, a set seen again later but within the lag: its latest end time moves, and
    is owed, when planned. A flush rolled back is retried with the next one's records, so
    that end time is committed by the retry, or its owed row after it."""

    def __init__(self, *, lag_ns: int = TAG_TIME_LAG_NS, limit: int = MAX_REMEMBERED) -> None:
        self._lag_ns = lag_ns
        self._limit = limit
        self._rows: dict[TagKey, Remembered] = {}
        self._sets: dict[str, SetRemembered] = {}
        # The sessions remembered per row.
        self._split: set[str] = set()
        # The rows (or sessions' sets) whose latest end time is not written yet, each with the
        # time it is due; in the order they became owed, which is the order of those times.
        self._owed: dict[TagKey | str, int] = {}

    def plan(self, batch: Batch, now_ns: int) -> TagPlan:
        """The rows a flush of `batch` at `now_ns` writes (session id, dimension, value,
        end time), for the statements of the table's latest-value rule."""
        rows: list[tuple[str, str, str, int]] = []
        updates: dict[TagKey, Remembered] = {}
        sets: dict[str, SetRemembered | None] = {}
        remembered, whole, split, owed = self._rows, self._sets, self._split, self._owed
        lag = self._lag_ns
        for d in batch.sessions.values():
            session_id = d.session_id
            tags = d.tags
            known_set = whole.get(session_id)  # never one for a session in `split`
            if not d.dimensions and session_id not in split:
                if not tags:
                    continue
                end = d.tags_ns
                if known_set is None:  # a session new here (or forgotten): written as one
                    rows.extend((session_id, name, value, end) for name, value in tags)
                    sets[session_id] = [tags, end, end, now_ns]
                    continue
                old_tags, written, seen, at = known_set
                if old_tags is tags or old_tags == tags:
                    if end <= seen:
                        continue  # nothing later than what is written or owed
                    if now_ns - at < lag:
                        known_set[2] = end  # in place, and owed now (class docstring)
                        self._owe(session_id, True, now_ns)
                    else:
                        rows.extend((session_id, name, value, end) for name, value in tags)
                        sets[session_id] = [tags, end, end, now_ns]
                    continue
            if known_set is not None:  # another set: this session is kept per row from now
                old_tags, written, seen, at = known_set
                for name, value in old_tags:
                    updates[(session_id, name)] = (value, written, seen, at)
                sets[session_id] = None
            for name, value, end in session_dimensions(d):
                key = (session_id, name)
                known = updates.get(key) or remembered.get(key)
                if known is not None:
                    old, written, seen, at = known
                    if end <= seen and (value == old or end < seen):
                        continue  # nothing later than what is written or owed
                    if value == old and now_ns - at < lag:
                        updates[key] = (old, written, end, at)
                        continue
                rows.append((session_id, name, value, end))
                updates[key] = (value, end, end, now_ns)
        for owing, due in owed.items():
            if due > now_ns:
                break
            if isinstance(owing, str):
                planned = sets.get(owing, whole.get(owing))
                if planned is not None:
                    tags, written, seen, _ = planned
                    if seen > written:
                        rows.extend((owing, name, value, seen) for name, value in tags)
                        sets[owing] = [tags, seen, seen, now_ns]
                    continue
                # Its set was broken into rows by this flush: those are owed instead.
                keys: list[TagKey] = [(owing, name) for name, _ in whole[owing][0]]
            else:
                keys = [owing]
            for key in keys:
                value, written, seen, _ = updates.get(key) or remembered[key]
                if seen > written:
                    rows.append((key[0], key[1], value, seen))
                    updates[key] = (value, seen, seen, now_ns)
        return TagPlan(rows, updates, sets)

    def committed(self, plan: TagPlan, now_ns: int) -> None:
        """The flush that wrote `plan` committed (never called for one rolled back, so its
        rows are planned again with the batch it is retried in)."""
        for session_id, entry in plan.sets.items():
            if entry is None:
                self._sets.pop(session_id, None)
                self._owed.pop(session_id, None)  # owed per row now, through plan.updates
                self._split.add(session_id)
            elif self._room_for(session_id in self._sets):
                self._sets[session_id] = entry
                self._owe(session_id, entry[2] > entry[1], now_ns)
        for key, row in plan.updates.items():
            if self._room_for(key in self._rows):
                self._rows[key] = row
                self._split.add(key[0])
                self._owe(key, row[2] > row[1], now_ns)

    def _room_for(self, known: bool) -> bool:
        """Whether an entry can be kept: a known one always; a new one when the memo is not
        full, else once what owes nothing is forgotten (written as new when next seen);
        owed entries stay until written."""
        if known or len(self._rows) + len(self._sets) < self._limit:
            return True
        owed = self._owed
        self._rows = {k: e for k, e in self._rows.items() if k in owed}
        self._sets = {k: e for k, e in self._sets.items() if k in owed}
        self._split = {session_id for session_id, _ in self._rows}
        return len(self._rows) + len(self._sets) < self._limit

    def _owe(self, key: TagKey | str, owes: bool, now_ns: int) -> None:
        if owes:
            if key not in self._owed:
                self._owed[key] = now_ns + self._lag_ns
        else:
            self._owed.pop(key, None)

    def owed_rows(self) -> list[tuple[str, str, str, int]]:
        """Every end time not written yet (for a store that closes)."""
        rows: list[tuple[str, str, str, int]] = []
        for key in self._owed:
            if isinstance(key, str):
                tags, _, seen, _ = self._sets[key]
                rows.extend((key, name, value, seen) for name, value in tags)
            else:
                rows.append((key[0], key[1], self._rows[key][0], self._rows[key][2]))
        return rows

    def settled(self) -> None:
        """owed_rows() committed."""
        for key in self._owed:
            if isinstance(key, str):
                tags, _, seen, at = self._sets[key]
                self._sets[key] = [tags, seen, seen, at]
            else:
                value, _, seen, at = self._rows[key]
                self._rows[key] = (value, seen, seen, at)
        self._owed.clear()

    def __len__(self) -> int:
        """Rows remembered, a session's set counting each of its rows."""
        return len(self._rows) + sum(len(entry[0]) for entry in self._sets.values())
