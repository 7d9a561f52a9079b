"""`collector sessions` against the database of a running daemon."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from collector import __version__
from collector.cli import literal
from collector.config import DEFAULTS_SOURCE
from collector.store.sqlite import COLUMN_NAMES
from tests.conftest import SECOND, T0, Daemon, make_span
from tests.test_receivers import new_trace

ROOT = Path(__file__).resolve().parent.parent


def sessions(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", "sessions", "--config", str(daemon.config_path),
         *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_sessions_while_the_daemon_runs(start_daemon: Callable[..., Daemon]) -> None:
    daemon = start_daemon("[sessions]\nstale_after_s = 315360000\n")
    spans: list[Any] = []
    for i, status in enumerate(["active", "completed", "failed"]):
        spans.append(make_span(trace_id=new_trace(), start=T0 + i * SECOND, attrs={
            "session.id": f"cli-{i}", "agent.session.status": status,
            "gen_ai.response.model": "gpt-4o", "gen_ai.usage.input_tokens": 1000 * (i + 1),
            "gen_ai.usage.output_tokens": 1234567}))
    daemon.export_grpc(spans)

    result = sessions(daemon, "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == ["cli-2", "cli-1", "cli-0"]  # newest activity first
    assert all(list(r) == list(COLUMN_NAMES) for r in rows)
    assert rows[0]["prompt_tokens"] == 3000 and rows[0]["status"] == "failed"

    filtered = json.loads(sessions(daemon, "--json", "--status", "completed").stdout)
    assert [r["id"] for r in filtered] == ["cli-1"]
    limited = json.loads(sessions(daemon, "--json", "--limit", "2").stdout)
    assert [r["id"] for r in limited] == ["cli-2", "cli-1"]

    table = sessions(daemon)
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["id", "status", "kind"]
    assert lines[1].split()[:5] == ["cli-2", "failed", "interactive", "cli", "gpt-4o"]
    assert "1,234,567" in lines[1]


def test_sessions_without_a_database_or_with_bad_arguments(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[storage]\nsqlite_path = "missing.db"\n')
    result = subprocess.run([sys.executable, "-m", "collector", "sessions", "--config",
                             str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no database at" in result.stderr
    bad = subprocess.run([sys.executable, "-m", "collector", "sessions", "--config",
                          str(config), "--status", "sleeping"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


# Agent text that a terminal or rich would act on if printed as it came: markup that closes a
# style nobody opened (rich raised MarkupError: exit 1), a hyperlink, colour escapes, a bell,
# a right-to-left override that reorders what follows.
HOSTILE_SESSION = "[link=https://example.invalid]open[/link]"
HOSTILE_MODEL = "[/bold]"
HOSTILE_USER = "\x1b[31mred\x1b[0m"
HOSTILE_HOST = "bell\x07\u202eflip"
HOSTILE_AGENT = "[bold red]agent"
# What the CLI shows for each instead (printable text as it is, the rest escaped).
SHOWN = {HOSTILE_SESSION: HOSTILE_SESSION, HOSTILE_MODEL: HOSTILE_MODEL,
         HOSTILE_USER: "\\x1b[31mred\\x1b[0m", HOSTILE_HOST: "bell\\x07\\u202eflip",
         HOSTILE_AGENT: HOSTILE_AGENT}
TERMINAL_COLUMNS = 400  # wide enough that rich wraps no cell


def on_terminal(argv: list[str]) -> tuple[int, str, str]:
    """Run argv with its standard output on a pseudo-terminal (so isatty() is true and the CLI
    draws rich tables); exit code, what the terminal received, standard error."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, TERMINAL_COLUMNS, 0, 0))
    env = {**os.environ, "COLUMNS": str(TERMINAL_COLUMNS), "TERM": "xterm-256color"}
    for name in ("NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    proc = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = proc.wait(60)
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n"), err


def assert_literal(out: str, shown: list[str]) -> None:
    """Each hostile text appears as SHOWN; none of its raw controls or markup effects."""
    for text in shown:
        assert SHOWN[text] in out, (text, out)
    for raw in ("\x1b[31m", "\x07", "\u202e", "\x1b]8;"):  # colour, bell, override, hyperlink
        assert raw not in out, (raw, out)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("hostile"), "[sessions]\nstale_after_s = 315360000\n")
    daemon.start()
    try:
        daemon.export_http([make_span(trace_id=new_trace(), attrs={
            "session.id": HOSTILE_SESSION, "gen_ai.response.model": HOSTILE_MODEL,
            "gen_ai.usage.input_tokens": 10, "gen_ai.usage.output_tokens": 2},
            resource={"service.name": HOSTILE_AGENT, "user.id": HOSTILE_USER,
                      "host.name": HOSTILE_HOST})])
        yield daemon
    finally:
        daemon.kill()


def cli(daemon: Daemon, *args: str) -> list[str]:
    return [sys.executable, "-m", "collector", *args, "--config", str(daemon.config_path)]


# What each table shows of the hostile values (reports with --breakdown also show the model).
SHOWN_BY = {"sessions": [HOSTILE_SESSION, HOSTILE_MODEL],
            "daily": [HOSTILE_MODEL], "monthly": [HOSTILE_MODEL],
            "session": [HOSTILE_SESSION, HOSTILE_MODEL], "model": [HOSTILE_MODEL],
            "agent": [HOSTILE_AGENT, HOSTILE_MODEL], "user": [HOSTILE_USER, HOSTILE_MODEL],
            "host": [HOSTILE_HOST, HOSTILE_MODEL]}


@pytest.mark.parametrize("table", list(SHOWN_BY))
def test_agent_text_prints_literally_on_a_terminal(hostile: Daemon, table: str) -> None:
    args = ["sessions"] if table == "sessions" else ["report", table, "--breakdown"]
    code, out, err = on_terminal(cli(hostile, *args))
    assert code == 0, err
    assert "\x1b[" in out and "┃" in out  # rich drew it: styles and a box, so a terminal
    assert_literal(out, SHOWN_BY[table])


@pytest.mark.parametrize("table", list(SHOWN_BY))
def test_agent_text_prints_literally_when_piped(hostile: Daemon, table: str) -> None:
    args = ["sessions"] if table == "sessions" else ["report", table, "--breakdown"]
    result = subprocess.run(cli(hostile, *args), capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout.replace("\\x1b", "")  # no escape at all when piped
    assert_literal(result.stdout, SHOWN_BY[table])


def test_literal_escapes_only_what_is_not_printable() -> None:
    assert literal("gpt-4o [x] é 模型 😀") == "gpt-4o [x] é 模型 😀"
    assert literal("a\x1bb\x00\x7f\x9b") == "a\\x1bb\\x00\\x7f\\x9b"
    assert literal("\u2028\u200b\U000e0001") == "\\u2028\\u200b\\U000e0001"


def test_without_a_config_every_command_uses_the_defaults_under_the_working_directory(
        tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "collector", "check-config"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["sqlite_path"] == str(tmp_path / "data" / "agent_sessions.db")
    assert effective["source"] == DEFAULTS_SOURCE
    assert (effective["receivers"]["grpc_endpoint"], effective["web_endpoint"]) == (
        "127.0.0.1:4317", "127.0.0.1:8889")
    missing = subprocess.run([sys.executable, "-m", "collector", "sessions"],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert missing.returncode == 1
    assert str(tmp_path / "data" / "agent_sessions.db") in missing.stderr


def test_version_is_the_packages() -> None:
    result = subprocess.run([sys.executable, "-m", "collector", "--version"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and result.stdout == f"collector {__version__}\n"
