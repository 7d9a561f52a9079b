"""Pydantic AI with its own instrumentation: two runs of one agent in one conversation.

The session setting is `conversation_id=` on the run (the second run also inherits it from
`message_history`); it is exported as `gen_ai.conversation.id` on the agent run span.
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
    VARIANT,
    tracer_provider,
    weather,
)
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider


async def main() -> None:
    provider = tracer_provider("weather-bot")
    Agent.instrument_all()  # uses the global tracer provider
    api = OpenAIProvider(base_url=API_URL, api_key="standin")
    model = (OpenAIResponsesModel(MODEL, provider=api) if VARIANT == "responses"
             else OpenAIChatModel(MODEL, provider=api))
    agent = Agent(model, name="weather", instructions=INSTRUCTIONS)
    agent.tool_plain(weather, name="get_weather")
    # First run not streamed (a tool call, then the answer), second run streamed.
    first = await agent.run(FIRST_PROMPT, conversation_id=SESSION)
    async with agent.run_stream(SECOND_PROMPT, message_history=first.all_messages(),
                                conversation_id=SESSION) as second:
        await second.get_output()
    provider.shutdown()


asyncio.run(main())
