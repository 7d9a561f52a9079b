"""Sign-in sessions of the fleet view, held in memory (a restart signs everyone out).

A session id is 256 random bits (secrets), the only thing the cookie carries: it says nothing
about the token. A session remembers the name and hash of the token it was made from; every
request re-checks that this token is still in effect with the read role (collector.security.
Credentials.still_valid), so revoking a token (a reload) ends its sessions at once, and
signing out ends one. Each expires SESSION_TTL_S after sign-in whatever happens.

No I/O and no event loop: the clock is handed in.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A sign-in lasts this long; the cookie's Max-Age says the same to the browser.
SESSION_TTL_S = 12 * 3600
# Sessions held at most; beyond, the oldest go first (a flood of sign-ins cannot grow memory).
MAX_SESSIONS = 10_000
SESSION_ID_BYTES = 32


@dataclass(frozen=True, slots=True)
class WebSession:
    token_name: str
    token_digest: bytes = field(repr=False)
    expires_at: float  # on the store's clock


class WebSessions:
    def __init__(self, *, ttl_s: float = SESSION_TTL_S, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        # Insertion order is creation order: the first entries are the oldest.
        self._sessions: dict[str, WebSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, token_name: str, token_digest: bytes) -> str:
        """A new session's id (for the cookie)."""
        self._prune()
        while len(self._sessions) >= self._max:
            del self._sessions[next(iter(self._sessions))]
        session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
        self._sessions[session_id] = WebSession(token_name, token_digest,
                                                self._clock() + self._ttl_s)
        return session_id

    def get(self, session_id: str) -> WebSession | None:
        """The live session of this id, or None (unknown, expired or ended)."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires_at <= self._clock():
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def end_where(self, keep: Callable[[WebSession], bool]) -> int:
        """End every session `keep` says no to (a token revoked); returns how many ended."""
        ended = [sid for sid, session in self._sessions.items() if not keep(session)]
        for sid in ended:
            del self._sessions[sid]
        return len(ended)

    def _prune(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[sid]
