"""OTLP metric points -> usage, for dialects whose source of truth is their metrics. Pure.

Metrics carry no per-call id, so an agent's metric points are usage only when its dialect says
metrics are the source (`source = "metrics"`); otherwise they repeat what its logs or spans
report and are counted as received and ignored.

A point adds its value to one field (a token count or the cost), per the dialect's rule for its
metric. Delta points are usage as they are. A cumulative point's usage is its difference from
the last value stored for its series: that needs the database, so it leaves the mapping as a
`CumulativePoint` and the store turns it into a usage event in the flush transaction (so a
restart neither loses nor doubles anything, and several collectors agree).

Pricing is linear per point: each unit of a field costs its model's base rate for that field
(a cached token in an input that includes cache costs the cache rate minus the input rate).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from collector.dialects.model import COST_USD, METRICS, Dialect, MetricRule
from collector.signals import values
from collector.signals.records import (
    CENTS_PER_USD,
    NO_TIME_PREFIX,
    Record,
    attributes_of,
    content_key,
    digest,
    labels_of,
    model_of,
    session_of,
    usage,
)
from collector.signals.scan import service_name
from collector.signals.traces import NO_LABELS, Labels, MappingOptions, MappingResult, SpanUsage

DELTA = 1  # AggregationTemporality values of the OTLP metrics protocol
CUMULATIVE = 2


class Unit(NamedTuple):
    """What one unit of a point's value adds: token multipliers and cents."""

    prompt: int
    completion: int
    reasoning: int
    cache_read: int
    cache_write: int
    cost_cents: float
    priced: bool


class CumulativePoint(NamedTuple):
    """A cumulative point waiting for its series' last stored value (see the store)."""

    series: bytes  # KEY_BYTES: identifies the series (metric, resource, point attributes)
    start_ns: int
    time_ns: int
    value: float
    is_cost: bool
    unit: Unit
    session_id: str
    model: str | None
    key: bytes  # the usage event's key once resolved
    labels: Labels = NO_LABELS  # who spends
    credential: str | None = None  # the token that carried it, as on SpanUsage


def map_metrics_request(request: Any, options: MappingOptions, now_ns: int) -> MappingResult:
    """Map an ExportMetricsServiceRequest; `result.spans` counts the data points received."""
    result = MappingResult()
    dialects = options.dialects
    for rm in request.resource_metrics:
        service = service_name(rm.resource.attributes)
        resource: dict[str, Any] | None = None
        for sm in rm.scope_metrics:
            dialect = dialects.find(service, sm.scope.name)
            for metric in sm.metrics:
                kind = metric.WhichOneof("data")
                if kind is None:
                    continue
                data = getattr(metric, kind)
                points = data.data_points
                result.spans += len(points)
                rule = None if dialect is None or dialect.source != METRICS \
                    else dialect.metrics.get(metric.name)
                temporality = getattr(data, "aggregation_temporality", 0)
                if rule is None or kind not in ("sum", "histogram") \
                        or temporality not in (DELTA, CUMULATIVE):
                    result.ignored += len(points)
                    continue
                assert dialect is not None
                if resource is None:
                    try:
                        resource = attributes_of(rm.resource.attributes, options, "resource")
                    except values.InvalidRecord as exc:
                        for _ in points:
                            result.reject(str(exc))
                        continue
                for index, point in enumerate(points):
                    ref = f"data point {index} of metric {metric.name!r}"
                    try:
                        _map_point(dialect, rule, kind, temporality, metric.name, point,
                                   resource, options, now_ns, ref, result)
                    except values.InvalidRecord as exc:
                        result.reject(str(exc))
    return result


def _map_point(dialect: Dialect, rule: MetricRule, kind: str, temporality: int, name: str,
               point: Any, resource: dict[str, Any], options: MappingOptions, now_ns: int,
               ref: str, result: MappingResult) -> None:
    attributes = attributes_of(point.attributes, options, ref)
    field = rule.field_for(attributes)
    if field is None:
        result.ignored += 1
        return
    record = Record(METRICS, (name,), attributes, resource, b"", b"",
                    point.start_time_unix_nano, point.time_unix_nano,
                    name.encode() + point.SerializeToString(deterministic=True), ref)
    session = session_of(dialect, record, options)
    if session is None:
        result.ignored += 1
        return
    if kind == "histogram":
        raw: Any = point.sum
    else:
        raw = point.as_int if point.WhichOneof("value") == "as_int" else point.as_double
    is_cost = field == COST_USD
    amount: float = values.cost_usd(raw, name, ref) if is_cost else float(
        values.count(raw, name, ref))
    model = model_of(dialect, record, options)
    unit = unit_of(dialect, field, model or "", options, priced=not dialect.metric_cost)
    labels = labels_of(dialect, record, options)
    if temporality == CUMULATIVE:
        series = NO_TIME_PREFIX + digest(
            "series", dialect.name, name, repr(sorted(attributes.items(), key=_key)),
            repr(sorted(resource.items(), key=_key)))
        result.cumulative.append(CumulativePoint(
            series, point.start_time_unix_nano, point.time_unix_nano, amount, is_cost, unit,
            session, model, content_key(record), labels))
        return
    event = scaled(unit, amount, is_cost, content_key(record), session,
                   record.start_ns or record.end_ns or now_ns, record.end_ns or now_ns, model,
                   labels)
    result.take(event)


def _key(item: tuple[str, Any]) -> str:
    return item[0]


def unit_of(dialect: Dialect, field: str, model: str, options: MappingOptions, *,
            priced: bool) -> Unit:
    """What one unit of `field` adds under the dialect's cache and reasoning semantics."""
    if field == COST_USD:
        return Unit(0, 0, 0, 0, 0, CENTS_PER_USD, True)
    rates = options.pricer.rates_for(model) if priced and model else None
    known = rates is not None or not priced
    r_in = rates.input if rates else 0.0
    r_out = rates.output if rates else 0.0
    if field == "input":
        return Unit(1, 0, 0, 0, 0, r_in, known)
    if field == "output":
        return Unit(0, 1, 0, 0, 0, r_out, known)
    if field == "reasoning":
        if dialect.reasoning_in_output:
            return Unit(0, 0, 1, 0, 0, 0.0, True)
        return Unit(0, 1, 1, 0, 0, r_out, known)
    rate = (rates.cache_read if field == "cache_read" else rates.cache_write) if rates else 0.0
    read, write = (1, 0) if field == "cache_read" else (0, 1)
    if dialect.input_includes_cache:
        return Unit(0, 0, 0, read, write, rate - r_in, known)
    return Unit(1, 0, 0, read, write, rate, known)


def scaled(unit: Unit, amount: float, is_cost: bool, key: bytes, session: str, start: int,
           end: int, model: str | None, labels: Labels = NO_LABELS
           ) -> SpanUsage:
    """The usage event of `amount` units (a delta point's value, or a cumulative point's
    difference from its series' last value)."""
    if is_cost:
        return usage(key, session, start, end, cost=amount * CENTS_PER_USD, model=model,
                     labels=labels)
    n = int(amount)
    return usage(key, session, start, end, prompt=unit.prompt * n,
                 completion=unit.completion * n, reasoning=unit.reasoning * n,
                 cache_read=unit.cache_read * n, cache_write=unit.cache_write * n,
                 cost=unit.cost_cents * n, priced=unit.priced, model=model, labels=labels)
