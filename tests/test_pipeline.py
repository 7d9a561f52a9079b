"""The pipeline in-process, on a real SQLite store: group commit and its failure modes."""

from __future__ import annotations

import asyncio
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

from collector.accounting.pricing import Pricer
from collector.pipeline import Pipeline
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
    pipeline = Pipeline(store, MappingOptions(pricer=Pricer({}, use_library=False)),
                        flush_interval_s=0.01, max_pending_spans=1000, stale_after_s=3600,
                        **kwargs)
    return store, pipeline


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
async def test_a_large_batch_is_flushed_before_the_tick(tmp_path: Path, sessions: str) -> None:
    """A batch touching EARLY_FLUSH_SESSIONS sessions, or holding EARLY_FLUSH_SPANS spans, is
    committed at once rather than at the next tick."""
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
    # With an hour-long interval only the early flush can answer this request.
    await asyncio.wait_for(pipeline.export(Signal.TRACES, large), 60)
    rows = read_rows(store.path)
    assert len(rows) == (count if sessions == "many" else 1)
    assert sum(row["prompt_tokens"] for row in rows.values()) == count
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
