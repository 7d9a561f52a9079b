"""Captured agent payloads (tests/captures/) as OTLP requests, for the tests that replay them.

The captures hold bodies as OTLP/JSON (ids in hex), either raw as the agent sent them or
decoded from protobuf by the capture server, one export per list entry with its path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collector.receivers.otlp import decode_json
from collector.signals import Signal

CAPTURES = Path(__file__).resolve().parent / "captures"
PATH_SIGNALS = {"/v1/traces": Signal.TRACES, "/v1/logs": Signal.LOGS,
                "/v1/metrics": Signal.METRICS}
TOP_SIGNALS = {"resourceSpans": Signal.TRACES, "resourceLogs": Signal.LOGS,
               "resourceMetrics": Signal.METRICS}


@dataclass(frozen=True)
class Export:
    """One export as the agent sent it: its signal and its OTLP/JSON body."""

    signal: Signal
    body: dict[str, Any]

    def json_bytes(self) -> bytes:
        return json.dumps(self.body).encode()

    def request(self) -> Any:
        return decode_json(self.json_bytes(), self.signal)

    def protobuf(self) -> bytes:
        data: bytes = self.request().SerializeToString()
        return data


def exports(*names: str) -> list[Export]:
    """The exports of capture files (relative to tests/captures), in file order."""
    out: list[Export] = []
    for name in names:
        doc = json.loads((CAPTURES / name).read_text())
        for entry in doc if isinstance(doc, list) else [doc]:
            body = entry.get("body", entry)
            signal = PATH_SIGNALS.get(entry.get("path", ""))
            if signal is None:
                signal = next(TOP_SIGNALS[k] for k in body if k in TOP_SIGNALS)
            out.append(Export(signal, body))
    return out
