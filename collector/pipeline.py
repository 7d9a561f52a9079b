"""The one export handler every signal of both receivers calls, and the group-commit loop
behind it.

Contract: `export(signal, request, wire)` refuses, maps and accounts a request of any signal
the same way: the same refusals and limits, then the signal's own mapping (traces, logs or
metrics), then the same batch. It returns only after every usage record of the request is
committed (or known to be accounted already); it raises ExportError when the request must be
answered with a refusal. A request that carries no usage, and no trace link that held usage
may need (collector.accounting.traces), is answered at once.
A request whose batch fails to commit is refused as retryable, but its spans stay pending and
are committed by a later flush: the exporter's retry then finds them accounted, so nothing is
lost and nothing is counted twice.

Group commit: a batch is committed as soon as the writer is free, so an idle collector answers
after one commit, and the requests that arrive while a commit runs form the next batch (batches
grow with load by themselves). `flush_interval_s`, when not 0, is a fixed gathering time: a
batch waits that long after its first request before its commit starts. With 0 (the default)
there is no fixed wait, only the adaptive one: when the writer becomes free with fewer requests
waiting than were waiting around the last commit, the batch waits for that many, at most one
commit's duration (ADAPTIVE_GATHER_COMMITS, MAX_ADAPTIVE_GATHER_S). Without it, closed-loop
exporters split into two groups that alternate on the writer, each commit paying for nearly
every session at half the batch; with it they stay one group. One request in flight never
waits. A full batch (EARLY_FLUSH_SPANS or EARLY_FLUSH_SESSIONS) and shutdown never wait.
Nothing wakes the loop while idle but new data, shutdown and the stale sweep's own timer.

Lifecycle: `start` returns at once; `begin_shutdown` refuses new exports; `shutdown` commits
everything accepted and is safe to call even if `start` never ran.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from collector.accounting.aggregate import Batch, credit
from collector.receivers.errors import ExportError, Refusal
from collector.signals import Signal, count_items
from collector.signals.logs import map_logs_request
from collector.signals.metrics import map_metrics_request
from collector.signals.scan import UnreadableRequest
from collector.signals.traces import MappingOptions, MappingResult, map_request
from collector.store.base import CommitResult, StorageError, Store

log = logging.getLogger(__name__)

# Backoff between failed flushes: doubles from MIN_RETRY_DELAY_S up to MAX_RETRY_DELAY_S, so
# a locked or full disk is retried promptly at first, then without spinning.
MIN_RETRY_DELAY_S = 0.1
MAX_RETRY_DELAY_S = 5.0
# While storage keeps failing, one summary line per this period instead of one per failure.
FAILURE_LOG_PERIOD_S = 30.0
# How long shutdown keeps retrying a failing store before giving up on what is pending.
SHUTDOWN_FLUSH_DEADLINE_S = 10.0
# The stale sweep runs every stale_after/10, within these bounds.
MIN_SWEEP_INTERVAL_S = 1.0
MAX_SWEEP_INTERVAL_S = 60.0
# A batch touching this many sessions is committed without waiting out flush_interval_s: the
# commit costs the same per session either way, and memory stays bounded by this, not by how
# many sessions one interval happens to touch (about 1 KB each while pending).
EARLY_FLUSH_SESSIONS = 8192
# And a batch holding this many spans: exporters wait for their answer before sending more, so
# holding a full batch back only leaves the event loop idle while every request in flight
# waits for it. Big enough that a commit's fixed costs (a transaction, an fsync) stay small
# per span.
EARLY_FLUSH_SPANS = 16384
# The adaptive wait (flush_interval_s = 0): a batch holding fewer requests than were waiting
# around the last commit waits for the rest at most this many times the last commit's
# duration, counted from when the writer became free. One commit's duration: a request's
# answer then takes at most about twice as long as without the wait, and the wait pays for
# itself whenever the requests it gathers would otherwise need a commit of their own (a commit
# costs per session touched, and requests of one fleet touch mostly the same sessions).
ADAPTIVE_GATHER_COMMITS = 1.0
# And never longer than this, whatever one slow commit (a WAL checkpoint, a stalled disk) took:
# the flush period the collector had before group commit, so no answer waits longer to gather
# than it did then.
MAX_ADAPTIVE_GATHER_S = 0.2
# While usage is held waiting for its session, a flush runs at least this often (resolve
# window / 10, within these bounds) to resolve what waited a whole window, even when idle.
MIN_RESOLVE_CHECK_S = 0.5
MAX_RESOLVE_CHECK_S = 30.0
# Distinct invalid attribute values remembered so each is logged once.
MAX_LOGGED_INVALID_VALUES = 1000


# The signal label of an answer whose HTTP path named no signal (404).
NO_SIGNAL = "unknown"


@dataclass(slots=True)
class ItemCounts:
    """One signal's items (spans, log records or data points) as its mapping saw them."""

    received: int = 0  # in requests that reached the mapping
    rejected: int = 0  # invalid; the rest of their request was accepted
    ignored: int = 0  # not usage
    unpriced: int = 0  # usage with tokens but no known price
    # items in requests refused as a whole (not counted as received), by refusal reason
    refused: dict[str, int] = field(default_factory=dict)


def _per_signal() -> dict[Signal, ItemCounts]:
    return {signal: ItemCounts() for signal in Signal}


@dataclass(slots=True)
class Stats:
    """Counters since start; read by logs and, at scrape time, by the metrics (collector.web.ops).

    Plain ints and dicts bumped on the hot path: exposing them costs nothing until a scrape.
    """

    requests: int = 0
    items: dict[Signal, ItemCounts] = field(default_factory=_per_signal)
    # usage records committed, and ignored as accounted already (whatever their signal)
    spans_accepted: int = 0
    spans_duplicate: int = 0
    invalid_values: int = 0
    flushes: int = 0
    flush_failures: int = 0
    sessions_swept: int = 0
    # usage without a session id: held (until its trace names one), then resolved by a span
    # naming the session or at the end of the resolve window; held_now is the database's
    held: int = 0
    held_resolved: int = 0
    held_resolved_by_window: int = 0
    held_now: int = 0
    # answers given, by (transport, signal, outcome); outcome is "ok", "partial" or a refusal
    # reason, signal is NO_SIGNAL when the path named none
    answers: dict[tuple[str, str, str], int] = field(default_factory=dict)

    @property
    def spans(self) -> ItemCounts:
        return self.items[Signal.TRACES]

    def count_answer(self, transport: str, signal: Signal | None, outcome: str) -> None:
        key = (transport, NO_SIGNAL if signal is None else signal.value, outcome)
        self.answers[key] = self.answers.get(key, 0) + 1

    def refused_requests(self) -> dict[str, int]:
        """Requests answered with a refusal, by reason, over both transports and all signals."""
        refused: dict[str, int] = {}
        for (_, _, outcome), count in self.answers.items():
            if outcome not in ("ok", "partial"):
                refused[outcome] = refused.get(outcome, 0) + count
        return refused


@dataclass(frozen=True, slots=True)
class ExportOutcome:
    rejected: int
    message: str


def map_signal(signal: Signal, request: Any, options: MappingOptions, now_ns: int,
               wire: bytes | None = None) -> MappingResult:
    """The signal's own mapping: the one place that knows which module reads which signal.
    Pure, so the fuzzers' oracle calls it too."""
    if signal is Signal.TRACES:
        return map_request(request, options, now_ns, wire)
    if signal is Signal.LOGS:
        return map_logs_request(request, options, now_ns)
    return map_metrics_request(request, options, now_ns)


class Pipeline:
    def __init__(
        self,
        store: Store,
        options: MappingOptions,
        *,
        flush_interval_s: float,
        max_pending_spans: int,
        stale_after_s: float,
        max_items_per_request: int = 10_000,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
        on_flush: Callable[[float, int], None] | None = None,
        resolve_window_s: float = 600.0,
    ) -> None:
        """`max_items_per_request` bounds the spans, log records or data points of one request
        (config: limits.max_spans_per_request). `on_flush(seconds, rows)` is called after each
        committed flush (for the metrics). `monotonic` times gathering and commits (tests
        make a commit look as long as they need)."""
        self._store = store
        self._options = options
        self._interval = flush_interval_s
        self._max_pending = max_pending_spans
        self._max_items_per_request = max_items_per_request
        self._stale_after_ns = int(stale_after_s * 1e9)
        self._sweep_every_ns = int(
            min(max(stale_after_s / 10, MIN_SWEEP_INTERVAL_S), MAX_SWEEP_INTERVAL_S) * 1e9)
        self._next_sweep_ns = 0
        self._resolve_every_ns = int(
            min(max(resolve_window_s / 10, MIN_RESOLVE_CHECK_S), MAX_RESOLVE_CHECK_S) * 1e9)
        self._next_resolve_ns = 0
        self._clock = clock
        self._monotonic = monotonic
        self._on_flush = on_flush
        self.stats = Stats(held_now=getattr(store, "held_now", 0))
        self._pending = Batch()
        self._ticket: asyncio.Future[CommitResult] | None = None
        self._in_flush = 0
        self._closing = False
        # Set when the loop may have something to do: a batch begun or full, shutdown.
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()  # shutdown began: cuts a failure backoff short
        self._gathering_since = 0.0  # monotonic time the pending batch got its first span
        # The adaptive wait's inputs: requests waiting for the pending batch's commit; requests
        # that were waiting around the last commit (in it, or arriving during it); when the
        # writer last became free, and how long that commit took.
        self._waiting = 0
        self._concurrency = 0
        self._writer_free_at = 0.0
        self._last_commit_s = 0.0
        self.wakeups = 0  # times the flush loop woke up (tests: no wake-ups while idle)
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None
        self._last_failure = ""
        self._failures_unlogged = 0
        self._last_failure_log = 0.0
        self._logged_invalid: set[tuple[str, str]] = set()
        self.lost_on_shutdown = 0
        self.fatal = False
        self._on_fatal: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, on_fatal: Callable[[], None] | None = None) -> None:
        """Start the flush loop. `on_fatal` is called if the loop ever dies of a bug, so the
        daemon exits (and its supervisor restarts it) instead of hanging with requests
        waiting forever."""
        self._task = asyncio.create_task(self._run(), name="flush-loop")
        self._on_fatal = on_fatal
        self._task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.critical("flush loop died; stopping the collector", exc_info=task.exception())
        self.fatal = True
        self._closing = True
        ticket = self._ticket
        if ticket is not None and not ticket.done():
            ticket.set_exception(ExportError(Refusal.STORAGE_UNAVAILABLE,
                                             "collector failed; retry later"))
            ticket.exception()
        if self._on_fatal is not None:
            self._on_fatal()

    def begin_shutdown(self) -> None:
        """Refuse new exports (retryably); in-flight ones still get their commit."""
        self._closing = True
        self._wake.set()
        self._closed.set()

    async def shutdown(self) -> None:
        self.begin_shutdown()
        if self._task is not None:
            task, self._task = self._task, None
            if not self.fatal:
                await task

    @property
    def pending_spans(self) -> int:
        return len(self._pending) + self._in_flush

    @property
    def pending_sessions(self) -> int:
        return len(self._pending.sessions)

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def storage_problem(self) -> str | None:
        """Why the last flush failed, while storage keeps failing; None once a flush commits."""
        if self._failing_since is None:
            return None
        return (f"storage failing for {time.monotonic() - self._failing_since:.0f} s: "
                f"{self._last_failure}")

    # -- the export handler ----------------------------------------------------------------

    async def export(self, signal: Signal, request: Any, wire: bytes | None = None,
                     credential: str | None = None) -> ExportOutcome:
        """`wire`: the protobuf bytes `request` was decoded from, when there are any;
        `credential`: the name of the token the receiver authenticated the request by (None
        without tokens), stored as its sessions' credential label."""
        stats = self.stats
        stats.requests += 1
        counts = stats.items[signal]
        items = count_items(signal, request)
        if self._closing:
            raise self._refuse(Refusal.SHUTTING_DOWN, "collector is shutting down; retry later",
                               counts, items)
        if self.pending_spans >= self._max_pending:
            raise self._refuse(Refusal.OVERLOADED,
                               f"{self.pending_spans} usage records waiting for storage; "
                               f"retry later", counts, items)
        if items > self._max_items_per_request:
            raise self._refuse(Refusal.TOO_LARGE,
                               f"request carries {items} {signal.items}; the limit is "
                               f"{self._max_items_per_request} (send smaller batches)",
                               counts, items)
        try:
            result = map_signal(signal, request, self._options, self._clock(), wire)
        except UnreadableRequest as exc:
            log.error("%s (please report this request)", exc)
            raise self._refuse(Refusal.INVALID, str(exc), counts, items) from None
        del request, wire  # both are large; do not hold them while waiting for the commit
        if credential is not None and (result.held or result.cumulative):
            credit(result, credential)
        counts.received += result.spans
        counts.rejected += result.rejected
        counts.ignored += result.ignored
        counts.unpriced += result.unpriced
        if result.invalid_values:
            self._log_invalid_values(result.invalid_values)
        outcome = ExportOutcome(rejected=result.rejected, message=result.error_message)
        if result.records or result.cumulative or result.held or result.links or result.roots:
            pending = self._pending
            if not pending:
                self._gathering_since = self._monotonic()
                self._wake.set()
            pending.add(result.records, credential)
            pending.cumulative.extend(result.cumulative)
            if result.held or result.links or result.roots:
                pending.hold(result.held, result.links, result.roots)
            self._waiting += 1
            if self._interval:
                if self._full(pending):
                    self._wake.set()
            elif self._waiting == self._concurrency:
                self._wake.set()  # the group is complete: end an adaptive wait
            ticket = self._current_ticket()
            log.debug("request with %d usage records waiting for commit",
                      len(result.records) + len(result.cumulative) + len(result.held))
            del result
            try:
                await asyncio.shield(ticket)
            except ExportError as exc:
                raise self._refuse(exc.refusal, exc.message) from None
        return outcome

    @staticmethod
    def _refuse(refusal: Refusal, message: str, counts: ItemCounts | None = None,
                items: int = 0) -> ExportError:
        if counts is not None and items:
            reason = refusal.answer.reason
            counts.refused[reason] = counts.refused.get(reason, 0) + items
        return ExportError(refusal, message)

    def _current_ticket(self) -> asyncio.Future[CommitResult]:
        if self._ticket is None:
            self._ticket = asyncio.get_running_loop().create_future()
        return self._ticket

    def _log_invalid_values(self, values: list[tuple[str, str]]) -> None:
        self.stats.invalid_values += len(values)
        for item in values:
            if item in self._logged_invalid:
                continue
            if len(self._logged_invalid) >= MAX_LOGGED_INVALID_VALUES:
                break
            self._logged_invalid.add(item)
            log.warning("attribute %s has value %r outside its allowed set; stored as the column "
                        "default (logged once per value)", item[0], item[1])

    # -- group commit ----------------------------------------------------------------------

    async def _run(self) -> None:
        delay = 0.0
        shutdown_deadline: float | None = None
        while True:
            await self._until_due()
            if self._closing and shutdown_deadline is None:
                shutdown_deadline = time.monotonic() + SHUTDOWN_FLUSH_DEADLINE_S
            if await self._flush_once():
                delay = 0.0
                if self._closing and not self._pending:
                    return
                continue
            delay = min(max(delay * 2, MIN_RETRY_DELAY_S), MAX_RETRY_DELAY_S)
            if shutdown_deadline is not None and time.monotonic() >= shutdown_deadline:
                self._abandon_pending()
                return
            # Back off whatever arrives meanwhile (it joins the kept batch); shutdown cuts the
            # wait short once, for a prompt last attempt, then backs off the same way.
            if self._closing:
                await asyncio.sleep(delay)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)

    async def _until_due(self) -> None:
        """Return when a commit is due: a batch is pending and done gathering, the stale sweep
        is due, or shutdown began. Sleeps without a timeout's wake-ups while idle, except at
        the sweep's time."""
        while not self._closing:
            wait = self.next_commit_in(self._monotonic(), self._clock())
            if wait <= 0:
                return
            # No await between the check above and this clear: nothing can slip in between.
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self.wakeups += 1

    def next_commit_in(self, now_s: float, now_ns: int) -> float:
        """Seconds until the next commit is due at monotonic `now_s`, wall clock `now_ns`, once
        the writer is free: 0 for a pending batch done gathering, else the earlier of its
        gathering's end and the stale sweep (or, while usage is held, the next look for held
        usage whose window ended)."""
        sweep_in = (self._next_sweep_ns - now_ns) / 1e9
        if self._store.held_now:
            sweep_in = min(sweep_in, (self._next_resolve_ns - now_ns) / 1e9)
        pending = self._pending
        if not pending:
            return max(sweep_in, 0.0)
        if self._full(pending):
            return 0.0
        if self._interval:
            return max(min(self._gathering_since + self._interval - now_s, sweep_in), 0.0)
        if self._waiting >= self._concurrency:
            return 0.0
        gather = min(self._last_commit_s * ADAPTIVE_GATHER_COMMITS, MAX_ADAPTIVE_GATHER_S)
        since = max(self._gathering_since, self._writer_free_at)
        return max(min(since + gather - now_s, sweep_in), 0.0)

    @staticmethod
    def _full(batch: Batch) -> bool:
        return len(batch) >= EARLY_FLUSH_SPANS or len(batch.sessions) >= EARLY_FLUSH_SESSIONS

    async def _flush_once(self) -> bool:
        now = self._clock()
        sweep_before = None
        if now >= self._next_sweep_ns:
            sweep_before = now - self._stale_after_ns
        if not self._pending and sweep_before is None and not (
                self._store.held_now and now >= self._next_resolve_ns):
            return True
        batch, ticket = self._pending, self._ticket
        self._pending, self._ticket = Batch(), None
        committing, self._waiting = self._waiting, 0
        self._in_flush = len(batch)
        started = self._monotonic()
        try:
            result, applied = await self._store.commit(batch, now_ns=now,
                                                       sweep_before_ns=sweep_before)
        except StorageError as exc:
            # Keep the data: it goes in front of whatever arrived meanwhile, and its requests
            # are told to retry (their retries will find it accounted).
            batch.absorb(self._pending)
            self._pending = batch
            self._gathering_since = 0.0  # it has gathered already: due once the backoff ends
            self._concurrency = 0  # its requests were answered: wait for none of them
            self._note_failure(exc, len(batch))
            if ticket is not None:
                ticket.set_exception(ExportError(
                    Refusal.STORAGE_UNAVAILABLE, f"storage unavailable: {exc}; retry later"))
                ticket.exception()  # retrieved: waiters that left early do not warn
            return False
        except BaseException:
            # Not a storage failure: a bug or a cancellation. Keep the data as above, answer
            # this batch's waiters retryably now; later waiters keep the newer ticket, which
            # whoever handles the loop's end fails in turn.
            batch.absorb(self._pending)
            self._pending = batch
            if ticket is not None:
                ticket.set_exception(ExportError(
                    Refusal.STORAGE_UNAVAILABLE, "collector failed to commit; retry later"))
                ticket.exception()
            raise
        finally:
            self._in_flush = 0
        if sweep_before is not None:
            self._next_sweep_ns = now + self._sweep_every_ns
        self._next_resolve_ns = now + self._resolve_every_ns
        self._writer_free_at = self._monotonic()
        self._last_commit_s = self._writer_free_at - started
        # Requests in this commit come back soon when their exporters run a closed loop;
        # those that arrived during it are waiting already.
        self._concurrency = committing + self._waiting
        self._note_success(result, applied, self._last_commit_s)
        if ticket is not None:
            ticket.set_result(result)
        return True

    def _note_success(self, result: CommitResult, applied: Batch, seconds: float) -> None:
        stats = self.stats
        stats.flushes += 1
        stats.spans_accepted += result.spans
        stats.spans_duplicate += result.duplicates
        stats.sessions_swept += result.swept
        stats.held += result.held
        stats.held_resolved += result.resolved
        stats.held_resolved_by_window += result.resolved_by_window
        stats.held_now = self._store.held_now
        if result.resolved_by_window:
            log.info("%d usage records waited the resolve window without their trace naming "
                     "a session; accounted to their trace's session", result.resolved_by_window)
        if self._failing_since is not None:
            log.warning("storage recovered after %.1f s; %d failed flushes",
                        time.monotonic() - self._failing_since, stats.flush_failures)
            self._failing_since = None
        if result.swept:
            log.info("%d sessions silent for %d s marked unknown", result.swept,
                     self._stale_after_ns // 1_000_000_000)
        log.debug("flushed %d spans into %d sessions (%d duplicates) in %.1f ms",
                  result.spans, result.sessions, result.duplicates, seconds * 1000)
        if self._on_flush is not None:
            self._on_flush(seconds, result.sessions)

    def _note_failure(self, exc: StorageError, pending: int) -> None:
        self.stats.flush_failures += 1
        self._last_failure = str(exc)
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            self._last_failure_log = now
            self._failures_unlogged = 0
            log.error("flush failed, %d spans kept for retry: %s", pending, exc)
            return
        self._failures_unlogged += 1
        if now - self._last_failure_log >= FAILURE_LOG_PERIOD_S:
            log.error("storage still failing after %.0f s (%d more failed flushes), %d spans "
                      "pending: %s", now - self._failing_since, self._failures_unlogged,
                      pending, exc)
            self._last_failure_log = now
            self._failures_unlogged = 0

    def _abandon_pending(self) -> None:
        """Shutdown could not commit: the spans' requests were refused retryably already."""
        self.lost_on_shutdown = len(self._pending)
        log.error("shutting down with %d spans not committed; their exporters were told to "
                  "retry", self.lost_on_shutdown)
        if self._ticket is not None:
            self._ticket.set_exception(ExportError(
                Refusal.STORAGE_UNAVAILABLE, "storage unavailable at shutdown; retry later"))
            self._ticket.exception()
        self._pending, self._ticket = Batch(), None
