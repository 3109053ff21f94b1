"""The official ``openai`` SDK, unchanged, against the real server's ``/v1``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import RunningServer, running_server
from tests.support import WEATHER_TOOL, WebAppDatabase

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, web_app_database: WebAppDatabase
) -> Iterator[RunningServer]:
    """A server of its own with n-gram speculative decoding: structured output and streamed
    tool calls through the SDK with several tokens per engine step (issue 15)."""
    folder = tmp_path_factory.mktemp("sdk-server")
    with running_server(
        folder, web_app_database, keys="sdk", TEXT_SPECULATIVE_METHOD="ngram"
    ) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(api_key=server.key, base_url=f"{server.url}/v1", timeout=300)


def test_chat_plain(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=30,
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 30


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=20,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert len(chunks) > 3
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.completion_tokens == len([c for c in chunks if c.choices])


def test_chat_json_schema_is_valid(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"hero": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["hero", "age"],
        "additionalProperties": False,
    }
    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a hero as JSON."}],
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "hero", "schema": schema}},
    )
    jsonschema.validate(json.loads(completion.choices[0].message.content or ""), schema)


def test_completions_and_logprobs(client: openai.OpenAI) -> None:
    completion = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, logprobs=2, temperature=0
    )
    choice = completion.choices[0]
    assert choice.text
    assert choice.logprobs is not None
    assert choice.logprobs.tokens
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs or [])


def test_async_client_and_ignore_eos(server: RunningServer) -> None:
    async def run() -> list[int]:
        async with openai.AsyncOpenAI(
            api_key=server.key, base_url=f"{server.url}/v1", timeout=300
        ) as client:
            results = await asyncio.gather(
                *(
                    client.chat.completions.create(
                        model=MODEL,
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=12,
                        extra_body={"ignore_eos": True},
                    )
                    for _ in range(4)
                )
            )
        return [r.usage.completion_tokens for r in results if r.usage is not None]

    assert asyncio.run(run()) == [12, 12, 12, 12]


def test_images_b64_and_url(client: openai.OpenAI) -> None:
    b64 = client.images.generate(
        prompt="a tower", size="256x256", response_format="b64_json", extra_body={"steps": 2}
    )
    assert b64.data is not None
    assert b64.data[0].b64_json is not None
    png = base64.b64decode(b64.data[0].b64_json)
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    linked = client.images.generate(
        prompt="a tower", size="256x256", extra_body={"steps": 2, "seed": 4}
    )
    assert linked.data is not None
    assert linked.data[0].url is not None
    fetched = httpx.get(linked.data[0].url)  # the URL itself is the permission: no key
    assert fetched.status_code == 200
    assert Image.open(io.BytesIO(fetched.content)).size == (256, 256)


def test_bad_request_raises_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=100_000
        )
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


def test_what_speculation_cannot_hold_is_a_400_naming_it(server: RunningServer) -> None:
    # This server speculates (n-gram) on the CPU: a sampled min_tokens would not be held.
    client = openai.OpenAI(api_key=server.key, base_url=f"{server.url}/v1", timeout=300)
    messages: Any = [{"role": "user", "content": "Write a line of a sea shanty."}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=20, temperature=0.7, stream=stream,
                extra_body={"min_tokens": 12},
            )  # fmt: skip
        assert refused.value.body["param"] == "min_tokens"  # type: ignore[index]
        assert "TEXT_SPECULATIVE_METHOD=none" in refused.value.message
    greedy = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, temperature=0, extra_body={"min_tokens": 12}
    )
    assert greedy.usage is not None
    assert greedy.usage.completion_tokens >= 12
    fictures = server.http.post(
        f"{server.url}/api/v1/text/generate",
        json={"prompt": "Write a line.", "max_tokens": 20, "min_tokens": 12, "temperature": 0.7},
    )
    assert fictures.status_code == 400, fictures.text
    assert "min_tokens" in fictures.json()["detail"]


CLOCK: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_tool_calls_streamed_and_whole_agree(client: openai.OpenAI) -> None:
    request: Any = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER_TOOL, CLOCK],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 80,
    }
    whole = client.chat.completions.create(**request)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert calls
    for call in calls:
        assert call.function.name in ("get_weather", "get_time")  # type: ignore[union-attr]
        arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
        schema = (WEATHER_TOOL if call.function.name == "get_weather" else CLOCK)["function"]  # type: ignore[union-attr]
        jsonschema.validate(arguments, schema["parameters"])

    streamed: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(**request, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            assert delta.function is not None
            if delta.id is not None:
                streamed[delta.index] = [delta.function.name or "", ""]
            streamed[delta.index][1] += delta.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    # Greedy sampling: the same calls, and the pieces join to the same arguments.
    assert [tuple(parts) for parts in streamed.values()] == [
        (c.function.name, c.function.arguments)  # type: ignore[union-attr]
        for c in calls
    ]


def test_named_tool_call_and_the_answer_round_trip(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER_TOOL, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments)["city"], str)  # type: ignore[union-attr]

    # The app runs the tool and sends the result back: the model answers in text.
    follow_up = client.chat.completions.create(
        model=MODEL,
        messages=[
            *ASK,
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER_TOOL, CLOCK],
        tool_choice="none",
        max_tokens=30,
    )
    assert follow_up.choices[0].message.content
    assert follow_up.choices[0].message.tool_calls is None


def test_what_the_engine_would_refuse_is_a_400_and_nulls_are_defaults(
    client: openai.OpenAI, server: RunningServer
) -> None:
    for seed, n in [(2**64, 1), (2**64 - 1, 2), (-(2**63) - 1, 1)]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=MODEL,
                messages=ASK,
                max_tokens=2,
                seed=seed,
                n=n,  # type: ignore[arg-type]
            )
        assert refused.value.param == "seed" or "seed" in str(refused.value)
    completion = client.chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        max_tokens=4,
        temperature=None,
        top_p=None,
        n=None,
        presence_penalty=None,
        frequency_penalty=None,
        stream=None,
        logprobs=None,
        seed=-1,
    )
    assert completion.choices[0].message.content
    for path in ("generate", "stream"):
        answer = server.http.post(
            f"{server.url}/api/v1/text/{path}",
            json={"prompt": "Say hi.", "max_tokens": 4, "top_p": 0.0},
        )
        assert answer.status_code == 200, answer.text
    tokens = server.http.post(f"{server.url}/tokenize", json={"messages": ASK}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 5
    assert (
        "Paris"
        in server.http.post(f"{server.url}/detokenize", json={"tokens": tokens["tokens"]}).json()[
            "prompt"
        ]
    )


def test_a_tool_schema_the_grammar_compiler_refuses_is_a_400_naming_the_tool(
    client: openai.OpenAI,
) -> None:
    # xgrammar cannot enforce multipleOf: vLLM refuses the schema built from the tools.
    odd = {
        "type": "function",
        "function": {
            "name": "pick_chapter",
            "parameters": {
                "type": "object",
                "properties": {"number": {"type": "integer", "multipleOf": 5}},
            },
        },
    }
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=ASK,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL, odd],  # type: ignore[list-item]
            tool_choice="required",
            max_tokens=10,
        )
    assert refused.value.param == "tools[1].function.parameters"
    assert "pick_chapter" in str(refused.value)
