"""A PostgreSQL database of any encoding: SQL_ASCII (what `initdb --locale=C` gives without -E;
the collector exited with KeyError: 'seen_current_count' on it) stores and returns agent text of
any script exactly; an encoding that cannot hold every character is refused at start."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg

from tests.conftest import ROOT, Daemon, make_span
from tests.pg import PgServer
from tests.test_receivers import new_trace

StartDaemon = Callable[..., Daemon]
# Latin, CJK, Cyrillic, an emoji (4 bytes in UTF-8), a combining accent.
SESSION = "séance-模型-😀"
MODEL = "модель-e\u0301"
USER = "ユーザー@例え.jp"


def cli(daemon: Daemon, *args: str) -> Any:
    result = subprocess.run([sys.executable, "-m", "collector", *args, "--config",
                             str(daemon.config_path), "--json"], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def api(daemon: Daemon, path: str) -> Any:
    with urllib.request.urlopen(daemon.web_url + path, timeout=20) as answer:
        return json.loads(answer.read())


def test_a_sql_ascii_database_round_trips_text_of_any_script(
        pg_server: PgServer, start_daemon: StartDaemon) -> None:
    url = pg_server.new_database(encoding="SQL_ASCII")
    assert pg_server.query(url, "SHOW server_encoding") == [(b"SQL_ASCII",)]
    daemon = start_daemon(postgres_url=url)
    daemon.export_http([make_span(trace_id=new_trace(), attrs={
        "session.id": SESSION, "gen_ai.response.model": MODEL,
        "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 2},
        resource={"user.id": USER})])

    (row,) = cli(daemon, "sessions")
    assert (row["id"], row["model"], row["prompt_tokens"]) == (SESSION, MODEL, 40)
    (line,) = cli(daemon, "report", "user")["lines"]
    assert (line["user"], line["input_tokens"]) == (USER, 40)
    found = api(daemon, "/api/sessions?q=" + urllib.parse.quote(SESSION[:8]))["sessions"]
    assert [s["id"] for s in found] == [SESSION]

    # Stored as UTF-8 bytes: what any client asking for UTF8 reads back as the same text.
    with psycopg.connect(url, autocommit=True) as raw:
        stored = raw.execute("SELECT id, model FROM agent_sessions").fetchall()
    assert stored == [(SESSION.encode(), MODEL.encode())]
    assert daemon.stop() == 0


def test_an_encoding_that_cannot_hold_every_character_is_refused_at_start(
        pg_server: PgServer, tmp_path: Any) -> None:
    url = pg_server.new_database(encoding="LATIN1")
    daemon = Daemon(tmp_path / "d", postgres_url=url)
    try:
        daemon.start()
    except RuntimeError:
        pass
    finally:
        daemon.kill()
    assert daemon.proc is not None and daemon.proc.returncode == 1, daemon.log
    assert "the database's encoding is LATIN1" in daemon.log, daemon.log
    assert "ENCODING 'UTF8'" in daemon.log and "Traceback" not in daemon.log
    # Refused before anything was created in it.
    assert pg_server.query(url, "SELECT to_regclass('agent_sessions')") == [(None,)]
