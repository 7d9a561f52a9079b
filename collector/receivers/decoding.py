"""Large OTLP/JSON bodies are decoded on a worker thread, not on the event loop.

Measured (bench machine, one core): OTLP/JSON decodes at about 0.37 us a byte, so the largest
body (16 MiB) held the loop for over 6 s, and every health check, scrape and small export
waited behind it. On a thread it costs the loop nothing but the GIL's switch interval: the
decoding is mostly Python code (json_format.ParseDict), which hands the GIL back every few
milliseconds. The one part that keeps it is json.loads, a single C call (about 0.5 s for
16 MiB); the loop waits for that part, once per large body, not for the whole decode.

Protobuf stays on the loop: the largest body decodes in about 20 ms, in one C call that holds
the GIL whether on a thread or not, so a thread would add a hop and save nothing.

Below JSON_OFF_LOOP_BYTES a body decodes in a few milliseconds; the thread hop (tens of
microseconds) would cost more than it saves for the many small exports.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from collector.receivers.otlp import JSON, decode
from collector.signals import Signal

log = logging.getLogger(__name__)

JSON_OFF_LOOP_BYTES = 16 * 1024
# One thread: decoding is CPU-bound under the GIL, so a second would not decode faster; big
# bodies queue for it while small ones keep being decoded on the loop.
DECODE_THREADS = 1


@dataclass(slots=True)
class DecodeStats:
    in_progress: int = 0  # queued for or on the thread now
    done: int = 0


class Decoder:
    """decode() of collector.receivers.otlp, on a thread for large JSON bodies."""

    def __init__(self, stats: DecodeStats | None = None, *,
                 off_loop_bytes: int = JSON_OFF_LOOP_BYTES) -> None:
        self.stats = stats or DecodeStats()
        self._off_loop_bytes = off_loop_bytes
        self._executor: ThreadPoolExecutor | None = None

    async def decode(self, body: bytes, content_type: str,
                     signal: Signal) -> tuple[Any, bytes | None]:
        if content_type != JSON or len(body) < self._off_loop_bytes:
            return decode(body, content_type, signal)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=DECODE_THREADS,
                                                thread_name_prefix="collector-decode")
        stats = self.stats
        stats.in_progress += 1
        log.debug("decoding %d bytes of OTLP/JSON off the event loop", len(body))
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, decode, body, content_type, signal)
        finally:
            stats.in_progress -= 1
            stats.done += 1

    def close(self) -> None:
        """Drop what is queued (its requests are being answered at shutdown already)."""
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False, cancel_futures=True)
