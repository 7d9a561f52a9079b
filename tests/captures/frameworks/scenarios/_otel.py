"""The OTLP trace exporter every scenario sets up, as an application would.

Run by the framework's own venv (capture.py passes the endpoints in the environment):
CAPTURE_OTLP_URL is the capture receiver, OPENAI_BASE_URL the stand-in API, CAPTURE_SESSION
the conversation id the scenario names, CAPTURE_VARIANT which model API it uses.
"""

from __future__ import annotations

import os

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

SESSION = os.environ.get("CAPTURE_SESSION", "conversation-1")
VARIANT = os.environ.get("CAPTURE_VARIANT", "")
API_URL = os.environ["OPENAI_BASE_URL"]
MODEL = "gpt-5"
FIRST_PROMPT = "What is the weather in Paris?"
SECOND_PROMPT = "Do I need an umbrella there?"
INSTRUCTIONS = "You answer weather questions; call get_weather for a city's weather."


def tracer_provider(service: str) -> TracerProvider:
    """A provider exporting OTLP/HTTP protobuf to the capture receiver, set as the global."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    exporter = OTLPSpanExporter(endpoint=os.environ["CAPTURE_OTLP_URL"] + "/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def weather(city: str) -> str:
    """The tool every scenario offers."""
    return f"sunny, 21 C in {city}"
