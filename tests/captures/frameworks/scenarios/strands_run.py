"""Strands Agents with its own tracing: two invocations of one agent in one conversation.

Strands keeps the conversation in the Agent object; the session is named per its
observability docs with `trace_attributes={"session.id": ...}`, set on the agent's spans.
"""

from __future__ import annotations

import asyncio

from _otel import (
    API_URL,
    FIRST_PROMPT,
    INSTRUCTIONS,
    MODEL,
    SECOND_PROMPT,
    SESSION,
    tracer_provider,
    weather,
)
from strands import Agent, tool
from strands.models.openai import OpenAIModel


@tool
def get_weather(city: str) -> str:
    """The weather in a city.

    Args:
        city: the city's name
    """
    return weather(city)


async def main() -> None:
    provider = tracer_provider("weather-bot")  # Strands traces to the global provider
    model = OpenAIModel(client_args={"base_url": API_URL, "api_key": "standin"},
                        model_id=MODEL)
    agent = Agent(model=model, tools=[get_weather], system_prompt=INSTRUCTIONS,
                  name="weather", callback_handler=None,
                  trace_attributes={"session.id": SESSION})
    # First invocation a plain call (a tool call, then the answer), second streamed.
    await agent.invoke_async(FIRST_PROMPT)
    async for _ in agent.stream_async(SECOND_PROMPT):
        pass
    provider.shutdown()


asyncio.run(main())
