"""The attributes the span mapping reads, each with a slot: the names the mapping and the
config (whose aliases name them) both need. Imports nothing of the collector, so the config
can check an alias without importing the mapping (and, through it, pricing)."""

from __future__ import annotations

# Attribute slots: every attribute the mapping reads gets an index into a flat list, so one pass
# over a span's attributes with one dict lookup each finds everything.
(
    S_CONVERSATION_ID, S_SESSION_ID, S_LANGFUSE_SESSION, S_TRACELOOP_SESSION, S_VERCEL_SESSION,
    S_RESPONSE_MODEL, S_REQUEST_MODEL, S_OI_MODEL,
    S_IN, S_OUT, S_REASONING, S_CACHE_READ, S_CACHE_WRITE,
    S_IN_DEPRECATED, S_OUT_DEPRECATED,
    S_OI_IN, S_OI_OUT, S_OI_REASONING, S_OI_CACHE_READ, S_OI_CACHE_WRITE,
    S_COST_GENAI, S_COST_OI, S_COST_OP,
    S_KIND, S_STATUS, S_CHANNEL, S_GOAL,
    S_OPERATION, S_OI_SPAN_KIND,
    S_AGENT, S_AGENT_VERSION, S_HOST, S_USER_EMAIL, S_USER_ID, S_ENDUSER_ID,
) = range(35)
N_SLOTS = 35

ATTRIBUTE_SLOTS: dict[str, int] = {
    "gen_ai.conversation.id": S_CONVERSATION_ID,
    "session.id": S_SESSION_ID,
    "langfuse.session.id": S_LANGFUSE_SESSION,
    "traceloop.association.properties.session_id": S_TRACELOOP_SESSION,
    "ai.telemetry.metadata.sessionId": S_VERCEL_SESSION,
    "gen_ai.response.model": S_RESPONSE_MODEL,
    "gen_ai.request.model": S_REQUEST_MODEL,
    "llm.model_name": S_OI_MODEL,
    "gen_ai.usage.input_tokens": S_IN,
    "gen_ai.usage.output_tokens": S_OUT,
    "gen_ai.usage.reasoning.output_tokens": S_REASONING,
    "gen_ai.usage.cache_read.input_tokens": S_CACHE_READ,
    "gen_ai.usage.cache_creation.input_tokens": S_CACHE_WRITE,
    "gen_ai.usage.prompt_tokens": S_IN_DEPRECATED,
    "gen_ai.usage.completion_tokens": S_OUT_DEPRECATED,
    "llm.token_count.prompt": S_OI_IN,
    "llm.token_count.completion": S_OI_OUT,
    "llm.token_count.completion_details.reasoning": S_OI_REASONING,
    "llm.token_count.prompt_details.cache_read": S_OI_CACHE_READ,
    "llm.token_count.prompt_details.cache_write": S_OI_CACHE_WRITE,
    "gen_ai.usage.cost": S_COST_GENAI,
    "llm.cost.total": S_COST_OI,
    "operation.cost": S_COST_OP,
    "agent.session.kind": S_KIND,
    "agent.session.status": S_STATUS,
    "agent.session.channel": S_CHANNEL,
    "agent.session.goal": S_GOAL,
    "gen_ai.operation.name": S_OPERATION,
    "openinference.span.kind": S_OI_SPAN_KIND,
    "service.name": S_AGENT,
    "service.version": S_AGENT_VERSION,
    "host.name": S_HOST,
    "user.email": S_USER_EMAIL,
    "user.id": S_USER_ID,
    "enduser.id": S_ENDUSER_ID,
}
SLOT_NAMES = {slot: name for name, slot in ATTRIBUTE_SLOTS.items()}

SESSION_SLOTS = (S_CONVERSATION_ID, S_SESSION_ID, S_LANGFUSE_SESSION, S_TRACELOOP_SESSION,
                 S_VERCEL_SESSION)
# Read only when the first two are absent (off the hot path).
OTHER_SESSION_SLOTS = SESSION_SLOTS[2:]
MODEL_SLOTS = (S_RESPONSE_MODEL, S_REQUEST_MODEL, S_OI_MODEL)
IN_SLOTS = (S_IN, S_IN_DEPRECATED, S_OI_IN)
OUT_SLOTS = (S_OUT, S_OUT_DEPRECATED, S_OI_OUT)
REASONING_SLOTS = (S_REASONING, S_OI_REASONING)
CACHE_READ_SLOTS = (S_CACHE_READ, S_OI_CACHE_READ)
CACHE_WRITE_SLOTS = (S_CACHE_WRITE, S_OI_CACHE_WRITE)
TOKEN_SLOTS = IN_SLOTS + OUT_SLOTS + REASONING_SLOTS + CACHE_READ_SLOTS + CACHE_WRITE_SLOTS
COST_SLOTS = (S_COST_GENAI, S_COST_OI, S_COST_OP)
SESSION_ATTRIBUTE_SLOTS = (S_KIND, S_STATUS, S_CHANNEL, S_GOAL)
USER_SLOTS = (S_USER_EMAIL, S_USER_ID, S_ENDUSER_ID)
