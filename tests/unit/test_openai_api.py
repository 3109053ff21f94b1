"""The OpenAI-compatible surface over fake engines, driven by the official ``openai`` SDK."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from PIL import Image

from fictures_ai.api.app import create_app
from tests.unit.conftest import make_services
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

REPLY = "Once upon a time there was a brave little dragon ."


@pytest.fixture
async def sdk(
    engine: FakeTextEngine, image_engine: FakeImageEngine
) -> AsyncIterator[openai.AsyncOpenAI]:
    app = create_app(services=make_services(engine, image_engine=image_engine))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    async with openai.AsyncOpenAI(
        api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0
    ) as client:
        yield client


async def test_models_lists_the_text_and_image_models(sdk: openai.AsyncOpenAI) -> None:
    models = await sdk.models.list()
    assert [model.id for model in models.data] == ["fake-model", "fake-image-model"]
    assert all(model.object == "model" for model in models.data)


async def test_chat_completion(sdk: openai.AsyncOpenAI, engine: FakeTextEngine) -> None:
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "system", "content": "You tell stories."},
            {"role": "user", "content": [{"type": "text", "text": "Tell one."}]},
        ],
        max_tokens=5,
        temperature=0.2,
        top_p=0.5,
        stop=["zzz"],
        seed=3,
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "fake-model"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Once upon a time there"
    assert choice.finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens == 5
    assert completion.usage.total_tokens == 10
    prompt, params = engine.calls[-1]
    assert prompt.messages is not None
    assert [(m.role, m.content) for m in prompt.messages] == [
        ("system", "You tell stories."),
        ("user", "Tell one."),
    ]
    assert (params.max_tokens, params.temperature, params.top_p) == (5, 0.2, 0.5)
    assert (params.stop, params.seed) == (("zzz",), 3)


async def test_max_completion_tokens_wins_and_default_is_the_rest_of_the_context(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "x"}
    ]
    await sdk.chat.completions.create(
        model="fake-model", messages=messages, max_tokens=9, max_completion_tokens=3
    )
    assert engine.calls[-1][1].max_tokens == 3
    await sdk.chat.completions.create(model="fake-model", messages=messages)
    assert engine.calls[-1][1].max_tokens is None


async def test_n_choices_use_consecutive_seeds(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        n=3,
        seed=10,
        max_tokens=2,
    )
    assert [choice.index for choice in completion.choices] == [0, 1, 2]
    assert sorted(params.seed for _, params in engine.calls[-3:]) == [10, 11, 12]
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    assert completion.usage.prompt_tokens == 1


async def test_streamed_chat_with_usage(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(part or "" for part in content) == "Once upon a time"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.object == "chat.completion.chunk" for c in chunks)


async def test_json_schema_response_format_is_enforced_by_the_engine(
    sdk: openai.AsyncOpenAI, engine: FakeTextEngine
) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "character", "schema": schema},
        },
    )
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ava", "age": 20}
    spec = engine.calls[-1][1].structured
    assert spec is not None
    assert spec.json_schema == schema
    await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_object"},
    )
    spec = engine.calls[-1][1].structured
    assert spec is not None
    assert spec.json_schema == {"type": "object"}


async def test_chat_logprobs(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=2,
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == ["Once", " upon"]
    assert logprobs.content[0].logprob == -0.5
    assert [top.token for top in logprobs.content[0].top_logprobs] == ["alt0", "alt1"]


async def test_completions_plain_streamed_and_batched(sdk: openai.AsyncOpenAI) -> None:
    completion = await sdk.completions.create(model="fake-model", prompt="Once", max_tokens=3)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == "Once upon a"
    stream = await sdk.completions.create(
        model="fake-model", prompt="Once", max_tokens=3, stream=True
    )
    pieces = [chunk.choices[0].text async for chunk in stream]
    assert "".join(pieces) == "Once upon a"
    batch = await sdk.completions.create(
        model="fake-model", prompt=["a b", "c d e"], max_tokens=2, n=2, logprobs=1
    )
    assert len(batch.choices) == 4
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == 5
    assert batch.choices[0].logprobs is not None
    assert batch.choices[0].logprobs.tokens == ["Once", " upon"]
    assert batch.choices[0].logprobs.text_offset == [0, 4]


async def test_unknown_model_is_404_model_not_found(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == "model_not_found"
    assert "gpt-4" in caught.value.message


async def test_bad_requests_raise_bad_request_error(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}], temperature=3.0
        )
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="context"):
        await sdk.completions.create(model="fake-model", prompt="x", max_tokens=9000)


async def test_image_generation_as_b64_and_url(
    sdk: openai.AsyncOpenAI, image_engine: FakeImageEngine
) -> None:
    b64 = await sdk.images.generate(
        prompt="a castle",
        size="256x256",
        response_format="b64_json",
        n=2,
        extra_body={"seed": 9, "steps": 2, "negative_prompt": "fog", "guidance_scale": 4.0},
    )
    assert b64.data is not None
    assert len(b64.data) == 2
    assert b64.data[0].b64_json is not None
    image = Image.open(io.BytesIO(base64.b64decode(b64.data[0].b64_json)))
    assert image.size == (256, 256)
    assert sorted(p.seed for p in image_engine.calls[-2:]) == [9, 10]
    params = image_engine.calls[-1]
    assert (params.num_inference_steps, params.negative_prompt) == (2, "fog")

    url = await sdk.images.generate(prompt="a castle", size="256x512", response_format="url")
    assert url.data is not None
    link = url.data[0].url
    assert link is not None
    assert link.startswith("http://test/v1/images/files/")
    fetched = await sdk._client.get(link)
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (256, 512)
    missing = await sdk._client.get("http://test/v1/images/files/not-a-token")
    assert missing.status_code == 404


async def test_bad_image_sizes_are_bad_requests(sdk: openai.AsyncOpenAI) -> None:
    for size in ["1000x255", "big", "4096x4096", "1024x2049"]:
        with pytest.raises(openai.BadRequestError, match="size"):
            await sdk.images.generate(prompt="x", size=size)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dead", "status", "kind"),
    [(True, 503, "service_unavailable_error"), (False, 500, "server_error")],
)
async def test_a_stream_that_fails_after_it_started_ends_with_the_errors_own_type(
    dead: bool, status: int, kind: str
) -> None:
    # One map for responses and events: an engine that dies mid-stream is what it would be
    # before the stream started (503, service_unavailable_error), not a generic server error.
    engine = FakeTextEngine(fail_after=2, dead=dead)
    app = create_app(services=make_services(engine))
    body = {"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post("/v1/chat/completions", json=body)
        before = await c.post("/v1/chat/completions", json={**body, "stream": False})
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == kind
    assert len(events) == 4  # two chunks, the error, [DONE]
    # Before the stream started the same failure is a response with that status and type.
    assert before.status_code == status
    assert before.json()["error"]["type"] == kind
