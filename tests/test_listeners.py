"""Several collectors on one host: a second one whose listener is taken refuses before it
starts anything, naming the key to change and the file; with listeners of their own both run."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from collector.config import (
    DEFAULTS_SOURCE,
    Endpoint,
    ReceiverConfig,
    default_config,
    load_config,
)
from collector.listeners import ListenerError, check_listeners
from tests.conftest import Daemon, free_port, make_span
from tests.test_receivers import new_trace

StartDaemon = Callable[..., Daemon]
LISTENERS = {"receivers.otlp.grpc_endpoint": "grpc_port",  # key -> the Daemon's port of it
             "receivers.otlp.http_endpoint": "http_port", "ops.endpoint": "ops_port",
             "web.endpoint": "web_port"}


def ready(daemon: Daemon) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.ops_port}/readyz",
                                timeout=20) as answer:
        status: int = answer.status
        return status


def export_one(daemon: Daemon, session: str) -> None:
    daemon.export_http([make_span(trace_id=new_trace(), attrs={
        "session.id": session, "gen_ai.response.model": "m",
        "gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 1})])


@pytest.mark.parametrize("key", list(LISTENERS))
def test_a_second_collector_on_a_taken_listener_refuses_naming_the_key(
        start_daemon: StartDaemon, tmp_path: Path, key: str) -> None:
    first = start_daemon()
    work = tmp_path / "second"
    work.mkdir()
    ports = {k: free_port() for k in LISTENERS}
    ports[key] = getattr(first, LISTENERS[key])
    config = work / "collector.toml"
    db = work / "data" / "sessions.db"
    config.write_text(
        f'[receivers.otlp]\ngrpc_endpoint = "127.0.0.1:{ports["receivers.otlp.grpc_endpoint"]}"\n'
        f'http_endpoint = "127.0.0.1:{ports["receivers.otlp.http_endpoint"]}"\n'
        f'[storage]\nsqlite_path = "{db}"\n'
        f'[ops]\nendpoint = "127.0.0.1:{ports["ops.endpoint"]}"\n'
        f'[web]\nendpoint = "127.0.0.1:{ports["web.endpoint"]}"\n')
    result = subprocess.run([sys.executable, "-m", "collector", "serve", "--config",
                             str(config)], capture_output=True, text=True, timeout=120, cwd=work)
    assert result.returncode == 1, result.stderr
    assert f'{key} = "127.0.0.1:{ports[key]}"' in result.stderr, result.stderr
    assert f"set them in {config}" in result.stderr
    assert "already in use" in result.stderr and "nothing started" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing of the second was started: no database, not even its directory.
    assert not db.parent.exists()
    # The first is unharmed: ready, and taking exports.
    assert ready(first) == 200
    export_one(first, "first-still-works")
    assert first.row("first-still-works")["prompt_tokens"] == 5


def test_two_collectors_with_listeners_of_their_own_both_run(
        start_daemon: StartDaemon) -> None:
    one, two = start_daemon(), start_daemon()
    export_one(one, "on-one")
    export_one(two, "on-two")
    assert list(one.rows()) == ["on-one"] and list(two.rows()) == ["on-two"]
    assert ready(one) == ready(two) == 200


def test_one_configs_own_overlapping_listeners_are_found(tmp_path: Path) -> None:
    """`localhost` and `127.0.0.1` on one port are different strings, one address."""
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'[receivers.otlp]\ngrpc_endpoint = "127.0.0.1:{free_port()}"\n'
                      f'http_endpoint = "127.0.0.1:{free_port()}"\n'
                      f'[ops]\nendpoint = "127.0.0.1:{port}"\n'
                      f'[web]\nendpoint = "localhost:{port}"\n')
    with pytest.raises(ListenerError, match=rf"web\.endpoint = \"localhost:{port}\""):
        check_listeners(load_config(config))


def test_a_clash_on_the_defaults_says_no_config_was_given() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = replace(default_config(), web_endpoint=Endpoint("127.0.0.1", port),
                         ops_endpoint=None, receivers=ReceiverConfig(
                             grpc_endpoint=None, http_endpoint=Endpoint("127.0.0.1", free_port())))
        assert config.source == DEFAULTS_SOURCE
        with pytest.raises(ListenerError) as raised:
            check_listeners(config)
    message = str(raised.value)
    assert f'web.endpoint = "127.0.0.1:{port}"' in message and "no --config" in message
    assert "receivers.otlp.http_endpoint" not in message  # the free one is not named


def test_benchmark_collectors_start_side_by_side(tmp_path: Path) -> None:
    """bench.pg's two-collector step starts two at once (it stopped at the fixed web port)."""
    from bench.pg import start

    servers = []
    try:
        for tag in ("a", "b"):
            servers.append(start(tmp_path, tag, f'sqlite_path = "{tmp_path / tag}.db"'))
    finally:
        for server in servers:
            server.stop()
    assert [s.proc.returncode for s in servers] == [0, 0]
