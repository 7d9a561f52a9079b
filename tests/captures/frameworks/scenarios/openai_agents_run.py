"""OpenAI Agents SDK traced by OpenInference: two runs of one agent in one conversation.

The SDK keeps the conversation in a `SQLiteSession`; its `group_id` (the SDK's own grouping of
a conversation's traces) is not exported by OpenInference, so the session is named with
OpenInference's `using_session`, exported as `session.id` on every span.
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
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    SQLiteSession,
    function_tool,
)
from openai import AsyncOpenAI
from openinference.instrumentation import using_session
from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return weather(city)


async def main() -> None:
    provider = tracer_provider("weather-bot")
    # Replaces the SDK's default processor (which uploads to OpenAI) with OpenInference's.
    OpenAIAgentsInstrumentor().instrument(tracer_provider=provider)
    client = AsyncOpenAI(base_url=API_URL, api_key="standin")
    model = (OpenAIChatCompletionsModel(MODEL, openai_client=client) if VARIANT == "chat"
             else OpenAIResponsesModel(MODEL, openai_client=client))
    agent = Agent(name="weather", instructions=INSTRUCTIONS, model=model, tools=[get_weather])
    memory = SQLiteSession(SESSION)
    config = RunConfig(workflow_name="weather workflow", group_id=SESSION)
    with using_session(SESSION):
        # First run not streamed (a tool call, then the answer), second run streamed.
        await Runner.run(agent, FIRST_PROMPT, session=memory, run_config=config)
        second = Runner.run_streamed(agent, SECOND_PROMPT, session=memory, run_config=config)
        async for _ in second.stream_events():
            pass
    provider.shutdown()


asyncio.run(main())
