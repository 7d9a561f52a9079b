"""Capture what Python agent frameworks export over OTLP, for the replay tests.

Each framework runs from PyPI, at the pinned versions below, in a throwaway venv of its own
(/tmp/fwvenv-<name>, created on first use; never the project's venv), against the stand-in
OpenAI API of standin.py, exporting OTLP/HTTP protobuf to the capture receiver beside it.
Each scenario (scenarios/*_run.py) runs one agent twice in one conversation, with the
framework's documented session setting: three model calls, the first answered with a tool call.

    .venv/bin/python tests/captures/frameworks/capture.py [NAME ...]

keeps each raw body (protobuf) with its path and content type under /tmp/fwcapture/, and
writes tests/captures/<name>-<version>/<variant>_traces_http-protobuf_decoded.json (every
export as received: path, headers, body decoded to OTLP/JSON with hex ids, strings over 500
characters elided) and the calls the API answered, then README.txt. Run it under the
project's venv: decoding needs opentelemetry-proto; the frameworks never see that venv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CAPTURES = HERE.parent
SCENARIOS = HERE / "scenarios"
sys.path.insert(0, str(HERE))
from standin import (  # noqa: E402 - the sibling module, found once HERE is on the path
    CACHED_TOKENS,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REASONING_TOKENS,
    Servers,
)

OTEL = ("opentelemetry-sdk==1.45.2", "opentelemetry-exporter-otlp-proto-http==1.45.2")
MAX_STRING = 500  # longer strings (prompts, tool schemas) are elided, as in the other captures
RUN_TIMEOUT_S = 300
RAW_DIR = Path("/tmp/fwcapture")  # raw bodies (protobuf) with path and content type, per run


@dataclass(frozen=True)
class Framework:
    """One framework as a user installs it, and the scenarios run with it."""

    name: str
    version: str  # of the framework itself: names the capture folder
    packages: tuple[str, ...]
    scenario: str
    variants: tuple[str, ...]  # CAPTURE_VARIANT values: which model API or agent builder
    session: str  # the conversation id the scenario names, suffixed with the variant

    notes: tuple[str, ...] = ()  # what the spans carry, for README.txt

    def session_of(self, variant: str) -> str:
        """Each variant its own conversation, so one collector can take all the captures."""
        return f"{self.session}-{variant}"


FRAMEWORKS = {f.name: f for f in (
    Framework(
        "pydantic-ai", "2.68.0", ("pydantic-ai-slim[openai]==2.68.0", *OTEL),
        "pydantic_ai_run.py", ("chat", "responses"), "pydantic-conversation", (
            "Traced by its own instrumentation (Agent.instrument_all(), data format version 5):",
            " invoke_agent weather (root, one per run): gen_ai.operation.name=invoke_agent, "
            "gen_ai.conversation.id, gen_ai.aggregated_usage.* (the run's sum, a roll-up)",
            " chat gpt-5 (child): gen_ai.usage.input_tokens 1234 (includes "
            "gen_ai.usage.cache_read.input_tokens 500), output_tokens 77, "
            "gen_ai.usage.details.reasoning_tokens 33 (inside output), "
            "gen_ai.usage.details.cache_read_tokens 500 (repeats the cache read), "
            "operation.cost (USD, genai-prices), gen_ai.conversation.id",
            " execute_tool get_weather (child): no usage",
            "Chat variant: OpenAIChatModel; responses variant: OpenAIResponsesModel.")),
    Framework(
        "openai-agents", "0.24.0",
        ("openai-agents==0.24.0", "openinference-instrumentation-openai-agents==2.6.0", *OTEL),
        "openai_agents_run.py", ("responses", "chat"), "agents-session", (
            "Traced by OpenInference (OpenAIAgentsInstrumentor, which replaces the SDK's "
            "upload to OpenAI); session by openinference's using_session (session.id on "
            "every span). RunConfig(group_id=...) is set but not exported.",
            " weather workflow (root, AGENT: the SDK's trace, named after workflow_name) -> "
            "weather workflow (CHAIN) -> weather (AGENT: the agent) -> turn (CHAIN, one per "
            "step) -> response / generation (LLM) and get_weather (TOOL)",
            " responses variant: LLM span `response`: llm.token_count.prompt 1234 (includes "
            "prompt_details.cache_read 500), completion 77 (includes "
            "completion_details.reasoning 33), llm.model_name",
            " chat variant (OpenAIChatCompletionsModel): LLM span `generation` with "
            "llm.token_count.prompt and .completion only: OpenInference drops the SDK's "
            "input/output token details, so neither cache nor reasoning is on the wire.")),
    Framework(
        "langgraph", "1.2.24",
        ("langchain==1.5.2", "langgraph==1.2.24", "langchain-openai==1.8.1",
         "openinference-instrumentation-langchain==0.1.80", *OTEL),
        "langgraph_run.py", ("create_agent", "create_react_agent"), "thread", (
            "Traced by OpenInference (LangChainInstrumentor); session by LangGraph's "
            "configurable thread_id (with a checkpointer), which LangGraph copies into "
            "the runs' metadata and OpenInference exports as session.id (and inside the "
            "metadata JSON).",
            " create_agent: LangGraph (root, CHAIN) -> model (CHAIN) -> ChatOpenAI (LLM); "
            "tools (CHAIN) -> get_weather (TOOL). No AGENT span.",
            " create_react_agent: LangGraph (root, CHAIN) -> agent (AGENT: the graph node, "
            "one per model step) -> call_model / RunnableSequence -> ChatOpenAI (LLM)",
            " ChatOpenAI: llm.token_count.prompt 1234 (includes prompt_details.cache_read "
            "500), completion 77 (includes completion_details.reasoning 33), llm.model_name")),
    Framework(
        "strands-agents", "1.62.0",
        ("strands-agents[openai,otel]==1.62.0",  # pins the SDK at 1.45.1
         "opentelemetry-exporter-otlp-proto-http==1.45.1"),
        "strands_run.py", ("chat",), "strands-session", (
            "Traced by its own tracing (to the global tracer provider); session by "
            "Agent(trace_attributes={'session.id': ...}), set on every span.",
            " invoke_agent weather (root, one per invocation): gen_ai.usage.* roll-ups of "
            "the agent's whole history so far (not added)",
            " execute_event_loop_cycle (one per cycle): no usage",
            " chat (child of a cycle): gen_ai.usage.input_tokens 1234 (and the deprecated "
            "prompt_tokens), gen_ai.usage.cache_read.input_tokens 500 (and "
            "cache_read_input_tokens), output_tokens 77; no reasoning count (its OpenAI model "
            "does not pass it on), gen_ai.request.model only",
            " execute_tool get_weather: no usage")),
)}


def ensure_venv(framework: Framework) -> Path:
    """The framework's own venv with its pinned packages; created when missing."""
    root = Path(f"/tmp/fwvenv-{framework.name}")
    python = root / "bin" / "python"
    if not python.exists():
        venv.create(root, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *framework.packages],
                       check=True)
    return python


def decoded(path: str, body: bytes) -> dict[str, Any]:
    """An OTLP protobuf body as OTLP/JSON, ids in hex as the OTLP/JSON encoding has them."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    if path != "/v1/traces":
        raise SystemExit(f"unexpected export to {path}: only traces are captured")
    request = ExportTraceServiceRequest.FromString(body)
    doc: dict[str, Any] = MessageToDict(request)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = _b64_to_hex(span[key])
                for link in span.get("links", []):
                    for key in ("traceId", "spanId"):
                        if key in link:
                            link[key] = _b64_to_hex(link[key])
    return _scrubbed(doc)


def _b64_to_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


def _scrubbed(value: Any) -> Any:
    """Long strings elided; the home directory and venv paths replaced."""
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, str):
        value = value.replace(str(Path.home()), "~").replace("/tmp/fwvenv-", "VENV/fwvenv-")
        if len(value) > MAX_STRING:
            return value[:MAX_STRING] + f"...[{len(value) - MAX_STRING} more characters elided]"
    return value


def run(framework: Framework, variant: str, servers: Servers, out: Path) -> Path:
    python = ensure_venv(framework)
    env = {**os.environ, "OPENAI_BASE_URL": servers.api_url, "OPENAI_API_KEY": "standin",
           "CAPTURE_OTLP_URL": servers.otlp_url,
           "CAPTURE_SESSION": framework.session_of(variant),
           "CAPTURE_VARIANT": variant, "OTEL_SDK_DISABLED": "false",
           # Frameworks that phone home or trace to their vendor by default must not.
           "LANGCHAIN_TRACING_V2": "false",
           "DO_NOT_TRACK": "1"}
    subprocess.run([str(python), str(SCENARIOS / framework.scenario)], env=env, check=True,
                   cwd=SCENARIOS, timeout=RUN_TIMEOUT_S)
    calls, received = servers.take()
    # The raw bodies as received, beside the decoded copies the repository keeps.
    raw = RAW_DIR / framework.name / variant
    raw.mkdir(parents=True, exist_ok=True)
    for number, r in enumerate(received, 1):
        (raw / f"{number:03d}.bin").write_bytes(r.body)
        (raw / f"{number:03d}.json").write_text(json.dumps(
            {"path": r.path, "content_type": r.content_type, "headers": r.headers}))
    folder = out / f"{framework.name}-{framework.version}"
    folder.mkdir(parents=True, exist_ok=True)
    exports = [{"transport": "http", "path": r.path,
                "headers": {k: r.headers[k] for k in ("content-type", "user-agent")
                            if k in r.headers},
                "body_len": len(r.body), "body": decoded(r.path, r.body)} for r in received]
    target = folder / f"{variant}_traces_http-protobuf_decoded.json"
    target.write_text(json.dumps(exports, indent=1) + "\n")
    (folder / f"{variant}_api_calls.json").write_text(json.dumps(calls, indent=1) + "\n")
    print(f"{target}: {len(exports)} exports, {len(calls)} model calls")
    return target


def write_readme(framework: Framework, out: Path) -> None:
    folder = out / f"{framework.name}-{framework.version}"
    sessions = ", ".join(f"{v}: {framework.session_of(v)}" for v in framework.variants)
    lines = [
        f"{framework.name} {framework.version}, captured by ../frameworks/capture.py "
        f"(scenario ../frameworks/scenarios/{framework.scenario}).",
        "Packages (own venv): " + " ".join(framework.packages),
        "Two runs of one agent in one conversation, three model calls: a tool call "
        "(get_weather), the answer after the tool, then the second run's answer (first run "
        "not streamed, second streamed).",
        f"Stand-in OpenAI API usage per call: input {INPUT_TOKENS} (cached {CACHED_TOKENS}), "
        f"output {OUTPUT_TOKENS} (reasoning {REASONING_TOKENS}); model gpt-5.",
        f"Sessions named (one per variant): {sessions}.",
        "Files per variant: <variant>_traces_http-protobuf_decoded.json (every export as "
        "received: path, headers, body decoded to OTLP/JSON, ids hex, strings over 500 "
        "characters elided) and <variant>_api_calls.json (what the API answered, in order).",
        "",
        *framework.notes,
    ]
    (folder / "README.txt").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=CAPTURES,
                        help="where the capture folders go (default tests/captures)")
    parser.add_argument("--readme-only", action="store_true",
                        help="rewrite the folders' README.txt without capturing")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"frameworks to capture (default all): {', '.join(FRAMEWORKS)}")
    args = parser.parse_args()
    names = args.names or list(FRAMEWORKS)
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown:
        parser.error(f"unknown framework {unknown[0]!r}")
    if args.readme_only:
        for name in names:
            write_readme(FRAMEWORKS[name], args.out)
        return
    servers = Servers()
    try:
        for name in names:
            framework = FRAMEWORKS[name]
            for variant in framework.variants:
                run(framework, variant, servers, args.out)
            write_readme(framework, args.out)
    finally:
        servers.close()


if __name__ == "__main__":
    main()
