"""Bounded connections, large bodies off the event loop and quiet logs, over real sockets
against the real daemon (collector.receivers.connections, collector.receivers.decoding).

No assertion here depends on how fast anything runs: timeouts are configured short so that
waits end soon, and every wait is a bounded loop for an event (a socket closed, a metric
moved); assertions are about what happened and in which order.
"""

from __future__ import annotations

import http.client
import json
import re
import resource
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from collector.config import ConfigError, parse_config
from collector.config.connections import ConnectionLimits
from collector.receivers.grpc import server_options
from tests.conftest import MS, T0, Daemon, make_span

# Every wait below gives up after this; it bounds the test's time, it is not a threshold.
WAIT_S = 60.0
TRICKLERS = 300
SECRET = "s3cr3t-TOKEN-4f1c9a7e"
SHORT = ("[connections]\nheader_timeout_ms = 1000\nidle_timeout_ms = 30000\n"
         "body_chunk_timeout_ms = 1000\nbody_timeout_ms = 4000\n")


def usage(session: str) -> dict[str, Any]:
    return {"session.id": session, "gen_ai.usage.input_tokens": 100,
            "gen_ai.usage.output_tokens": 10, "gen_ai.response.model": "test-model"}


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)


def is_closed(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset); drops anything it sent."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(65536) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on an open socket and read its whole answer."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside an answer"
        body += chunk
    return status, headers, body


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def metrics(daemon: Daemon) -> str:
    """The exposition; "" while the ops listener is at its cap (503)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{daemon.ops_port}/metrics",
                                    timeout=WAIT_S) as answer:
            text: str = answer.read().decode()
            return text
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        return ""


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    found = re.search("^" + pattern + "$", text, re.M)
    return float(found.group(1)) if found else 0.0


def healthz(daemon: Daemon) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.ops_port}/healthz",
                                timeout=WAIT_S) as answer:
        status: int = answer.status
        return status


def pb_request(session: str, trace_id: int) -> bytes:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    data: bytes = encode_spans([make_span(trace_id=trace_id, attrs=usage(session))]
                               ).SerializeToString()
    return (f"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/x-protobuf\r\nContent-Length: {len(data)}\r\n\r\n"
            ).encode() + data


# -- 1. trickling clients, the cap ---------------------------------------------------------------

def test_trickling_connections_neither_exhaust_the_daemon_nor_stop_an_export(
        start_daemon: Callable[..., Daemon]) -> None:
    """300 connections that send nothing or trickle a partial request, on a daemon whose
    descriptor limit they would exhaust without the cap: a real SDK export arriving meanwhile
    is answered and committed, the ops and web listeners keep answering, and every trickler
    is closed (evicted at the cap, or at the header deadline)."""
    daemon = start_daemon(SHORT + "max_connections = 64\n")
    assert daemon.proc is not None
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for the daemon's own files and three full listeners, not for 300 more sockets.
    resource.prlimit(daemon.proc.pid, resource.RLIMIT_NOFILE, (280, hard))
    tricklers: list[socket.socket] = []
    partial = b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"
    for i in range(TRICKLERS):
        sock = connect(daemon.http_port)
        if i % 3 == 1:
            sock.sendall(partial[:i % len(partial) + 1])
        elif i % 3 == 2:
            sock.sendall(b"P")  # and one more byte now and then, below
        tricklers.append(sock)
    # Some at the other listeners too.
    others = [connect(port) for port in (daemon.ops_port, daemon.web_port) for _ in range(40)]

    daemon.export_http([make_span(trace_id=0x7A11, attrs=usage("while-trickled"))])
    assert daemon.row("while-trickled")["prompt_tokens"] == 100
    assert healthz(daemon) == 200
    with urllib.request.urlopen(daemon.web_url + "/", timeout=WAIT_S) as page:
        assert page.status == 200

    # The slow ones go on with a valid request, one byte at a time, that never ends.
    endless = partial + b"ication/x-protobuf\r\nX-Pad: " + b"a" * 10_000
    slow = {sock: 1 for i, sock in enumerate(tricklers) if i % 3 == 2}
    open_ = tricklers + others
    deadline = time.monotonic() + WAIT_S
    while open_:
        assert time.monotonic() < deadline, f"{len(open_)} trickling connections still open"
        for sock in set(slow).intersection(open_):
            try:
                sock.send(endless[slow[sock]:slow[sock] + 1])
                slow[sock] += 1
            except OSError:
                pass
        open_ = [sock for sock in open_ if not is_closed(sock)]
        time.sleep(0.1)
    for sock in tricklers + others:
        sock.close()

    text = metrics(daemon)
    closed = {reason: sample(text, "collector_http_connections_closed_total",
                             listener="otlp_http", reason=reason)
              for reason in ("header_timeout", "evicted")}
    assert closed["header_timeout"] > 0  # the last ones outlived their deadline
    assert closed["evicted"] > 0  # the cap made room for newer ones (the export among them)
    assert closed["header_timeout"] + closed["evicted"] == TRICKLERS
    assert sample(text, "collector_http_malformed_requests_total", listener="otlp_http") == 0
    assert sample(text, "collector_http_connections_closed_total", listener="ops",
                  reason="header_timeout") == 40
    assert "Too many open files" not in daemon.log
    assert "out of system resource" not in daemon.log


@pytest.mark.parametrize("listener", ["otlp_http", "ops", "web"])
def test_over_the_cap_a_new_connection_gets_503_and_established_ones_are_served(
        start_daemon: Callable[..., Daemon], listener: str) -> None:
    daemon = start_daemon("[connections]\nmax_connections = 3\n")
    port = {"otlp_http": daemon.http_port, "ops": daemon.ops_port, "web": daemon.web_port}[
        listener]
    requests = iter(range(1, 100))

    def request() -> bytes:
        if listener == "otlp_http":
            n = next(requests)
            return pb_request(f"cap-{n}", 0xCA90 + n)
        return get("/healthz" if listener == "ops" else "/")

    established = [connect(port) for _ in range(3)]
    for sock in established:
        status, _, _ = exchange(sock, request())
        assert status == 200

    refused = connect(port)
    status, headers, body = exchange(refused, request())
    assert status == 503
    assert headers["retry-after"] == "1"
    assert b"too many connections" in body
    wait_for(lambda: is_closed(refused), "the refused connection closed")

    # The kept-alive connections that sent a valid request keep being served.
    for sock in established:
        status, _, _ = exchange(sock, request())
        assert status == 200
    if listener == "otlp_http":
        rows = daemon.rows()
        assert {"cap-1", "cap-2", "cap-3", "cap-5", "cap-6", "cap-7"} <= set(rows)
        assert "cap-4" not in rows  # the refused one: its exporter retries it
    for sock in [*established, refused]:
        sock.close()
    # Once they are gone there is room again.
    wait_for(lambda: sample(metrics(daemon), "collector_http_connections_refused_total",
                            listener=listener) >= 1, "the refusal counted, and room again")


def test_a_stalled_or_endless_body_is_cut(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon(SHORT)
    head = (b"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-protobuf\r\nContent-Length: 100000\r\n\r\n")
    stalled = connect(daemon.http_port)
    stalled.sendall(head + b"\x0a\x00")  # then nothing: the gap exceeds body_chunk_timeout_ms
    trickled = connect(daemon.http_port)
    trickled.sendall(head)
    # A byte every 0.2 s: never a stalled chunk, but the body never completes.
    deadline = time.monotonic() + WAIT_S
    while not is_closed(trickled):
        assert time.monotonic() < deadline, "an endless body was never cut"
        try:
            trickled.send(b"\x00")
        except OSError:
            break
        time.sleep(0.2)
    wait_for(lambda: is_closed(stalled), "the stalled body cut")
    stalled.close()
    trickled.close()
    assert sample(metrics(daemon), "collector_http_connections_closed_total",
                  listener="otlp_http", reason="body_timeout") == 2
    assert "Traceback" not in daemon.log
    # A body that arrives in time is still served, on a fresh connection.
    daemon.export_http([make_span(trace_id=0xB0D1, attrs=usage("after-bodies"))])
    assert daemon.row("after-bodies")["turns"] == 1


def test_an_idle_kept_alive_connection_is_closed(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("[connections]\nidle_timeout_ms = 500\nheader_timeout_ms = 20000\n")
    sock = connect(daemon.ops_port)
    status, _, _ = exchange(sock, get("/healthz"))
    assert status == 200
    wait_for(lambda: is_closed(sock), "the idle connection closed")
    sock.close()


def test_grpc_handshake_deadline_cap_and_idle_limit(start_daemon: Callable[..., Daemon]) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    daemon = start_daemon("[connections]\nheader_timeout_ms = 1000\nmax_connections = 2\n"
                          "grpc_max_connection_idle_ms = 1000\n")
    silent = connect(daemon.grpc_port)  # never sends the HTTP/2 preface
    wait_for(lambda: is_closed(silent), "a silent gRPC connection closed at the handshake "
                                        "deadline")
    silent.close()

    def call(channel: grpc.Channel, session: str, trace_id: int) -> None:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        export(encode_spans([make_span(trace_id=trace_id, attrs=usage(session))])
               .SerializeToString(), timeout=WAIT_S)

    idle_seen = threading.Event()
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        call(channel, "grpc-idle-1", 0x1D1)

        def watch(state: grpc.ChannelConnectivity) -> None:
            if state == grpc.ChannelConnectivity.IDLE:
                idle_seen.set()

        channel.subscribe(watch)
        # The server sends GOAWAY to the connection without calls: the channel goes idle.
        assert idle_seen.wait(WAIT_S)
        call(channel, "grpc-idle-2", 0x1D2)  # and reconnects for the next export
    assert {"grpc-idle-1", "grpc-idle-2"} <= set(daemon.rows())


def test_grpc_connections_over_the_cap_are_closed_while_a_channel_keeps_exporting(
        start_daemon: Callable[..., Daemon]) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    daemon = start_daemon("[connections]\nmax_connections = 2\nheader_timeout_ms = 60000\n")
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")

        def call(n: int) -> None:
            export(encode_spans([make_span(trace_id=0x6CA0 + n, attrs=usage(f"grpc-cap-{n}"))])
                   .SerializeToString(), timeout=WAIT_S)

        call(1)  # one connection
        second = connect(daemon.grpc_port)  # two: the cap
        third = connect(daemon.grpc_port)
        wait_for(lambda: is_closed(third), "the connection over the cap closed")
        call(2)  # the established channel is still served
        second.close()
        third.close()
    assert {"grpc-cap-1", "grpc-cap-2"} <= set(daemon.rows())


def test_grpc_server_options_carry_every_grpc_key() -> None:
    limits = ConnectionLimits(header_timeout_ms=1, max_connections=2,
                              grpc_max_connection_idle_ms=3, grpc_max_connection_age_ms=4,
                              grpc_max_connection_age_grace_ms=5, grpc_min_ping_interval_ms=6,
                              grpc_max_ping_strikes=7, grpc_max_concurrent_streams=8)
    assert dict(server_options(99, limits)) == {
        "grpc.max_receive_message_length": 99,
        "grpc.so_reuseport": 0,
        "grpc.server_handshake_timeout_ms": 1,
        "grpc.max_allowed_incoming_connections": 2,
        "grpc.max_connection_idle_ms": 3,
        "grpc.max_connection_age_ms": 4,
        "grpc.max_connection_age_grace_ms": 5,
        "grpc.http2.min_ping_interval_without_data_ms": 6,
        "grpc.http2.max_ping_strikes": 7,
        "grpc.max_concurrent_streams": 8,
    }


def test_grpc_age_limit_moves_a_busy_client_to_a_new_connection(
        start_daemon: Callable[..., Daemon]) -> None:
    """max_connection_age: even a connection that keeps calling is asked to go away; the
    channel reconnects and every export is answered."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    daemon = start_daemon("[connections]\ngrpc_max_connection_age_ms = 300\n"
                          "grpc_max_connection_age_grace_ms = 1000\n")
    states: list[grpc.ChannelConnectivity] = []
    with grpc.insecure_channel(daemon.grpc_endpoint) as channel:
        channel.subscribe(states.append)
        export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        n = 0
        deadline = time.monotonic() + WAIT_S
        # Export until the channel has had to connect a second time.
        while states.count(grpc.ChannelConnectivity.READY) < 2:
            assert time.monotonic() < deadline, f"never reconnected: {states}"
            n += 1
            export(encode_spans([make_span(trace_id=0xA6E0 + n, attrs=usage(f"age-{n}"))])
                   .SerializeToString(), timeout=WAIT_S)
            time.sleep(0.05)
    assert {f"age-{i}" for i in range(1, n + 1)} <= set(daemon.rows())


# -- 2. large JSON off the event loop -----------------------------------------------------------

def big_json(spans: int) -> bytes:
    extra = [{"key": f"extra.{k}", "value": {"stringValue": "x" * 100}} for k in range(10)]
    return json.dumps({"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{
        "scope": {"name": "agent"},
        "spans": [{
            "traceId": f"{0xB16 << 64 | i:032x}", "spanId": f"{i + 1:016x}", "name": "turn",
            "kind": 1, "startTimeUnixNano": str(T0), "endTimeUnixNano": str(T0 + 3 * MS),
            "attributes": [
                {"key": "session.id", "value": {"stringValue": f"big-{i % 10}"}},
                {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "10"}},
                {"key": "gen_ai.usage.output_tokens", "value": {"intValue": 5}},
                {"key": "gen_ai.response.model", "value": {"stringValue": "test-model"}},
                *extra,
            ]} for i in range(spans)],
    }]}]}).encode()


def test_a_large_json_export_in_flight_delays_neither_healthz_nor_a_small_export(
        start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon()
    body = big_json(8_500)
    assert 14 * 2**20 < len(body) < 16 * 2**20
    order: list[str] = []
    answers: dict[str, int] = {}

    def send_big() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=WAIT_S * 2)
        conn.request("POST", "/v1/traces", body=body,
                     headers={"Content-Type": "application/json"})
        answers["big"] = conn.getresponse().status
        order.append("big")
        conn.close()

    big = threading.Thread(target=send_big)
    big.start()
    # The daemon has the whole body and is decoding it.
    wait_for(lambda: sample(metrics(daemon), "collector_decodes_off_loop_in_progress") == 1,
             "the large body being decoded")
    answers["healthz"] = healthz(daemon)
    order.append("healthz")
    daemon.export_http([make_span(trace_id=0x5A11, attrs=usage("small-beside-big"))])
    order.append("small")
    big.join(WAIT_S * 2)
    assert order == ["healthz", "small", "big"]
    assert answers == {"big": 200, "healthz": 200}
    rows = daemon.rows()
    assert rows["small-beside-big"]["prompt_tokens"] == 100
    assert sum(rows[f"big-{k}"]["prompt_tokens"] for k in range(10)) == 8_500 * 10
    assert sample(metrics(daemon), "collector_decodes_off_loop_total") == 1


# -- 3. malformed requests: counted, summarised, never a traceback or a header value ------------

MALFORMED = [
    # An Authorization header with a control character in its (secret-looking) value.
    f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n".encode(),
    f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nAuthorization Bearer {SECRET}\r\n\r\n".encode(),
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: " + SECRET.encode() + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + SECRET.encode() + b"\r\n\r\n",
    f"GET /{SECRET} HTTP/9.9\r\n\r\n".encode(),
    b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/x-protobuf\r\n\r\nzz" + SECRET.encode() + b"\r\n",
]
MALFORMED_PER_LISTENER = 200


def test_malformed_requests_are_counted_not_logged(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon('[log]\nlevel = "debug"\n')
    ports = {"otlp_http": daemon.http_port, "web": daemon.web_port, "ops": daemon.ops_port}
    for port in ports.values():
        for i in range(MALFORMED_PER_LISTENER):
            sock = connect(port)
            try:
                sock.sendall(MALFORMED[i % len(MALFORMED)])
                status, _, _ = exchange(sock, b"")
                assert status == 400
            finally:
                sock.close()
    text = metrics(daemon)
    for name in ports:
        assert sample(text, "collector_http_malformed_requests_total", listener=name) == (
            MALFORMED_PER_LISTENER), name
    # The listeners still serve.
    daemon.export_http([make_span(trace_id=0xBAD0, attrs=usage("after-malformed"))])
    assert healthz(daemon) == 200
    assert daemon.stop() == 0
    log = daemon.log
    assert SECRET not in log
    assert "Traceback" not in log
    assert "Error handling request" not in log
    lines = [line for line in daemon.lines if "malformed HTTP request" in line]
    # Once each when it starts, then its count (here at shutdown): never one per request.
    assert len(lines) == 2 * len(ports), lines
    for label in ("OTLP/HTTP", "fleet view", "operations endpoint"):
        assert any(f"{label}: {MALFORMED_PER_LISTENER - 1} more malformed" in line
                   for line in lines), (label, lines)


# -- config ---------------------------------------------------------------------------------------

def test_shipped_config_toml_documents_the_defaults() -> None:
    from collector.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "config.toml")
    assert config.connections == ConnectionLimits()


def test_connections_keys_are_read_and_defaulted(tmp_path: Path) -> None:
    assert parse_config({}, source="t.toml", base_dir=tmp_path).connections == (
        ConnectionLimits())
    values = {name: 1000 + i for i, name in enumerate(ConnectionLimits.__slots__)}
    values["body_timeout_ms"] = 99_999
    config = parse_config({"connections": values}, source="t.toml", base_dir=tmp_path)
    assert config.connections == ConnectionLimits(**values)


@pytest.mark.parametrize(("table", "key", "words"), [
    ({"header_timeout_ms": 0}, "connections.header_timeout_ms", "must be >= 1"),
    ({"max_connections": -5}, "connections.max_connections", "must be >= 1"),
    ({"grpc_max_ping_strikes": -1}, "connections.grpc_max_ping_strikes", "must be >= 0"),
    ({"body_timeout_ms": 1000, "body_chunk_timeout_ms": 2000},
     "connections.body_chunk_timeout_ms", "at most connections.body_timeout_ms"),
    ({"idle_timeout_ms": 1.5}, "connections.idle_timeout_ms", "must be an integer"),
    ({"idle_timeout": 10}, "connections.idle_timeout", "unknown key"),
])
def test_bad_connections_keys_name_key_and_file(tmp_path: Path, table: dict[str, Any],
                                                key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"connections": table}, source="bad.toml", base_dir=tmp_path)
    assert caught.value.key == key
    assert words in caught.value.problem
    assert str(caught.value).startswith("bad.toml: ")


def test_the_soft_descriptor_limit_is_raised_to_fit_the_caps() -> None:
    """In a child process (limits are per process): a soft limit below what four listeners
    at the cap may hold is raised, up to the hard limit; the hard limit is left alone."""
    import subprocess
    import sys

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource\n"
        "from collector.config.connections import ConnectionLimits\n"
        "from collector.receivers.connections import raise_descriptor_limit\n"
        "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "raise_descriptor_limit(4, ConnectionLimits(max_connections=300))\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    new_soft, new_hard = map(int, out.stdout.split())
    needed = 4 * (300 + 64) + 128
    assert new_hard == hard
    assert new_soft == (needed if hard == resource.RLIM_INFINITY else min(hard, needed))
    if new_soft < needed:
        assert "open file limit" in out.stderr
