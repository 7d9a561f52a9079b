"""The systemd unit runs the command this package installs, and waits long enough to drain."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from collector.cli import _parser
from collector.pipeline import SHUTDOWN_FLUSH_DEADLINE_S
from collector.receivers.common import STOP_GRACE_S
from collector.web.ops import STOP_GRACE_S as OPS_STOP_GRACE_S

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "collector.service"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def test_unit_runs_serve_and_check_config_with_one_config() -> None:
    service = unit()["Service"]
    start = shlex.split(service["ExecStart"])
    check = shlex.split(service["ExecStartPre"])
    assert start[0].endswith("/collector") and check[0] == start[0]
    assert _parser().parse_args(start[1:]).command == "serve"
    assert _parser().parse_args(check[1:]).command == "check-config"
    assert start[start.index("--config") + 1] == check[check.index("--config") + 1]


def test_unit_restarts_on_failure_and_lets_shutdown_commit() -> None:
    service = unit()["Service"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    drain = STOP_GRACE_S + SHUTDOWN_FLUSH_DEADLINE_S + OPS_STOP_GRACE_S
    assert int(service["TimeoutStopSec"]) > drain
    assert service["User"] != "root" and service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict" and service["StateDirectory"]
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
