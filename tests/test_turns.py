"""Turns across a trace (collector.accounting.turns), as pure functions, and what the mapping
gives them: each span's role and the root spans that are no usage."""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

from collector.accounting.pricing import Pricer
from collector.accounting.turns import (
    COUNTED,
    NAMED,
    ROOT_PREFIX,
    ROOTED,
    USAGE,
    decide_turns,
    earlier_root,
    first_session,
    root_row_id,
    stored_root,
)
from collector.signals.traces import (
    ROLE_CALL,
    ROLE_NAMED,
    ROLE_OWN,
    ROLE_TURN,
    MappingOptions,
    MappingResult,
    SpanUsage,
    TraceRoot,
    map_request,
)
from tests.conftest import MS, SECOND, T0, make_span

TRACE = bytes(range(16))


def record(span: int, session: str, role: int, *, start: int = T0, end: int | None = None,
           turns: int | None = None, prompt: int = 0) -> SpanUsage:
    end = start + MS if end is None else end
    key = end.to_bytes(8, "big") + TRACE + span.to_bytes(8, "big")
    mapped = (0 if role == ROLE_CALL else 1) if turns is None else turns
    return SpanUsage(key, session, start, end, mapped, prompt, 0, 0, 0, 0, 0.0, True, None,
                     None, None, None, None, role=role)


def root(span: int = 1, *, start: int = T0 - SECOND, end: int = T0 + 10 * SECOND) -> TraceRoot:
    return TraceRoot(end.to_bytes(8, "big") + TRACE + span.to_bytes(8, "big"), start, end)


def turns_by_session(out: list[SpanUsage]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for r in out:
        sums[r.session_id] = sums.get(r.session_id, 0) + r.turns
    return sums


def test_nested_agent_spans_of_one_session_are_one_turn_the_outermost_takes_it() -> None:
    inner = record(3, "s", ROLE_TURN, start=T0 + 2 * MS)
    outer = record(2, "s", ROLE_TURN, start=T0)
    out, states = decide_turns({}, [inner, outer], None)
    assert turns_by_session(out) == {"s": 1}
    assert [r.turns for r in out if r.key == outer.key] == [1]
    assert states == {"s": COUNTED}


def test_a_workflow_agent_arriving_after_its_agent_adds_no_turn() -> None:
    """OpenAI Agents SDK through OpenInference: the agent's AGENT span ends (and is exported)
    before the workflow's root AGENT span."""
    out, states = decide_turns({}, [record(2, "s", ROLE_TURN), record(5, "s", ROLE_CALL)],
                               None)
    assert turns_by_session(out) == {"s": 1}
    out, later = decide_turns(states, [record(1, "s", ROLE_TURN, start=T0 - MS)], None)
    assert turns_by_session(out) == {"s": 0}
    assert later == {}  # nothing new to store


def test_a_sub_agent_naming_its_own_session_is_that_sessions_turn() -> None:
    out, states = decide_turns({}, [record(2, "outer", ROLE_TURN),
                                    record(3, "inner", ROLE_TURN, start=T0 + MS)], None)
    assert turns_by_session(out) == {"outer": 1, "inner": 1}
    assert states == {"outer": COUNTED, "inner": COUNTED}


def test_graph_nodes_marked_agent_under_a_chain_root_are_one_turn_with_the_roots_times() -> None:
    """LangGraph's create_react_agent through OpenInference: each model step runs in a graph
    node `agent` (kind AGENT); the invocation's root is a CHAIN span."""
    nodes = [record(10 + i, "s", ROLE_TURN, start=T0 + i * SECOND) for i in range(3)]
    calls = [record(20 + i, "s", ROLE_CALL, start=T0 + i * SECOND, prompt=100)
             for i in range(3)]
    out, states = decide_turns({}, nodes + calls, root())
    assert turns_by_session(out) == {"s": 1}
    [times] = [r for r in out if r.key.startswith(root().key)]
    assert (times.turns, times.start_ns, times.end_ns) == (0, T0 - SECOND, T0 + 10 * SECOND)
    assert states == {"s": COUNTED | USAGE | ROOTED}


def test_a_chain_root_without_agent_spans_is_the_turn_when_it_arrives_last() -> None:
    """LangGraph's create_agent: no AGENT span at all; the root arrives in a later request."""
    out, states = decide_turns({}, [record(5, "s", ROLE_CALL, prompt=10),
                                    record(6, "s", ROLE_CALL, prompt=20)], None)
    assert turns_by_session(out) == {"s": 0}
    assert states == {"s": USAGE}
    out, states = decide_turns(states, [], root())
    assert [(r.session_id, r.turns, r.start_ns, r.end_ns) for r in out] == [
        ("s", 1, T0 - SECOND, T0 + 10 * SECOND)]
    assert states == {"s": USAGE | ROOTED | COUNTED}
    # The same root again (an exporter's retry), or a late call: no second turn.
    out, again = decide_turns(states, [record(7, "s", ROLE_CALL)], root())
    assert turns_by_session(out) == {"s": 0}
    assert again == {}


def test_a_root_is_no_turn_of_a_session_its_trace_only_named() -> None:
    out, states = decide_turns({}, [record(5, "d", ROLE_NAMED, turns=1)], root())
    assert [(r.session_id, r.turns) for r in out] == [("d", 1)]  # the dialect's own turn
    assert states == {"d": NAMED}


def test_a_trace_without_any_state_gives_the_root_nothing() -> None:
    assert decide_turns({}, [], root()) == ([], {})


def test_the_first_session_named_is_the_earliest_seen() -> None:
    assert first_session([("b", 5), ("a", 7), ("c", 5)]) == "b"
    assert first_session([]) is None


# -- what the mapping gives: roles and roots ------------------------------------------------

OPTIONS = MappingOptions(pricer=Pricer({}, use_library=False))


def mapped(*spans: Any) -> MappingResult:
    return map_request(encode_spans(list(spans)), OPTIONS, now_ns=T0)


def test_roles_follow_what_a_span_is_and_where_it_sits() -> None:
    agent = {"session.id": "s", "openinference.span.kind": "AGENT"}
    call = {"session.id": "s", "openinference.span.kind": "LLM",
            "llm.token_count.prompt": 5}
    other = {"session.id": "s", "gen_ai.usage.input_tokens": 5}
    result = mapped(make_span(span_id=1, attrs=agent),
                    make_span(span_id=2, parent_id=1, attrs=agent),
                    make_span(span_id=3, parent_id=2, attrs=call),
                    make_span(span_id=4, trace_id=2, attrs=call),
                    make_span(span_id=5, trace_id=3, parent_id=9, attrs=other),
                    make_span(span_id=6, trace_id=4, attrs=other))
    assert [(r.role, r.turns) for r in result.records] == [
        (ROLE_TURN, 1), (ROLE_TURN, 1), (ROLE_CALL, 0), (ROLE_OWN, 1), (ROLE_TURN, 1),
        (ROLE_OWN, 1)]
    assert result.roots == []


def test_a_root_span_that_is_no_usage_is_a_root_with_its_times() -> None:
    result = mapped(
        make_span(span_id=1, name="LangGraph", start=T0, end=T0 + 5 * SECOND,
                  attrs={"openinference.span.kind": "CHAIN", "session.id": "s"}),
        make_span(span_id=2, trace_id=2, name="SessionPrompt.prompt", start=T0,
                  end=T0 + SECOND),
        make_span(span_id=3, trace_id=3, parent_id=1, name="tool"))
    assert result.roots == [
        TraceRoot((T0 + 5 * SECOND).to_bytes(8, "big") + (1).to_bytes(16, "big")
                  + (1).to_bytes(8, "big"), T0, T0 + 5 * SECOND),
        TraceRoot((T0 + SECOND).to_bytes(8, "big") + (2).to_bytes(16, "big")
                  + (2).to_bytes(8, "big"), T0, T0 + SECOND)]
    assert result.records == []


def test_a_remembered_root_round_trips_and_is_never_a_session() -> None:
    """The row remembering a root cannot be taken for a session's (ids are printable), and
    gives back the same root, so usage arriving after it gets its turn and times."""
    root = TraceRoot(bytes(range(32)), 5, 9)
    row_id = root_row_id(root)
    assert row_id.startswith(ROOT_PREFIX) and not row_id.isprintable()
    assert stored_root(row_id) == root
    assert stored_root("session-1") is None
    later = TraceRoot(bytes([1]) + bytes(31), 1, 2)
    assert earlier_root(later, root) == root and earlier_root(None, later) == later
