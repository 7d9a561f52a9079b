"""Collectors on a real PostgreSQL server: several on one database through kill -9 and a server
restart, an unreachable and a hung server, the readers, and where the password comes from.
Every test ends with exact sums read back from the database."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from collector.store.postgres import ConnectOptions, PostgresStore
from tests.conftest import ROOT, SECOND, T0, Daemon, assert_daily_is_the_rollup, make_span
from tests.pg import PASSWORD, PASSWORD_USER, PgServer
from tests.test_daemon import wait_for
from tests.test_ops import get
from tests.test_receivers import new_trace, post, request_bytes

StartDaemon = Callable[..., Daemon]
SESSIONS = 7
FAST_FLUSH = "[flush]\ninterval_ms = 20\n"


def turn(trace: int, span_id: int, session: str, tokens: int) -> Any:
    return make_span(trace_id=trace, span_id=span_id, attrs={
        "gen_ai.conversation.id": session, "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": tokens, "gen_ai.usage.output_tokens": 1})


def workload(name: str, requests: int, spans: int) -> tuple[list[bytes], Counter[str],
                                                            Counter[str]]:
    """Bodies of distinct spans over a few sessions; the expected tokens and turns."""
    tokens: Counter[str] = Counter()
    turns: Counter[str] = Counter()
    bodies = []
    for r in range(requests):
        trace = new_trace()
        batch = []
        for i in range(spans):
            session = f"{name}-{(r + i) % SESSIONS}"
            batch.append(turn(trace, i + 1, session, r * 100 + i))
            tokens[session] += r * 100 + i
            turns[session] += 1
        bodies.append(request_bytes(*batch))
    return bodies, tokens, turns


class FleetClient(threading.Thread):
    """Sends each body until some collector answers 200, moving to the next collector after a
    refused connection, a lost answer or a retryable status (a load balancer's retry). Every
    `resend_every`-th acknowledged body is sent once more to another collector, as an exporter
    does when the answer is lost: it must not count twice."""

    def __init__(self, daemons: list[Daemon], bodies: list[bytes], *, start: int,
                 resend_every: int = 4, deadline_s: float = 150.0) -> None:
        super().__init__(daemon=True)
        self.daemons = daemons
        self.bodies = bodies
        self.index = start
        self.resend_every = resend_every
        self.acked = 0
        self.retries = 0
        self.statuses: Counter[int] = Counter()
        self.deadline = time.monotonic() + deadline_s

    def _send(self, body: bytes) -> None:
        while time.monotonic() < self.deadline:
            daemon = self.daemons[self.index % len(self.daemons)]
            try:
                conn = http.client.HTTPConnection("127.0.0.1", daemon.http_port, timeout=15)
                try:
                    conn.request("POST", "/v1/traces", body=body,
                                 headers={"Content-Type": "application/x-protobuf"})
                    response = conn.getresponse()
                    response.read()
                finally:
                    conn.close()
                self.statuses[response.status] += 1
                if response.status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            self.retries += 1
            self.index += 1
            time.sleep(0.05)  # a retry backoff, not a wait for an event
        raise AssertionError("deadline passed")

    def run(self) -> None:
        for n, body in enumerate(self.bodies):
            self._send(body)
            self.acked += 1
            if n % self.resend_every == 0:
                self.index += 1
                self._send(body)


def pg_rows(server: PgServer, url: str) -> dict[str, tuple[int, int]]:
    return {str(r[0]): (int(r[1]), int(r[2])) for r in server.query(
        url, "SELECT id, prompt_tokens, turns FROM agent_sessions")}


def assert_exact(server: PgServer, url: str, tokens: Counter[str], turns: Counter[str], *,
                 updates: int = 0) -> None:
    """`updates`: session-update spans (remembered, but no turn)."""
    rows = pg_rows(server, url)
    assert {s: rows[s][0] for s in tokens} == dict(tokens)
    assert {s: rows[s][1] for s in turns} == dict(turns)
    # The rollup agrees with the sessions, and every span id is remembered once.
    (rollup,) = server.query(url, "SELECT sum(prompt_tokens), sum(turns) "
                                  "FROM collector_usage_hourly")
    assert (int(rollup[0]), int(rollup[1])) == (sum(tokens.values()), sum(turns.values()))
    assert server.query(url, "SELECT count(*) FROM collector_seen_current") == [
        (sum(turns.values()) + updates,)]
    # The fleet view's daily table is the rollup per current agent (kept by triggers through
    # every flush, concurrent collectors and a migration alike).
    assert_daily_is_the_rollup(lambda sql: [
        tuple(int(v) if isinstance(v, Decimal) else v for v in r) for r in server.query(url, sql)])


def test_three_collectors_through_kill_9_and_a_server_restart_count_everything_once(
        start_daemon: StartDaemon, pg_server: PgServer, pg_url: str) -> None:
    daemons = [start_daemon(FAST_FLUSH, postgres_url=pg_url) for _ in range(3)]
    clients = []
    tokens: Counter[str] = Counter()
    turns: Counter[str] = Counter()
    for c in range(3):
        # The same sessions from every client: the collectors contend for the same rows.
        bodies, t, n = workload(f"fleet-{c % 2}", 40, 30)
        tokens.update(t)
        turns.update(n)
        clients.append(FleetClient(daemons, bodies, start=c))
    for client in clients:
        client.start()

    def acked() -> int:
        return sum(c.acked for c in clients)

    steps: list[Callable[[], None]] = [
        lambda: _kill_and_restart(daemons[0]),
        lambda: _kill_and_restart(daemons[1]),
        lambda: pg_server.restart("fast"),
        lambda: _kill_and_restart(daemons[2]),
    ]
    for n, step in enumerate(steps):
        target = (n + 1) * 20
        wait_for(lambda target=target: acked() >= target, f"{target} acknowledged requests",
                 timeout=90)
        step()
    for client in clients:
        client.join(150)
        assert not client.is_alive()
    assert acked() == 120
    assert sum(c.retries for c in clients) > 0  # the faults were felt
    assert_exact(pg_server, pg_url, tokens, turns)


def _kill_and_restart(daemon: Daemon) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait()
    daemon.start()


def test_a_stopped_server_is_answered_503_readyz_says_why_and_the_collector_reconnects(
        start_daemon: StartDaemon, pg_server: PgServer, pg_url: str) -> None:
    daemon = start_daemon(FAST_FLUSH, postgres_url=pg_url)
    bodies, tokens, turns = workload("down", 6, 10)
    assert post(daemon, bodies[0])[0] == 200
    pg_server.stop("fast")
    try:
        status, headers, _ = post(daemon, bodies[1])
        assert status == 503 and "Retry-After" in headers
        status, _, text = get(daemon, "/readyz")
        assert status == 503 and "storage failing" in text and "PostgreSQL" in text, text
    finally:
        pg_server.start()
    # The refused body was kept and is committed once the server is back; its retry and the
    # rest are then accounted exactly once.
    for body in bodies[1:]:
        wait_for(lambda body=body: post(daemon, body)[0] == 200, "an accepted export", 30)
    wait_for(lambda: get(daemon, "/readyz")[0] == 200, "readiness after the server is back")
    assert "reconnected to PostgreSQL" in daemon.log
    assert_exact(pg_server, pg_url, tokens, turns)


@contextmanager
def frozen(server: PgServer) -> Iterator[None]:
    """Every process of the server stopped (SIGSTOP): connections stay open, nothing answers,
    as when a host hangs or a network drops packets."""
    pids = [server.postmaster_pid()]
    children = subprocess.run(["pgrep", "-P", str(pids[0])], capture_output=True, text=True,
                              check=False).stdout.split()
    pids += [int(p) for p in children]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_a_hung_server_is_answered_retryably_not_left_to_the_exporter_timeout(
        start_daemon: StartDaemon, pg_server: PgServer, pg_url: str) -> None:
    daemon = start_daemon(FAST_FLUSH + "[storage]\npostgres_commit_timeout_s = 2\n",
                          postgres_url=pg_url)
    bodies, tokens, turns = workload("hung", 4, 10)
    assert post(daemon, bodies[0])[0] == 200
    with frozen(pg_server):
        status, _, body = post(daemon, bodies[1])
        assert status == 503 and b"PostgreSQL" in body
        # Answered by the commit timeout cutting the connection, not by TCP giving up.
        wait_for(lambda: "no answer from PostgreSQL" in daemon.log, "the timeout's log line")
    for body in bodies[1:]:
        wait_for(lambda body=body: post(daemon, body)[0] == 200, "an accepted export", 30)
    assert_exact(pg_server, pg_url, tokens, turns)


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collector", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def test_sessions_report_and_gauges_read_postgres(start_daemon: StartDaemon, pg_url: str) -> None:
    daemon = start_daemon(FAST_FLUSH, postgres_url=pg_url)
    bodies, tokens, turns = workload("read", 3, 10)
    for body in bodies:
        assert post(daemon, body)[0] == 200
    sessions = run_cli(daemon.config_path, "sessions", "--json")
    assert sessions.returncode == 0, sessions.stderr
    rows = {r["id"]: r for r in json.loads(sessions.stdout)}
    assert {s: rows[s]["prompt_tokens"] for s in tokens} == dict(tokens)
    assert len(rows[next(iter(rows))]) == 13
    table = run_cli(daemon.config_path, "sessions")
    assert table.returncode == 0 and "read-0" in table.stdout
    report = run_cli(daemon.config_path, "report", "model", "--json")
    assert report.returncode == 0, report.stderr
    lines = json.loads(report.stdout)
    assert lines["totals"]["turns"] == sum(turns.values())
    assert lines["totals"]["input_tokens"] == sum(tokens.values())
    _, _, metrics = get(daemon, "/metrics")
    assert f'collector_sessions{{status="active"}} {float(len(tokens))}' in metrics
    assert f"collector_dedupe_window_spans {float(sum(turns.values()))}" in metrics


async def _create_tables(url: str, password: str) -> None:
    store = PostgresStore(ConnectOptions(url, password=password), retention_s=86400,
                          commit_timeout_s=10)
    await store.open()
    await store.close()


def test_the_password_comes_from_a_file_pgpassword_or_pgpass_and_is_never_shown(
        tmp_path: Path, pg_server: PgServer, pg_url: str) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    url = pg_server.url(dbname, user=PASSWORD_USER)
    asyncio.run(_create_tables(url, PASSWORD))
    base = f'[storage]\nbackend = "postgres"\npostgres_url = "{url}"\n'
    plain = tmp_path / "plain.toml"
    plain.write_text(base)
    home = tmp_path / "home"
    home.mkdir()
    no_password = {"HOME": str(home), "PGPASSWORD": "", "PGPASSFILE": str(home / "none")}

    refused = run_cli(plain, "sessions", env=no_password)
    assert refused.returncode == 1 and "cannot connect to PostgreSQL" in refused.stderr
    wrong = run_cli(plain, "sessions", env={**no_password, "PGPASSWORD": "not-it"})
    assert wrong.returncode == 1 and "password authentication failed" in wrong.stderr
    assert "not-it" not in wrong.stderr

    assert run_cli(plain, "sessions", env={**no_password, "PGPASSWORD": PASSWORD}
                   ).returncode == 0
    pgpass = home / ".pgpass"
    pgpass.write_text(f"127.0.0.1:{pg_server.port}:*:{PASSWORD_USER}:{PASSWORD}\n")
    pgpass.chmod(0o600)
    ok = run_cli(plain, "sessions", env={**no_password, "PGPASSFILE": str(pgpass)})
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "pw.txt").write_text(PASSWORD + "\n")
    with_file = tmp_path / "file.toml"
    with_file.write_text(base + 'postgres_password_file = "pw.txt"\n')
    ok = run_cli(with_file, "sessions", env=no_password)
    assert ok.returncode == 0, ok.stderr
    assert PASSWORD not in ok.stdout + ok.stderr
    shown = run_cli(with_file, "check-config")
    assert PASSWORD not in shown.stdout and '"password": "<set>"' in shown.stdout


def test_collectors_started_together_create_the_schema_once(
        tmp_path: Path, pg_server: PgServer, pg_url: str) -> None:
    # Several daemons creating tables at once serialize on an advisory lock; the others find
    # the tables and check them. Built one after another (ports), started at once.
    daemons = [Daemon(tmp_path / f"d{i}", postgres_url=pg_url) for i in range(3)]
    threads = [threading.Thread(target=d.start) for d in daemons]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(d.proc is not None and d.proc.poll() is None for d in daemons)
        assert pg_server.query(pg_url, "SELECT count(*) FROM information_schema.columns "
                                       "WHERE table_name = 'agent_sessions'") == [(13,)]
        for daemon in daemons:
            assert post(daemon, workload("x", 1, 3)[0][0])[0] == 200
    finally:
        for daemon in daemons:
            daemon.kill()


def test_a_sqlite_database_moves_into_postgres_once_and_merges_with_what_is_there(
        start_daemon: StartDaemon, pg_server: PgServer, pg_url: str) -> None:
    # A SQLite collector's history, and a PostgreSQL collector already running on shared
    # sessions ("move-1" is in both).
    old = start_daemon(FAST_FLUSH)
    old_bodies, tokens, turns = workload("move", 4, 10)
    for body in old_bodies:
        assert post(old, body)[0] == 200
    assert post(old, request_bytes(make_span(trace_id=77, span_id=1, end=T0 + 99 * SECOND,
                                             attrs={"session.id": "move-1",
                                                    "agent.session.status": "completed"},
                                             resource={"team.id": "platform"})))[0] \
        == 200
    # A model call naming no session, held in SQLite until its trace names one.
    assert post(old, request_bytes(make_span(
        trace_id=88, span_id=3, parent_id=1, attrs={
            "gen_ai.operation.name": "chat", "gen_ai.request.model": "test-model",
            "gen_ai.usage.input_tokens": 500, "gen_ai.usage.output_tokens": 50},
        resource={"project": "held-project"})))[0] == 200
    assert old.stop() == 0
    new = start_daemon(FAST_FLUSH, postgres_url=pg_url)
    new_bodies, more_tokens, more_turns = workload("move", 2, 10)
    for body in new_bodies:
        assert post(new, body)[0] == 200
    tokens.update(more_tokens)
    turns.update(more_turns)
    config = new.workdir / "migrate.toml"
    config.write_text(new.config_path.read_text())

    moved = run_cli(config, "migrate-sqlite", "--from", str(old.db_path))
    assert moved.returncode == 0, moved.stderr
    assert "moved" in moved.stdout and f"{4 * 10 + 2} span ids" in moved.stdout
    assert "1 held usage records" in moved.stdout
    again = run_cli(config, "migrate-sqlite", "--from", str(old.db_path))
    assert again.returncode == 0 and "nothing to do" in again.stdout
    assert_exact(pg_server, pg_url, tokens, turns, updates=2)
    # The latest status set in SQLite (by span time) survived the merge.
    assert pg_server.query(pg_url, "SELECT status FROM agent_sessions WHERE id = 'move-1'") == [
        ("completed",)]
    # Its dimensions moved with it.
    assert pg_server.query(pg_url, "SELECT dimension, value FROM collector_session_dimensions "
                                   "WHERE session_id = 'move-1'") == [("team", "platform")]
    # A span the SQLite collector accounted, retried into PostgreSQL, counts nothing.
    assert post(new, old_bodies[0])[0] == 200
    assert_exact(pg_server, pg_url, tokens, turns, updates=2)
    # The held call moved with its wait: its agent span, now sent to PostgreSQL, resolves it.
    assert pg_server.query(pg_url, "SELECT value FROM collector_meta "
                                   "WHERE name = 'held_count'") == [(1,)]
    assert post(new, request_bytes(make_span(
        trace_id=88, span_id=1, name="invoke_agent", attrs={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.conversation.id": "move-held"})))[0] == 200
    assert pg_server.query(pg_url, "SELECT prompt_tokens, completion_tokens FROM "
                                   "agent_sessions WHERE id = 'move-held'") == [(500, 50)]
    # The held call kept its resource's tags through the move and its wait.
    assert pg_server.query(pg_url, "SELECT dimension, value FROM collector_session_dimensions "
                                   "WHERE session_id = 'move-held'") == [
        ("project", "held-project")]
    assert pg_server.query(pg_url, "SELECT count(*) FROM collector_held_usage") == [(0,)]
    wrong = run_cli(old.config_path, "migrate-sqlite")
    assert wrong.returncode == 2 and 'storage.backend must be "postgres"' in wrong.stderr
