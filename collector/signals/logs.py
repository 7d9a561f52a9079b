"""Log record -> usage mapping. Pure: values in, values out; no I/O, no event loop.

Interim body: the agents' log dialects (issue 9) replace it. Until then no log record is read
as usage: each is received and counted as ignored, so an agent's logs are answered success
(exporters neither log errors nor drop data) and show in /metrics, and nothing is guessed.
"""

from __future__ import annotations

from typing import Any

from collector.signals import Signal, count_items
from collector.signals.traces import MappingOptions, MappingResult


def map_logs_request(request: Any, options: MappingOptions, now_ns: int) -> MappingResult:
    """Map an ExportLogsServiceRequest to usage records (none yet: every record is ignored)."""
    records = count_items(Signal.LOGS, request)
    return MappingResult(spans=records, ignored=records)
