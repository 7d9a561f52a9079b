"""Metric data point -> usage mapping. Pure: values in, values out; no I/O, no event loop.

Interim body: the agents' metric dialects (issue 9), with delta and cumulative accounting,
replace it. Until then no data point is read as usage: each is received and counted as
ignored, so an agent's metrics are answered success and show in /metrics, and nothing is
guessed.
"""

from __future__ import annotations

from typing import Any

from collector.signals import Signal, count_items
from collector.signals.traces import MappingOptions, MappingResult


def map_metrics_request(request: Any, options: MappingOptions, now_ns: int) -> MappingResult:
    """Map an ExportMetricsServiceRequest to usage records (none yet: every point is ignored)."""
    points = count_items(Signal.METRICS, request)
    return MappingResult(spans=points, ignored=points)
