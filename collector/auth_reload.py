"""Tokens added or revoked without a restart: [auth] is read again on SIGHUP and when the
config file or a token file changes (a stat every RELOAD_CHECK_S: mtime, size and inode).

A reload that fails (bad TOML, a missing token file, a duplicate name, or one that would turn
authentication on or off) changes nothing: the tokens in effect stay, and the error is logged
naming the key and the file. The same bad files are not tried again until one changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from collector.config import ConfigError
from collector.config.auth import AuthConfig, load_auth
from collector.security import Credentials, ReloadRefused

log = logging.getLogger(__name__)

# How often the files are looked at: a stat each, cheap beside anything else the daemon does.
RELOAD_CHECK_S = 1.0

Signature = tuple[tuple[str, int, int, int], ...]


def signature(paths: tuple[Path, ...]) -> Signature:
    """What changes when a file is edited, replaced or removed."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out.append((str(path), -1, -1, -1))
            continue
        out.append((str(path), st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class TokenReloader:
    def __init__(self, config_path: Path, auth: AuthConfig, credentials: Credentials, *,
                 on_reload: Callable[[], object] | None = None,
                 check_every_s: float = RELOAD_CHECK_S) -> None:
        """`on_reload`: called after the new tokens are in effect (the fleet view ends the
        sign-in sessions of revoked tokens)."""
        self._path = config_path
        self._credentials = credentials
        self._on_reload = on_reload
        self._every = check_every_s
        self._watched = (config_path, *auth.files)
        self._seen = signature(self._watched)
        self.reloads = 0  # reloads that took effect
        self.failures = 0

    def reload(self, reason: str) -> bool:
        """Read [auth] again; True when the new tokens took effect."""
        try:
            auth = load_auth(self._path)
            self._credentials.replace(auth)
        except (ConfigError, ReloadRefused) as exc:
            self.failures += 1
            self._seen = signature(self._watched)  # not again until a file changes
            log.error("tokens not reloaded (%s), the %d in effect stay: %s", reason,
                      len(self._credentials.names), exc)
            return False
        self._watched = (self._path, *auth.files)
        self._seen = signature(self._watched)
        self.reloads += 1
        log.info("tokens reloaded (%s): %d in effect: %s", reason, len(auth.tokens),
                 ", ".join(self._credentials.names) or "none")
        if self._on_reload is not None:
            self._on_reload()
        return True

    def changed(self) -> bool:
        return signature(self._watched) != self._seen

    async def watch(self) -> None:
        """Reload whenever a watched file changes; runs until cancelled."""
        while True:
            await asyncio.sleep(self._every)
            if self.changed():
                self.reload("a file changed")


async def stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
