"""The `collector` command: serve, sessions, report, budgets, check-config."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import itertools
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from collector import __version__, report
from collector.config import Config, ConfigError, default_config, load_config
from collector.signals.traces import STATUSES
from collector.store import open_reader
from collector.store.base import Reader, SchemaError, StorageError

log = logging.getLogger("collector")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DISTRIBUTION = "agent-usage-collector"  # the installed package --version asks about
CONFIG_HELP = ("TOML config file (default: none, the documented defaults: data under ./data, "
               "listeners on 127.0.0.1)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = default_config() if args.config is None else load_config(args.config)
    except ConfigError as exc:
        print(f"collector: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    handler: Any = {"serve": _serve, "sessions": _sessions, "check-config": _check_config,
                    "report": _report, "migrate-sqlite": _migrate_sqlite,
                    "budgets": _budgets}
    code: int = handler[args.command](config, args)
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collector",
                                     description="OTLP agent usage collector")
    parser.add_argument("--version", action=_Version, help="print the installed version")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", help=CONFIG_HELP)
    sessions = sub.add_parser("sessions", help="list sessions, most recently active first")
    sessions.add_argument("--config", help=CONFIG_HELP)
    sessions.add_argument("--status", choices=STATUSES, help="only sessions with this status")
    sessions.add_argument("--limit", type=_positive_int, help="at most this many rows")
    sessions.add_argument("--json", action="store_true", help="a JSON array of row objects")
    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("--config", help=CONFIG_HELP)
    rep = sub.add_parser("report", help="usage by day, month, session, model or who spends",
                         description="Tokens by kind, turns and cost from the hourly rollup. "
                         "Days and months are in --timezone (UTC by default).")
    # Checked once the config is read: its [attribution] dimensions are reports too.
    rep.add_argument("kind", metavar="KIND",
                     help=f"one of {', '.join(report.REPORTS)}, or a dimension of the "
                     "config's [attribution] (team, department, cost_center, project by "
                     "default)")
    rep.add_argument("--config", help=CONFIG_HELP)
    rep.add_argument("--since", type=_date, help="first day included (YYYY-MM-DD)")
    rep.add_argument("--until", type=_date, help="last day included (YYYY-MM-DD)")
    rep.add_argument("--json", action="store_true", help="the same numbers as JSON")
    rep.add_argument("--breakdown", action="store_true", help="split each line by model")
    rep.add_argument("--timezone", type=_zone, default="UTC",
                     help="IANA time zone for days and months, e.g. Europe/Berlin (default UTC)")
    budgets = sub.add_parser(
        "budgets", help="each budget's spend in its current period",
        description="Spend, limit, share and the end-of-period projection at the current burn "
        "rate of every [[budgets]] instance (the fleet, or each value of its dimension) in its "
        "current period and time zone, with the thresholds already alerted.")
    budgets.add_argument("--config", help=CONFIG_HELP)
    budgets.add_argument("--json", action="store_true", help="the same numbers as JSON")
    migrate = sub.add_parser(
        "migrate-sqlite", help="move a SQLite database's data into the configured PostgreSQL",
        description="Adds the sessions, rollup and remembered span ids of a SQLite database "
        "to the PostgreSQL database of the config (storage.backend = \"postgres\"), in one "
        "transaction. Safe to run again: a database already moved is not added twice. Stop "
        "the collector that writes the SQLite file first.")
    migrate.add_argument("--config", help=CONFIG_HELP)
    migrate.add_argument("--from", dest="source", type=Path,
                         help="the SQLite file (default: storage.sqlite_path)")
    return parser


class _Version(argparse.Action):
    """`collector --version`: the installed distribution's version, looked up only when asked
    (importlib.metadata scans sys.path, a cost every report would pay otherwise)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version(DISTRIBUTION)
        except PackageNotFoundError:  # run from a checkout that was never installed
            installed = f"{__version__} (not installed)"
        print(f"collector {installed}")
        parser.exit(EXIT_OK)


def _migrate_sqlite(config: Config, args: argparse.Namespace) -> int:
    if config.postgres is None:
        print(f"collector: {config.source}: storage.backend must be \"postgres\" to move a "
              "SQLite database into PostgreSQL", file=sys.stderr)
        return EXIT_USAGE
    source: Path = args.source or config.sqlite_path
    if not source.is_file():
        print(f"collector: no SQLite database at {source}", file=sys.stderr)
        return EXIT_FAILURE
    from collector.store import connect_options
    from collector.store.postgres import migrate_sqlite

    options = connect_options(config.postgres)
    try:
        result = migrate_sqlite(source, options, retention_s=config.dedupe_retention_s)
    except (StorageError, SchemaError, sqlite3.Error) as exc:
        print(f"collector: nothing moved: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if result.already:
        print(f"{source} was moved into {options.where} before; nothing to do")
    else:
        print(f"moved {source} into {options.where}: {result.sessions} sessions, "
              f"{result.hours} rollup rows, {result.span_ids} span ids, "
              f"{result.held} held usage records, {result.budget_rows} budget rows")
    return EXIT_OK


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _zone(text: str) -> str:
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown time zone: {text!r}") from None
    return text


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
    # Imported here: the network stack (grpc, aiohttp) is slow to import and only serve needs
    # it, so `collector report` and `collector sessions` start in a fraction of the time.
    from collector.daemon import serve
    from collector.listeners import ListenerError
    from collector.receivers.common import ReceiverError
    from collector.web.app import WebError
    from collector.web.ops import OpsError

    try:
        return _run(serve(config))
    except (StorageError, SchemaError, ListenerError, ReceiverError, OpsError, WebError,
            sqlite3.Error, OSError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def _reader(config: Config) -> Reader | None:
    """The configured database's reader, or None (after saying why) when there is none yet."""
    reader = open_reader(config)
    problem = reader.missing()
    if problem is None:
        return reader
    print(f"collector: {problem}", file=sys.stderr)
    return None


def _sessions(config: Config, args: argparse.Namespace) -> int:
    reader = _reader(config)
    if reader is None:
        return EXIT_FAILURE
    try:
        rows = reader.read_sessions(status=args.status, limit=args.limit)
    except StorageError as exc:
        print(f"collector: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        reader.close()
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        cells = [[_cell(name, row[name]) for name in SHOWN_COLUMNS] for row in rows]
        _print_table(f"agent sessions ({len(rows)}) in {reader.description}", SHOWN_COLUMNS,
                     [name in NUMERIC for name in SHOWN_COLUMNS], cells)
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


def _print_table(title: str, headers: Sequence[str], numeric: Sequence[bool],
                 rows: Sequence[Sequence[str]], totals: Sequence[str] | None = None) -> None:
    """A rich table on a terminal; plain aligned text when piped (for grep and friends).

    Cells hold agent text (ids, models, users): both ways print it literally, every character
    a terminal would act on shown as an escape (see `literal`), and on a terminal each cell is
    a rich Text, never markup, so `[/bold]` is a model name and not a style."""
    # One C-level scan of all cells first: a 50,000-line report of plain text is not copied.
    if not "".join(itertools.chain.from_iterable(rows)).isprintable():
        rows = [[literal(cell) for cell in cells] for cells in rows]
    if totals is not None:
        totals = [literal(cell) for cell in totals]
    title = literal(title)
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(title=Text(title))
        for header, num in zip(headers, numeric, strict=True):
            table.add_column(Text(header), justify="right" if num else "left")
        for i, cells in enumerate(rows):
            table.add_row(*map(Text, cells),
                          end_section=totals is not None and i == len(rows) - 1)
        if totals is not None:
            table.add_row(*map(Text, totals), style="bold")
        Console(highlight=False, emoji=False, markup=False).print(table)
        return
    lines = _aligned(headers, numeric, [*rows, totals] if totals is not None else rows)
    sys.stdout.write("\n".join(lines) + "\n")  # one write: a session report has 50,000 lines


def literal(text: str) -> str:
    """`text` with every character that is not printable (controls such as ESC, which would
    drive the terminal; bidi and other format characters, which would reorder or hide what
    follows; line and paragraph separators) written as a Python-style escape: \\x1b, \\u202e.
    Printable text is returned as it is, so the common case costs one C-level scan."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


BUDGET_HEADERS = ("budget", "scope", "period", "spend USD", "limit USD", "share %",
                  "projected USD", "alerted")
BUDGET_NUMERIC = (False, False, False, True, True, True, True, False)


def _budgets(config: Config, args: argparse.Namespace) -> int:
    from collector.budgets.status import budget_status, local_iso, read_status, to_json

    now_ns = time.time_ns()
    status = budget_status(config.budgets, [], [], now_ns)
    if config.budgets:
        reader = _reader(config)
        if reader is None:
            return EXIT_FAILURE
        try:
            status = read_status(reader, config.budgets, now_ns)
        except StorageError as exc:
            print(f"collector: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        finally:
            reader.close()
    if args.json:
        json.dump(to_json(status), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not config.budgets:
        print(f"no budgets configured in {config.source} (see [[budgets]] in the README)")
        return EXIT_OK
    rows = [[s.budget, s.scope,
             f"{s.period} from {local_iso(s.period_start_ns, s.timezone)[:10]} ({s.timezone})",
             report.format_usd(s.spend_cents), f"${s.limit_usd:,.2f}", f"{s.share * 100:.1f}",
             report.format_usd(s.projected_cents),
             ", ".join(f"{t:g}" for t in s.alerted) or "-"] for s in status.instances]
    _print_table("budgets, current period", BUDGET_HEADERS, BUDGET_NUMERIC, rows)
    return EXIT_OK


def _check_config(config: Config, args: argparse.Namespace) -> int:
    effective = json.loads(json.dumps(asdict(config), default=str))
    effective["auth_token"] = "<set>" if config.auth_token else None
    # Names and roles only: not even a token's hash is printed.
    effective["auth"] = {"tokens": [{"name": t.name, "roles": sorted(t.roles)}
                                    for t in config.auth.tokens]}
    if config.postgres is not None:
        effective["postgres"]["password"] = "<set>" if config.postgres.password else None
    for key in ("grpc_endpoint", "http_endpoint"):
        endpoint = getattr(config.receivers, key)
        effective["receivers"][key] = "" if endpoint is None else str(endpoint)
    effective["ops_endpoint"] = "" if config.ops_endpoint is None else str(config.ops_endpoint)
    effective["web_endpoint"] = "" if config.web_endpoint is None else str(config.web_endpoint)
    effective["dialects"] = {d.name: d.summary() for d in config.dialects}
    # A sink's URL may be its credential (a Slack webhook's path is), its headers and
    # secret are: only the scheme and host, header names and whether a secret is set.
    effective["alert_sinks"] = [
        {"name": s.name, "kind": s.kind, "url": _url_origin(s.url),
         "headers": {name: "<set>" for name in s.headers},
         "secret": "<set>" if s.secret is not None else None} for s in config.alert_sinks]
    print(json.dumps(effective, indent=2, sort_keys=True))
    return EXIT_OK


def _url_origin(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/<hidden>"


# The rollup grouping each report reads (see collector.store.sqlite.read_usage). The model report
# folds (hour, model) sums too: they stream in the table's key order, while a bare GROUP BY
# model would sort every row.
REPORT_GROUPS = {"daily": "hour", "monthly": "hour", "session": "session", "model": "hour",
                 "agent": "agent", "user": "user", "host": "host", "credential": "credential"}


def _report(config: Config, args: argparse.Namespace) -> int:
    # A report makes a few hundred thousand small objects that all live until it is printed
    # and form no cycles: the cyclic garbage collector would only walk them over and over
    # (a quarter of a 50,000-session report's time). Paused, and resumed for in-process callers.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _print_report(config, args)
    finally:
        if was_enabled:
            gc.enable()


def _print_report(config: Config, args: argparse.Namespace) -> int:
    dimensions = tuple(d.name for d in config.dimensions)
    kinds = report.report_kinds(dimensions)
    if args.kind not in kinds:
        print(f"collector: report: unknown kind {literal(args.kind)!r}; choose from "
              f"{', '.join(kinds)}", file=sys.stderr)
        return EXIT_USAGE
    if args.since and args.until and args.since > args.until:
        print(f"collector: --since {args.since} is after --until {args.until}", file=sys.stderr)
        return EXIT_USAGE
    reader = _reader(config)
    if reader is None:
        return EXIT_FAILURE
    tz = ZoneInfo(args.timezone)
    lo, hi = report.hour_bounds(args.since, args.until, tz)
    try:
        rows = reader.read_usage(group=REPORT_GROUPS.get(args.kind, args.kind), lo=lo, hi=hi)
    except StorageError as exc:
        print(f"collector: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        reader.close()
    result = report.build_report(args.kind, (report.RollupRow(*r) for r in rows), tz=tz,
                                 timezone=args.timezone, breakdown=args.breakdown,
                                 since=args.since, until=args.until, dimensions=dimensions)
    if args.json:
        sys.stdout.write(report.json_report(result, tz))
        return EXIT_OK
    table = report.to_table(result, tz)
    _print_table(f"{args.kind} usage ({args.timezone})", table.headers, table.numeric,
                 table.rows, table.totals)
    return EXIT_OK


def _aligned(headers: Sequence[str], numeric: Sequence[bool],
             rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain columns for pipes: numbers right-aligned, text left, two spaces apart."""
    everything = [headers, *rows]
    widths = [max(map(len, column)) for column in zip(*everything, strict=True)]
    # One str.format per row, the padding of every cell written into the template.
    template = "  ".join(f"{{:{'>' if num else '<'}{width}}}"
                         for width, num in zip(widths, numeric, strict=True))
    return [template.format(*row).rstrip() for row in everything]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
