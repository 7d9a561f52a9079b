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
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from collector.budgets import backoff_s
from collector.config.budgets import AlertSink

log = logging.getLogger(__name__)

# How long a claimed row is left to its claimant before another may send it: well beyond
# the POST timeout, so only a dead claimant's rows are taken over.
LEASE_S = 60.0
POST_TIMEOUT_S = 10.0
# Idle polling: crossings are rare, and a new one waits at most this long for its POST.
POLL_S = 1.0
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0
MAX_RESPONSE_LOG_BYTES = 200

_CLAIM = """
UPDATE collector_alert_outbox SET claimed_until_ns = ?
WHERE id = (SELECT id FROM collector_alert_outbox
            WHERE delivered_ns IS NULL AND next_attempt_ns <= ? AND claimed_until_ns <= ?
            ORDER BY created_ns, id LIMIT 1)
RETURNING id, sink, payload, attempts
"""


@dataclass(slots=True)
class DeliveryStats:
    """For /metrics and status: a dead sink shows as pending rows and failed attempts."""

    delivered: int = 0
    failed_attempts: int = 0
    last_success_ns: int = 0


class OutboxDelivery:
    """Start with `start()`, stop with `stop()` (safe if never started)."""

    def __init__(self, path: Path, sinks: tuple[AlertSink, ...], *,
                 poll_s: float = POLL_S, lease_s: float = LEASE_S,
                 backoff_base_s: float = BACKOFF_BASE_S,
                 backoff_cap_s: float = BACKOFF_CAP_S) -> None:
        self._path = path
        self._sinks = {s.name: s for s in sinks}
        self._poll_s = poll_s
        self._lease_ns = int(lease_s * 1e9)
        self._base_s = backoff_base_s
        self._cap_s = backoff_cap_s
        self._task: asyncio.Task[None] | None = None
        self.stats = DeliveryStats()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alert-delivery")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 2000")
        return db

    def _claim(self) -> tuple[str, str, str, int] | None:
        now = time.time_ns()
        with self._db() as db:
            row = db.execute(_CLAIM, (now + self._lease_ns, now, now)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]), int(row[3]))

    def _settle(self, alert_id: str, delivered: bool, attempts: int) -> None:
        now = time.time_ns()
        with self._db() as db:
            if delivered:
                db.execute("UPDATE collector_alert_outbox SET delivered_ns = ?, "
                           "attempts = ?, claimed_until_ns = 0 WHERE id = ?",
                           (now, attempts, alert_id))
            else:
                delay = backoff_s(attempts, base_s=self._base_s, cap_s=self._cap_s,
                                  jitter=random.random())
                db.execute("UPDATE collector_alert_outbox SET attempts = ?, "
                           "next_attempt_ns = ?, claimed_until_ns = 0 WHERE id = ?",
                           (attempts, now + int(delay * 1e9), alert_id))

    def pending(self) -> int:
        with self._db() as db:
            row = db.execute("SELECT count(*) FROM collector_alert_outbox "
                             "WHERE delivered_ns IS NULL").fetchone()
        return int(row[0])

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                try:
                    claimed = await asyncio.to_thread(self._claim)
                except sqlite3.Error as exc:
                    log.warning("alert outbox unreadable: %s", exc)
                    claimed = None
                if claimed is None:
                    await asyncio.sleep(self._poll_s)
                    continue
                alert_id, sink_name, payload, attempts = claimed
                sink = self._sinks.get(sink_name)
                if sink is None:  # a sink removed from the config: its rows wait for it
                    await asyncio.to_thread(self._settle, alert_id, False, attempts + 1)
                    continue
                ok = await self._post(http, sink, alert_id, payload)
                await asyncio.to_thread(self._settle, alert_id, ok, attempts + 1)
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
