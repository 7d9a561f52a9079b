"""Sessions resolved across a trace, end to end: the SDK's BatchSpanProcessor exports a trace's
children before their parent ends (force_flush between), to the real daemon over HTTP, every
request sent twice; the rows are read back from SQLite."""

from __future__ import annotations

import sqlite3
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Tracer, set_span_in_context

from tests.conftest import Daemon

StartDaemon = Callable[..., Daemon]
PRICES = '[pricing."test-model"]\ninput = 1.0\noutput = 2.0\n'
LONG_WAIT = "\n[sessions]\nresolve_window_s = 3600\n"
SHORT_WAIT = "\n[sessions]\nresolve_window_s = 1\n"


class TwiceExporter(SpanExporter):
    """Sends every export twice (an exporter's retry after a lost answer) and keeps each
    answer: every one must be a success. `daemon` may be replaced (a restarted collector)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.results: list[SpanExportResult] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        inner = self.daemon.http_exporter()
        try:
            for _ in range(2):
                self.results.append(inner.export(spans))
        finally:
            inner.shutdown()
        return self.results[-1]

    def shutdown(self) -> None:
        pass


class Tracing:
    """A tracer whose spans go to a daemon through a BatchSpanProcessor that exports only
    when flushed."""

    def __init__(self, daemon: Daemon) -> None:
        self.exporter = TwiceExporter(daemon)
        self.provider = TracerProvider(resource=Resource({"service.name": "app"}))
        self.provider.add_span_processor(
            BatchSpanProcessor(self.exporter, schedule_delay_millis=600_000))
        self.tracer = self.provider.get_tracer("app")

    def flush(self) -> None:
        """Export what has ended; every answer must be a success (committed)."""
        assert self.provider.force_flush(30_000)
        results = self.exporter.results
        assert results and all(r == SpanExportResult.SUCCESS for r in results), \
            self.exporter.daemon.log
        results.clear()


@pytest.fixture
def tracing() -> Iterator[Callable[[Daemon], Tracing]]:
    made: list[Tracing] = []

    def make(daemon: Daemon) -> Tracing:
        made.append(Tracing(daemon))
        return made[-1]

    yield make
    for t in made:
        t.provider.shutdown()


def agent(tracer: Tracer, session: str | None, parent: Span | None = None) -> Span:
    attrs: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent"}
    if session is not None:
        attrs["gen_ai.conversation.id"] = session
    attrs["gen_ai.usage.input_tokens"] = 99999  # a roll-up of its children: never counted
    context = set_span_in_context(parent) if parent is not None else None
    return tracer.start_span("invoke_agent", context=context, attributes=attrs)


def chat(tracer: Tracer, parent: Span, tokens: int) -> None:
    """A model call without a session id, as the openai-v2 instrumentation emits it."""
    span = tracer.start_span("chat test-model", context=set_span_in_context(parent),
                             attributes={"gen_ai.operation.name": "chat",
                                         "gen_ai.request.model": "test-model",
                                         "gen_ai.usage.input_tokens": tokens,
                                         "gen_ai.usage.output_tokens": tokens // 10})
    span.end()


def tool(tracer: Tracer, parent: Span) -> Span:
    return tracer.start_span("execute_tool search", context=set_span_in_context(parent),
                             attributes={"gen_ai.operation.name": "execute_tool"})


def sums(daemon: Daemon) -> dict[str, tuple[int, int, int]]:
    return {sid: (row["turns"], row["prompt_tokens"], row["completion_tokens"])
            for sid, row in daemon.rows().items()}


def held(daemon: Daemon) -> int:
    conn = sqlite3.connect(daemon.db_path)
    try:
        return int(conn.execute("SELECT count(*) FROM collector_held_usage").fetchone()[0])
    finally:
        conn.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric(daemon: Daemon, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.ops_port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_parent_in_a_later_request(start_daemon: StartDaemon,
                                   tracing: Callable[[Daemon], Tracing]) -> None:
    daemon = start_daemon(PRICES + LONG_WAIT)
    t = tracing(daemon)
    root = agent(t.tracer, "s-later")
    chat(t.tracer, root, 1000)
    chat(t.tracer, root, 2000)
    t.flush()
    # Answered success: held durably, in no session yet.
    assert sums(daemon) == {}
    assert held(daemon) == 2
    root.end()
    t.flush()
    assert sums(daemon) == {"s-later": (1, 3000, 300)}
    assert held(daemon) == 0
    assert daemon.row("s-later")["cost_cents"] == pytest.approx((3000 + 600) / 1e6 * 100)
    assert metric(daemon, "collector_held_spans_total") == 2
    assert metric(daemon, "collector_held_resolved_total") == 2
    assert metric(daemon, "collector_held_resolved_by_window_total") == 0
    assert metric(daemon, "collector_held_spans_now") == 0


def test_a_restart_between_children_and_parent(start_daemon: StartDaemon,
                                               tracing: Callable[[Daemon], Tracing]) -> None:
    first = start_daemon(LONG_WAIT)
    t = tracing(first)
    root = agent(t.tracer, "s-restart")
    middle = tool(t.tracer, root)
    chat(t.tracer, middle, 500)
    t.flush()
    middle.end()
    t.flush()
    assert first.stop() == 0
    second = start_daemon(LONG_WAIT, db_path=first.db_path)
    t.exporter.daemon = second
    root.end()
    t.flush()
    assert sums(second) == {"s-restart": (1, 500, 50)}
    assert held(second) == 0


def test_another_collector_on_the_database_resolves(start_daemon: StartDaemon,
                                                    tracing: Callable[[Daemon], Tracing]
                                                    ) -> None:
    first = start_daemon(LONG_WAIT)
    second = start_daemon(LONG_WAIT, db_path=first.db_path)
    t = tracing(first)
    root = agent(t.tracer, "s-other")
    chat(t.tracer, root, 700)
    t.flush()
    t.exporter.daemon = second
    root.end()
    t.flush()
    assert sums(first) == {"s-other": (1, 700, 70)}
    assert held(first) == 0


def test_a_parent_that_never_arrives_then_arrives_late(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing]) -> None:
    """After the window the trace id's session takes the usage; a parent after that keeps
    its own turn, and the children stay with the trace id's session."""
    daemon = start_daemon(SHORT_WAIT)
    t = tracing(daemon)
    root = agent(t.tracer, "s-too-late")
    chat(t.tracer, root, 400)
    chat(t.tracer, root, 600)
    t.flush()
    trace_session = format(root.get_span_context().trace_id, "032x")
    wait_for(lambda: trace_session in sums(daemon), "the window to end")
    assert sums(daemon) == {trace_session: (0, 1000, 100)}
    assert held(daemon) == 0
    assert metric(daemon, "collector_held_resolved_by_window_total") == 2
    root.end()
    t.flush()
    assert sums(daemon) == {trace_session: (0, 1000, 100), "s-too-late": (1, 0, 0)}


def test_nested_agents_take_the_nearest_session(start_daemon: StartDaemon,
                                                tracing: Callable[[Daemon], Tracing]) -> None:
    """A sub-agent with its own session inside another agent's trace: its calls (also
    those under its tools) take its session, the outer agent's own calls take the outer
    one, whichever of the two agent spans arrives first."""
    daemon = start_daemon(LONG_WAIT)
    t = tracing(daemon)
    outer = agent(t.tracer, "s-outer")
    chat(t.tracer, outer, 100)
    inner = agent(t.tracer, "s-inner", parent=outer)
    chat(t.tracer, inner, 1000)
    search = tool(t.tracer, inner)
    chat(t.tracer, search, 2000)
    t.flush()
    search.end()
    chat(t.tracer, inner, 3000)
    t.flush()
    assert sums(daemon) == {}
    inner.end()
    t.flush()
    # The outer agent's own call waits: its nearest ancestor has not arrived.
    assert sums(daemon) == {"s-inner": (1, 6000, 600)}
    assert held(daemon) == 1
    chat(t.tracer, outer, 10)
    outer.end()
    t.flush()
    assert sums(daemon) == {"s-inner": (1, 6000, 600), "s-outer": (1, 110, 11)}
    assert held(daemon) == 0


def test_a_call_after_its_agent_takes_the_agents_session(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing]) -> None:
    """A call ending after a sibling agent span: its parent names no session, so it waits
    for that parent; once its chain reaches the trace's root without a session, the session
    of the agent span (remembered as the trace's anchor when it arrived) takes it."""
    daemon = start_daemon(LONG_WAIT)
    t = tracing(daemon)
    workflow = t.tracer.start_span("workflow")
    first = agent(t.tracer, "s-first", parent=workflow)
    first.end()
    t.flush()
    chat(t.tracer, workflow, 800)
    t.flush()
    assert sums(daemon) == {"s-first": (1, 0, 0)}
    assert held(daemon) == 1
    workflow.end()
    t.flush()
    assert sums(daemon) == {"s-first": (1, 800, 80)}
    assert held(daemon) == 0
