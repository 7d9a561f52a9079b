"""Shared test parts: a real daemon in a subprocess, real SDK exporters, the real SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http import Compression as HttpCompression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from collector.store.base import DAILY_TABLE

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "collector ready"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
# A fixed base time keeps expected timestamps exact: 2026-01-01T00:00:00Z.
T0 = 1_767_225_600_000_000_000
MS = 1_000_000
SECOND = 1_000_000_000


_ports_given: set[int] = set()


def free_port() -> int:
    """A port free now and never given before in this run: a daemon takes four, asked for one
    after another, and the kernel may hand a just-released port out again."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def make_span(
    *,
    trace_id: int = 1,
    span_id: int = 1,
    parent_id: int | None = None,
    name: str = "span",
    attrs: Mapping[str, Any] | None = None,
    resource: Mapping[str, Any] | None = None,
    start: int = T0,
    end: int | None = None,
) -> ReadableSpan:
    """A finished SDK span, exactly as an instrumented agent would hand it to its exporter."""
    ctx = SpanContext(trace_id=trace_id, span_id=span_id, is_remote=False,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    parent = None
    if parent_id is not None:
        parent = SpanContext(trace_id=trace_id, span_id=parent_id, is_remote=False,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return ReadableSpan(
        name=name, context=ctx, parent=parent, kind=SpanKind.INTERNAL,
        resource=Resource(dict(resource or {})), attributes=dict(attrs or {}),
        start_time=start, end_time=start + MS if end is None else end,
    )


class Daemon:
    """`collector serve` in a subprocess with its own ports and database."""

    def __init__(self, workdir: Path, extra_config: str = "", *, db_path: Path | None = None,
                 grpc: bool = True, http: bool = True, ops: bool = True,
                 web: bool = True, postgres_url: str | None = None) -> None:
        """`ops=False` / `web=False` leave [ops] / [web] to `extra_config` (else each is on a
        free port). `postgres_url`: store in that PostgreSQL database instead of the SQLite
        file."""
        self.postgres_url = postgres_url
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.ops_port = free_port()  # never the default 8888: daemons run side by side
        self.web_port = free_port()
        self.db_path = db_path or workdir / "data" / "sessions.db"
        grpc_ep = f"127.0.0.1:{self.grpc_port}" if grpc else ""
        http_ep = f"127.0.0.1:{self.http_port}" if http else ""
        self.config_path = workdir / "collector.toml"
        base = (f'[receivers.otlp]\ngrpc_endpoint = "{grpc_ep}"\nhttp_endpoint = "{http_ep}"\n'
                f'[storage]\nsqlite_path = "{self.db_path}"\n')
        if postgres_url is not None:
            base += f'backend = "postgres"\npostgres_url = "{postgres_url}"\n'
        if ops:
            base += f'[ops]\nendpoint = "127.0.0.1:{self.ops_port}"\n'
        if web:
            base += f'[web]\nendpoint = "127.0.0.1:{self.web_port}"\n'
        self.config_path.write_text(merge_toml(base, extra_config))
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/traces"

    @property
    def grpc_endpoint(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> Daemon:
        self.lines = []
        self._ready.clear()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "collector", "serve", "--config", str(self.config_path)],
            cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("daemon did not start:\n" + self.log)
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if READY_LINE in line:
                self._ready.set()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it to exit; returns its exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(STOP_TIMEOUT_S)
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(5)

    def http_exporter(self, **kwargs: Any) -> HttpExporter:
        return HttpExporter(endpoint=self.http_url, timeout=20, **kwargs)

    def grpc_exporter(self, **kwargs: Any) -> GrpcExporter:
        return GrpcExporter(endpoint=self.grpc_endpoint, insecure=True, timeout=20, **kwargs)

    def export_http(self, spans: Sequence[ReadableSpan], *, gzip: bool = False) -> None:
        compression = HttpCompression.Gzip if gzip else HttpCompression.NoCompression
        exporter = self.http_exporter(compression=compression)
        try:
            assert exporter.export(list(spans)) == SpanExportResult.SUCCESS, self.log
        finally:
            exporter.shutdown()  # type: ignore[no-untyped-call]  # unannotated in the SDK

    def export_grpc(self, spans: Sequence[ReadableSpan], *, gzip: bool = False) -> None:
        import grpc

        compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
        exporter = self.grpc_exporter(compression=compression)
        try:
            assert exporter.export(list(spans)) == SpanExportResult.SUCCESS, self.log
        finally:
            exporter.shutdown()

    def rows(self) -> dict[str, dict[str, Any]]:
        if self.postgres_url is not None:
            return read_pg_rows(self.postgres_url)
        return read_rows(self.db_path)

    def row(self, session_id: str) -> dict[str, Any]:
        return self.rows()[session_id]


def read_rows(db_path: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(db_path)
    try:
        conn.row_factory = sqlite3.Row
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM agent_sessions")}
    finally:
        conn.close()


def read_pg_rows(url: str) -> dict[str, dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as conn:
        return {r["id"]: dict(r) for r in conn.execute("SELECT * FROM agent_sessions")}


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One real PostgreSQL server for the whole run (tests take a fresh database each).
    If it cannot start, every test using it fails with the reason: it is never skipped."""
    from tests.pg import PgServer

    server = PgServer()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """A fresh, empty database on the shared server."""
    url: str = pg_server.new_database()
    return url


def merge_toml(base: str, extra: str) -> str:
    """Append extra TOML; a [section] present in both is merged by moving its keys up."""
    sections: dict[str, list[str]] = {}
    order: list[str] = []
    for text in (base, extra):
        current = ""
        for line in text.splitlines():
            stripped = line.strip()
            if stripped.startswith("[") and not stripped.startswith("[["):
                current = stripped
                if current not in sections:
                    sections[current] = []
                    order.append(current)
                continue
            if stripped:
                sections.setdefault(current, [])
                if current not in order:
                    order.insert(0, current)
                sections[current].append(line)
    out: list[str] = []
    for name in order:
        if name:
            out.append(name)
        out.extend(sections[name])
    return "\n".join(out) + "\n"


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Any]:
    """Start daemons for one test; every one is killed at the end whatever happened."""
    started: list[Daemon] = []

    def start(extra_config: str = "", **kwargs: Any) -> Daemon:
        daemon = Daemon(tmp_path / f"d{len(started)}", extra_config, **kwargs)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        daemon.kill()


def module_daemon(tmp_path_factory: pytest.TempPathFactory, name: str,
                  extra_config: str) -> Iterator[Daemon]:
    """Body of a module-scoped daemon fixture: started once, killed whatever happened."""
    daemon = Daemon(tmp_path_factory.mktemp(name), extra_config)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.kill()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for tests that only need distinct session ids (saves start-up time)."""
    yield from module_daemon(tmp_path_factory, "shared",
                             '[pricing."test-model"]\ninput = 1.0\noutput = 2.0\n'
                             'cache_read = 0.5\ncache_write = 4.0\n')


# The daily table (collector_usage_daily) against the rollup it must equal, grouped by each
# session's current agent: the same SQL on both backends.
DAILY_FROM_ROLLUP = (
    "SELECT substr(h.hour, 1, 10) AS day, h.model, coalesce(l.agent, '') AS agent, "
    "sum(h.turns), sum(h.prompt_tokens), sum(h.completion_tokens), sum(h.reasoning_tokens), "
    "sum(h.cache_read_tokens), sum(h.cache_write_tokens), sum(h.cost_cents) "
    "FROM collector_usage_hourly AS h LEFT JOIN collector_session_labels AS l "
    "ON l.id = h.session_id GROUP BY 1, 2, 3 ORDER BY 1, 2, 3")
DAILY_ROWS = (f"SELECT day, model, agent, turns, prompt_tokens, completion_tokens, "
              f"reasoning_tokens, cache_read_tokens, cache_write_tokens, cost_cents "
              f"FROM {DAILY_TABLE} ORDER BY day, model, agent")


def assert_daily_is_the_rollup(read: Callable[[str], list[Any]]) -> None:
    """`read`: a query's rows, on either backend."""
    want = read(DAILY_FROM_ROLLUP)
    got = read(DAILY_ROWS)
    assert [tuple(w[:9]) for w in want] == [tuple(g[:9]) for g in got]
    assert [g[9] for g in got] == pytest.approx([w[9] for w in want], abs=1e-9)


# -- the fleet view in a real browser --------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
UI_TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/deps does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page that records console errors and failed requests; none are allowed."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.set_default_timeout(UI_TIMEOUT_MS)
    yield page
    context.close()
    assert problems == []
