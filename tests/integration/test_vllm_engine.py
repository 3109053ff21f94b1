"""The vLLM engine on the real bundled model: streaming, batching, stops, structure, abort."""

from __future__ import annotations

import asyncio
import json
import re
import uuid

import jsonschema
import pytest

from fictures_ai.api.json_schema import to_json_schema
from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    ChatMessage,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextChunk,
    TextGenerationParams,
    TextPrompt,
    ToolCall,
    ToolDefinition,
)
from fictures_ai.engines.vllm_engine import VllmTextEngine, _VllmToolCallParser
from fictures_ai.errors import ContextLengthExceededError, InvalidRequestError, ModelLoadError
from fictures_ai.services.engine_factory import text_engine_options
from fictures_ai.services.tool_calls import RequiredToolCallParser, required_tool_calls_spec
from fictures_ai.shared import PromptFormat

pytestmark = pytest.mark.integration

STORY = TextPrompt(text="Write one sentence about a dragon who loves books.")


async def collect(
    engine: VllmTextEngine, prompt: TextPrompt, params: TextGenerationParams
) -> list[TextChunk]:
    return [chunk async for chunk in engine.generate(prompt, params, request_id=uuid.uuid4().hex)]


async def test_streams_english_text_in_several_chunks(text_engine: VllmTextEngine) -> None:
    chunks = await collect(text_engine, STORY, TextGenerationParams(max_tokens=40, seed=7))
    text = "".join(chunk.delta for chunk in chunks)
    assert len(chunks) > 3
    assert re.search(r"\b(the|a|dragon|book|books)\b", text, flags=re.IGNORECASE), text
    assert chunks[-1].finish_reason in ("stop", "length")
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    # Token counts come from the engine and grow by the tokens of each delta.
    counts = [chunk.completion_tokens for chunk in chunks]
    assert counts == sorted(counts)
    assert counts[-1] <= 40
    assert chunks[0].prompt_tokens > 10  # the chat template adds a system turn


async def test_max_tokens_ends_with_length(text_engine: VllmTextEngine) -> None:
    params = TextGenerationParams(max_tokens=5, ignore_eos=True)
    chunks = await collect(text_engine, STORY, params)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 5


async def test_stop_sequence_ends_with_stop_and_is_not_included(
    text_engine: VllmTextEngine,
) -> None:
    prompt = TextPrompt(text="Count from 1 to 20, separated by commas.")
    params = TextGenerationParams(max_tokens=80, temperature=0.0, stop=("7",))
    chunks = await collect(text_engine, prompt, params)
    text = "".join(c.delta for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert "7" not in text
    assert "6" in text


async def test_sixteen_concurrent_requests_all_complete(text_engine: VllmTextEngine) -> None:
    params = TextGenerationParams(max_tokens=24, ignore_eos=True)
    results = await asyncio.gather(*(collect(text_engine, STORY, params) for _ in range(16)))
    assert all(chunks[-1].completion_tokens == 24 for chunks in results)
    assert all(chunks[-1].finish_reason == "length" for chunks in results)


async def test_json_schema_output_parses_and_validates(text_engine: VllmTextEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    spec = StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=schema)
    prompt = TextPrompt(text="Invent a story character. Answer in JSON with name and age.")
    chunks = await collect(
        text_engine, prompt, TextGenerationParams(max_tokens=80, structured=spec, seed=1)
    )
    value = json.loads("".join(c.delta for c in chunks))
    jsonschema.validate(value, schema)


async def test_choice_output_is_one_of_the_choices(text_engine: VllmTextEngine) -> None:
    spec = StructuredOutputSpec(StructuredOutputKind.CHOICE, choices=("fantasy", "horror"))
    prompt = TextPrompt(text="Is a story about a dragon fantasy or horror?")
    for seed in range(3):
        chunks = await collect(
            text_engine, prompt, TextGenerationParams(max_tokens=10, structured=spec, seed=seed)
        )
        assert "".join(c.delta for c in chunks) in ("fantasy", "horror")


async def test_regex_and_grammar_outputs_match(text_engine: VllmTextEngine) -> None:
    regex = StructuredOutputSpec(StructuredOutputKind.REGEX, regex=r"Chapter [0-9]{1,2}")
    grammar = StructuredOutputSpec(
        StructuredOutputKind.GRAMMAR, grammar='root ::= "The " ("end" | "beginning") "."'
    )
    prompt = TextPrompt(text="Name a chapter.")
    regex_text = "".join(
        c.delta
        for c in await collect(text_engine, prompt, TextGenerationParams(20, structured=regex))
    )
    grammar_text = "".join(
        c.delta
        for c in await collect(text_engine, prompt, TextGenerationParams(20, structured=grammar))
    )
    assert re.fullmatch(r"Chapter [0-9]{1,2}", regex_text)
    assert grammar_text in ("The end.", "The beginning.")


async def test_invalid_regex_is_an_invalid_request(text_engine: VllmTextEngine) -> None:
    spec = StructuredOutputSpec(StructuredOutputKind.REGEX, regex="(unclosed")
    with pytest.raises(InvalidRequestError, match="regex"):
        await collect(text_engine, STORY, TextGenerationParams(max_tokens=5, structured=spec))


async def test_closing_the_stream_aborts_the_request_in_the_engine(
    text_engine: VllmTextEngine,
) -> None:
    params = TextGenerationParams(max_tokens=1000, ignore_eos=True)
    stream = text_engine.generate(STORY, params, request_id="to-abort")
    received = [await anext(stream) for _ in range(3)]
    assert received[-1].finish_reason is None
    await stream.aclose()  # type: ignore[attr-defined]
    llm = text_engine._llm
    for _ in range(100):
        if llm.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert llm.get_num_unfinished_requests() == 0


async def test_cancelling_the_consumer_aborts_the_request(text_engine: VllmTextEngine) -> None:
    params = TextGenerationParams(max_tokens=1000, ignore_eos=True)
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in text_engine.generate(STORY, params, request_id="to-cancel"):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    llm = text_engine._llm
    for _ in range(100):
        if llm.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.05)
    assert llm.get_num_unfinished_requests() == 0


async def test_prompt_plus_max_tokens_beyond_the_context_is_refused(
    text_engine: VllmTextEngine,
) -> None:
    prompt = TextPrompt(text="story " * 2000)
    with pytest.raises(ContextLengthExceededError) as caught:
        await collect(text_engine, prompt, TextGenerationParams(max_tokens=3000))
    assert caught.value.max_model_len == 4096
    assert caught.value.prompt_tokens > 2000


async def test_fit_to_context_lowers_max_tokens_to_what_the_prompt_leaves(
    text_engine: VllmTextEngine,
) -> None:
    prompt = TextPrompt(text="story " * 4050)  # with the chat template, ~15 short of 4096
    params = TextGenerationParams(max_tokens=16_384, ignore_eos=True, fit_to_context=True)
    chunks = await collect(text_engine, prompt, params)
    last = chunks[-1]
    assert last.finish_reason == "length"
    assert last.prompt_tokens + last.completion_tokens == 4096


async def test_a_prompt_that_fills_the_context_by_itself_is_refused_with_both_numbers(
    text_engine: VllmTextEngine,
) -> None:
    prompt = TextPrompt(text="story " * 5000)
    params = TextGenerationParams(max_tokens=10, fit_to_context=True)
    with pytest.raises(ContextLengthExceededError) as caught:
        await collect(text_engine, prompt, params)
    assert caught.value.max_tokens is None
    assert f"The prompt has {caught.value.prompt_tokens} tokens" in caught.value.message
    assert "context is 4096 tokens" in caught.value.message


async def test_min_tokens_holds_off_the_end(text_engine: VllmTextEngine) -> None:
    prompt = TextPrompt(text="Reply with the single word: yes.")
    free = await collect(text_engine, prompt, TextGenerationParams(max_tokens=40, temperature=0))
    held = await collect(
        text_engine, prompt, TextGenerationParams(max_tokens=40, temperature=0, min_tokens=25)
    )
    assert free[-1].completion_tokens < 25
    assert held[-1].completion_tokens >= 25


# A comic-script schema as Zod writes it for OpenAPI 3.0 (nullable fields, nesting, enums).
ZOD_PANELS = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "panels": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string"},
                    "dialogue": {"type": "string", "nullable": True},
                    "shot": {"type": "string", "enum": ["wide", "close"], "nullable": True},
                },
                "required": ["description", "dialogue", "shot"],
            },
        },
    },
    "required": ["title", "panels"],
}


async def test_constrained_json_is_compact_and_follows_a_zod_schema(
    text_engine: VllmTextEngine,
) -> None:
    schema = to_json_schema(ZOD_PANELS, param="schema")
    spec = StructuredOutputSpec(StructuredOutputKind.JSON, json_schema=schema)
    prompt = TextPrompt(text="Write a two-panel comic about a cat as JSON.")
    finished = 0
    for seed in range(4):
        params = TextGenerationParams(
            max_tokens=160, temperature=1.0, top_p=1.0, seed=seed, structured=spec
        )
        chunks = await collect(text_engine, prompt, params)
        text = "".join(chunk.delta for chunk in chunks)
        # No free whitespace: the grammar gives the model nothing to run on with.
        assert "\n" not in text, text
        if chunks[-1].finish_reason == "stop":
            finished += 1
            value = json.loads(text)
            jsonschema.validate(value, schema)
            assert json.dumps(value, separators=(",", ":"), ensure_ascii=False) == text
    assert finished >= 1


async def test_raw_format_and_chat_messages(text_engine: VllmTextEngine) -> None:
    raw = TextPrompt(text="Once upon a time", format=PromptFormat.RAW)
    chat = TextPrompt(
        messages=(
            ChatMessage("system", "You are a poet."),
            ChatMessage("user", "One line about the sea."),
        )
    )
    raw_chunks = await collect(text_engine, raw, TextGenerationParams(max_tokens=8))
    chat_chunks = await collect(text_engine, chat, TextGenerationParams(max_tokens=8))
    assert raw_chunks[0].prompt_tokens == 4
    assert chat_chunks[0].prompt_tokens > raw_chunks[0].prompt_tokens


async def test_top_p_zero_is_greedy(text_engine: VllmTextEngine) -> None:
    greedy = TextGenerationParams(max_tokens=12, temperature=0.0)
    top_p_zero = TextGenerationParams(max_tokens=12, temperature=1.5, top_p=0.0)
    expected = "".join(c.delta for c in await collect(text_engine, STORY, greedy))
    assert "".join(c.delta for c in await collect(text_engine, STORY, top_p_zero)) == expected


@pytest.mark.parametrize("seed", [-(2**63), -1, 2**63 - 1])
async def test_every_signed_64_bit_seed_is_served_and_repeatable(
    text_engine: VllmTextEngine, seed: int
) -> None:
    params = TextGenerationParams(max_tokens=8, temperature=1.0, seed=seed)
    first = "".join(c.delta for c in await collect(text_engine, STORY, params))
    again = "".join(c.delta for c in await collect(text_engine, STORY, params))
    assert first == again


async def test_values_vllm_refuses_are_invalid_requests_naming_them(
    text_engine: VllmTextEngine,
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await collect(text_engine, STORY, TextGenerationParams(max_tokens=4, temperature=2.5))
    assert refused.value.param == "temperature"
    with pytest.raises(InvalidRequestError, match="vocab"):
        await collect(
            text_engine, STORY, TextGenerationParams(max_tokens=4, logit_bias=((10**9, 5.0),))
        )
    with pytest.raises(InvalidRequestError):
        await collect(
            text_engine, TextPrompt(token_ids=(1, 10**9)), TextGenerationParams(max_tokens=4)
        )


async def test_token_id_prompts_and_tokenize_round_trip(text_engine: VllmTextEngine) -> None:
    prompt = TextPrompt(text="Once upon a time", format=PromptFormat.RAW)
    ids = await text_engine.tokenize(prompt)
    assert await text_engine.detokenize(ids) == "Once upon a time"
    params = TextGenerationParams(max_tokens=6, temperature=0.0)
    by_text = await collect(text_engine, prompt, params)
    by_ids = await collect(text_engine, TextPrompt(token_ids=tuple(ids)), params)
    assert [c.delta for c in by_ids] == [c.delta for c in by_text]
    assert by_ids[0].prompt_tokens == len(ids)
    with pytest.raises(InvalidRequestError, match="outside this model's vocabulary"):
        await text_engine.detokenize([10**9])


async def test_forced_tool_calls_follow_the_tool_schemas(text_engine: VllmTextEngine) -> None:
    weather = ToolDefinition(
        "get_weather",
        "The weather in a city.",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    clock = ToolDefinition("get_time", "The time now.", {"type": "object", "properties": {}})
    prompt = TextPrompt(
        messages=(ChatMessage("user", "What is the weather in Paris?"),), tools=(weather, clock)
    )
    params = TextGenerationParams(
        max_tokens=80,
        temperature=0.0,
        structured=required_tool_calls_spec((weather, clock), parallel=False),
    )
    chunks = await collect(text_engine, prompt, params)
    parser = RequiredToolCallParser()
    pieces = [piece for chunk in chunks for piece in parser.feed(chunk).tool_calls]
    assert chunks[-1].finish_reason == "stop"
    (header, *rest) = pieces
    assert header.name in ("get_weather", "get_time")
    arguments = json.loads(header.arguments + "".join(piece.arguments for piece in rest))
    tool = weather if header.name == "get_weather" else clock
    jsonschema.validate(arguments, tool.parameters or {})


async def test_tool_history_goes_through_the_chat_template(text_engine: VllmTextEngine) -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    prompt = TextPrompt(
        messages=(
            ChatMessage("user", "Weather in Paris?"),
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "Sunny, 21 C", tool_call_id="call_1"),
        ),
        tools=(ToolDefinition("get_weather"),),
    )
    ids = await text_engine.tokenize(prompt)
    assert "Sunny, 21 C" in await text_engine.detokenize(ids)
    chunks = await collect(text_engine, prompt, TextGenerationParams(max_tokens=4))
    assert chunks[-1].finish_reason is not None


def test_a_tool_call_parser_that_does_not_fit_the_tokenizer_fails_loudly(
    text_engine: VllmTextEngine,
) -> None:
    # llama3_json reads Llama 3's <|python_tag|>, which SmolLM2's vocabulary lacks: the load
    # check (VllmTextEngine.load) builds the parser the same way and refuses to start.
    tokenizer = text_engine._llm.get_tokenizer()  # the engine's tokenizer is not public API
    with pytest.raises(RuntimeError, match="python_tag"):
        _VllmToolCallParser("llama3_json", tokenizer, (), model="x")
    assert _VllmToolCallParser("pythonic", tokenizer, (), model="x").skip_special_tokens


async def test_a_kv_cache_too_small_for_the_context_says_which_settings_to_change() -> None:
    # vLLM's engine core logs the reason and raises "Engine core initialization failed".
    settings = Settings(_env_file=None, text_cpu_kv_cache_mb=16)  # type: ignore[call-arg]
    with pytest.raises(ModelLoadError, match="TEXT_CPU_KV_CACHE_MB=16 too small for"):
        await VllmTextEngine.load(text_engine_options(settings))
