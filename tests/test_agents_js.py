"""opencode and Qwen Code, end to end: their captured payloads (tests/captures/agents_js/
capture.py ran each real agent from npm against a stand-in OpenAI API) replayed through the real
receivers over real sockets (HTTP protobuf, HTTP JSON in chunks, gRPC), every request sent
twice, and the whole row read back from the database; plus the same payloads through the pure
mapping, to show which signal each count comes from.

Each capture is two prompts in one conversation, the first making the model call a tool, and
every model call the stand-in answered billed the same usage (capture.USAGE, OpenAI's
semantics): 1234 prompt tokens of which 500 cached, 77 completion tokens of which 33 reasoning.
opencode made four calls (a title, the tool call, the answer, the follow-up's answer), Qwen
Code four as well (the tool call, the answer, the follow-up's answer, and its memory
extractor's one call after the follow-up).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from collector.accounting.pricing import Pricer
from collector.config import ModelPrice
from collector.signals import Signal
from tests.conftest import Daemon
from tests.replay import Export, exports
from tests.test_agents import NOT_STALE, TRANSPORTS, row, send
from tests.test_dialects import fold, total

PROMPT, CACHED, COMPLETION, REASONING = 1234, 500, 77, 33  # per call, as the stand-in billed
CALLS = 4
PROMPTS = 2
OPENCODE = ["opencode-1.18.33/exports.json"]
QWEN = ["qwen-code-0.24.4/exports.json"]
# genai-prices knows no Qwen model without its provider: the test prices Qwen Code's default
# model itself (USD per million tokens).
QWEN_MODEL = "qwen3-coder-plus"
QWEN_PRICE = ModelPrice(input=1.0, output=5.0, cache_read=0.2, cache_write=0.0)
PRICING = (f'[pricing."{QWEN_MODEL}"]\ninput = {QWEN_PRICE.input}\n'
           f"output = {QWEN_PRICE.output}\ncache_read = {QWEN_PRICE.cache_read}\n"
           f"cache_write = {QWEN_PRICE.cache_write}\n")


def cents(model: str) -> float:
    """One call: uncached prompt at the input rate, cached at the cache-read rate, the
    completion (reasoning included) at the output rate."""
    pricer = Pricer({QWEN_MODEL: QWEN_PRICE})
    value = pricer.cost_cents(model, "", PROMPT - CACHED, CACHED, 0, COMPLETION)
    assert value is not None
    return value


CASES: dict[str, tuple[list[str], dict[str, Any]]] = {
    # One turn per prompt (SessionPrompt.prompt), not one per ai.streamText step or title.
    # The times are those of the first prompt's span and of the follow-up's end.
    "opencode-1.18.33": (OPENCODE, row(
        "ses_dc7eb62d9ffe3dysqzcF5X5XQx", "gpt-4.1-mini", "2026-12-02T18:46:45.098Z",
        "2026-12-02T18:47:21.124Z", PROMPTS, CALLS * PROMPT, CALLS * COMPLETION,
        CALLS * REASONING, CALLS * cents("gpt-4.1-mini"))),
    # One turn per qwen-code.user_prompt log; each call once across its log and its span.
    "qwen-code-0.24.4": (QWEN, row(
        "4290e72d-0bf8-4992-82c2-7bb9eac24063", QWEN_MODEL, "2026-12-02T18:46:39.546Z",
        "2026-12-02T18:47:16.227Z", PROMPTS, CALLS * PROMPT, CALLS * COMPLETION,
        CALLS * REASONING, CALLS * cents(QWEN_MODEL))),
}


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Daemon]]:
    """One daemon per transport, so the same captures can be replayed on each."""
    started: dict[str, Daemon] = {}
    try:
        for transport in TRANSPORTS:
            started[transport] = Daemon(tmp_path_factory.mktemp(transport),
                                        NOT_STALE + PRICING).start()
        yield started
    finally:
        for daemon in started.values():
            daemon.kill()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("agent", list(CASES))
def test_each_agent_gives_its_exact_row(daemons: dict[str, Daemon], agent: str,
                                        transport: str) -> None:
    daemon = daemons[transport]
    names, expected = CASES[agent]
    for item in exports(*names):
        send(daemon, item, transport)
        send(daemon, item, transport)
    assert daemon.row(expected["id"]) == expected


# -- which record each count comes from (the pure mapping) ------------------------------------

def only(items: list[Export], signal: Signal) -> list[Export]:
    return [item for item in items if item.signal is signal]


def test_qwen_code_counts_each_call_once_whichever_signal_brings_it() -> None:
    """The api_response log and the llm_request span of a call share its response id: the
    logs alone, the spans alone and both together give the same calls."""
    items = exports(*QWEN)
    calls = {"prompt": CALLS * PROMPT, "completion": CALLS * COMPLETION,
             "reasoning": CALLS * REASONING, "cache_read": CALLS * CACHED}
    both = total(fold(items))
    logs = total(fold(only(items, Signal.LOGS)))
    spans = total(fold(only(items, Signal.TRACES)))
    for got in (both, logs, spans):
        assert {k: got[k] for k in calls} == calls
    # Turns are the user_prompt logs: the interaction spans are not a second source of them.
    assert (both["turns"], logs["turns"], spans["turns"]) == (PROMPTS, PROMPTS, 0)
    # Its cumulative metrics name no session: nothing.
    assert not fold(only(items, Signal.METRICS)).sessions


def test_opencode_counts_the_provider_calls_not_their_roll_ups() -> None:
    """Each ai.streamText span repeats its doStream's usage (and the SDK's gen_ai.* names
    repeat it again): only the doStream spans add. Cached tokens are priced as cache reads."""
    got = total(fold(exports(*OPENCODE)))
    assert {k: got[k] for k in ("session", "model", "prompt", "completion", "reasoning",
                                "cache_read", "cache_write")} == {
        "session": CASES["opencode-1.18.33"][1]["id"], "model": "gpt-4.1-mini",
        "prompt": CALLS * PROMPT, "completion": CALLS * COMPLETION,
        "reasoning": CALLS * REASONING, "cache_read": CALLS * CACHED, "cache_write": 0}
    assert got["cents"] == pytest.approx(CALLS * cents("gpt-4.1-mini"), rel=1e-9)
