"""Which spans are a turn: one invocation of the agent by its user. Pure.

A user's invocation of an agent is one trace: its outermost agent span, or, when the trace has
no agent span, its root span. Frameworks nest agent spans freely (a workflow span around the
agent, sub-agents, handoffs, graph nodes an instrumentation marks AGENT), and every span of a
trace arrives on its own schedule (children first, the root last, perhaps in another request
or to another collector), so a turn is decided per trace and session, not per span:

* a turn span (an agent span, or a span with tokens of no known kind; ROLE_TURN) is the turn
  of its trace in its session unless one was counted for that (trace, session) already; the
  first to arrive takes it, the others are part of it. A sub-agent naming a session of its
  own is its own session's turn;
* a model call inside a trace (ROLE_CALL) says the trace carried usage in its session;
* a dialect's span under a parent (ROLE_NAMED) keeps its dialect's turns; it only tells
  which session the trace named, for its spans that name none (collector.store.base);
* the trace's root span, when it is not usage itself (a workflow or graph span, an HTTP
  request), is the turn of every session the trace carried usage in and no turn span
  counted, and its times are the turn's: they widen each such session's created_at and
  last_active_at once;
* a root span that is usage itself (a model call without a parent; ROLE_OWN) counts its own
  turn at once: it is the whole trace, and nothing needs to be remembered about it.

What is known of a trace is its state per session (collector_trace_turns, in the flush
transaction, under the trace's lock): COUNTED, USAGE and ROOTED bits. Every decision only
sets bits, so a retried span (already deduplicated by its key) or a retried root (not a
record; its bits are set) never counts twice.

A root is remembered too, in a row of its own beside the sessions' (ROOT_PREFIX, which no
session id can start with: those are printable), because it may arrive before the usage of
its trace (a graph's root ends last, but a child's export can be retried after the root's
went through, or spans be sent one by one): usage that arrives later, in a session the root
has not counted yet, is given the root's turn and times then.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from collector.signals.traces import ROLE_CALL, ROLE_TURN, SpanUsage, TraceRoot

# A (trace, session)'s state bits.
COUNTED = 1  # its turn was counted (by a turn span or by the root)
USAGE = 2  # the trace carried usage in this session
ROOTED = 4  # the root's times were added to the session
NAMED = 8  # a span of the trace named the session (a dialect's, whose turns are its own)
ROOT_SEEN = 16  # the state of a remembered root's own row
# A remembered root's row: its session_id is this prefix, then its key (hex), start and end.
ROOT_PREFIX = "\x01root "


def root_record(root: TraceRoot, session_id: str, turns: int) -> SpanUsage:
    """The root's contribution to one session: its turn (or none) and its times. The key is
    the root's, extended by the session, so it never meets a span's key."""
    return SpanUsage(root.key + session_id.encode(), session_id, root.start_ns, root.end_ns,
                     turns, 0, 0, 0, 0, 0, 0.0, True, None, None, None, None, None)


def root_row_id(root: TraceRoot) -> str:
    """The session_id column of the row that remembers a trace's root."""
    return f"{ROOT_PREFIX}{root.key.hex()} {root.start_ns} {root.end_ns}"


def stored_root(session_id: str) -> TraceRoot | None:
    """The root a row remembers, or None when the row is a session's state."""
    if not session_id.startswith(ROOT_PREFIX):
        return None
    key, start, end = session_id[len(ROOT_PREFIX):].split(" ")
    return TraceRoot(bytes.fromhex(key), int(start), int(end))


def earlier_root(a: TraceRoot | None, b: TraceRoot | None) -> TraceRoot | None:
    """One root per trace, the same whichever arrived first (the first by key)."""
    if a is None or (b is not None and b.key < a.key):
        return b
    return a


def decide_turns(stored: Mapping[str, int], records: Iterable[SpanUsage],
                 root: TraceRoot | None) -> tuple[list[SpanUsage], dict[str, int]]:
    """One trace's records with a role (each with its final turns) plus the root's records,
    and the states that changed. `stored`: the trace's state per session before this batch;
    `records`: its new records with a role, accounted once each (their keys deduplicated)."""
    state = dict(stored)
    out: list[SpanUsage] = []
    # The earliest-starting turn span of a session takes its turn: the outermost of those
    # that arrive together.
    for record in sorted(records, key=lambda r: (r.start_ns, r.key)):
        bits = state.get(record.session_id, 0)
        if record.role == ROLE_TURN:
            if bits & COUNTED:
                record = record._replace(turns=0)
            elif record.turns:
                bits |= COUNTED
        elif record.role == ROLE_CALL:
            bits |= USAGE
        else:
            bits |= NAMED
        state[record.session_id] = bits
        out.append(record)
    if root is not None:
        for session_id in sorted(state):
            bits = state[session_id]
            if bits & ROOTED or not bits & (USAGE | COUNTED):
                continue
            out.append(root_record(root, session_id, 0 if bits & COUNTED else 1))
            state[session_id] = bits | ROOTED | COUNTED
    changed = {s: bits for s, bits in state.items() if stored.get(s) != bits}
    return out, changed


def first_session(states: Iterable[tuple[str, int]]) -> str | None:
    """The session a trace's spans named first, from its states as (session, seen_ns): what a
    held span whose chain reached the root without a session takes when no link names one
    (its trace's model calls named theirs before anything was held)."""
    best: tuple[int, str] | None = None
    for session_id, seen_ns in states:
        if best is None or (seen_ns, session_id) < best:
            best = (seen_ns, session_id)
    return None if best is None else best[1]
