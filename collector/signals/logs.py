"""OTLP log records -> usage events, through the dialect of the agent that sent them. Pure.

Most of an agent's log records are not usage (settings, tool decisions, responses); they are
counted as received and ignored. Records of a scope no dialect recognises are not read at all.
Only ids, counts, model, times and session attributes are kept: prompt and response text that
some agents put in their records is never stored (a record without an id of its own is
identified by a digest of its bytes, which is not its text).
"""

from __future__ import annotations

from typing import Any

from collector.dialects.model import EVENT_NAME, LOGS
from collector.signals.records import Record, attributes_of, map_record
from collector.signals.scan import service_name
from collector.signals.traces import MappingOptions, MappingResult
from collector.signals.values import InvalidRecord


def map_logs_request(request: Any, options: MappingOptions, now_ns: int) -> MappingResult:
    """Map an ExportLogsServiceRequest; `result.spans` counts the log records received."""
    result = MappingResult()
    dialects = options.dialects
    for rl in request.resource_logs:
        service = service_name(rl.resource.attributes)
        # Decoded once per dialect: each reads its own attributes of the resource.
        resources: dict[str, dict[str, Any]] = {}
        for sl in rl.scope_logs:
            n = len(sl.log_records)
            result.spans += n
            dialect = dialects.find(service, sl.scope.name)
            if dialect is None or not any(s.signal == LOGS
                                          for s in dialect.calls + dialect.turns):
                result.ignored += n
                continue
            resource = resources.get(dialect.name)
            if resource is None:
                try:
                    resource = resources[dialect.name] = attributes_of(
                        rl.resource.attributes, options, "resource", options.read_for(dialect))
                except InvalidRecord as exc:
                    for _ in range(n):
                        result.reject(str(exc))
                    continue
            for index, lr in enumerate(sl.log_records):
                ref = f"log record {index} of scope {sl.scope.name!r}"
                try:
                    attributes = attributes_of(lr.attributes, options, ref,
                                               options.read_for(dialect))
                    body = lr.body.string_value if lr.body.WhichOneof("value") == \
                        "string_value" else ""
                    event = attributes.get(EVENT_NAME)
                    record = Record(
                        LOGS, (lr.event_name, event if isinstance(event, str) else "", body),
                        attributes, resource, lr.trace_id, lr.span_id, 0,
                        lr.time_unix_nano or lr.observed_time_unix_nano,
                        lr, ref)
                    usage = map_record(dialect, record, options, now_ns, result)
                except InvalidRecord as exc:
                    result.reject(str(exc))
                    continue
                result.take(usage)
    return result
