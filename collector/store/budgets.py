"""Budgets in the store, the same on every backend: what a flush adds to each budget period,
the crossings it records, the alerts it queues, and the outbox the delivery task drains.

The planning is pure (collector.budgets). The statements here are written once, in the SQL
SQLite and PostgreSQL share, with `?` placeholders (the PostgreSQL store translates them, as
it does for the fleet view's queries). What differs per backend sits behind two small
protocols: how a statement runs (in the flush transaction, or on the delivery task's own
connection), and `scope_values`, the one lookup of a session's dimension values. Where a
dimension's value lives is said once, in `dimension_sql`, which both that lookup and the
alerts' top lists use; a new kind of dimension changes that function and nothing else.

Exactly once: a crossing is a row of collector_budget_alerts inserted with ON CONFLICT DO
NOTHING. The spend upsert that precedes it locks the period's spend row until commit, so of
two collectors crossing one threshold at once the second waits, reads the first's sum, and
finds the crossing already there; only the one that inserted it queues the alert.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from collector.accounting.aggregate import HOUR_NS, Batch
from collector.budgets import Period, outbox_rows, period_of, reached, top_n
from collector.budgets.spend import LABEL_FIELDS, SpendPlanner, Sums, encode, journal_total
from collector.config.attribution import NAME_PATTERN
from collector.config.budgets import AlertSink, Budget
from collector.store.base import (
    ALERTS_PENDING_SQL,
    ALERTS_TABLE,
    DIMENSIONS_TABLE,
    HOURLY_TABLE,
    JOURNAL_TABLE,
    LABEL_COLUMNS,
    LABELS_TABLE,
    OUTBOX_TABLE,
    SPEND_TABLE,
    StorageError,
    iso_utc,
)

log = logging.getLogger(__name__)

# How many sessions, users and models an alert names: enough to act on, short enough to read.
TOP_N = 5
TOP_KINDS = ("sessions", "users", "models")
# Fractions of a cent kept in the top lists: a session of a few tenths of a cent still shows.
CENTS_DIGITS = 4


def dimension_sql(dimension: str, session: str) -> str:
    """An SQL expression for the latest value of `dimension` of the session whose id is the
    expression `session` (NULL when it has none): the single place that knows where a
    dimension's values are stored: a built-in one's column of the labels, or a configured
    one's row of collector_session_dimensions (its name, an identifier by
    collector.config.attribution's rule, is safe as a literal)."""
    column = LABEL_COLUMNS.get(dimension)
    if column is not None:
        return f"(SELECT lbl.{column} FROM {LABELS_TABLE} AS lbl WHERE lbl.id = {session})"
    if not NAME_PATTERN.fullmatch(dimension):
        raise ValueError(f"not a dimension name: {dimension!r}")
    return (f"(SELECT dv.value FROM {DIMENSIONS_TABLE} AS dv WHERE dv.session_id = {session} "
            f"AND dv.dimension = '{dimension}')")


def scope_rows(dimensions: Sequence[str], rows: Iterable[Sequence[Any]]
               ) -> dict[tuple[str, str], str | None]:
    """A backend's scope_values answer from its rows: (session id, one value per dimension)."""
    out: dict[tuple[str, str], str | None] = {}
    for sid, *found in rows:
        for dimension, value in zip(dimensions, found, strict=True):
            out[(dimension, str(sid))] = None if value is None else str(value)
    return out


# A flush may touch thousands of budget instances (a glob over 1,000 teams): their spend is
# added SPEND_CHUNK rows a statement, each returning its row's new total.
SPEND_CHUNK = 256


def spend_chunks(rows: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """`rows` in order, in chunks of SPEND_CHUNK and then of powers of two: a handful of
    statement texts in all, so each backend's statement cache keeps them compiled (a new
    row count per flush was a new statement to prepare every flush)."""
    first = 0
    while first < len(rows):
        size = min(SPEND_CHUNK, 1 << ((len(rows) - first).bit_length() - 1))
        yield rows[first:first + size]
        first += size


@functools.cache
def add_spend_sql(rows: int) -> str:
    """Add to `rows` spend rows at once (in the order given: key order, so that concurrent
    flushes lock them alike); each row's new total comes back with its key."""
    values = ", ".join(["(?, ?, ?, ?)"] * rows)
    return f"""
INSERT INTO {SPEND_TABLE} (budget, scope_value, period_start_ns, spend_cents)
VALUES {values}
ON CONFLICT (budget, scope_value, period_start_ns) DO UPDATE SET
    spend_cents = {SPEND_TABLE}.spend_cents + excluded.spend_cents
RETURNING budget, scope_value, period_start_ns, spend_cents
"""
# A flush's sums, when they need no fold (collector.budgets.spend): one row, whatever the
# number of budgets; a fold takes every row, this collector's and the others'.
ADD_JOURNAL = f"INSERT INTO {JOURNAL_TABLE} (id, created_ns, sums) VALUES (?, ?, ?)"
TAKE_JOURNAL = f"DELETE FROM {JOURNAL_TABLE} RETURNING sums"
ADD_CROSSING = f"""
INSERT INTO {ALERTS_TABLE} (budget, scope_value, period_start_ns, threshold)
VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING threshold
"""
ADD_OUTBOX = f"""
INSERT INTO {OUTBOX_TABLE} (id, sink, payload, created_ns) VALUES (?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""


class BudgetOps(Protocol):
    """A backend's side of recording budgets, in the open flush transaction."""

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """One of this module's statements (`?` placeholders); its rows, if it returns any."""
        ...

    def scope_values(self, dimensions: Sequence[str], session_ids: Sequence[str]
                     ) -> dict[tuple[str, str], str | None]:
        """(dimension, session id) -> the session's value as committed by this flush, for
        every pair asked (None when the session has no value)."""
        ...

    def lock_fold(self) -> None:
        """Wait until no other collector is folding the journal, for the rest of this
        transaction (a single-writer backend has nothing to wait for)."""
        ...


assert LABEL_FIELDS.keys() == LABEL_COLUMNS.keys()


def record_budgets(ops: BudgetOps, applied: Batch, planner: SpendPlanner,
                   sinks: Sequence[AlertSink], now_ns: int) -> int:
    """Inside the usage's transaction, after the rollup is written: the applied batch's cost
    per (dimension, value, hour), journaled, or folded with the journal into the budget
    periods when it may reach a threshold or a fold is due (collector.budgets.spend).
    Returns the crossings added."""
    if not planner.budgets:
        return 0
    sums, missing = planner.sums(applied.hours, applied.sessions)
    if missing:
        asked = sorted({d for d, _ in missing}), sorted({sid for _, sid in missing})
        found = ops.scope_values(*asked)
        values: dict[str, list[tuple[str, str]]] = {}
        for dimension, session_id in missing:
            value = found.get((dimension, session_id))
            if value is not None:
                values.setdefault(session_id, []).append((dimension, value))
        planner.add_read_back(sums, applied.hours, values)
    if not sums:
        return 0
    if not planner.must_fold(sums, now_ns):
        ops.run(ADD_JOURNAL, (os.urandom(16).hex(), now_ns, encode(sums)))
        return 0
    return fold_budgets(ops, planner, sinks, now_ns, sums)


def fold_budgets(ops: BudgetOps, planner: SpendPlanner, sinks: Sequence[AlertSink],
                 now_ns: int, sums: Sums | None = None) -> int:
    """In an open transaction: the whole journal (and `sums`, a flush's own) added to each
    budget period it counts towards, every threshold newly reached recorded with one outbox
    row per sink. One collector folds at a time (ops.lock_fold); spend rows are taken in key
    order, the same in every collector, so concurrent flushes queue on them instead of
    deadlocking. Returns the crossings added."""
    ops.lock_fold()
    total, bad = journal_total((str(t) for (t,) in ops.run(TAKE_JOURNAL, ())), sums)
    if bad:
        log.error("%d budget journal rows were not journal rows and are dropped: their cost "
                  "is in the usage tables but not in any budget's spend", bad)
    deltas = sorted(planner.spread(total).items())
    by_name = {b.name: b for b in planner.budgets}
    # Below it an instance's new total needs no look: no threshold can be reached.
    lowest = {b.name: b.amount_usd * 100 * min(b.thresholds) for b in planner.budgets}
    totals: dict[tuple[str, str, int], float] = {}
    reaching: list[tuple[str, str, int, float]] = []
    for chunk in spend_chunks(deltas):
        params: list[Any] = []
        for key, cents in chunk:
            params += key
            params.append(cents)
        for name, value, start_ns, spend in ops.run(add_spend_sql(len(chunk)), tuple(params)):
            key = (str(name), str(value), int(start_ns))
            totals[key] = float(spend)
            if spend >= lowest[key[0]]:
                reaching.append((*key, float(spend)))
    planner.folded(totals, now_ns)
    added = 0
    for name, value, start_ns, spend in sorted(reaching):
        budget = by_name[name]
        top: dict[str, list[tuple[str, float]]] | None = None
        for threshold in reached(budget, spend):
            if not ops.run(ADD_CROSSING, (name, value, start_ns, threshold)):
                continue  # recorded before, by this collector or another
            added += 1
            if top is None:
                top = top_spenders(ops, budget, value, period_of(budget, start_ns))
            for row in outbox_rows(budget, value, start_ns, threshold, spend, sinks, top=top):
                ops.run(ADD_OUTBOX, (*row, now_ns))
    return added


def _top_sql(budget: Budget, kind: str) -> str:
    name = {"sessions": "h.session_id", "models": "h.model",
            "users": dimension_sql("user", "h.session_id")}[kind]
    scope = ("" if budget.dimension is None
             else f" AND {dimension_sql(budget.dimension, 'h.session_id')} = ?")
    return (f"SELECT who, sum(cost) FROM (SELECT {name} AS who, h.cost_cents AS cost "
            f"FROM {HOURLY_TABLE} AS h WHERE h.hour >= ? AND h.hour < ?{scope}) AS r "
            f"WHERE who IS NOT NULL GROUP BY who HAVING sum(cost) > 0 "
            f"ORDER BY 2 DESC, 1 LIMIT ?")


def period_hours(period: Period) -> tuple[str, str]:
    """[lo, hi) in the rollup's hour text for the hours counted in `period`: those starting
    in it (collector.budgets.spend_deltas files an hour under the period of its start)."""
    def first_hour_from(ns: int) -> str:
        return iso_utc(-(-ns // HOUR_NS) * HOUR_NS)

    return first_hour_from(period.start_ns), first_hour_from(period.end_ns)


def top_spenders(ops: BudgetOps, budget: Budget, value: str, period: Period
                 ) -> dict[str, list[tuple[str, float]]]:
    """The budget instance's largest sessions, users and models of the period, in cents, as
    committed by this flush. Bounded to the period's hours (the rollup's key starts with the
    hour) and to the instance's scope; run only when a threshold is crossed."""
    lo, hi = period_hours(period)
    scope: tuple[Any, ...] = () if budget.dimension is None else (value,)
    return {kind: top_n(((str(n), round(float(c), CENTS_DIGITS))
                         for n, c in ops.run(_top_sql(budget, kind), (lo, hi, *scope, TOP_N))),
                        TOP_N)
            for kind in TOP_KINDS}


# -- the outbox ------------------------------------------------------------------------------

def _claim_sql(skip_locked: bool) -> str:
    # SKIP LOCKED (PostgreSQL): a row another collector is claiming this instant is passed
    # over, not waited for; SQLite runs one writer at a time and needs no such clause.
    lock = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
    return f"""
UPDATE {OUTBOX_TABLE} SET claimed_until_ns = ?
WHERE id = (SELECT id FROM {OUTBOX_TABLE}
            WHERE delivered_ns IS NULL AND next_attempt_ns <= ? AND claimed_until_ns <= ?
            ORDER BY created_ns, id LIMIT 1{lock})
RETURNING id, sink, payload, attempts
"""


SETTLE_DELIVERED = f"""
UPDATE {OUTBOX_TABLE} SET delivered_ns = ?, attempts = ?, claimed_until_ns = 0 WHERE id = ?
"""
SETTLE_FAILED = f"""
UPDATE {OUTBOX_TABLE} SET attempts = ?, next_attempt_ns = ?, claimed_until_ns = 0
WHERE id = ? AND delivered_ns IS NULL
"""


class OutboxConnection(Protocol):
    """A backend connection for the delivery task; each statement commits on its own.
    Database errors surface as StorageError."""

    def run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Claimed:
    id: str
    sink: str
    payload: str
    attempts: int


class Outbox:
    """The outbox as the delivery task sees it: lease the next due row, settle it. One
    connection, opened on first use and again after an error. Methods block: call them off
    the event loop, one at a time."""

    def __init__(self, connect: Callable[[], OutboxConnection], *, skip_locked: bool,
                 description: str) -> None:
        self._connect = connect
        self._claim = _claim_sql(skip_locked)
        self._conn: OutboxConnection | None = None
        self.description = description

    def _run(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        if self._conn is None:
            self._conn = self._connect()
        try:
            return self._conn.run(sql, params)
        except StorageError:
            self.close()  # a broken connection is replaced at the next call
            raise

    def claim(self, now_ns: int, lease_ns: int) -> Claimed | None:
        """The oldest due row no live lease holds, leased to the caller until now + lease:
        atomically, so two collectors never hold one row at once."""
        rows = self._run(self._claim, (now_ns + lease_ns, now_ns, now_ns))
        if not rows:
            return None
        alert_id, sink, payload, attempts = rows[0]
        return Claimed(str(alert_id), str(sink), str(payload), int(attempts))

    def delivered(self, alert_id: str, attempts: int, now_ns: int) -> None:
        self._run(SETTLE_DELIVERED, (now_ns, attempts, alert_id))

    def failed(self, alert_id: str, attempts: int, next_attempt_ns: int) -> None:
        """Back off; a row another claimant delivered meanwhile (our lease lapsed) stays
        delivered."""
        self._run(SETTLE_FAILED, (attempts, next_attempt_ns, alert_id))

    def pending(self) -> int:
        return int(self._run(ALERTS_PENDING_SQL, ())[0][0])

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
