"""The vLLM engine on the real bundled model: streaming, batching, stops, structure, abort,
LoRA adapters."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from fictures_ai.api.app import create_app
from fictures_ai.api.json_schema import to_json_schema
from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    BATCH_PRIORITY,
    INTERACTIVE_PRIORITY,
    ChatMessage,
    LoraAdapter,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextChunk,
    TextGenerationParams,
    TextPrompt,
    ToolCall,
    ToolDefinition,
)
from fictures_ai.engines.tiny_text_lora import build_tiny_text_lora
from fictures_ai.engines.vllm_engine import VllmTextEngine, _VllmToolCallParser, vllm_lora_rank
from fictures_ai.errors import ContextLengthExceededError, InvalidRequestError, ModelLoadError
from fictures_ai.services.engine_factory import text_engine_options
from fictures_ai.services.tool_calls import RequiredToolCallParser, required_tool_calls_spec
from fictures_ai.shared import BUNDLED_TEXT_LORA, PromptFormat
from tests.unit.conftest import make_services, text_of

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


async def test_batch_and_interactive_priorities_reach_vllm_and_leave_greedy_text_alone(
    text_engine: VllmTextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert text_engine._llm.vllm_config.scheduler_config.policy == "priority"
    priorities: list[int] = []
    generate = text_engine._llm.generate

    def recording(*args: Any, **kwargs: Any) -> Any:
        priorities.append(kwargs["priority"])
        return generate(*args, **kwargs)

    monkeypatch.setattr(text_engine._llm, "generate", recording)
    greedy = TextGenerationParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    plain = "".join(c.delta for c in await collect(text_engine, STORY, greedy))
    batch, interactive = await asyncio.gather(
        collect(text_engine, STORY, dataclasses.replace(greedy, priority=BATCH_PRIORITY)),
        collect(text_engine, STORY, dataclasses.replace(greedy, priority=INTERACTIVE_PRIORITY)),
    )
    assert "".join(c.delta for c in batch) == "".join(c.delta for c in interactive) == plain
    assert batch[-1].completion_tokens == interactive[-1].completion_tokens == 8
    # The structured path hands it on too.
    choice = StructuredOutputSpec(StructuredOutputKind.CHOICE, choices=("yes", "no"))
    question = TextPrompt(text="Is the sky blue? Answer yes or no.")
    answer = await collect(
        text_engine,
        question,
        TextGenerationParams(max_tokens=4, temperature=0.0, structured=choice, priority=1),
    )
    assert "".join(c.delta for c in answer) in ("yes", "no")
    # The two gathered requests reach vLLM in either order.
    assert priorities[0] == INTERACTIVE_PRIORITY
    assert sorted(priorities[1:3]) == [INTERACTIVE_PRIORITY, BATCH_PRIORITY]
    assert priorities[3:] == [1]


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
    text_engine: VllmTextEngine, plain_text_engine: VllmTextEngine
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        await collect(text_engine, STORY, TextGenerationParams(max_tokens=4, temperature=2.5))
    assert refused.value.param == "temperature"
    # logit_bias needs an engine without speculative decoding (test_speculative_decoding.py).
    with pytest.raises(InvalidRequestError, match="vocab"):
        await collect(
            plain_text_engine,
            STORY,
            TextGenerationParams(max_tokens=4, logit_bias=((10**9, 5.0),)),
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


async def test_a_shared_story_prefix_shows_as_prefix_cache_hits_in_the_metrics(
    text_engine: VllmTextEngine,
) -> None:
    block = text_engine._llm.vllm_config.cache_config.block_size
    assert text_engine._llm.vllm_config.cache_config.enable_prefix_caching
    # Through the app, as a scraper sees it: engine -> service -> registry -> /metrics.
    services = make_services(loader=lambda: _loaded(text_engine))
    app = create_app(services=services)
    await text_of(services).initialize()  # loaded: its figures show from the first scrape
    # A story of several KV-cache blocks, new to the engine: the first request misses.
    story = f"Story {uuid.uuid4().hex}. " + " ".join(
        f"Ava walked past the {i}th tower of the old city." for i in range(60)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        figures = [await _figures(c)]
        for question in ("Who is Ava?", "Where did Ava walk?"):
            body = {"prompt": f"{story}\n\n{question}", "max_tokens": 1}
            answer = await c.post("/api/v1/text/generate", json=body)
            assert answer.status_code == 200, answer.text
            figures.append(await _figures(c))
    first, second = (
        {name: after[name] - before.get(name, 0.0) for name in after}
        for before, after in itertools.pairwise(figures)
    )
    prompt = first["fictures_prompt_tokens_total"]
    assert prompt > 4 * block
    # The first looked its whole prompt up and found at most the chat template's system turn.
    assert first["fictures_vllm_prefix_cache_queries_total"] == prompt
    assert first["fictures_vllm_prefix_cache_hits_total"] < 2 * block
    # The second found the story: every whole block of the start the two share.
    assert (
        second["fictures_vllm_prefix_cache_queries_total"] == second["fictures_prompt_tokens_total"]
    )
    assert second["fictures_vllm_prefix_cache_hits_total"] >= prompt - 2 * block - 10
    after = figures[-1]
    assert after["fictures_vllm_num_requests_running"] == 0
    assert after["fictures_vllm_num_requests_waiting"] == 0
    assert 0 <= after["fictures_vllm_kv_cache_usage_perc"] < 1


async def test_the_scheduler_figures_count_a_running_request(text_engine: VllmTextEngine) -> None:
    stream = text_engine.generate(
        STORY, TextGenerationParams(max_tokens=8, ignore_eos=True), request_id=uuid.uuid4().hex
    )
    await anext(stream)
    # The step that made the first token reported it (before the token reached us).
    running = text_engine.stats()
    await stream.aclose()
    assert running is not None
    assert running.running == 1
    assert running.waiting == 0
    assert 0 < running.kv_cache_usage < 1


async def _loaded(engine: VllmTextEngine) -> VllmTextEngine:
    return engine


async def _figures(client: httpx.AsyncClient) -> dict[str, float]:
    """The samples of ``/metrics`` now, by name (the app serves one text model)."""
    text = (await client.get("/metrics")).text
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(("fictures_vllm_", "fictures_prompt_tokens"))
    }


async def test_a_kv_cache_too_small_for_the_context_says_which_settings_to_change() -> None:
    # vLLM's engine core logs the reason and raises "Engine core initialization failed".
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, text_cpu_kv_cache_mb=16, text_enforce_eager=True
    )
    with pytest.raises(ModelLoadError, match="TEXT_CPU_KV_CACHE_MB=16 too small for"):
        await VllmTextEngine.load(text_engine_options(settings))


# LoRA adapters. vLLM loads an adapter inside its engine core: given a request naming an adapter
# it cannot load (even a missing folder) the core dies; some wrong adapters it takes silently.

_lora_ids = itertools.count(100)


def _bundled_lora(name: str = "tiny") -> LoraAdapter:
    return LoraAdapter(name, next(_lora_ids), BUNDLED_TEXT_LORA)


def _copy_adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(build_tiny_text_lora(tmp_path / "built"), folder)
    return folder


def _rewrite(
    folder: Path,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = lambda t: t,
    config: Callable[[dict[str, Any]], None] = lambda c: None,
) -> Path:
    weights = folder / "adapter_model.safetensors"
    save_file(tensors(load_file(str(weights))), str(weights))
    settings = json.loads((folder / "adapter_config.json").read_text())
    config(settings)
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return folder


def _missing_folder(tmp_path: Path) -> Path:
    return tmp_path / "no-such-adapter"


def _rank_32(tmp_path: Path) -> Path:
    def widen(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: torch.zeros(32, t.shape[1]) if "lora_A" in name else torch.zeros(t.shape[0], 32)
            for name, t in tensors.items()
        }

    return _rewrite(_copy_adapter(tmp_path), widen, lambda c: c.update(r=32))


def _narrower_inputs(tmp_path: Path) -> Path:  # vLLM alone takes it and pads with zeros
    return _rewrite(
        _copy_adapter(tmp_path),
        lambda ts: {n: t[:, :512].clone() if "lora_A" in n else t for n, t in ts.items()},
    )


def _wider_outputs(tmp_path: Path) -> Path:  # vLLM alone: a request with it kills the core
    return _rewrite(
        _copy_adapter(tmp_path),
        lambda ts: {n: torch.zeros(1024, 8) if "lora_B" in n else t for n, t in ts.items()},
    )


def _a_layer_the_model_lacks(tmp_path: Path) -> Path:  # vLLM alone ignores that layer
    return _rewrite(
        _copy_adapter(tmp_path),
        lambda ts: {n.replace("layers.0.", "layers.99."): t for n, t in ts.items()},
    )


def _rank_other_than_the_config(tmp_path: Path) -> Path:  # vLLM alone takes it
    return _rewrite(
        _copy_adapter(tmp_path),
        lambda ts: {n: t[:4].clone() if "lora_A" in n else t[:, :4].clone() for n, t in ts.items()},
    )


def _corrupt_weights(tmp_path: Path) -> Path:
    folder = _copy_adapter(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10" + bytes(7) + b"not a header")
    return folder


def _no_config(tmp_path: Path) -> Path:
    folder = _copy_adapter(tmp_path)
    (folder / "adapter_config.json").unlink()
    return folder


def _dora(tmp_path: Path) -> Path:
    return _rewrite(_copy_adapter(tmp_path), config=lambda c: c.update(use_dora=True))


def _gpt2_adapter(tmp_path: Path) -> Path:
    """A PEFT LoRA of GPT-2 (another architecture: fused c_attn, hidden size 768)."""
    folder = tmp_path / "gpt2-lora"
    folder.mkdir()
    prefix = "base_model.model.transformer.h.0.attn.c_attn"
    tensors = {f"{prefix}.lora_A.weight": torch.zeros(8, 768)}
    tensors[f"{prefix}.lora_B.weight"] = torch.zeros(2304, 8)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "base_model_name_or_path": "openai-community/gpt2",
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["c_attn"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (_missing_folder, "is not a folder"),
        (_rank_32, "its rank is 32, above this engine's max_lora_rank of 16. Raise TEXT_MAX_LORA"),
        (_narrower_inputs, "k_proj map 512 inputs to 192 outputs, but that layer maps 576 to 192"),
        (_wider_outputs, "map 576 inputs to 1024 outputs, but that layer maps 576 to 192"),
        (_a_layer_the_model_lacks, "model.layers.99.self_attn.k_proj, which is not a linear"),
        (_rank_other_than_the_config, "have rank 4, but adapter_config.json says 8"),
        (_corrupt_weights, "adapter_model.safetensors is unreadable"),
        (_no_config, "adapter_config.json is missing"),
        (_dora, "DoRA"),
        (_gpt2_adapter, "not a linear layer of it (the adapter was made for 'openai-community/gpt"),
    ],
)
async def test_an_adapter_that_does_not_fit_is_refused_and_the_engine_serves_on(
    lora_text_engine: VllmTextEngine,
    tmp_path: Path,
    make: Callable[[Path], Path],
    problem: str,
) -> None:
    adapter = LoraAdapter("bad", next(_lora_ids), str(make(tmp_path)))
    with pytest.raises(InvalidRequestError, match=re.escape(problem)) as refused:
        await lora_text_engine.add_lora(adapter)
    assert refused.value.param == "lora"
    assert "'bad'" in refused.value.message
    # Neither loaded nor servable, and the engine is unchanged.
    assert adapter.id not in await lora_text_engine._llm.list_loras()
    with pytest.raises(InvalidRequestError, match="is not loaded"):
        await collect(lora_text_engine, STORY, TextGenerationParams(max_tokens=4, lora=adapter))
    await lora_text_engine.check_health()
    chunks = await collect(lora_text_engine, STORY, TextGenerationParams(max_tokens=4))
    assert chunks[-1].completion_tokens == 4


async def test_the_adapter_changes_greedy_output_and_leaves_the_base_model_alone(
    lora_text_engine: VllmTextEngine,
) -> None:
    adapter = _bundled_lora()
    greedy = TextGenerationParams(max_tokens=24, temperature=0.0)
    before = "".join(c.delta for c in await collect(lora_text_engine, STORY, greedy))
    await lora_text_engine.add_lora(adapter)
    await lora_text_engine.add_lora(adapter)  # again: a no-op
    assert adapter.id in await lora_text_engine._llm.list_loras()
    with_adapter = "".join(
        c.delta
        for c in await collect(lora_text_engine, STORY, dataclasses.replace(greedy, lora=adapter))
    )
    after = "".join(c.delta for c in await collect(lora_text_engine, STORY, greedy))
    assert with_adapter != before
    assert re.search(r"[A-Za-z]{3}", with_adapter), with_adapter  # words, not noise
    assert after == before
    await lora_text_engine.remove_lora(adapter)


async def test_a_removed_adapter_is_refused_and_unloaded(lora_text_engine: VllmTextEngine) -> None:
    adapter = _bundled_lora()
    await lora_text_engine.add_lora(adapter)
    await lora_text_engine.remove_lora(adapter)
    await lora_text_engine.remove_lora(adapter)  # again: a no-op
    assert adapter.id not in await lora_text_engine._llm.list_loras()
    with pytest.raises(InvalidRequestError, match="never added or has been removed") as refused:
        await collect(lora_text_engine, STORY, TextGenerationParams(max_tokens=4, lora=adapter))
    assert refused.value.param == "lora"
    await lora_text_engine.check_health()


async def test_removing_an_adapter_in_use_waits_for_its_requests(
    lora_text_engine: VllmTextEngine,
) -> None:
    adapter = _bundled_lora()
    await lora_text_engine.add_lora(adapter)
    params = TextGenerationParams(max_tokens=12, ignore_eos=True, lora=adapter)
    stream = lora_text_engine.generate(STORY, params, request_id=uuid.uuid4().hex)
    first = await anext(stream)
    await lora_text_engine.remove_lora(adapter)
    with pytest.raises(InvalidRequestError, match="has been removed"):
        await collect(lora_text_engine, STORY, params)
    rest = [chunk async for chunk in stream]  # the running request ends normally
    assert [first, *rest][-1].completion_tokens == 12
    assert adapter.id not in await lora_text_engine._llm.list_loras()


async def test_an_adapter_never_added_or_changed_on_disk_is_refused_before_vllm_sees_it(
    lora_text_engine: VllmTextEngine, tmp_path: Path
) -> None:
    never_added = LoraAdapter("never", next(_lora_ids), str(_missing_folder(tmp_path)))
    with pytest.raises(InvalidRequestError, match="is not loaded"):
        await collect(lora_text_engine, STORY, TextGenerationParams(4, lora=never_added))
    folder = _copy_adapter(tmp_path)
    adapter = LoraAdapter("copied", next(_lora_ids), str(folder))
    await lora_text_engine.add_lora(adapter)
    shutil.rmtree(folder)
    with pytest.raises(InvalidRequestError, match="changed or vanished since it was loaded"):
        await collect(lora_text_engine, STORY, TextGenerationParams(4, lora=adapter))
    await lora_text_engine.remove_lora(adapter)
    await lora_text_engine.check_health()


async def test_an_id_belongs_to_one_adapter(lora_text_engine: VllmTextEngine) -> None:
    adapter = _bundled_lora("first")
    await lora_text_engine.add_lora(adapter)
    other = dataclasses.replace(adapter, name="second")
    with pytest.raises(InvalidRequestError, match=f"id {adapter.id} is taken by 'first'"):
        await lora_text_engine.add_lora(other)
    with pytest.raises(InvalidRequestError, match="is not loaded"):
        await collect(lora_text_engine, STORY, TextGenerationParams(4, lora=other))
    await lora_text_engine.remove_lora(adapter)


async def test_an_engine_without_lora_says_how_to_turn_it_on(text_engine: VllmTextEngine) -> None:
    adapter = _bundled_lora()
    with pytest.raises(InvalidRequestError, match="TEXT_ENABLE_LORA=true") as refused:
        await text_engine.add_lora(adapter)
    assert refused.value.param == "lora"
    with pytest.raises(InvalidRequestError, match="LoRA adapters are off"):
        await collect(text_engine, STORY, TextGenerationParams(max_tokens=4, lora=adapter))


def test_max_lora_rank_becomes_a_slot_size_vllm_takes() -> None:
    assert [vllm_lora_rank(rank) for rank in (1, 8, 9, 16, 20, 320, 321, 600)] == [
        1,
        8,
        16,
        16,
        32,
        320,
        512,
        512,
    ]
