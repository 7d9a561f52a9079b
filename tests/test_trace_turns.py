"""Turns across a trace, end to end: spans shaped as the frameworks' instrumentations emit them
(OpenInference for the OpenAI Agents SDK and LangGraph, a turn span without a session as
opencode's), made by the real SDK, exported by its BatchSpanProcessor to the real daemon over
HTTP with every request sent twice, the root in a later request than its children; the rows
are read back from the database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry.trace import Span, Tracer, set_span_in_context

from collector.store.base import iso_utc
from tests.conftest import Daemon
from tests.test_traces import LONG_WAIT, PRICES, Tracing

StartDaemon = Callable[..., Daemon]


@pytest.fixture
def tracing() -> Iterator[Callable[[Daemon], Tracing]]:
    made: list[Tracing] = []

    def make(daemon: Daemon) -> Tracing:
        made.append(Tracing(daemon))
        return made[-1]

    yield make
    for t in made:
        t.provider.shutdown()


def span(tracer: Tracer, name: str, kind: str, parent: Span | None = None,
         session: str | None = "conv", **attrs: Any) -> Span:
    """An OpenInference span of the given kind (AGENT, CHAIN, LLM, TOOL)."""
    attributes: dict[str, Any] = {"openinference.span.kind": kind, **attrs}
    if session is not None:
        attributes["session.id"] = session
    context = set_span_in_context(parent) if parent is not None else None
    return tracer.start_span(name, context=context, attributes=attributes)


def llm(tracer: Tracer, parent: Span, tokens: int, session: str | None = "conv") -> None:
    span(tracer, "ChatOpenAI", "LLM", parent, session, **{
        "llm.model_name": "test-model", "llm.token_count.prompt": tokens,
        "llm.token_count.completion": tokens // 10}).end()


def turns_and_tokens(daemon: Daemon) -> dict[str, tuple[int, int]]:
    return {sid: (row["turns"], row["prompt_tokens"]) for sid, row in daemon.rows().items()}


def times(daemon: Daemon, session: str) -> tuple[str, str]:
    row = daemon.row(session)
    return row["created_at"], row["last_active_at"]


def span_times(first: Span, last: Span) -> tuple[str, str]:
    start, end = first.start_time, last.end_time  # type: ignore[attr-defined]
    return iso_utc(start), iso_utc(end)


def test_a_workflow_agent_around_the_agent_is_one_turn_per_run(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing]) -> None:
    """OpenAI Agents SDK via OpenInference: a root AGENT span named after the workflow and an
    AGENT span for the agent, its model calls under it; a handoff to a second agent."""
    daemon = start_daemon(PRICES + LONG_WAIT)
    t = tracing(daemon)
    roots = []
    for run in range(2):
        workflow = span(t.tracer, "Agent workflow", "AGENT")
        triage = span(t.tracer, "Triage", "AGENT", workflow)
        llm(t.tracer, triage, 100)
        triage.end()
        helper = span(t.tracer, "Helper", "AGENT", workflow)  # the handoff
        llm(t.tracer, helper, 200)
        helper.end()
        t.flush()
        # The agents' spans counted the run's turn at once; the workflow's is still open.
        assert turns_and_tokens(daemon) == {"conv": (run + 1, 300 * (run + 1))}
        workflow.end()
        t.flush()
        roots.append(workflow)
        assert turns_and_tokens(daemon) == {"conv": (run + 1, 300 * (run + 1))}
    assert times(daemon, "conv") == span_times(roots[0], roots[1])


def test_graph_nodes_named_agent_under_a_chain_root_are_one_turn_per_invocation(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing]) -> None:
    """LangGraph's create_react_agent via OpenInference: each model step runs in a graph node
    `agent` (kind AGENT) under the invocation's CHAIN root `LangGraph`, tools between."""
    daemon = start_daemon(PRICES + LONG_WAIT)
    t = tracing(daemon)
    roots = []
    for _ in range(2):
        graph = span(t.tracer, "LangGraph", "CHAIN")
        for step in range(2):
            node = span(t.tracer, "agent", "AGENT", graph)
            llm(t.tracer, node, 1000)
            node.end()
            if step == 0:
                tools = span(t.tracer, "tools", "CHAIN", graph)
                span(t.tracer, "search", "TOOL", tools).end()
                tools.end()
        t.flush()
        graph.end()
        t.flush()
        roots.append(graph)
    assert turns_and_tokens(daemon) == {"conv": (2, 4000)}
    # The invocations' own spans give the session's times, not their model calls.
    assert times(daemon, "conv") == span_times(roots[0], roots[1])


def test_a_chain_root_without_agent_spans_arriving_last_after_a_restart_is_the_turn(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing]) -> None:
    """LangGraph's create_agent: the root CHAIN span `LangGraph` and no AGENT span at all;
    the collector restarts between the model calls and the root."""
    first = start_daemon(PRICES + LONG_WAIT)
    t = tracing(first)
    graph = span(t.tracer, "LangGraph", "CHAIN")
    model = span(t.tracer, "model", "CHAIN", graph)
    llm(t.tracer, model, 500)
    llm(t.tracer, model, 700)
    model.end()
    t.flush()
    assert turns_and_tokens(first) == {"conv": (0, 1200)}
    assert first.stop() == 0
    second = start_daemon(PRICES + LONG_WAIT, db_path=first.db_path)
    t.exporter.daemon = second
    graph.end()
    t.flush()
    assert turns_and_tokens(second) == {"conv": (1, 1200)}
    assert times(second, "conv") == span_times(graph, graph)


def test_a_second_collector_on_the_same_postgresql_receives_the_root(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing], pg_url: str) -> None:
    first = start_daemon(PRICES + LONG_WAIT, postgres_url=pg_url)
    second = start_daemon(PRICES + LONG_WAIT, postgres_url=pg_url)
    t = tracing(first)
    graph = span(t.tracer, "LangGraph", "CHAIN")
    llm(t.tracer, graph, 300)
    t.flush()
    t.exporter.daemon = second
    graph.end()
    t.flush()
    assert turns_and_tokens(first) == {"conv": (1, 300)}
    assert times(first, "conv") == span_times(graph, graph)


def test_a_turn_span_naming_no_session_is_resolved_when_its_trace_named_one(
        start_daemon: StartDaemon, tracing: Callable[[Daemon], Tracing]) -> None:
    """opencode's shape: the prompt's span names no session, its model calls do. The turn is
    there as soon as the prompt's span arrives, not at the end of the (hour-long) window."""
    daemon = start_daemon(PRICES + LONG_WAIT)
    t = tracing(daemon)
    prompt = t.tracer.start_span("SessionPrompt.prompt")
    for tokens in (100, 200, 300):
        t.tracer.start_span("chat test-model", context=set_span_in_context(prompt), attributes={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model",
            "gen_ai.conversation.id": "ses_1", "gen_ai.usage.input_tokens": tokens}).end()
    t.flush()
    assert turns_and_tokens(daemon) == {"ses_1": (0, 600)}
    prompt.end()
    t.flush()
    assert turns_and_tokens(daemon) == {"ses_1": (1, 600)}
    assert times(daemon, "ses_1") == span_times(prompt, prompt)
