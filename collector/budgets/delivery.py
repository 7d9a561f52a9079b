"""Delivering recorded alerts from the outbox: at least once, with a stable id.

A crossing's outbox rows are written in the usage's transaction; this task only reads them
and POSTs. It owns its own database connection and HTTP session, so a slow or dead sink can
never hold the writer or an export. A row is leased before its POST (claimed_until_ns): a
second collector on the same database skips leased rows, and a process killed mid-POST
leaves a lease that lapses, after which the same id is sent again. That is the promise: the
sink may see one id more than once (it dedupes on the Idempotency-Key header or the body's
"id"); it never sees two ids for one crossing, and never none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from collector.budgets import backoff_s
from collector.config.budgets import AlertSink
from collector.store.base import StorageError
from collector.store.budgets import Claimed, Outbox

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# How long a claimed row is left to its claimant before another may send it: three POST
# timeouts, so only a dead claimant's rows are taken over, and a collector killed mid-POST
# has its alert sent again (by whichever collector runs next) within half a minute.
LEASE_S = 30.0
POST_TIMEOUT_S = 10.0
# Idle polling: crossings are rare, and a new one waits at most this long for its POST.
POLL_S = 1.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
MAX_RESPONSE_LOG_BYTES = 200


@dataclass(slots=True)
class DeliveryStats:
    """For /metrics and status: a dead sink shows as pending rows and failed attempts."""

    delivered: int = 0
    failed_attempts: int = 0
    last_success_ns: int = 0


class OutboxDelivery:
    """Start with `start()`, stop with `stop()` (safe if never started, and again).

    Every call on the outbox, its close included, runs on one thread of its own, one after
    another. Cancelling the task does not stop a call already running on a thread (a claim
    waiting for the database's write lock, say); with the calls on a shared pool, stop()
    closed the connection beside such a claim, and the daemon crashed (SIGSEGV) on its way
    out. On one thread the close waits for it."""

    def __init__(self, outbox: Outbox, sinks: tuple[AlertSink, ...], *,
                 poll_s: float = POLL_S, lease_s: float = LEASE_S,
                 backoff_base_s: float = BACKOFF_BASE_S,
                 backoff_cap_s: float = BACKOFF_CAP_S) -> None:
        self._outbox = outbox
        self._sinks = {s.name: s for s in sinks}
        self._poll_s = poll_s
        self._lease_ns = int(lease_s * 1e9)
        self._base_s = backoff_base_s
        self._cap_s = backoff_cap_s
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alert-outbox")
        self._stopped = False
        self._unreadable = 0  # consecutive failed reads: logged once, then on recovery
        self.stats = DeliveryStats()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alert-delivery")

    async def stop(self) -> None:
        if self._stopped:
            return  # a second call would hand the closed outbox to a thread that is gone
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._call(self._outbox.close)  # after any call still running: one thread
        self._thread.shutdown(wait=False)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _settle(self, alert_id: str, delivered: bool, attempts: int) -> None:
        now = time.time_ns()
        if delivered:
            self._outbox.delivered(alert_id, attempts, now)
        else:
            delay = backoff_s(attempts, base_s=self._base_s, cap_s=self._cap_s,
                              jitter=random.random())
            self._outbox.failed(alert_id, attempts, now + int(delay * 1e9))

    def pending(self) -> int:
        """Alerts not yet delivered (blocks: for tests and the CLI, not the event loop)."""
        return self._outbox.pending()

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    claimed = await self._call(self._outbox.claim, time.time_ns(),
                                               self._lease_ns)
                except StorageError as exc:
                    self._unreadable += 1
                    if self._unreadable == 1:
                        log.warning("alert outbox unreadable (%s): %s",
                                    self._outbox.description, exc)
                    claimed = None
                else:
                    if self._unreadable:
                        log.info("alert outbox readable again after %d failed reads",
                                 self._unreadable)
                        self._unreadable = 0
                if claimed is None:
                    await asyncio.sleep(self._poll_s)
                    continue
                await self._deliver(http, claimed)

    async def _deliver(self, http: aiohttp.ClientSession, claimed: Claimed) -> None:
        attempts = claimed.attempts + 1
        sink = self._sinks.get(claimed.sink)
        ok = False
        if sink is not None:  # a sink removed from the config: its rows wait for it
            ok = await self._post(http, sink, claimed.id, claimed.payload)
        try:
            await self._call(self._settle, claimed.id, ok, attempts)
        except StorageError as exc:
            # The lease lapses and the same id is sent again: at least once, never lost.
            log.warning("alert %s sent but not settled: %s", claimed.id, exc)
        if sink is None:
            return
        if ok:
            self.stats.delivered += 1
            self.stats.last_success_ns = time.time_ns()
        else:
            self.stats.failed_attempts += 1

    async def _post(self, http: aiohttp.ClientSession, sink: AlertSink, alert_id: str,
                    payload: str) -> bool:
        headers = {**sink.headers, "Content-Type": "application/json",
                   "Idempotency-Key": alert_id}
        if sink.secret is not None:
            headers["Authorization"] = f"Bearer {sink.secret}"
        try:
            async with http.post(sink.url, data=payload.encode("utf-8"),
                                 headers=headers) as response:
                if 200 <= response.status < 300:
                    return True
                log.warning("alert sink %s answered %d", sink.name, response.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Never the URL: a Slack webhook's path is its credential.
            log.warning("alert sink %s unreachable: %s", sink.name, type(exc).__name__)
        return False
