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
    S_TOTAL, S_OI_TOTAL,
    S_AGENT, S_AGENT_VERSION, S_HOST, S_USER_EMAIL, S_USER_ID, S_ENDUSER_ID,
) = range(37)
N_SLOTS = 37

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
    # Only a hint (never counted): whether cache tokens are inside input or beside it.
    "gen_ai.usage.total_tokens": S_TOTAL,
    "llm.token_count.total": S_OI_TOTAL,
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

# Other conventions' names for the same counts, read as the GenAI name they stand for (the same
# mechanism as `mapping.aliases`, which can override them): the known name wins when a span
# carries both, so a count reported twice counts once. Each has the GenAI semantics of its
# target (checked against each emitter's source): cache reads and writes are part of input,
# reasoning is part of output; an emitter that reports either beside its total is caught by
# the mapping's cache > input and reasoning > output rules.
CONVENTION_ALIASES: dict[str, str] = {
    # Pydantic AI (RequestUsage.details, emitted as gen_ai.usage.details.<key>): OpenAI's
    # completion_tokens_details.reasoning_tokens and Google's thoughts (both inside
    # gen_ai.usage.output_tokens); its cache keys repeat the first-class GenAI ones.
    "gen_ai.usage.details.reasoning_tokens": "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.details.thoughts_tokens": "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.details.cache_read_tokens": "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.details.cache_write_tokens": "gen_ai.usage.cache_creation.input_tokens",
    # OpenLLMetry (opentelemetry-semantic-conventions-ai 0.5): reasoning under its own names;
    # its older cache names, also Strands Agents' (beside the GenAI ones).
    "gen_ai.usage.reasoning_tokens": "gen_ai.usage.reasoning.output_tokens",
    "llm.usage.reasoning_tokens": "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.cache_read_input_tokens": "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens": "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_write_input_tokens": "gen_ai.usage.cache_creation.input_tokens",
    # The write counterpart of gen_ai.usage.cache_read.input_tokens as the GenAI token metrics
    # name it (gen_ai.client.inference.usage.cache_write.input_tokens); Codex's spans use it.
    "gen_ai.usage.cache_write.input_tokens": "gen_ai.usage.cache_creation.input_tokens",
    # Sentry's AI conventions: subsets of gen_ai.usage.input_tokens / output_tokens.
    "gen_ai.usage.input_tokens.cached": "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.input_tokens.cache_write": "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.output_tokens.reasoning": "gen_ai.usage.reasoning.output_tokens",
    # OpenLLMetry's total (the hint above).
    "llm.usage.total_tokens": "gen_ai.usage.total_tokens",
    # OpenInference (openinference-semantic-conventions 0.1.42): cached input, a cache read.
    "llm.token_count.prompt_details.cache_input": "llm.token_count.prompt_details.cache_read",
}
