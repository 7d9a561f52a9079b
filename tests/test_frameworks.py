"""The Python agent frameworks, end to end: payloads captured from each real framework
(tests/captures/frameworks/capture.py) replayed through the real receivers, HTTP protobuf and
gRPC, every request sent twice, and the whole row read back from the database.

Every capture is two runs of one agent in one conversation against the stand-in OpenAI API
(tests/captures/frameworks/standin.py): three model calls, each billed 1234 input tokens of
which 500 were cached, and 77 output tokens of which 33 were reasoning, on gpt-5. So a row
that matches the bill has prompt 3 x 1234, completion 3 x 77, reasoning 3 x 33 (a subset of
completion, not priced apart), and costs three times CALL_CENTS below; turns are the two
runs, and the session's times are those of the runs' own spans (each trace's root here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from collector.accounting.pricing import Pricer
from tests.conftest import Daemon
from tests.replay import Export, exports
from tests.test_agents import NOT_STALE, row, send

TRANSPORTS = ("http-protobuf", "grpc")
ORDERS = ("as-ended", "roots-first")
CALLS = 3
INPUT, CACHED, OUTPUT, REASONING = 1234, 500, 77, 33
# gpt-5 per million tokens: $1.25 input, $0.125 cached input, $10 output (reasoning is output).
USD_PER_MTOK_INPUT, USD_PER_MTOK_CACHED, USD_PER_MTOK_OUTPUT = 1.25, 0.125, 10.0
CALL_CENTS = ((INPUT - CACHED) * USD_PER_MTOK_INPUT + CACHED * USD_PER_MTOK_CACHED
              + OUTPUT * USD_PER_MTOK_OUTPUT) / 1e6 * 100  # 0.175 cents
# A call whose telemetry says nothing of its cache: all its input at the full rate.
CALL_CENTS_NO_CACHE = (INPUT * USD_PER_MTOK_INPUT + OUTPUT * USD_PER_MTOK_OUTPUT) / 1e6 * 100


def billed(session: str, created: str, last: str, reasoning: int = CALLS * REASONING,
           cents: float = CALLS * CALL_CENTS) -> dict[str, Any]:
    """The row of two runs, three calls as billed; `created`/`last`: the start of the first
    run's span and the end of the second's."""
    return row(session, "gpt-5", created, last, 2, CALLS * INPUT, CALLS * OUTPUT, reasoning,
               cents)


# capture file -> the row it must give. Times: start of the first run's root span, end of the
# second run's (the capture's two root spans; see each folder's README.txt for the scenario).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # Pydantic AI: root `invoke_agent weather` per run (gen_ai.conversation.id), `chat gpt-5`
    # calls with gen_ai.usage.details.reasoning_tokens and its own cost (operation.cost).
    "pydantic-ai-chat": ("pydantic-ai-2.68.0/chat_traces_http-protobuf_decoded.json", billed(
        "pydantic-conversation-chat", "2026-12-02T18:46:36.146Z", "2026-12-02T18:46:36.388Z")),
    "pydantic-ai-responses": (
        "pydantic-ai-2.68.0/responses_traces_http-protobuf_decoded.json", billed(
            "pydantic-conversation-responses", "2026-12-02T18:46:41.861Z",
            "2026-12-02T18:46:43.666Z")),
    # OpenAI Agents SDK + OpenInference: per run a root AGENT span `weather workflow` (the
    # SDK's trace) around the agent's AGENT span `weather`: one turn, not two.
    "openai-agents-responses": (
        "openai-agents-0.24.0/responses_traces_http-protobuf_decoded.json", billed(
            "agents-session-responses", "2026-12-02T18:46:51.567Z",
            "2026-12-02T18:46:52.995Z")),
    # With the Chat Completions model OpenInference exports only the calls' input and output
    # counts (its generation spans drop the SDK's token details): no reasoning, and the
    # cached input priced as uncached. Above the bill, but all the telemetry says.
    "openai-agents-chat": ("openai-agents-0.24.0/chat_traces_http-protobuf_decoded.json", billed(
        "agents-session-chat", "2026-12-02T18:47:05.756Z", "2026-12-02T18:47:06.903Z",
        reasoning=0, cents=CALLS * CALL_CENTS_NO_CACHE)),
    # LangChain create_agent + OpenInference: each invocation's root is the CHAIN `LangGraph`
    # (no AGENT span at all); thread_id exported as session.id.
    "langgraph-create_agent": (
        "langgraph-1.2.24/create_agent_traces_http-protobuf_decoded.json", billed(
            "thread-create_agent", "2026-12-02T18:47:18.680Z", "2026-12-02T18:47:18.842Z")),
    # langgraph create_react_agent: the root CHAIN `LangGraph` runs the graph node `agent`
    # (AGENT) once per model step: two of them in the first invocation, still one turn.
    "langgraph-create_react_agent": (
        "langgraph-1.2.24/create_react_agent_traces_http-protobuf_decoded.json", billed(
            "thread-create_react_agent", "2026-12-02T18:47:32.953Z",
            "2026-12-02T18:47:33.035Z")),
    # Strands: root `invoke_agent weather` per invocation (session.id from trace_attributes),
    # its `chat` spans carry cache reads but not reasoning (its OpenAI model drops them).
    "strands-agents": ("strands-agents-1.62.0/chat_traces_http-protobuf_decoded.json", billed(
        "strands-session-chat", "2026-12-02T18:47:41.550Z", "2026-12-02T18:47:43.512Z",
        reasoning=0)),
}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """One daemon per transport and one per order of single spans; every capture names
    sessions of its own, so one daemon takes them all."""
    started: dict[str, Daemon] = {}
    try:
        for name in TRANSPORTS + ORDERS:
            started[name] = Daemon(tmp_path_factory.mktemp(name), NOT_STALE).start()
        yield started
    finally:
        for daemon in started.values():
            daemon.kill()


def test_the_price_the_rows_assume_is_the_collectors() -> None:
    """CALL_CENTS is derived from gpt-5's list price; the collector's price data agrees."""
    pricer = Pricer({})
    assert pricer.cost_cents("gpt-5", "", INPUT - CACHED, CACHED, 0, OUTPUT) == pytest.approx(
        CALL_CENTS, rel=1e-9)
    assert pricer.cost_cents("gpt-5", "", INPUT, 0, 0, OUTPUT) == pytest.approx(
        CALL_CENTS_NO_CACHE, rel=1e-9)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_framework_gives_its_exact_row(daemons: dict[str, Daemon], case: str,
                                            transport: str) -> None:
    daemon = daemons[transport]
    name, expected = CASES[case]
    for item in exports(name):
        send(daemon, item, transport)
        send(daemon, item, transport)
    assert daemon.row(expected["id"]) == expected


def single_spans(item: Export) -> list[Export]:
    """An export split into one request per span, each with its resource and scope, in the
    export's order (the SDK's batch holds spans as they ended: children before parents)."""
    out: list[Export] = []
    for rs in item.body["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                out.append(Export(item.signal, {"resourceSpans": [
                    {**rs, "scopeSpans": [{**ss, "spans": [span]}]}]}))
    return out


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", list(CASES))
def test_each_framework_span_by_span_in_either_order(daemons: dict[str, Daemon], case: str,
                                                     order: str) -> None:
    """The same payloads, one span per request (as a small batch size or a slow run would
    send them), children first as they ended or roots first; each request twice."""
    daemon = daemons[order]
    name, expected = CASES[case]
    spans = [one for item in exports(name) for one in single_spans(item)]
    assert len(spans) > CALLS  # the captures hold agent, tool and chain spans besides calls
    for item in spans if order == "as-ended" else spans[::-1]:
        send(daemon, item, "http-protobuf")
        send(daemon, item, "http-protobuf")
    assert daemon.row(expected["id"]) == expected
