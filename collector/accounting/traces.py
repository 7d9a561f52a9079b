"""Which session usage without a session id belongs to: resolved across its trace. Pure.

Children end, and are exported, before their parents, so a model call whose span names no
session usually arrives before the agent span that does. Such usage is held (on disk, by the
store) with its span's parent id; spans that name a session, and spans that link a held span
to an ancestor further up, are remembered as trace links. This module decides, from what is
known of one trace, where each held span goes:

* its nearest ancestor that names a session;
* when its chain of ancestors is complete (it reaches the trace's root) without one, any span
  of the trace that names a session: the one remembered first;
* while its chain is broken (an ancestor not seen yet) it waits: that ancestor may name a
  nearer session than any known now (a sub-agent inside another agent's trace);
* once the wait is over (`expired`), any span of the trace naming a session, else the session
  whose id is the trace id as 32 lowercase hex digits.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

# Longest chain of ancestors followed; a cycle (a malformed trace) stops the walk earlier.
MAX_ANCESTORS = 1024


class Node(NamedTuple):
    """A span known in a trace: its parent and the session it names (None if none)."""

    parent_id: bytes
    session_id: str | None


class Waiting(NamedTuple):
    """A held span to resolve: its identity (`key`), ids and whether its wait is over."""

    key: bytes
    span_id: bytes
    parent_id: bytes
    expired: bool


class Resolved(NamedTuple):
    key: bytes
    session_id: str
    by_window: bool  # resolved by the end of the wait, not by a span naming the session


def trace_session_id(trace_id: bytes) -> str:
    """The session of usage whose trace never named one."""
    return trace_id.hex()


def resolve_trace(trace_id: bytes, nodes: dict[bytes, Node], first_session: str | None,
                  waiting: Iterable[Waiting]) -> list[Resolved]:
    """The held spans of one trace that can be resolved now. `nodes`: the trace's known spans
    by span id (links and the held spans themselves); `first_session`: the session of the
    trace's first remembered span naming one."""
    resolved: list[Resolved] = []
    for held in waiting:
        session, complete = nearest_session(nodes, held.parent_id)
        if session is None and complete:
            session = first_session
        if session is not None:
            resolved.append(Resolved(held.key, session, False))
        elif held.expired:
            resolved.append(Resolved(held.key, first_session or trace_session_id(trace_id),
                                     True))
    return resolved


def nearest_session(nodes: dict[bytes, Node], parent_id: bytes) -> tuple[str | None, bool]:
    """(session of the nearest ancestor naming one, whether the chain reached the root)."""
    visited: set[bytes] = set()
    current = parent_id
    for _ in range(MAX_ANCESTORS):
        if not current:
            return None, True
        node = nodes.get(current)
        if node is None or current in visited:
            return None, False
        if node.session_id is not None:
            return node.session_id, True
        visited.add(current)
        current = node.parent_id
    return None, False
