"""The `collector` command: serve, sessions, check-config."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from collector.config import Config, ConfigError, load_config
from collector.mapping import STATUSES
from collector.receivers import ReceiverError
from collector.store import SchemaError, StorageError, read_sessions

log = logging.getLogger("collector")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"collector: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler: Any = {"serve": _serve, "sessions": _sessions, "check-config": _check_config}
    code: int = handler[args.command](config, args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collector",
                                     description="OTLP agent usage collector")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", required=True, help="TOML config file")
    sessions = sub.add_parser("sessions", help="list sessions, most recently active first")
    sessions.add_argument("--config", required=True, help="TOML config file")
    sessions.add_argument("--status", choices=STATUSES, help="only sessions with this status")
    sessions.add_argument("--limit", type=_positive_int, help="at most this many rows")
    sessions.add_argument("--json", action="store_true", help="a JSON array of row objects")
    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("--config", required=True, help="TOML config file")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _serve(config: Config, args: argparse.Namespace) -> int:
    logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    from collector.daemon import serve

    try:
        return _run(serve(config))
    except (StorageError, SchemaError, ReceiverError, sqlite3.Error, OSError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def _sessions(config: Config, args: argparse.Namespace) -> int:
    path = config.sqlite_path
    if not path.exists():
        print(f"collector: no database at {path} (has the daemon run?)", file=sys.stderr)
        return EXIT_FAILURE
    try:
        rows = read_sessions(path, status=args.status, limit=args.limit)
    except sqlite3.Error as exc:
        print(f"collector: cannot read {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(rows, path)
    return EXIT_OK


def _print_table(rows: list[dict[str, Any]], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent sessions ({len(rows)}) in {path}")
    shown = [("id", "left"), ("status", "left"), ("kind", "left"), ("channel", "left"),
             ("model", "left"), ("turns", "right"), ("prompt_tokens", "right"),
             ("completion_tokens", "right"), ("reasoning_tokens", "right"),
             ("cost_cents", "right"), ("created_at", "left"), ("last_active_at", "left"),
             ("goal_text", "left")]
    for name, justify in shown:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        cells = []
        for name, _ in shown:
            value = row[name]
            if name == "cost_cents":
                cells.append(f"{value:.4f}")
            elif isinstance(value, int):
                cells.append(f"{value:,}")
            else:
                cells.append("" if value is None else str(value))
        table.add_row(*cells)
    Console().print(table)


def _check_config(config: Config, args: argparse.Namespace) -> int:
    effective = asdict(config)
    effective["sqlite_path"] = str(config.sqlite_path)
    for key in ("grpc_endpoint", "http_endpoint"):
        endpoint = getattr(config.receivers, key)
        effective["receivers"][key] = "" if endpoint is None else str(endpoint)
    print(json.dumps(effective, indent=2, sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
