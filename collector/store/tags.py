"""What this collector has committed of each session's tags, so that a flush writes a
(session, dimension) row only when it says something new. Pure: no database.

A row of collector_session_dimensions holds a session's latest value of one dimension and
the end time of the latest record that gave it: a different value replaces it only from a
later record, the rule the model follows. A session's records nearly always repeat their
values, and then a row changes only by its end time. Rewriting every row on every flush for
that was most of what tags cost ingestion (about 2 µs a row, four tags a session).

So each store keeps a TagMemo: per row, the value and end time it committed, when, and the
latest end time it has seen since. A flush writes
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

from collector.accounting.aggregate import Batch
from collector.store.base import dimension_rows

TAG_TIME_LAG_NS = 5_000_000_000
MAX_REMEMBERED = 65_536  # rows; each about 200 bytes

# (session id, dimension)
TagKey = tuple[str, str]
# (value, end time committed with it, latest end time seen for it, when it was committed)
Remembered = tuple[str, int, int, int]


@dataclass(slots=True)
class TagPlan:
    """One flush's dimension rows, and what the memo knows once that flush commits."""

    rows: list[tuple[str, str, str, int]]
    updates: dict[TagKey, Remembered]


class TagMemo:
    """The dimension rows this collector committed (module docstring)."""

    def __init__(self, *, lag_ns: int = TAG_TIME_LAG_NS, limit: int = MAX_REMEMBERED) -> None:
        self._lag_ns = lag_ns
        self._limit = limit
        self._rows: dict[TagKey, Remembered] = {}
        # The rows whose latest end time is not written yet, each with the time it is due;
        # in the order they became owed, which is the order of those times.
        self._owed: dict[TagKey, int] = {}

    def plan(self, batch: Batch, now_ns: int) -> TagPlan:
        """The rows a flush of `batch` at `now_ns` writes (session id, dimension, value,
        end time), for the statements of the table's latest-value rule."""
        rows: list[tuple[str, str, str, int]] = []
        updates: dict[TagKey, Remembered] = {}
        remembered = self._rows
        lag = self._lag_ns
        for session_id, name, value, end in dimension_rows(batch):
            key = (session_id, name)
            known = remembered.get(key)
            if known is not None:
                old, written, seen, at = known
                if end <= seen and (value == old or end < seen):
                    continue  # nothing later than what is written or owed
                if value == old and now_ns - at < lag:
                    updates[key] = (old, written, end, at)
                    continue
            rows.append((session_id, name, value, end))
            updates[key] = (value, end, end, now_ns)
        for key, due in self._owed.items():
            if due > now_ns:
                break
            value, written, seen, _ = updates.get(key) or remembered[key]
            if seen > written:
                rows.append((key[0], key[1], value, seen))
                updates[key] = (value, seen, seen, now_ns)
        return TagPlan(rows, updates)

    def committed(self, plan: TagPlan, now_ns: int) -> None:
        """The flush that wrote `plan` committed (never called for one rolled back, so its
        rows are planned again with the batch it is retried in)."""
        owed = self._owed
        rows = self._rows
        for key, entry in plan.updates.items():
            if key not in rows and len(rows) >= self._limit:
                # Room: rows with nothing owed are forgotten (written as new when next
                # seen); owed ones stay until written.
                self._rows = rows = {k: e for k, e in rows.items() if k in owed}
                if len(rows) >= self._limit:
                    continue  # a new key owes nothing: written as new next time
            rows[key] = entry
            if entry[2] > entry[1]:
                if key not in owed:
                    owed[key] = now_ns + self._lag_ns
            else:
                owed.pop(key, None)

    def owed_rows(self) -> list[tuple[str, str, str, int]]:
        """Every end time not written yet (for a store that closes)."""
        return [(key[0], key[1], self._rows[key][0], self._rows[key][2]) for key in self._owed]

    def settled(self) -> None:
        """owed_rows() committed."""
        for key in self._owed:
            value, _, seen, at = self._rows[key]
            self._rows[key] = (value, seen, seen, at)
        self._owed.clear()

    def __len__(self) -> int:
        return len(self._rows)
