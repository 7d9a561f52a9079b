"""Decoding each OTLP signal into usage events. Pure: values in, values out.

The names every layer shares live here, below the mapping, the receivers and the pipeline, so
none of them imports another to learn which signal a request carries.
"""

from __future__ import annotations

import enum
from typing import Any


class Signal(enum.Enum):
    """An OTLP signal; the value is its label in metrics and its name in OTLP paths."""

    TRACES = "traces"
    LOGS = "logs"
    METRICS = "metrics"

    @property
    def items(self) -> str:
        """What one request carries many of, for messages: "spans", "log records"..."""
        return _ITEMS[self]


_ITEMS = {Signal.TRACES: "spans", Signal.LOGS: "log records", Signal.METRICS: "data points"}
# Each Metric holds its points in exactly one of these (the `data` oneof of metrics.proto).
METRIC_DATA_FIELDS = ("gauge", "sum", "histogram", "exponential_histogram", "summary")


def count_items(signal: Signal, request: Any) -> int:
    """Spans, log records or data points in a decoded export request: what the per-request
    limit and the refusal counters count, before any mapping runs."""
    if signal is Signal.TRACES:
        return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
    if signal is Signal.LOGS:
        return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)
    points = 0
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                which = metric.WhichOneof("data")
                if which is not None:
                    points += len(getattr(metric, which).data_points)
    return points
