"""The pipeline in-process, on a real SQLite store: group commit and its failure modes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)

from collector.accounting.aggregate import Batch
from collector.accounting.pricing import Pricer
from collector.pipeline import MAX_SWEEP_INTERVAL_S, Pipeline
from collector.receivers.errors import ExportError, Refusal
from collector.signals import Signal, count_items
from collector.signals.scan import COMPILED_AVAILABLE
from collector.signals.traces import MappingOptions, MappingResult, map_request
from collector.store.sqlite import SQLiteStore
from tests.conftest import make_span, read_rows


def request(session: str, span_id: int = 1) -> Any:
    return encode_spans([make_span(span_id=span_id, attrs={
        "session.id": session, "gen_ai.usage.input_tokens": 3})])


async def make(tmp_path: Path, **kwargs: Any) -> tuple[SQLiteStore, Pipeline]:
    store = SQLiteStore(tmp_path / "p.db", retention_s=3600)
    await store.open()
    settings: dict[str, Any] = {"flush_interval_s": 0.01, "max_pending_spans": 1000,
                                "stale_after_s": 3600, **kwargs}
    pipeline = Pipeline(store, MappingOptions(pricer=Pricer({}, use_library=False)),
                        **settings)
    return store, pipeline


class Monotonic:
    """A monotonic clock that moves only when told: a pipeline's gathering and commit
    durations as the test wants them, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Commits:
    """Wraps the real store's commit: records each batch (spans, sessions) it is handed, and
    while `hold` is clear keeps a commit of spans from starting until it is set. With a
    `clock`, every commit of spans takes `takes` seconds by that clock."""

    def __init__(self, store: SQLiteStore, clock: Monotonic | None = None,
                 takes: float = 0.0) -> None:
        self.batches: list[tuple[int, frozenset[str]]] = []
        self.started = asyncio.Event()
        self.hold = asyncio.Event()
        self.hold.set()
        self._clock = clock
        self._takes = takes
        self._commit: Callable[..., Awaitable[Any]] = store.commit
        store.commit = self.commit  # type: ignore[method-assign]

    async def commit(self, batch: Batch, **kwargs: Any) -> Any:
        if batch:
            self.batches.append((len(batch), frozenset(batch.sessions)))
            self.started.set()
            await self.hold.wait()
            if self._clock is not None:
                self._clock.now += self._takes
        return await self._commit(batch, **kwargs)


def flush_event(pipeline_kwargs: dict[str, Any]) -> asyncio.Event:
    """An event set after every committed flush (through the pipeline's on_flush hook)."""
    flushed = asyncio.Event()
    pipeline_kwargs["on_flush"] = lambda seconds, rows: flushed.set()
    return flushed


async def test_export_returns_after_commit_and_shutdown_drains(tmp_path: Path) -> None:
    store, pipeline = await make(tmp_path)
    await pipeline.start()
    outcome = await pipeline.export(Signal.TRACES, request("a"))
    assert (outcome.rejected, read_rows(store.path)["a"]["turns"]) == (0, 1)
    await pipeline.shutdown()
    with pytest.raises(ExportError) as info:
        await pipeline.export(Signal.TRACES, request("a", 2))
    assert info.value.refusal is Refusal.SHUTTING_DOWN
    await store.close()


async def test_wire_bytes_the_reader_cannot_follow_are_refused_as_invalid(
        tmp_path: Path) -> None:
    """Should the compiled reader and the protobuf library ever disagree on a request, the
    request is refused (400 / INVALID_ARGUMENT), not answered with a server error."""
    store, pipeline = await make(tmp_path)
    if not COMPILED_AVAILABLE:
        pytest.skip("the compiled reader is not installed")
    await pipeline.start()
    with pytest.raises(ExportError) as info:
        await pipeline.export(Signal.TRACES, request("a"), b"\x0a\xff")  # a length past the end
    assert info.value.refusal is Refusal.INVALID
    assert "cannot read" in info.value.message
    assert pipeline.pending_spans == 0
    assert (await pipeline.export(Signal.TRACES, request("a", 2))).rejected == 0  # still works
    await pipeline.shutdown()
    assert read_rows(store.path)["a"]["turns"] == 1
    await store.close()


async def test_shutdown_is_safe_when_start_never_ran(tmp_path: Path) -> None:
    store, pipeline = await make(tmp_path)
    await pipeline.shutdown()
    await store.close()


async def test_a_dead_flush_loop_fails_waiters_and_stops_the_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, pipeline = await make(tmp_path)
    stopped = asyncio.Event()

    async def broken_commit(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug in the store")

    monkeypatch.setattr(store, "commit", broken_commit)
    await pipeline.start(on_fatal=stopped.set)
    with pytest.raises(ExportError) as info:
        await asyncio.wait_for(pipeline.export(Signal.TRACES, request("b")), 10)
    assert info.value.refusal.answer.retryable
    await asyncio.wait_for(stopped.wait(), 10)
    assert pipeline.fatal
    await pipeline.shutdown()
    await store.close()


@pytest.mark.parametrize("sessions", ["many", "one"])
async def test_a_large_batch_does_not_wait_out_the_interval(
        tmp_path: Path, sessions: str) -> None:
    """A batch touching EARLY_FLUSH_SESSIONS sessions, or holding EARLY_FLUSH_SPANS spans, is
    committed at once rather than after gathering for flush.interval_ms."""
    from collector.pipeline import EARLY_FLUSH_SESSIONS, EARLY_FLUSH_SPANS

    store = SQLiteStore(tmp_path / "p.db", retention_s=3600)
    await store.open()
    pipeline = Pipeline(store, MappingOptions(pricer=Pricer({}, use_library=False)),
                        flush_interval_s=3600, max_pending_spans=100_000,
                        max_items_per_request=100_000, stale_after_s=3600)
    await pipeline.start()
    count = EARLY_FLUSH_SESSIONS if sessions == "many" else EARLY_FLUSH_SPANS
    assert count < EARLY_FLUSH_SPANS or sessions == "one"  # each case tests one trigger
    large = encode_spans([make_span(span_id=i + 1, attrs={
        "session.id": f"s-{i}" if sessions == "many" else "s",
        "gen_ai.usage.input_tokens": 1}) for i in range(count)])
    # With an hour-long gathering only the early flush can answer this request.
    await asyncio.wait_for(pipeline.export(Signal.TRACES, large), 60)
    rows = read_rows(store.path)
    assert len(rows) == (count if sessions == "many" else 1)
    assert sum(row["prompt_tokens"] for row in rows.values()) == count
    await pipeline.shutdown()
    await store.close()


async def test_an_idle_collector_answers_after_one_commit_and_sleeps_until_the_sweep(
        tmp_path: Path) -> None:
    """With flush.interval_ms = 0 a request on an idle collector starts a commit at once: it is
    answered after exactly that one commit, and the loop woke once, for it. While idle the loop
    has no timer but the stale sweep's."""
    now = time.time_ns()
    kwargs: dict[str, Any] = {"flush_interval_s": 0, "clock": lambda: now}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)  # the first sweep, at start
    assert (commits.batches, pipeline.stats.flushes) == ([], 1)
    # Idle: the next wake-up is the sweep's, a whole sweep period away, whatever the time now.
    assert pipeline.next_commit_in(time.monotonic(), now) == MAX_SWEEP_INTERVAL_S
    assert pipeline.next_commit_in(time.monotonic() + 1000, now) == MAX_SWEEP_INTERVAL_S
    wakeups = pipeline.wakeups
    await asyncio.wait_for(pipeline.export(Signal.TRACES, request("idle")), 60)
    assert commits.batches == [(1, frozenset({"idle"}))]
    assert (pipeline.stats.flushes, pipeline.wakeups) == (2, wakeups + 1)
    assert read_rows(store.path)["idle"]["turns"] == 1
    await pipeline.shutdown()
    await store.close()


async def test_requests_arriving_during_a_commit_are_committed_together_next(
        tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"flush_interval_s": 0}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)  # the first sweep, at start
    commits.hold.clear()
    first = asyncio.create_task(pipeline.export(Signal.TRACES, request("a")))
    await asyncio.wait_for(commits.started.wait(), 60)  # a's commit has begun, and is held
    later = [asyncio.create_task(pipeline.export(Signal.TRACES, request(name, span_id)))
             for span_id, name in enumerate(("b", "c", "d"), start=2)]
    for _ in range(100):
        if pipeline.pending_sessions == 3:
            break
        await asyncio.sleep(0)
    assert not first.done() and not any(task.done() for task in later)
    assert pipeline.pending_spans == 4  # a in the commit, b, c and d waiting for the next
    # The writer is busy, so they wait for it. No requests were waiting around the last
    # commit (the start's sweep), so nothing says more are coming: no adaptive wait is due.
    # (Once a's commit ends, four were waiting around it: b, c and d then wait for a to come
    # back, at most one commit's duration, and a does not come back here.)
    assert pipeline.next_commit_in(time.monotonic(), time.time_ns()) == 0
    commits.hold.set()
    await asyncio.wait_for(asyncio.gather(first, *later), 60)
    assert commits.batches == [(1, frozenset({"a"})), (3, frozenset({"b", "c", "d"}))]
    rows = read_rows(store.path)
    assert {name: rows[name]["turns"] for name in "abcd"} == dict.fromkeys("abcd", 1)
    await pipeline.shutdown()
    await store.close()


async def settle(condition: Callable[[], bool]) -> None:
    """Give the event loop turns until `condition` holds (it must, within 1,000 turns)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the pipeline did not get there")


async def test_closed_loop_exporters_stay_one_group_instead_of_alternating_halves(
        tmp_path: Path) -> None:
    """Four exporters, each sending its next request once the last is answered. The first
    commit holds one request and the other three arrive during it: without the adaptive wait
    the three would be committed next, while the first exporter's next request waits for a
    third commit, and the two groups would alternate from then on. With it, the writer, once
    free, waits for the first exporter to come back (by this test's clock the commit took an
    hour and the clock stands still, so nothing but the group's completion can end the wait),
    and every later commit holds all four exporters' requests."""
    clock = Monotonic()
    kwargs: dict[str, Any] = {"flush_interval_s": 0, "monotonic": clock}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store, clock, takes=3600)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)  # the first sweep, at start
    rounds = 4

    async def exporter(name: str) -> None:
        for i in range(rounds):  # span ids unique across exporters: 1-4, 11-14, ...
            await pipeline.export(Signal.TRACES, request(name, 10 * "abcd".index(name) + i + 1))

    commits.hold.clear()
    first = asyncio.create_task(exporter("a"))
    await asyncio.wait_for(commits.started.wait(), 60)  # a's first commit begun, and held
    others = [asyncio.create_task(exporter(name)) for name in "bcd"]
    await settle(lambda: pipeline.pending_sessions == 3)
    commits.hold.set()
    await asyncio.wait_for(first, 60)
    assert commits.batches == [(1, frozenset("a"))] + [(4, frozenset("abcd"))] * (rounds - 1)
    # a is done; b, c and d's last requests wait for it in vain, until shutdown.
    await settle(lambda: pipeline.pending_sessions == 3)
    assert not any(task.done() for task in others)
    await pipeline.shutdown()
    await asyncio.wait_for(asyncio.gather(*others), 60)
    assert commits.batches[rounds:] == [(3, frozenset("bcd"))]
    rows = read_rows(store.path)
    assert {name: rows[name]["turns"] for name in "abcd"} == dict.fromkeys("abcd", rounds)
    await store.close()


async def test_one_request_in_flight_never_waits_to_gather(tmp_path: Path) -> None:
    """One exporter, one request at a time, every commit taking an hour by a clock that then
    stands still: were any commit to wait for a second request, it would wait forever. Each
    request wakes the loop once and is committed on its own."""
    clock = Monotonic()
    kwargs: dict[str, Any] = {"flush_interval_s": 0, "monotonic": clock}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store, clock, takes=3600)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)
    for i in range(5):
        wakeups = pipeline.wakeups
        await asyncio.wait_for(pipeline.export(Signal.TRACES, request("solo", i + 1)), 60)
        assert pipeline.wakeups == wakeups + 1
    assert commits.batches == [(1, frozenset({"solo"}))] * 5
    assert read_rows(store.path)["solo"]["turns"] == 5
    await pipeline.shutdown()
    await store.close()


@pytest.mark.parametrize("commit_s", [0.05, 3600])
async def test_an_adaptive_wait_lasts_at_most_one_commit_and_shutdown_cuts_it(
        tmp_path: Path, commit_s: float) -> None:
    """Three requests were waiting around the last commit, but only one comes back: its batch
    waits for the others at most the last commit's duration (and never more than
    MAX_ADAPTIVE_GATHER_S), counted from when the writer became free; the clock standing
    still, it is still waiting when shutdown begins, which commits it at once."""
    from collector.pipeline import ADAPTIVE_GATHER_COMMITS, MAX_ADAPTIVE_GATHER_S

    clock = Monotonic()
    kwargs: dict[str, Any] = {"flush_interval_s": 0, "monotonic": clock}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store, clock, takes=commit_s)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)
    commits.hold.clear()
    first = asyncio.create_task(pipeline.export(Signal.TRACES, request("a")))
    await asyncio.wait_for(commits.started.wait(), 60)
    later = [asyncio.create_task(pipeline.export(Signal.TRACES, request(name, span_id)))
             for span_id, name in ((2, "b"), (3, "c"))]
    await settle(lambda: pipeline.pending_sessions == 2)
    commits.hold.set()
    await asyncio.wait_for(first, 60)
    # b and c wait for a, which comes back: the three go together.
    await pipeline.export(Signal.TRACES, request("a", 4))
    await asyncio.wait_for(asyncio.gather(*later), 60)
    assert commits.batches == [(1, frozenset("a")), (3, frozenset("abc"))]
    free_at = clock.now
    # Three were waiting around that commit; one comes back.
    back = asyncio.create_task(pipeline.export(Signal.TRACES, request("a", 5)))
    await settle(lambda: pipeline.pending_sessions == 1)
    bound = min(commit_s * ADAPTIVE_GATHER_COMMITS, MAX_ADAPTIVE_GATHER_S)
    assert pipeline.next_commit_in(free_at, time.time_ns()) == pytest.approx(bound)
    assert pipeline.next_commit_in(free_at + bound, time.time_ns()) == 0
    for _ in range(100):  # the loop gets its turns; by its clock the wait has not ended
        await asyncio.sleep(0)
    assert len(commits.batches) == 2 and not back.done()
    await pipeline.shutdown()
    await asyncio.wait_for(back, 60)
    assert commits.batches[2:] == [(1, frozenset("a"))]
    assert read_rows(store.path)["a"]["turns"] == 3
    await store.close()


async def test_an_adaptive_wait_ends_when_its_time_is_up(tmp_path: Path) -> None:
    """b arrives while a's commit runs; a does not come back. Once the clock has moved past
    the bound, the loop commits b alone when its timer fires, without any other request or
    shutdown."""
    from collector.pipeline import MAX_ADAPTIVE_GATHER_S

    clock = Monotonic()
    kwargs: dict[str, Any] = {"flush_interval_s": 0, "monotonic": clock}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store, clock, takes=3600)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)
    commits.hold.clear()
    first = asyncio.create_task(pipeline.export(Signal.TRACES, request("a")))
    await asyncio.wait_for(commits.started.wait(), 60)
    second = asyncio.create_task(pipeline.export(Signal.TRACES, request("b", 2)))
    await settle(lambda: pipeline.pending_sessions == 1)
    commits.hold.set()
    await asyncio.wait_for(first, 60)
    assert not second.done()
    clock.now += MAX_ADAPTIVE_GATHER_S
    await asyncio.wait_for(second, 60)
    assert commits.batches == [(1, frozenset("a")), (1, frozenset("b"))]
    await pipeline.shutdown()
    await store.close()


async def test_a_batch_gathers_for_at_most_the_interval_and_shutdown_does_not_wait(
        tmp_path: Path) -> None:
    """flush.interval_ms > 0: a batch waits to gather more, up to the interval after its first
    request (here an hour: it is still gathering when shutdown begins, which commits it)."""
    kwargs: dict[str, Any] = {"flush_interval_s": 3600}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    commits = Commits(store)
    await pipeline.start()
    await asyncio.wait_for(flushed.wait(), 60)
    before = time.monotonic()
    waiting = [asyncio.create_task(pipeline.export(Signal.TRACES, request(name, span_id)))
               for span_id, name in enumerate(("x", "y"), start=1)]
    for _ in range(100):
        if pipeline.pending_sessions == 2:
            break
        await asyncio.sleep(0)
    due_in = pipeline.next_commit_in(time.monotonic(), time.time_ns())
    assert 0 < due_in <= 3600 - (time.monotonic() - before) + 1e-3  # counted from the first
    for _ in range(100):  # the loop gets its turns and still does not commit the batch
        await asyncio.sleep(0)
    assert commits.batches == [] and not any(task.done() for task in waiting)
    await pipeline.shutdown()
    await asyncio.wait_for(asyncio.gather(*waiting), 60)
    assert commits.batches == [(2, frozenset({"x", "y"}))]
    assert set(read_rows(store.path)) == {"x", "y"}
    await store.close()


async def test_the_stale_sweep_runs_on_its_own_timer_while_idle(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"flush_interval_s": 0, "stale_after_s": 1}
    flushed = flush_event(kwargs)
    store, pipeline = await make(tmp_path, **kwargs)
    await pipeline.start()
    await pipeline.export(Signal.TRACES, request("old"))  # its span ended at conftest T0
    flushed.clear()
    flushes = pipeline.stats.flushes
    # Nothing else is sent: only the sweep's timer can start the next commit.
    await asyncio.wait_for(flushed.wait(), 60)
    assert pipeline.stats.flushes == flushes + 1
    assert pipeline.stats.sessions_swept == 1
    assert read_rows(store.path)["old"]["status"] == "unknown"
    await pipeline.shutdown()
    await store.close()


# -- every signal through the one handler --------------------------------------------------------

def logs_request(records: int) -> ExportLogsServiceRequest:
    return ExportLogsServiceRequest(resource_logs=[ResourceLogs(scope_logs=[ScopeLogs(
        log_records=[LogRecord(time_unix_nano=i + 1) for i in range(records)])])])


def metrics_request(points: int) -> ExportMetricsServiceRequest:
    return ExportMetricsServiceRequest(resource_metrics=[ResourceMetrics(scope_metrics=[
        ScopeMetrics(metrics=[Metric(name="m", sum=Sum(data_points=[
            NumberDataPoint(as_int=i) for i in range(points)]))])])])


def signal_request(signal: Signal, items: int) -> Any:
    if signal is Signal.LOGS:
        return logs_request(items)
    if signal is Signal.METRICS:
        return metrics_request(items)
    return encode_spans([make_span(span_id=i + 1, attrs={"http.route": "/"})
                         for i in range(items)])


@pytest.mark.parametrize("signal", list(Signal))
async def test_every_signal_has_the_same_refusals(tmp_path: Path, signal: Signal) -> None:
    store, pipeline = await make(tmp_path, max_items_per_request=3)
    await pipeline.start()
    with pytest.raises(ExportError) as info:
        await pipeline.export(signal, signal_request(signal, 4))
    assert info.value.refusal is Refusal.TOO_LARGE
    assert f"request carries 4 {signal.items}; the limit is 3" in info.value.message
    outcome = await pipeline.export(signal, signal_request(signal, 3))
    assert (outcome.rejected, outcome.message) == (0, "")
    counts = pipeline.stats.items[signal]
    assert (counts.received, counts.ignored, counts.refused) == (3, 3, {"too_large": 4})
    await pipeline.shutdown()
    with pytest.raises(ExportError) as info:
        await pipeline.export(signal, signal_request(signal, 2))
    assert info.value.refusal is Refusal.SHUTTING_DOWN
    assert counts.refused == {"too_large": 4, "shutting_down": 2}
    others = [pipeline.stats.items[s] for s in Signal if s is not signal]
    assert all(c.received == 0 and not c.refused for c in others)
    await store.close()


@pytest.mark.parametrize("signal", [Signal.LOGS, Signal.METRICS])
async def test_logs_and_metrics_usage_waits_for_its_commit_and_overload_refuses_them(
        tmp_path: Path, signal: Signal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatch hands a logs or metrics request to its own mapping and treats what that
    returns as it treats spans: answered after the commit, counted against overload. (The
    mapping here stands in for the dialects, which are tested with captured payloads.)"""
    traces = map_request(request("from-" + signal.value), MappingOptions(
        pricer=Pricer({}, use_library=False)), 0)

    def mapped(request: Any, options: MappingOptions, now_ns: int) -> MappingResult:
        assert count_items(signal, request) == 2
        return MappingResult(records=traces.records, spans=2, ignored=1)

    monkeypatch.setattr(f"collector.pipeline.map_{signal.value}_request", mapped)
    store = SQLiteStore(tmp_path / "p.db", retention_s=3600)
    await store.open()
    pipeline = Pipeline(store, MappingOptions(pricer=Pricer({}, use_library=False)),
                        flush_interval_s=3600, max_pending_spans=1, stale_after_s=3600)
    await pipeline.start()
    waiting = asyncio.create_task(pipeline.export(signal, signal_request(signal, 2)))
    while not pipeline.pending_spans:
        await asyncio.sleep(0)
    assert not waiting.done() and read_rows(store.path) == {}
    with pytest.raises(ExportError) as info:
        await pipeline.export(signal, signal_request(signal, 2))
    assert info.value.refusal is Refusal.OVERLOADED
    assert "1 usage records waiting for storage" in info.value.message
    await pipeline.shutdown()  # commits what was accepted, then answers it
    assert (await waiting).rejected == 0
    assert read_rows(store.path)[f"from-{signal.value}"]["turns"] == 1
    counts = pipeline.stats.items[signal]
    assert (counts.received, counts.ignored, counts.refused) == (2, 1, {"overloaded": 2})
    await store.close()
