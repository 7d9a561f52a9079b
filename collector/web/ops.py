"""The operations endpoint: `/metrics` (Prometheus), `/healthz` and `/readyz`.

It listens on its own address (`[ops] endpoint`, loopback by default), apart from the OTLP
receivers: a scrape or a probe never competes with exports for a port, auth or body limits.

Metrics cost nothing on the export path: the pipeline already keeps plain counters (`Stats`),
and a custom collector turns them into metric families when Prometheus scrapes. The only
values observed as they happen are the two flush histograms, once per flush. Sessions by status
come from the database at scrape time (an index-only count on a read-only connection, off the
event loop), because an upsert may change a session's status without the pipeline knowing
the old one. Budget spend and the alert outbox's pending rows are read the same way, in the
same refresh (collector.budgets.status, so /metrics, /api/budgets and `collector budgets`
agree); delivery counters come from the delivery task's own DeliveryStats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from collector import __version__
from collector.budgets.delivery import DeliveryStats
from collector.budgets.status import BudgetStatus, read_status
from collector.config import Endpoint
from collector.config.budgets import Budget
from collector.pipeline import ItemCounts, Pipeline, Stats
from collector.receivers.common import start_app
from collector.receivers.connections import Connections, ConnectionStats
from collector.receivers.decoding import DecodeStats
from collector.signals import Signal
from collector.signals.traces import STATUSES
from collector.store.base import Reader, Store

log = logging.getLogger(__name__)

# Flush duration: a healthy commit takes milliseconds; seconds mean a slow or contended disk.
FLUSH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                         5.0, 10.0)
# Session rows upserted by one flush.
FLUSH_ROWS_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000)
STOP_GRACE_S = 5.0


class OpsError(Exception):
    """The operations listener could not start (address in use, bad address)."""


@dataclass(frozen=True, slots=True)
class Gauges:
    """Point-in-time values read at scrape time, beside the counters."""

    pending_spans: int
    pending_sessions: int
    dedupe_window: int
    sessions_by_status: Mapping[str, int]


# Metric name stems per signal, as the OpenTelemetry Collector names its own receiver metrics.
ITEM_STEMS = {Signal.TRACES: "spans", Signal.LOGS: "log_records",
              Signal.METRICS: "data_points"}
_NOT_USAGE = {Signal.TRACES: " (no session id, tools, HTTP calls)",
              Signal.LOGS: " (most of an agent's log records)",
              Signal.METRICS: " (most of an agent's metrics)"}


def item_families(signal: Signal, counts: ItemCounts) -> list[Metric]:
    """received, rejected{reason}, unpriced and ignored for one signal's items."""
    stem = ITEM_STEMS[signal]
    noun = signal.items.capitalize()
    rejected = CounterMetricFamily(
        f"collector_{stem}_rejected",
        f"{noun} not accounted, by reason: invalid ones (their request was accepted) and those "
        f"in requests refused as a whole (overloaded, shutting_down, too_large)",
        labels=("reason",))
    rejected.add_metric(("invalid",), counts.rejected)
    for reason, count in sorted(counts.refused.items()):
        rejected.add_metric((reason,), count)
    return [
        CounterMetricFamily(f"collector_{stem}_received",
                            f"{noun} decoded from export requests that reached the mapping",
                            value=counts.received),
        rejected,
        CounterMetricFamily(f"collector_{stem}_unpriced",
                            f"{noun} with tokens but no known price (counted at cost 0)",
                            value=counts.unpriced),
        CounterMetricFamily(f"collector_{stem}_ignored",
                            f"{noun} that are not usage{_NOT_USAGE[signal]}",
                            value=counts.ignored),
    ]


def metric_families(stats: Stats, gauges: Gauges) -> list[Metric]:
    """Prometheus families for the pipeline's counters and gauges. Pure: values in, families out.

    Names follow Prometheus conventions: `collector_` prefix, `_total` on counters (added by
    the client library), base units, one label set per family.
    """

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, doc, value=value)

    requests = CounterMetricFamily(
        "collector_requests", "Export requests answered, by transport, signal (traces, logs, "
        "metrics; unknown for a path naming none) and outcome (ok, partial when some items were "
        "rejected, or the refusal's reason)",
        labels=("transport", "signal", "outcome"))
    for (transport, signal, outcome), count in sorted(stats.answers.items()):
        requests.add_metric((transport, signal, outcome), count)
    sessions = GaugeMetricFamily("collector_sessions", "Sessions in the database, by status",
                                 labels=("status",))
    for status in sorted({*STATUSES, *gauges.sessions_by_status}):
        sessions.add_metric((status,), gauges.sessions_by_status.get(status, 0))

    info = GaugeMetricFamily("collector_build_info", "The collector's version",
                             labels=("version",))
    info.add_metric((__version__,), 1)

    return [
        *item_families(Signal.TRACES, stats.items[Signal.TRACES]),
        counter("collector_spans_accepted",
                "Usage records committed to the database (each at most once), whichever "
                "signal carried them", stats.spans_accepted),
        counter("collector_spans_duplicate",
                "Usage records ignored because they were already accounted",
                stats.spans_duplicate),
        *item_families(Signal.LOGS, stats.items[Signal.LOGS]),
        *item_families(Signal.METRICS, stats.items[Signal.METRICS]),
        counter("collector_attribute_values_invalid",
                "Session attributes outside their allowed set, stored as the column default",
                stats.invalid_values),
        requests,
        counter("collector_flushes", "Flushes committed", stats.flushes),
        counter("collector_flush_failures",
                "Flushes that failed and were kept for retry (nothing of them was applied)",
                stats.flush_failures),
        counter("collector_sessions_swept",
                "Active sessions marked unknown after staying silent", stats.sessions_swept),
        counter("collector_held_spans",
                "Usage records without a session id held until a span of their trace names "
                "one", stats.held),
        counter("collector_held_resolved",
                "Held usage records added to the session a span of their trace named",
                stats.held_resolved),
        counter("collector_held_resolved_by_window",
                "Held usage records added, at the end of sessions.resolve_window_s, to the "
                "session a span of their trace named, else to the trace id's session",
                stats.held_resolved_by_window),
        GaugeMetricFamily("collector_held_spans_now",
                          "Usage records held in the database now, waiting for their session "
                          "(all collectors on the database; as of this one's last flush)",
                          value=stats.held_now),
        GaugeMetricFamily("collector_pending_spans",
                          "Accepted spans waiting for their flush (or being flushed)",
                          value=gauges.pending_spans),
        GaugeMetricFamily("collector_pending_sessions",
                          "Sessions with spans waiting for their flush",
                          value=gauges.pending_sessions),
        GaugeMetricFamily("collector_dedupe_window_spans",
                          "Span ids remembered for exactly-once accounting (both generations)",
                          value=gauges.dedupe_window),
        sessions,
        info,
    ]


def connection_families(stats: ConnectionStats, decoding: DecodeStats | None) -> list[Metric]:
    """Each HTTP listener's connections (collector.receivers.connections) and the large
    bodies decoded off the event loop. Pure: values in, families out."""
    open_now = GaugeMetricFamily("collector_http_connections_open",
                                 "Connections open now, by listener (otlp_http, web, ops)",
                                 labels=("listener",))
    refused = CounterMetricFamily(
        "collector_http_connections_refused",
        "Connections answered 503 at connections.max_connections, by listener",
        labels=("listener",))
    closed = CounterMetricFamily(
        "collector_http_connections_closed",
        "Connections closed by the collector, by listener and reason (header_timeout, "
        "body_timeout, evicted: made room at the cap before sending a whole request)",
        labels=("listener", "reason"))
    malformed = CounterMetricFamily(
        "collector_http_malformed_requests",
        "Requests refused with 400 because they were not valid HTTP, by listener",
        labels=("listener",))
    for name, listener in sorted(stats.listeners.items()):
        open_now.add_metric((name,), listener.open)
        refused.add_metric((name,), listener.refused)
        malformed.add_metric((name,), listener.malformed)
        for reason, count in sorted(listener.closed.items()):
            closed.add_metric((name, reason), count)
    families: list[Metric] = [open_now, refused, closed, malformed]
    if decoding is not None:
        families += [
            GaugeMetricFamily("collector_decodes_off_loop_in_progress",
                              "Large request bodies being decoded off the event loop now",
                              value=decoding.in_progress),
            CounterMetricFamily("collector_decodes_off_loop",
                                "Large request bodies decoded off the event loop",
                                value=decoding.done),
        ]
    return families


class ConnectionCollector:
    """Reads the listeners' counters when scraped."""

    def __init__(self, stats: ConnectionStats, decoding: DecodeStats | None) -> None:
        self._stats = stats
        self._decoding = decoding

    def collect(self) -> Iterable[Metric]:
        return connection_families(self._stats, self._decoding)


class PipelineCollector:
    """Reads the pipeline and store when scraped; nothing is copied in between."""

    def __init__(self, pipeline: Pipeline, store: Store,
                 statuses: Callable[[], Mapping[str, int]]) -> None:
        self._pipeline = pipeline
        self._store = store
        self._statuses = statuses

    def collect(self) -> Iterable[Metric]:
        pipeline = self._pipeline
        return metric_families(pipeline.stats, Gauges(
            pending_spans=pipeline.pending_spans,
            pending_sessions=pipeline.pending_sessions,
            dedupe_window=self._store.dedupe_window,
            sessions_by_status=self._statuses(),
        ))


# Budget instances exported per budget: a glob over users or hosts has one instance per value,
# and each is two series. The largest spenders are kept; collector_budget_instances_not_exported
# counts the rest (`collector budgets` lists them all).
METRICS_BUDGET_INSTANCES = 50


@dataclass(frozen=True, slots=True)
class BudgetGauges:
    """What only the database knows about budgets, as of the last refresh."""

    status: BudgetStatus
    outbox_pending: int


def budget_families(gauges: BudgetGauges | None,
                    delivery: DeliveryStats | None) -> list[Metric]:
    """Spend and limit per budget instance in its current period (the `scope` label as
    `collector budgets` shows it: "fleet" or "DIMENSION=VALUE"), and the alert outbox's
    health. Pure: values in, families out. Without sinks (`delivery` None) nothing is
    delivered, and the outbox stays empty. `gauges` None (the database not read yet): no
    spend at all rather than a made-up zero."""
    stats = delivery or DeliveryStats()
    counters: list[Metric] = [
        CounterMetricFamily("collector_alert_deliveries",
                            "Alerts delivered (a 2xx from the sink) by this collector",
                            value=stats.delivered),
        CounterMetricFamily("collector_alert_delivery_failures",
                            "Delivery attempts that failed (not 2xx, unreachable, timed out) "
                            "and were rescheduled with backoff", value=stats.failed_attempts),
        GaugeMetricFamily("collector_alert_last_success_timestamp_seconds",
                          "When this collector last delivered an alert (0: never)",
                          value=stats.last_success_ns / 1e9),
    ]
    if gauges is None:
        return counters
    spend = GaugeMetricFamily(
        "collector_budget_spend_usd",
        "Spend of each budget instance in its current period (its own zone and period)",
        labels=("budget", "scope"))
    limit = GaugeMetricFamily("collector_budget_limit_usd",
                              "The amount of each budget instance per period",
                              labels=("budget", "scope"))
    for line in gauges.status.instances:
        if line.value is None:  # a glob no value matched yet: no instance to speak of
            continue
        spend.add_metric((line.budget, line.scope), line.spend_cents / 100)
        limit.add_metric((line.budget, line.scope), line.limit_usd)
    dropped = GaugeMetricFamily(
        "collector_budget_instances_not_exported",
        f"Budget instances beyond the {METRICS_BUDGET_INSTANCES} largest spenders a budget "
        "exports (see `collector budgets`)", labels=("budget",))
    for name, count in sorted(gauges.status.omitted.items()):
        dropped.add_metric((name,), count)
    return [
        spend, limit, dropped,
        GaugeMetricFamily("collector_alert_outbox_pending",
                          "Alerts recorded but not yet delivered (all sinks, all collectors "
                          "on the database)", value=gauges.outbox_pending),
        *counters,
    ]


class BudgetCollector:
    """Reads the last refresh's budget gauges and the delivery counters when scraped."""

    def __init__(self, gauges: Callable[[], BudgetGauges | None],
                 delivery: DeliveryStats | None) -> None:
        self._gauges = gauges
        self._delivery = delivery

    def collect(self) -> Iterable[Metric]:
        return budget_families(self._gauges(), self._delivery)


class Metrics:
    """The registry `/metrics` serves: process metrics, flush histograms, pipeline counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._flush_seconds = Histogram(
            "collector_flush_duration_seconds", "Time to commit one flush",
            buckets=FLUSH_SECONDS_BUCKETS, registry=self.registry)
        self._flush_rows = Histogram(
            "collector_flush_rows", "Session rows upserted by one flush",
            buckets=FLUSH_ROWS_BUCKETS, registry=self.registry)
        self._statuses: dict[str, int] = {}
        self._budgets: tuple[Budget, ...] = ()
        self._budget_gauges: BudgetGauges | None = None  # until the first refresh reads them
        self._reader: Reader | None = None
        self._refresh_lock = asyncio.Lock()

    def observe_flush(self, seconds: float, rows: int) -> None:
        """The pipeline's `on_flush`: once per committed flush."""
        self._flush_seconds.observe(seconds)
        self._flush_rows.observe(rows)

    def watch(self, pipeline: Pipeline, store: Store, reader: Reader) -> None:
        self._reader = reader
        self.registry.register(PipelineCollector(pipeline, store, lambda: self._statuses))

    def watch_budgets(self, budgets: tuple[Budget, ...],
                      delivery: DeliveryStats | None) -> None:
        """Export the budgets' spend and the outbox's health (call after `watch`)."""
        self._budgets = budgets
        self.registry.register(BudgetCollector(lambda: self._budget_gauges, delivery))

    def watch_connections(self, stats: ConnectionStats,
                          decoding: DecodeStats | None = None) -> None:
        self.registry.register(ConnectionCollector(stats, decoding))

    async def refresh(self) -> None:
        """Read what only the database knows, off the event loop, before a scrape."""
        reader = self._reader
        if reader is None:
            return
        async with self._refresh_lock:
            try:
                self._statuses = await asyncio.to_thread(reader.count_sessions_by_status)
            except Exception as exc:  # a scrape must not fail because a count did
                log.debug("cannot count sessions by status: %s", exc)
            if self._budgets:
                try:
                    self._budget_gauges = await asyncio.to_thread(
                        _read_budget_gauges, reader, self._budgets)
                except Exception as exc:  # the last values stay (a failing database shows
                    # in /readyz and the flush metrics); the scrape goes on
                    log.debug("cannot read budget spend: %s", exc)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def _read_budget_gauges(reader: Reader, budgets: tuple[Budget, ...]) -> BudgetGauges:
    """On a worker thread: the budgets' current periods and the outbox's pending count."""
    return BudgetGauges(read_status(reader, budgets, time.time_ns(), METRICS_BUDGET_INSTANCES),
                        reader.count_alerts_pending())


def readiness_problem(*, receivers_listening: bool, closing: bool,
                      storage_problem: str | None) -> str | None:
    """Why the collector should not get traffic now, or None when it is ready."""
    if closing:
        return "shutting down"
    if not receivers_listening:
        return "receivers not listening yet"
    if storage_problem is not None:
        return storage_problem
    return None


class OpsServer:
    """/metrics, /healthz (the process answers) and /readyz (it can take exports now)."""

    def __init__(self, endpoint: Endpoint, metrics: Metrics,
                 readiness: Callable[[], str | None],
                 before_scrape: Callable[[], Awaitable[None]] | None = None,
                 connections: Connections | None = None) -> None:
        self.endpoint = endpoint
        self._connections = connections
        self._metrics = metrics
        self._readiness = readiness
        self._before_scrape = before_scrape
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._scrape)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        try:
            self._runner = await start_app(app, self.endpoint, shutdown_timeout=STOP_GRACE_S,
                                           listener="ops", label="operations endpoint",
                                           connections=self._connections)
        except OSError as exc:
            raise OpsError(f"cannot listen for operations on {self.endpoint}: "
                           f"{exc.strerror or exc}") from None
        log.info("operations endpoint (/metrics, /healthz, /readyz) on %s", self.endpoint)

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _scrape(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            await self._before_scrape()
        body, content_type = self._metrics.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        problem = self._readiness()
        if problem is None:
            return web.Response(text="ready\n")
        return web.Response(status=503, text=f"not ready: {problem}\n")
