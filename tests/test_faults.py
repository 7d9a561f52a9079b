"""Faults the daemon meets unattended: kill -9 under load, overload, full and read-only disks,
a slow disk at shutdown. Each ends with exact sums: nothing acknowledged lost, nothing twice."""

from __future__ import annotations

import http.client
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SpanExportResult

from tests.conftest import Daemon, make_span, read_rows
from tests.test_daemon import post_in_flight, wait_for
from tests.test_receivers import new_trace, post, request_bytes

StartDaemon = Callable[..., Daemon]
SESSIONS = 7


def turn(trace: int, span_id: int, session: str, tokens: int) -> Any:
    return make_span(trace_id=trace, span_id=span_id, attrs={
        "gen_ai.conversation.id": session, "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": tokens, "gen_ai.usage.output_tokens": 1})


class RetryingClient(threading.Thread):
    """Sends each request until it gets 200, the way OTLP exporters retry: after a refused
    connection, a lost answer or a retryable status. Stops by itself at its deadline."""

    def __init__(self, daemon: Daemon, bodies: list[bytes], deadline_s: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.daemon_under_test = daemon
        self.bodies = bodies
        self.acked = 0
        self.retries = 0
        self.statuses: Counter[int] = Counter()
        self.deadline = time.monotonic() + deadline_s

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        for body in self.bodies:
            while time.monotonic() < self.deadline:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(
                            "127.0.0.1", self.daemon_under_test.http_port, timeout=10)
                    conn.request("POST", "/v1/traces", body=body,
                                 headers={"Content-Type": "application/x-protobuf"})
                    response = conn.getresponse()
                    response.read()
                    self.statuses[response.status] += 1
                    if response.status == 200:
                        self.acked += 1
                        break
                except (OSError, http.client.HTTPException):
                    conn = None
                self.retries += 1
                time.sleep(0.05)  # a retry backoff, not a wait for an event


def test_kill_9_under_load_loses_and_doubles_nothing(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("[flush]\ninterval_ms = 20\n")
    expected: Counter[str] = Counter()
    turns: Counter[str] = Counter()
    bodies = []
    for r in range(60):
        trace = new_trace()
        spans = []
        for i in range(40):
            session = f"kill-{(r + i) % SESSIONS}"
            spans.append(turn(trace, i + 1, session, r * 100 + i))
            expected[session] += r * 100 + i
            turns[session] += 1
        bodies.append(request_bytes(*spans))
    client = RetryingClient(daemon, bodies)
    client.start()
    for kill in range(3):
        target = (kill + 1) * 12
        wait_for(lambda target=target: client.acked >= target, f"{target} acknowledged requests",
                 timeout=60)
        assert daemon.proc is not None
        daemon.proc.kill()
        daemon.proc.wait()
        daemon.start()
    client.join(120)
    assert not client.is_alive() and client.acked == len(bodies)
    assert client.retries > 0  # the kills were felt
    rows = read_rows(daemon.db_path)
    assert {s: rows[s]["prompt_tokens"] for s in expected} == dict(expected)
    assert {s: rows[s]["turns"] for s in turns} == dict(turns)


def test_overload_refuses_retryably_and_sdk_exporters_deliver_everything(
        start_daemon: StartDaemon) -> None:
    daemon = start_daemon("[flush]\ninterval_ms = 300\nmax_pending_spans = 1\n")
    start = threading.Barrier(4)
    results: list[Any] = []

    def send(index: int) -> None:
        exporter = (daemon.http_exporter() if index % 2 else daemon.grpc_exporter())
        try:
            start.wait(10)
            for _ in range(3):
                trace = new_trace()
                spans = [turn(trace, i + 1, f"overload-{index}", 1) for i in range(512)]
                results.append(exporter.export(spans))
        finally:
            exporter.shutdown()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == [SpanExportResult.SUCCESS] * 12
    rows = daemon.rows()
    assert [rows[f"overload-{i}"]["turns"] for i in range(4)] == [1536] * 4
    assert daemon.stop() == 0
    assert "overloaded" in daemon.log.split("refused:")[-1]


def can_mount() -> bool:
    probe = Path(f"/tmp/collector-mount-probe-{uuid.uuid4().hex}")
    probe.mkdir()
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    except OSError:
        return False
    finally:
        probe.rmdir()


needs_mount = pytest.mark.skipif(not can_mount(), reason="needs permission to mount a tmpfs")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB filesystem: filling it gives SQLite a genuine 'disk is full'. Owner-only
    (a tmpfs root is 1777 by default, a data directory the collector refuses)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@needs_mount
def test_disk_full_answers_retryably_and_recovers_without_restart(
        start_daemon: StartDaemon, small_fs: Path) -> None:
    daemon = start_daemon("[flush]\ninterval_ms = 50\n", db_path=small_fs / "sessions.db")
    daemon.export_http([turn(new_trace(), 1, "full", 1)])
    filler = small_fs / "filler"
    with filler.open("wb") as f:  # take all the space that is left
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    trace = new_trace()
    body = request_bytes(*(turn(trace, i + 1, "full", 10) for i in range(2000)))
    status, headers, _ = post(daemon, body)
    assert status == 503 and headers["Retry-After"] == "1"
    wait_for(lambda: "full" in daemon.log and "flush failed" in daemon.log, "the failure log")
    filler.unlink()  # the fault clears; the kept batch commits with no restart
    wait_for(lambda: daemon.row("full")["turns"] == 2001, "the kept batch to commit")
    assert post(daemon, body)[0] == 200  # the exporter's retry: already accounted
    row = daemon.row("full")
    assert (row["turns"], row["prompt_tokens"]) == (2001, 20001)
    assert "storage recovered" in daemon.log


def can_chattr(directory: Path) -> bool:
    probe = directory / "chattr-probe"
    probe.write_bytes(b"x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
        if ok:
            subprocess.run(["chattr", "-i", str(probe)], check=True)
        return ok
    except OSError:
        return False
    finally:
        probe.unlink()


def test_read_only_files_answer_retryably_and_recover_without_restart(
        start_daemon: StartDaemon, tmp_path: Path) -> None:
    if not can_chattr(tmp_path):
        pytest.skip("needs chattr +i (immutable files) on the test filesystem")
    daemon = start_daemon("[flush]\ninterval_ms = 50\n")
    daemon.export_http([turn(new_trace(), 1, "ro", 1)])
    files = [str(daemon.db_path), f"{daemon.db_path}-wal"]
    # Immutable: even root, and even through the daemon's open descriptors, cannot write.
    subprocess.run(["chattr", "+i", *files], check=True)
    body = request_bytes(turn(new_trace(), 1, "ro", 10))
    try:
        status, headers, _ = post(daemon, body)
        assert status == 503 and headers["Retry-After"] == "1"
        wait_for(lambda: "flush failed" in daemon.log, "the failure log")
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)
    wait_for(lambda: daemon.row("ro")["turns"] == 2, "the kept batch to commit")
    assert post(daemon, body)[0] == 200
    row = daemon.row("ro")
    assert (row["turns"], row["prompt_tokens"]) == (2, 11)
    assert "storage recovered" in daemon.log


@needs_mount
def test_read_only_filesystem_is_a_clear_start_error(small_fs: Path) -> None:
    db = small_fs / "sessions.db"
    sqlite3.connect(db).close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    daemon = Daemon(small_fs.parent / "d", db_path=db)
    with pytest.raises(RuntimeError) as info:
        daemon.start()
    assert daemon.proc is not None and daemon.proc.wait(10) == 1
    assert "cannot start" in str(info.value)
    assert "read-only" in str(info.value) or "readonly" in str(info.value)


def test_shutdown_on_a_slow_disk_answers_success_only_after_commit(
        start_daemon: StartDaemon) -> None:
    daemon = start_daemon("[flush]\ninterval_ms = 60000\n[log]\nlevel = \"debug\"\n")
    results, threads = post_in_flight(daemon, {
        f"slow-{i}": request_bytes(turn(new_trace(), 1, f"slow-{i}", 5)) for i in range(6)})
    blocker = sqlite3.connect(daemon.db_path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")  # the disk is slow: the final commit must wait
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "flush failed" in daemon.log, "the shutdown flush to meet the slow disk")
    blocker.rollback()
    blocker.close()
    assert daemon.proc.wait(30) == 0
    for t in threads:
        t.join(20)
    rows = read_rows(daemon.db_path)
    # Each request was answered success after commit, or refused retryably; none lost.
    for session, status in results.items():
        assert status in (200, 503), (session, status)
        if status == 200:
            assert rows[session]["turns"] == 1
    assert set(results.values()) <= {200, 503} and len(results) == 6
    assert all(rows[f"slow-{i}"]["turns"] == 1 for i in range(6))


def test_shutdown_gives_up_on_a_dead_disk_and_says_so(start_daemon: StartDaemon) -> None:
    daemon = start_daemon("[flush]\ninterval_ms = 60000\n[log]\nlevel = \"debug\"\n")
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        post(daemon, request_bytes(turn(new_trace(), 1, "dead", 5)))[0]))
    thread.start()
    wait_for(lambda: "waiting for commit" in daemon.log, "the request in flight")
    blocker = sqlite3.connect(daemon.db_path, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        assert daemon.stop() == 1  # could not commit: non-zero, and the client was told
        thread.join(20)
        assert result == [503]
        assert "not committed; their exporters were told to retry" in daemon.log
    finally:
        blocker.rollback()
        blocker.close()
    assert "dead" not in read_rows(daemon.db_path)

