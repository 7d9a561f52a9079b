"""The pipeline in-process, on a real SQLite store: group commit and its failure modes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from collector.accounting.pricing import Pricer
from collector.pipeline import Pipeline
from collector.receivers.errors import ExportError, Refusal
from collector.signals.scan import COMPILED_AVAILABLE
from collector.signals.traces import MappingOptions
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
    outcome = await pipeline.export(request("a"))
    assert (outcome.rejected, read_rows(store.path)["a"]["turns"]) == (0, 1)
    await pipeline.shutdown()
    with pytest.raises(ExportError) as info:
        await pipeline.export(request("a", 2))
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
        await pipeline.export(request("a"), b"\x0a\xff")  # a length past the end
    assert info.value.refusal is Refusal.INVALID
    assert "cannot read" in info.value.message
    assert pipeline.pending_spans == 0
    assert (await pipeline.export(request("a", 2))).rejected == 0  # and it still works
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
        await asyncio.wait_for(pipeline.export(request("b")), 10)
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
                        max_spans_per_request=100_000, stale_after_s=3600)
    await pipeline.start()
    count = EARLY_FLUSH_SESSIONS if sessions == "many" else EARLY_FLUSH_SPANS
    assert count < EARLY_FLUSH_SPANS or sessions == "one"  # each case tests one trigger
    large = encode_spans([make_span(span_id=i + 1, attrs={
        "session.id": f"s-{i}" if sessions == "many" else "s",
        "gen_ai.usage.input_tokens": 1}) for i in range(count)])
    # With an hour-long interval only the early flush can answer this request.
    await asyncio.wait_for(pipeline.export(large), 60)
    rows = read_rows(store.path)
    assert len(rows) == (count if sessions == "many" else 1)
    assert sum(row["prompt_tokens"] for row in rows.values()) == count
    await pipeline.shutdown()
    await store.close()
