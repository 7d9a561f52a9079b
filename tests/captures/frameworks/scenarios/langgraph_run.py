"""LangChain / LangGraph traced by OpenInference: two invocations of one agent in one thread.

The session setting is LangGraph's `thread_id` in the run's config (with a checkpointer, the
conversation's memory); LangGraph copies it into each run's metadata, and OpenInference
exports it as `session.id` (besides the whole metadata as JSON in `metadata`). Variants:
langchain's `create_agent` and langgraph's `create_react_agent`.
"""

from __future__ import annotations

import warnings

from _otel import (
    API_URL,
    FIRST_PROMPT,
    INSTRUCTIONS,
    MODEL,
    SECOND_PROMPT,
    SESSION,
    VARIANT,
    tracer_provider,
    weather,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from openinference.instrumentation.langchain import LangChainInstrumentor


@tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return weather(city)


def build(model: ChatOpenAI) -> object:
    if VARIANT == "create_react_agent":
        from langgraph.prebuilt import create_react_agent

        with warnings.catch_warnings():  # deprecated for langchain's create_agent, still used
            warnings.simplefilter("ignore")
            return create_react_agent(model, [get_weather], prompt=INSTRUCTIONS,
                                      checkpointer=InMemorySaver())
    from langchain.agents import create_agent

    return create_agent(model, [get_weather], system_prompt=INSTRUCTIONS,
                        checkpointer=InMemorySaver())


def main() -> None:
    provider = tracer_provider("weather-bot")
    LangChainInstrumentor().instrument(tracer_provider=provider)
    model = ChatOpenAI(model=MODEL, base_url=API_URL, api_key="standin",
                       stream_usage=True)
    agent = build(model)
    config = {"configurable": {"thread_id": SESSION}}
    # First invocation not streamed (a tool call, then the answer), second streamed.
    agent.invoke({"messages": [("user", FIRST_PROMPT)]}, config)  # type: ignore[attr-defined]
    for _ in agent.stream({"messages": [("user", SECOND_PROMPT)]}, config,  # type: ignore[attr-defined]
                          stream_mode="messages"):
        pass
    provider.shutdown()


main()
