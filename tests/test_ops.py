"""The operations endpoint of a running daemon: /metrics, /healthz, /readyz, over real HTTP."""

from __future__ import annotations

import http.client
import socket
import sqlite3
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from collector.pipeline import ItemCounts, Stats
from collector.signals import Signal
from collector.web.ops import Gauges, metric_families, readiness_problem
from tests.conftest import T0, Daemon, make_span
from tests.test_daemon import NO_SWEEP, PRICES, conversation, wait_for
from tests.test_receivers import grpc_call, new_trace, post, request_bytes, usage

StartDaemon = Callable[..., Daemon]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(daemon: Daemon, path: str) -> tuple[int, str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.ops_port, timeout=20)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def scrape(daemon: Daemon) -> Samples:
    """Every sample of /metrics, keyed by name and sorted labels, parsed as Prometheus does."""
    status, content_type, text = get(daemon, "/metrics")
    assert status == 200 and content_type.startswith("text/plain"), text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def answered(samples: Samples, transport: str, outcome: str, signal: str = "traces") -> float:
    return metric(samples, "collector_requests_total", signal=signal, transport=transport,
                  outcome=outcome)


def test_metrics_count_what_the_daemon_did(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(PRICES + NO_SWEEP + "\n[limits]\nmax_spans_per_request = 3\n")
    logged_at_start = len(daemon.lines)
    spans = conversation(new_trace(), "m-1", T0)  # 3 spans: 2 model calls + 1 agent turn
    daemon.export_grpc(spans)
    daemon.export_http(spans)  # the same spans again: duplicates
    daemon.export_http([
        make_span(trace_id=new_trace(), attrs=usage("m-2", **{"gen_ai.request.model": "mystery",
                                                               "gen_ai.usage.input_tokens": 5})),
        make_span(trace_id=new_trace(), attrs=usage("m-2", **{
            "gen_ai.usage.output_tokens": -1})),  # invalid: rejected, the rest accepted
        make_span(trace_id=new_trace(), attrs={"http.route": "/tools"}),  # not usage
    ])
    assert post(daemon, b"{}", content_type="text/plain")[0] == 415
    too_many = [make_span(trace_id=new_trace(), attrs=usage("m-3")) for _ in range(4)]
    with pytest.raises(grpc.RpcError) as refused:
        grpc_call(daemon, request_bytes(*too_many))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    m = scrape(daemon)
    assert metric(m, "collector_spans_received_total") == 9
    assert metric(m, "collector_spans_accepted_total") == 4
    assert metric(m, "collector_spans_duplicate_total") == 3
    assert metric(m, "collector_spans_rejected_total", reason="invalid") == 1
    assert metric(m, "collector_spans_rejected_total", reason="too_large") == 4
    assert metric(m, "collector_spans_unpriced_total") == 1
    assert metric(m, "collector_spans_ignored_total") == 1
    assert answered(m, "grpc", "ok") == 1
    assert answered(m, "grpc", "too_large") == 1
    assert answered(m, "http", "ok") == 1
    assert answered(m, "http", "partial") == 1
    assert answered(m, "http", "unsupported_media_type") == 1
    flushes = metric(m, "collector_flushes_total")
    assert flushes >= 2
    assert metric(m, "collector_flush_duration_seconds_count") == flushes
    assert metric(m, "collector_flush_rows_count") == flushes
    assert metric(m, "collector_flush_rows_sum") >= 2  # at least one row per usage flush
    assert metric(m, "collector_flush_failures_total") == 0
    assert metric(m, "collector_pending_spans") == 0  # every answer came after its commit
    assert metric(m, "collector_pending_sessions") == 0
    assert metric(m, "collector_dedupe_window_spans") == 4
    assert metric(m, "collector_sessions", status="active") == 2
    assert metric(m, "collector_sessions", status="completed") == 0
    assert ("process_resident_memory_bytes", ()) in m
    assert daemon.lines[logged_at_start:] == []  # no line per request at INFO


def test_dedupe_window_survives_a_restart(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(NO_SWEEP)
    daemon.export_grpc([make_span(trace_id=new_trace(), attrs=usage("r")) for _ in range(3)])
    assert metric(scrape(daemon), "collector_dedupe_window_spans") == 3
    assert daemon.stop() == 0
    daemon.start()
    assert metric(scrape(daemon), "collector_dedupe_window_spans") == 3


def test_readyz_reports_failing_storage_and_recovers(start_daemon: StartDaemon) -> None:
    daemon = start_daemon(NO_SWEEP + "\n[flush]\ninterval_ms = 50\n")
    assert get(daemon, "/healthz")[:1] == (200,)
    assert get(daemon, "/readyz")[0] == 200
    # Waits out a transaction of the daemon's own that may be running (under a loaded
    # machine one did, and a zero timeout failed the test), then holds the database.
    blocker = sqlite3.connect(daemon.db_path, timeout=10)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database
    try:
        body = request_bytes(make_span(trace_id=new_trace(), attrs=usage("ready")))
        assert post(daemon, body)[0] == 503
        status, _, text = get(daemon, "/readyz")
        assert status == 503 and "storage failing" in text and "locked" in text
        assert get(daemon, "/healthz")[0] == 200  # alive, only not ready
        assert metric(scrape(daemon), "collector_flush_failures_total") >= 1
    finally:
        blocker.rollback()
        blocker.close()
    wait_for(lambda: get(daemon, "/readyz")[0] == 200, "readiness after storage recovered")
    assert daemon.row("ready")["turns"] == 1


def test_ops_endpoint_can_be_disabled_and_a_taken_port_fails_the_start(
        start_daemon: StartDaemon, tmp_path: Any) -> None:
    daemon = start_daemon('[ops]\nendpoint = ""\n', ops=False)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", daemon.ops_port), 2):
        pass
    assert "operations endpoint" not in daemon.log

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        blocked = Daemon(tmp_path / "blocked", f'[ops]\nendpoint = "127.0.0.1:{port}"\n',
                         ops=False)
        with pytest.raises(RuntimeError, match=r"cannot listen, nothing started: ops\.endpoint"):
            blocked.start()
        assert blocked.proc is not None and blocked.proc.wait(10) == 1


def test_unknown_ops_path_is_404(shared_daemon: Daemon) -> None:
    assert get(shared_daemon, "/nope")[0] == 404


# -- the pure parts ---------------------------------------------------------------------------

def test_metric_families_follow_prometheus_names() -> None:
    stats = Stats(spans_accepted=5, spans_duplicate=2, flushes=4, items={
        Signal.TRACES: ItemCounts(received=7, rejected=1, unpriced=3,
                                  refused={"overloaded": 9}),
        Signal.LOGS: ItemCounts(received=20, ignored=19, rejected=1),
        Signal.METRICS: ItemCounts(received=30, ignored=30, refused={"too_large": 4})})
    stats.count_answer("grpc", Signal.TRACES, "ok")
    stats.count_answer("grpc", Signal.TRACES, "ok")
    stats.count_answer("http", Signal.LOGS, "overloaded")
    stats.count_answer("http", None, "not_found")
    gauges = Gauges(pending_spans=11, pending_sessions=2, dedupe_window=13,
                    sessions_by_status={"active": 3, "failed": 1})

    class Fixed:
        def collect(self) -> Any:
            return metric_families(stats, gauges)

    registry = CollectorRegistry()
    registry.register(Fixed())
    text = generate_latest(registry).decode()
    for line in [
        "collector_spans_accepted_total 5.0",
        "collector_spans_received_total 7.0",
        'collector_spans_rejected_total{reason="invalid"} 1.0',
        'collector_spans_rejected_total{reason="overloaded"} 9.0',
        "collector_spans_duplicate_total 2.0",
        "collector_spans_unpriced_total 3.0",
        "collector_log_records_received_total 20.0",
        "collector_log_records_ignored_total 19.0",
        'collector_log_records_rejected_total{reason="invalid"} 1.0',
        "collector_data_points_received_total 30.0",
        "collector_data_points_ignored_total 30.0",
        'collector_data_points_rejected_total{reason="too_large"} 4.0',
        'collector_requests_total{outcome="ok",signal="traces",transport="grpc"} 2.0',
        'collector_requests_total{outcome="overloaded",signal="logs",transport="http"} 1.0',
        'collector_requests_total{outcome="not_found",signal="unknown",transport="http"} 1.0',
        "collector_flushes_total 4.0",
        "collector_pending_spans 11.0",
        "collector_pending_sessions 2.0",
        "collector_dedupe_window_spans 13.0",
        'collector_sessions{status="active"} 3.0',
        'collector_sessions{status="unknown"} 0.0',
        "# TYPE collector_spans_accepted_total counter",
    ]:
        assert line in text.splitlines(), line


def test_readiness_names_the_first_problem() -> None:
    assert readiness_problem(receivers_listening=True, closing=False,
                             storage_problem=None) is None
    assert readiness_problem(receivers_listening=False, closing=False,
                             storage_problem=None) == "receivers not listening yet"
    assert readiness_problem(receivers_listening=True, closing=True,
                             storage_problem="x") == "shutting down"
    assert readiness_problem(receivers_listening=True, closing=False,
                             storage_problem="storage failing for 3 s: disk I/O error") == (
        "storage failing for 3 s: disk I/O error")
