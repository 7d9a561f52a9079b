"""Usage reports (daily, monthly, per session, model, agent, user, host) from the hourly
rollup. Pure.

The store hands over rollup rows already summed per (group, model), where the group is a UTC
hour for the daily, monthly and model reports, a session for the session report, and the
session's agent, user or host (from its labels; '' when unknown) for those reports; this
module turns them into report lines. It imports no database or terminal
library, so what a report means is tested without either.

Time zones: the rollup keeps UTC hours, and each hour is counted in the day (and month) in which
it *starts*, in the report's time zone. For zones whose offset is a whole number of hours (UTC,
Europe/Berlin, America/New_York, also across daylight-saving changes) an hour lies within one
local day, so daily and monthly reports are exact. For a zone such as Asia/Kolkata (+05:30) the
UTC hour 18:00-19:00 is 23:30-00:30 local and counts wholly in the earlier day: usage in the
first 30 minutes after local midnight may land in the previous day. `--since`/`--until` select
hours by the same rule, so a line and its filter always agree.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

REPORTS = ("daily", "monthly", "session", "model", "agent", "user", "host", "credential")
# Who spends: one line per label value, ordered like the model report (highest cost first).
# `credential`: the ingest token that carried the usage (its name; collector.security).
LABEL_REPORTS = ("agent", "user", "host", "credential")
# The name of each report's key in tables and JSON.
KEY_NAMES = {"daily": "date", "monthly": "month", "session": "session", "model": "model",
             "agent": "agent", "user": "user", "host": "host", "credential": "credential"}
# Any configured dimension ([attribution]) is a report too, keyed by its own name, and read
# like the label reports (collector.config.attribution keeps its names clear of these).


def report_kinds(dimensions: Iterable[str] = ()) -> tuple[str, ...]:
    """Every report a config offers: the built-in ones, then its dimensions."""
    return REPORTS + tuple(d for d in dimensions if d not in REPORTS)


def key_name(kind: str) -> str:
    return KEY_NAMES.get(kind, kind)


def is_who(kind: str) -> bool:
    """A report with one line per label or dimension value."""
    return kind in LABEL_REPORTS or kind not in REPORTS


NO_MODEL_LABEL = "(none)"  # usage whose spans named no model (stored as ''); also no label
UTC = dt.UTC


class RollupRow(NamedTuple):
    """Sums of the hourly rollup for one (group, model), as the store reads them."""

    group: str  # UTC hour start (daily, monthly, model), session id, or agent/user/host
    model: str
    last_hour: str  # the latest hour with usage, YYYY-MM-DDTHH:00:00.000Z
    turns: int
    prompt_tokens: int  # includes cache reads and writes (GenAI convention, as agent_sessions)
    completion_tokens: int
    reasoning_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_cents: float


@dataclass(slots=True)
class Usage:
    """Token kinds as people read them: input is the uncached part, output includes reasoning."""

    turns: int = 0
    input_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_cents: float = 0.0

    @property
    def total_tokens(self) -> int:
        """Every token once: reasoning is part of output, cache tokens are not part of input."""
        return (self.input_tokens + self.cache_read_tokens + self.cache_write_tokens
                + self.output_tokens)

    def add_row(self, row: RollupRow) -> None:
        self.turns += row.turns
        self.input_tokens += row.prompt_tokens - row.cache_read_tokens - row.cache_write_tokens
        self.cache_read_tokens += row.cache_read_tokens
        self.cache_write_tokens += row.cache_write_tokens
        self.output_tokens += row.completion_tokens
        self.reasoning_tokens += row.reasoning_tokens
        self.cost_cents += row.cost_cents

    def as_dict(self) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "input_tokens": self.input_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
            "cost_usd": round(self.cost_cents / 100, 8),
        }


@dataclass(slots=True)
class Line:
    key: str
    model: str | None  # set with --breakdown: the line is this key's usage of this model
    models: set[str] = field(default_factory=set)  # models the line's usage came from
    last_hour: str = ""
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True, slots=True)
class Report:
    kind: str
    timezone: str
    since: dt.date | None
    until: dt.date | None
    breakdown: bool
    lines: list[Line]
    totals: Usage


def hour_bounds(since: dt.date | None, until: dt.date | None,
                tz: dt.tzinfo) -> tuple[str | None, str | None]:
    """The rollup `hour` range [lo, hi) for local dates since..until, both inclusive.

    An hour is in range when its start falls within those local days: the same rule that
    assigns hours to days, so a filtered report equals the matching lines of an unfiltered one.
    """
    lo = None if since is None else _iso(dt.datetime.combine(since, dt.time(), tz))
    hi = None
    if until is not None:
        hi = _iso(dt.datetime.combine(until + dt.timedelta(days=1), dt.time(), tz))
    return lo, hi


def _iso(moment: dt.datetime) -> str:
    """agent_sessions' time format, so that text order is time order in SQL comparisons."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def parse_hour(hour: str) -> dt.datetime:
    """A rollup hour (YYYY-MM-DDTHH:00:00.000Z); sliced, as strptime is ten times slower."""
    return dt.datetime(int(hour[0:4]), int(hour[5:7]), int(hour[8:10]), int(hour[11:13]),
                       tzinfo=UTC)


def build_report(kind: str, rows: Iterable[RollupRow], *, tz: dt.tzinfo, timezone: str,
                 breakdown: bool = False, since: dt.date | None = None,
                 until: dt.date | None = None, dimensions: Iterable[str] = ()) -> Report:
    """Fold rollup rows into report lines, ordered as people read them, and a totals line.

    Daily and monthly lines run oldest first; sessions most recently active first; models
    by cost, highest first. With `breakdown` each line is split by model (the model report's
    lines already are one per model). `dimensions`: the configured ones, reports too.
    """
    if kind not in report_kinds(dimensions):
        raise ValueError(f"unknown report {kind!r}")
    breakdown = breakdown and kind != "model"
    if kind == "session":
        ordered, totals = _session_lines(rows, breakdown)
        return Report(kind=kind, timezone=timezone, since=since, until=until,
                      breakdown=breakdown, lines=ordered, totals=totals)
    local_day: dict[str, str] = {}  # one conversion per distinct hour, not per row
    who = is_who(kind)

    def key_of(row: RollupRow) -> str:
        if kind == "session":
            return row.group
        if kind == "model":
            return row.model
        if who:
            return row.group
        day = local_day.get(row.group)
        if day is None:
            day = local_day[row.group] = parse_hour(row.group).astimezone(tz).date().isoformat()
        return day if kind == "daily" else day[:7]

    lines: dict[tuple[str, str | None], Line] = {}
    totals = Usage()
    for row in rows:
        key = key_of(row)
        model = row.model if breakdown else None
        line = lines.get((key, model))
        if line is None:
            line = lines[(key, model)] = Line(key, model)
        line.models.add(row.model)
        line.last_hour = max(line.last_hour, row.last_hour)
        line.usage.add_row(row)
        totals.add_row(row)

    ordered = list(lines.values())
    # Within one key, a breakdown lists the most expensive model first.
    ordered.sort(key=lambda line: (-line.usage.cost_cents, line.model or ""))
    if kind in ("daily", "monthly"):
        ordered.sort(key=lambda line: line.key)
    return Report(kind=kind, timezone=timezone, since=since, until=until, breakdown=breakdown,
                  lines=ordered, totals=totals)


def _session_lines(rows: Iterable[RollupRow], breakdown: bool) -> tuple[list[Line], Usage]:
    """The session report's fold: a session report can have a line per session, so this is
    build_report's loop with the per-row work cut down (one dict lookup, no method calls).

    Sums come out as Usage.add_row's would, in the same order: a line's first row is added to
    zeros and the totals take every row in turn, so costs are the same floats.
    """
    lines: dict[tuple[str, str] | str, Line] = {}
    turns = prompt = completion = reasoning = cache_read = cache_write = 0
    cents = 0.0
    for row in rows:
        session, model, last_hour, r_turns, r_prompt, r_completion, r_reasoning, \
            r_cache_read, r_cache_write, r_cents = row
        turns += r_turns
        prompt += r_prompt
        completion += r_completion
        reasoning += r_reasoning
        cache_read += r_cache_read
        cache_write += r_cache_write
        cents += r_cents
        key: tuple[str, str] | str = (session, model) if breakdown else session
        line = lines.get(key)
        if line is None:
            lines[key] = Line(session, model if breakdown else None, {model}, last_hour,
                              Usage(r_turns, r_prompt - r_cache_read - r_cache_write,
                                    r_cache_read, r_cache_write, r_completion, r_reasoning,
                                    0.0 + r_cents))
            continue
        line.models.add(model)
        if last_hour > line.last_hour:
            line.last_hour = last_hour
        line.usage.add_row(row)
    totals = Usage(turns, prompt - cache_read - cache_write, cache_read, cache_write, completion,
                   reasoning, cents)
    ordered = list(lines.values())
    if breakdown:
        # A session's models, most expensive first; then sessions as below, by the session's
        # latest hour (the latest of its lines').
        ordered.sort(key=lambda line: (line.key, -line.usage.cost_cents, line.model or ""))
        last: dict[str, str] = {}
        for line in ordered:
            if line.last_hour > last.get(line.key, ""):
                last[line.key] = line.last_hour
        ordered.sort(key=lambda line: last[line.key], reverse=True)
    else:
        # Most recently active first, then by session id. Rows from collector.store.sqlite come
        # ordered by session, so the first sort finds them sorted.
        ordered.sort(key=_KEY)
        ordered.sort(key=_LAST_HOUR, reverse=True)
    return ordered, totals


_KEY = operator.attrgetter("key")
_LAST_HOUR = operator.attrgetter("last_hour")


def model_label(model: str) -> str:
    return model or NO_MODEL_LABEL


@functools.lru_cache(maxsize=8192)  # sessions share hours: a few thousand, not one per line
def local_hour(hour: str, tz: dt.tzinfo) -> str:
    """The start of a UTC rollup hour in the report's zone, for the session report."""
    return parse_hour(hour).astimezone(tz).strftime("%Y-%m-%d %H:%M")


def to_json(report: Report, tz: dt.tzinfo) -> dict[str, Any]:
    """The report for scripts: the same lines and numbers as the table, unformatted."""
    key = key_name(report.kind)
    out_lines = []
    for line in report.lines:
        item: dict[str, Any] = {key: line.key}
        if report.breakdown:
            item["model"] = line.model
        elif report.kind != "model":
            item["models"] = sorted(line.models)
        if report.kind == "session":
            item["last_active"] = local_hour(line.last_hour, tz)
        item.update(line.usage.as_dict())
        out_lines.append(item)
    return {
        "report": report.kind,
        "timezone": report.timezone,
        "since": None if report.since is None else report.since.isoformat(),
        "until": None if report.until is None else report.until.isoformat(),
        "breakdown": report.breakdown,
        "lines": out_lines,
        "totals": report.totals.as_dict(),
    }


def json_text(data: dict[str, Any]) -> str:
    """`to_json`'s document with one line per report line: readable, and written by the C
    encoder (an indented dump runs the pure-Python one, 10x slower on 50,000 sessions)."""
    return _json_document(data, [json.dumps(line) for line in data["lines"]])


def json_report(report: Report, tz: dt.tzinfo) -> str:
    """`json_text(to_json(report, tz))`, character for character, written straight from the
    lines: a session report has up to a line per session, and a dict per line that json.dumps
    then walks costs three times as much as formatting the line's text directly."""
    key = json.dumps(key_name(report.kind))
    kind, breakdown = report.kind, report.breakdown
    texts = []
    for line in report.lines:
        text = f"{{{key}: {_json_str(line.key)}"
        if breakdown:
            text += f', "model": {"null" if line.model is None else _json_str(line.model)}'
        elif kind != "model":
            models = line.models
            names = (map(_json_str, models) if len(models) == 1
                     else map(_json_str, sorted(models)))
            text += f', "models": [{", ".join(names)}]'
        if kind == "session":
            # local_hour's text is digits, '-', ':' and a space: nothing to escape.
            text += f', "last_active": "{local_hour(line.last_hour, tz)}"'
        u = line.usage
        texts.append(
            f'{text}, "turns": {u.turns}, "input_tokens": {u.input_tokens}, '
            f'"cache_read_tokens": {u.cache_read_tokens}, '
            f'"cache_write_tokens": {u.cache_write_tokens}, "output_tokens": {u.output_tokens}, '
            f'"reasoning_tokens": {u.reasoning_tokens}, "total_tokens": {u.total_tokens}, '
            f'"cost_usd": {_json_float(round(u.cost_cents / 100, 8))}}}')
    return _json_document(to_json(replace(report, lines=[]), tz), texts)


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps writes for a str


def _json_float(value: float) -> str:
    """What json.dumps writes for a float (it spells NaN and the infinities its own way)."""
    return float.__repr__(value) if math.isfinite(value) else json.dumps(value)


def _json_document(data: dict[str, Any], lines: list[str]) -> str:
    parts = []
    for key, value in data.items():
        if key == "lines" and lines:
            inner = ",\n    ".join(lines)
            parts.append(f'  "lines": [\n    {inner}\n  ]')
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


NUMBER_HEADERS = ("turns", "input", "cache read", "cache write", "output", "reasoning",
                  "total tokens", "cost (USD)")


@dataclass(frozen=True, slots=True)
class Table:
    headers: tuple[str, ...]
    numeric: tuple[bool, ...]
    rows: list[tuple[str, ...]]
    totals: tuple[str, ...]


def to_table(report: Report, tz: dt.tzinfo) -> Table:
    """Formatted cells for a terminal table or plain text; the last row is the totals."""
    headers: list[str] = [key_name(report.kind)]
    if report.breakdown:
        headers.append("model")
    elif report.kind != "model":
        headers.append("models")
    if report.kind == "session":
        headers.append("last active")
    text_columns = len(headers)
    headers.extend(NUMBER_HEADERS)
    kind, breakdown = report.kind, report.breakdown
    labelled = kind == "model" or is_who(kind)
    rows = []
    for line in report.lines:
        cells: tuple[str, ...] = (model_label(line.key) if labelled else line.key,)
        if breakdown:
            cells += (model_label(line.model or ""),)
        elif kind != "model":
            models = line.models
            cells += (model_label(next(iter(models))) if len(models) == 1
                      else ", ".join(map(model_label, sorted(models))),)
        if kind == "session":
            cells += (local_hour(line.last_hour, tz),)
        rows.append(cells + _numbers(line.usage))
    totals = ("Total", *([""] * (text_columns - 1)), *_numbers(report.totals))
    numeric = tuple(i >= text_columns for i in range(len(headers)))
    return Table(headers=tuple(headers), numeric=numeric, rows=rows, totals=totals)


def _numbers(u: Usage) -> tuple[str, ...]:
    return (f"{u.turns:,}", f"{u.input_tokens:,}", f"{u.cache_read_tokens:,}",
            f"{u.cache_write_tokens:,}", f"{u.output_tokens:,}", f"{u.reasoning_tokens:,}",
            f"{u.total_tokens:,}", format_usd(u.cost_cents))


def format_usd(cents: float) -> str:
    """Dollars with cents; sub-dollar amounts keep four decimals so small costs stay visible."""
    usd = cents / 100
    return f"${usd:,.2f}" if abs(usd) >= 1 or usd == 0 else f"${usd:.4f}"
