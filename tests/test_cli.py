"""`collector sessions` against the database of a running daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
