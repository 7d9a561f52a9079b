"""End to end: the daemon as users run it, fed by the SDK exporters, read back from SQLite."""

from __future__ import annotations

import http.client
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import MS, SECOND, T0, Daemon, make_span, read_rows
from tests.test_receivers import new_trace, post, request_bytes, usage

StartDaemon = Callable[..., Daemon]
PRICES = ('[pricing."test-model"]\ninput = 1.0\noutput = 2.0\n'
          'cache_read = 0.5\ncache_write = 4.0\n')
# Sessions from 2026-01-01 are long silent: with this, the sweep runs every second.
SWEEP_FAST = "\n[sessions]\nstale_after_s = 10\n"
# ... and with this, never (ten years), so statuses stay as the spans set them.
NO_SWEEP = "\n[sessions]\nstale_after_s = 315360000\n"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll for an observable event (never a fixed sleep); fail with a reason on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def conversation(trace: int, session: str, t: int) -> list[Any]:
    """One agent turn: an invoke_agent root with two chat children, GenAI conventions."""
    common = {"gen_ai.conversation.id": session}
    agent = make_span(trace_id=trace, span_id=1, name="invoke_agent", start=t, end=t + 900 * MS,
                      attrs={**common, "gen_ai.operation.name": "invoke_agent",
                             "gen_ai.usage.input_tokens": 99999,  # roll-up: ignored
                             "agent.session.kind": "autonomous",
                             "agent.session.channel": "telegram",
                             "agent.session.goal": "summarise the inbox"})
    first = make_span(trace_id=trace, span_id=2, parent_id=1, name="chat", start=t + 10 * MS,
                      end=t + 400 * MS,
                      attrs={**common, "gen_ai.operation.name": "chat",
                             "gen_ai.request.model": "test-model",
                             "gen_ai.response.model": "test-model",
                             "gen_ai.usage.input_tokens": 1000,
                             "gen_ai.usage.cache_read.input_tokens": 400,
                             "gen_ai.usage.output_tokens": 200,
                             "gen_ai.usage.reasoning.output_tokens": 50})
    second = make_span(trace_id=trace, span_id=3, parent_id=1, name="chat", start=t + 500 * MS,
                       end=t + 800 * MS,
                       attrs={**common, "gen_ai.operation.name": "chat",
                              "gen_ai.request.model": "test-model",
                              "gen_ai.usage.input_tokens": 2000,
                              "gen_ai.usage.output_tokens": 100})
    return [first, second, agent]


# cents: (600 x 1 + 400 x 0.5 + 200 x 2 + 2000 x 1 + 100 x 2) / 1e6 USD x 100
CONVERSATION_CENTS = (600 + 200 + 400 + 2000 + 200) / 1e6 * 100


def expected_row(session: str, *, times: int = 1, status: str = "active") -> dict[str, Any]:
    return {
        "id": session, "kind": "autonomous", "status": status, "channel": "telegram",
        "model": "test-model", "created_at": "2026-01-01T00:00:00.000Z",
        "last_active_at": "2026-01-01T00:00:00.900Z", "turns": times,
        "prompt_tokens": 3000 * times, "completion_tokens": 300 * times,
        "reasoning_tokens": 50 * times, "cost_cents": pytest.approx(CONVERSATION_CENTS * times),
        "goal_text": "summarise the inbox",
    }


def test_conversation_over_grpc_gives_an_exact_row(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + SWEEP_FAST)
    daemon.export_grpc(conversation(new_trace(), "conv", T0))
    # Old timestamps: the stale sweep presumes the session dead, hence 'unknown'.
    wait_for(lambda: daemon.row("conv")["status"] == "unknown", "the stale sweep")
    assert daemon.row("conv") == expected_row("conv", status="unknown")


def test_openinference_conversation_over_http(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + NO_SWEEP)
    trace = new_trace()
    t = T0
    common = {"session.id": "oi"}
    spans = [
        make_span(trace_id=trace, span_id=2, parent_id=1, start=t, end=t + 100 * MS,
                  attrs={**common, "openinference.span.kind": "LLM",
                         "llm.model_name": "test-model", "llm.token_count.prompt": 500,
                         "llm.token_count.completion": 70,
                         "llm.token_count.completion_details.reasoning": 20,
                         "llm.token_count.prompt_details.cache_write": 100}),
        make_span(trace_id=trace, span_id=1, start=t, end=t + 200 * MS,
                  attrs={**common, "openinference.span.kind": "AGENT",
                         "llm.token_count.prompt": 500, "agent.session.channel": "slack",
                         "agent.session.status": "completed"}),
    ]
    daemon.export_http(spans, gzip=True)
    assert daemon.row("oi") == {
        "id": "oi", "kind": "interactive", "status": "completed", "channel": "slack",
        "model": "test-model", "created_at": "2026-01-01T00:00:00.000Z",
        "last_active_at": "2026-01-01T00:00:00.200Z", "turns": 1, "prompt_tokens": 500,
        "completion_tokens": 70, "reasoning_tokens": 20,
        "cost_cents": pytest.approx((400 * 1.0 + 100 * 4.0 + 70 * 2.0) / 1e6 * 100),
        "goal_text": None,
    }


def test_library_price_and_unpriced_model(start_daemon: StartDaemon) -> None:
    daemon = start_daemon()
    daemon.export_http([
        make_span(trace_id=new_trace(), attrs={
            "session.id": "priced", "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 1000,
            "gen_ai.usage.cache_read.input_tokens": 200, "gen_ai.usage.output_tokens": 100}),
        make_span(trace_id=new_trace(), attrs={
            "session.id": "unpriced", "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "in-house-llm", "gen_ai.usage.input_tokens": 1000}),
    ])
    # gpt-4o per genai-prices: $2.50 input, $1.25 cached input, $10 output per million.
    assert daemon.row("priced")["cost_cents"] == pytest.approx(
        (800 * 2.5 + 200 * 1.25 + 100 * 10) / 1e6 * 100)
    unpriced = daemon.row("unpriced")
    assert (unpriced["cost_cents"], unpriced["prompt_tokens"]) == (0.0, 1000)


def test_duplicates_are_ignored_within_and_across_requests(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + NO_SWEEP)
    spans = conversation(new_trace(), "dup", T0)
    daemon.export_grpc(spans + spans[:1])  # one span twice in one request
    daemon.export_http(spans)  # the whole request again, other transport
    daemon.export_grpc(spans, gzip=True)
    assert daemon.row("dup") == expected_row("dup")


def test_restart_on_the_same_database_keeps_sums_and_dedupe(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + NO_SWEEP)
    trace = new_trace()
    daemon.export_grpc(conversation(trace, "restart", T0))
    assert daemon.stop() == 0
    daemon.start()
    daemon.export_http(conversation(trace, "restart", T0))  # a retry after restart
    daemon.export_http(conversation(new_trace(), "restart", T0))  # a new turn
    assert daemon.row("restart") == expected_row("restart", times=2)


def test_acknowledged_spans_survive_kill_9(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + NO_SWEEP + "\n[flush]\ninterval_ms = 50\n")
    daemon.export_grpc(conversation(new_trace(), "killed", T0))
    daemon.proc.kill()  # type: ignore[union-attr]
    daemon.proc.wait()  # type: ignore[union-attr]
    assert read_rows(daemon.db_path)["killed"] == expected_row("killed")


def test_latest_values_follow_span_time_not_arrival(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + NO_SWEEP)
    late = make_span(trace_id=new_trace(), start=T0 + 10 * SECOND,
                     attrs={"session.id": "order", "agent.session.status": "completed",
                            "gen_ai.response.model": "model-b",
                            "gen_ai.usage.input_tokens": 1})
    early = make_span(trace_id=new_trace(), start=T0,
                      attrs={"session.id": "order", "agent.session.status": "failed",
                             "agent.session.kind": "acp",
                             "gen_ai.response.model": "model-a",
                             "gen_ai.usage.input_tokens": 1})
    silent = make_span(trace_id=new_trace(), start=T0 + 20 * SECOND,
                       attrs={"session.id": "order", "gen_ai.usage.output_tokens": 1})
    daemon.export_grpc([late])
    daemon.export_grpc([early])  # arrives later but happened earlier: does not win
    daemon.export_grpc([silent])  # no status, kind or model: resets nothing
    row = daemon.row("order")
    assert (row["status"], row["kind"], row["model"], row["turns"]) == (
        "completed", "acp", "model-b", 3)
    assert row["created_at"] == "2026-01-01T00:00:00.000Z"
    assert row["last_active_at"] == "2026-01-01T00:00:20.001Z"


def test_stale_sweep_spares_terminal_sessions_and_a_new_turn_revives(
        start_daemon: StartDaemon) -> None:
    daemon = start_daemon(SWEEP_FAST)
    daemon.export_grpc([
        make_span(trace_id=new_trace(), attrs={"session.id": "old-active",
                                               "gen_ai.usage.input_tokens": 1}),
        make_span(trace_id=new_trace(), attrs={"session.id": "old-done",
                                               "agent.session.status": "completed",
                                               "gen_ai.usage.input_tokens": 1}),
    ])
    wait_for(lambda: daemon.row("old-active")["status"] == "unknown", "the stale sweep")
    assert daemon.row("old-done")["status"] == "completed"
    now = time.time_ns()
    daemon.export_grpc([make_span(trace_id=new_trace(), start=now,
                                  attrs={"session.id": "old-active",
                                         "gen_ai.usage.input_tokens": 1})])
    row = daemon.row("old-active")
    assert (row["status"], row["turns"]) == ("active", 2)


def post_in_flight(daemon: Daemon, bodies: dict[str, bytes]
                   ) -> tuple[dict[str, int], list[threading.Thread]]:
    """POST each body on its own thread and return once the daemon holds every one waiting for
    its commit (it must log at debug level). Each thread records its answer's status under its
    key, -1 for no answer."""
    results: dict[str, int] = {}

    def send(key: str, body: bytes) -> None:
        try:
            results[key] = post(daemon, body)[0]
        except (OSError, http.client.HTTPException):
            results[key] = -1

    threads = [threading.Thread(target=send, args=item) for item in bodies.items()]
    for t in threads:
        t.start()
    wait_for(lambda: daemon.log.count("waiting for commit") >= len(bodies),
             "requests to be in flight")
    return results, threads


def test_sigterm_answers_in_flight_requests_after_commit(start_daemon: StartDaemon) -> None:
    # A long flush interval holds accepted requests waiting for their commit.
    daemon = start_daemon("[flush]\ninterval_ms = 60000\n[log]\nlevel = \"debug\"\n")
    results, threads = post_in_flight(daemon, {
        f"inflight-{i}": request_bytes(make_span(trace_id=new_trace(),
                                                 attrs=usage(f"inflight-{i}")))
        for i in range(8)})
    assert daemon.stop(signal.SIGTERM) == 0
    for t in threads:
        t.join(20)
    assert results == {f"inflight-{i}": 200 for i in range(8)}
    rows = read_rows(daemon.db_path)
    assert all(rows[f"inflight-{i}"]["turns"] == 1 for i in range(8))


def test_storage_lock_gives_retryable_answers_and_nothing_twice(
        start_daemon: StartDaemon) -> None:
    daemon = start_daemon("[flush]\ninterval_ms = 50\n")
    daemon.export_grpc([make_span(trace_id=new_trace(), attrs=usage("locked"))])
    blocker = sqlite3.connect(daemon.db_path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    body = request_bytes(make_span(trace_id=new_trace(), attrs=usage("locked")))
    try:
        status, headers, _ = post(daemon, body)
        assert status == 503 and headers["Retry-After"] == "1"
    finally:
        blocker.rollback()
        blocker.close()
    # The refused spans were kept and get committed; the exporter's retry finds them accounted.
    wait_for(lambda: daemon.row("locked")["turns"] == 2, "the kept batch to commit")
    assert post(daemon, body)[0] == 200
    row = daemon.row("locked")
    assert (row["turns"], row["prompt_tokens"]) == (2, 200)
    assert "flush failed" in daemon.log and "storage recovered" in daemon.log


def test_existing_dashboard_database_is_added_to(start_daemon: StartDaemon, tmp_path: Any) -> None:
    db = tmp_path / "dashboard.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE agent_sessions (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL DEFAULT 'interactive',
            status TEXT NOT NULL DEFAULT 'active', channel TEXT NOT NULL DEFAULT 'cli',
            model TEXT NOT NULL DEFAULT '', created_at TEXT NOT NULL,
            last_active_at TEXT NOT NULL, turns INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            cost_cents REAL NOT NULL DEFAULT 0.0, goal_text TEXT);
        INSERT INTO agent_sessions (id, created_at, last_active_at, turns, prompt_tokens,
            status) VALUES ('legacy', '2025-12-01T00:00:00.000Z', '2025-12-01T00:00:00.000Z',
            5, 50, 'completed');
    """)
    conn.commit()
    conn.close()
    daemon = start_daemon(db_path=db)
    daemon.export_grpc([make_span(trace_id=new_trace(), attrs=usage("legacy"))])
    row = daemon.row("legacy")
    assert (row["turns"], row["prompt_tokens"], row["status"]) == (6, 150, "completed")
    assert row["created_at"] == "2025-12-01T00:00:00.000Z"


def test_database_with_other_columns_is_refused(tmp_path: Any) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE agent_sessions (id TEXT PRIMARY KEY, tokens INTEGER)")
    conn.close()
    daemon = Daemon(tmp_path / "d", db_path=db)
    with pytest.raises(RuntimeError, match="agent_sessions has columns"):
        daemon.start()
    assert daemon.proc is not None and daemon.proc.wait(10) == 1


def test_garbage_collector_is_tuned_for_the_export_path() -> None:
    """Start-up objects are frozen out of collections and young collections are rarer."""
    import gc

    from collector.daemon import GC_THRESHOLDS, tune_garbage_collector

    saved = gc.get_threshold()
    try:
        tune_garbage_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > saved[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)
