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


SHOWN_COLUMNS = ("id", "status", "kind", "channel", "model", "turns", "prompt_tokens",
                 "completion_tokens", "reasoning_tokens", "cost_cents", "created_at",
                 "last_active_at", "goal_text")
NUMERIC = {"turns", "prompt_tokens", "completion_tokens", "reasoning_tokens", "cost_cents"}


def _cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name == "cost_cents":
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _print_table(rows: list[dict[str, Any]], path: Path) -> None:
    """A rich table on a terminal; plain aligned text when piped (for grep and friends)."""
    cells = [[_cell(name, row[name]) for name in SHOWN_COLUMNS] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"agent sessions ({len(rows)}) in {path}")
        for name in SHOWN_COLUMNS:
            table.add_column(name, justify="right" if name in NUMERIC else "left")
        for line in cells:
            table.add_row(*line)
        Console().print(table)
        return
    widths = [max([len(name)] + [len(line[i]) for line in cells])
              for i, name in enumerate(SHOWN_COLUMNS)]

    def fmt(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if name in NUMERIC else v.ljust(w)
                 for v, w, name in zip(values, widths, SHOWN_COLUMNS, strict=True)]
        return "  ".join(parts).rstrip()

    print(fmt(SHOWN_COLUMNS))
    for line in cells:
        print(fmt(line))


def _check_config(config: Config, args: argparse.Namespace) -> int:
    effective = json.loads(json.dumps(asdict(config), default=str))
    effective["auth_token"] = "<set>" if config.auth_token else None
    for key in ("grpc_endpoint", "http_endpoint"):
        endpoint = getattr(config.receivers, key)
        effective["receivers"][key] = "" if endpoint is None else str(endpoint)
    print(json.dumps(effective, indent=2, sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
