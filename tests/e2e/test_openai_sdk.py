"""The official ``openai`` SDK, unchanged, against the real server's ``/v1``."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import jsonschema
import openai
import pytest
from PIL import Image

from tests.e2e.conftest import RunningServer

pytestmark = pytest.mark.e2e

MODEL = "SmolLM2-135M-Instruct"


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
