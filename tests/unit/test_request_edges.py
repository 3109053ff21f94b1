"""Values at and past the edges of every surface: what the engine refuses is refused at the
edge with a 400 naming the field, null means the default on ``/v1``, and an error no one
foresaw is a JSON 500 that leaves the connection usable."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.engines.base import TextChunk, TextGenerationParams, TextPrompt
from fictures_ai.engines.vllm_engine import VllmTextEngine
from tests.unit.conftest import live_server, make_services
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Say hi."}]}


@pytest.fixture
async def http(
    engine: FakeTextEngine, image_engine: FakeImageEngine
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services=make_services(engine, image_engine=image_engine))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        yield client


@pytest.mark.parametrize("path", ["generate", "stream", "structured"])
async def test_top_p_zero_is_served_on_the_fictures_surface(
    http: httpx.AsyncClient, engine: FakeTextEngine, path: str
) -> None:
    body: dict[str, Any] = {"prompt": "Say hi.", "max_tokens": 4, "top_p": 0.0}
    if path == "structured":
        body["guided_decoding"] = {"type": "choice", "choices": ["hi", "bye"]}
    response = await http.post(f"/api/v1/text/{path}", json=body)
    assert response.status_code == 200, response.text
    assert engine.calls[-1][1].top_p == 0.0


async def test_top_p_zero_is_served_on_the_openai_surface(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await http.post("/v1/chat/completions", json={**CHAT, "top_p": 0})
    assert response.status_code == 200, response.text
    assert engine.calls[-1][1].top_p == 0.0


def test_top_p_zero_samples_greedily_in_vllm() -> None:
    sampling = VllmTextEngine._sampling_params(
        TextGenerationParams(max_tokens=4, temperature=0.9, top_p=0.0), max_tokens=4, min_tokens=0
    )
    assert sampling.temperature == 0.0
    assert sampling.top_p == 1.0


@pytest.mark.parametrize(
    ("seed", "engine_seed"), [(None, None), (7, 7), (-1, 2**64 - 1), (-(2**63), 2**63)]
)
def test_signed_seeds_reach_vllm_as_the_same_torch_seed(
    seed: int | None, engine_seed: int | None
) -> None:
    # torch seeds with seed mod 2**64; vLLM alone would read -1 as "no seed".
    sampling = VllmTextEngine._sampling_params(
        TextGenerationParams(max_tokens=4, seed=seed), max_tokens=4, min_tokens=0
    )
    assert sampling.seed == engine_seed


@pytest.mark.parametrize(
    ("seed", "n"), [(2**64, 1), (2**64 - 1, 2), (-(2**63) - 1, 1), (2**63 - 1, 2)]
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_seeds_past_64_bits_are_400s(
    http: httpx.AsyncClient, path: str, seed: int, n: int
) -> None:
    body = {**CHAT, "prompt": "Say hi.", "seed": seed, "n": n, "max_tokens": 2}
    response = await http.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "seed" or "seed" in error["message"]


async def test_the_largest_seeds_are_served(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await http.post("/v1/chat/completions", json={**CHAT, "seed": 2**63 - 2, "n": 2})
    assert response.status_code == 200, response.text
    assert [params.seed for _, params in engine.calls[-2:]] == [2**63 - 2, 2**63 - 1]


NULLABLE_CHAT = [
    "temperature",
    "top_p",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "seed",
    "stop",
    "stream_options",
    "logit_bias",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "metadata",
    "store",
]
NULLABLE_COMPLETION = ["echo", "logprobs", "suffix", "best_of", "stream", "temperature", "n"]


async def test_null_means_the_default_on_chat(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    body = {**CHAT, **dict.fromkeys(NULLABLE_CHAT)}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    params = engine.calls[-1][1]
    assert (params.temperature, params.top_p, params.presence_penalty) == (1.0, 1.0, 0.0)
    assert len(response.json()["choices"]) == 1


async def test_null_means_the_default_on_completions(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    body = {"model": "fake-model", "prompt": "Once", **dict.fromkeys(NULLABLE_COMPLETION)}
    response = await http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["logprobs"] is None


async def test_the_openai_sdk_sends_none_as_null(engine: FakeTextEngine) -> None:
    import openai

    app = create_app(services=make_services(engine))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test/v1")
    async with openai.AsyncOpenAI(
        api_key="unused", base_url="http://test/v1", http_client=http, max_retries=0
    ) as sdk:
        completion = await sdk.chat.completions.create(
            model="fake-model",
            messages=[{"role": "user", "content": "Hi"}],
            temperature=None,
            top_p=None,
            n=None,
            presence_penalty=None,
            frequency_penalty=None,
            stream=None,
            logprobs=None,
        )
    assert completion.choices[0].message.content == engine.reply


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "-100..100"),
        ({"modalities": ["text", "audio"]}, None, "text only"),
        ({"reasoning_effort": "high"}, None, "do not reason"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            None,
            "'image_url' are not supported",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"temperature": "hot"}, "temperature", "number"),
        ({"messages": []}, "messages", "at least 1"),
    ],
)
async def test_openai_refusals_are_400_invalid_request_errors(
    http: httpx.AsyncClient, body: dict[str, Any], param: str | None, words: str
) -> None:
    response = await http.post("/v1/chat/completions", json={**CHAT, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


async def test_completions_refuse_what_they_cannot_do(http: httpx.AsyncClient) -> None:
    for extra, words in [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
    ]:
        body = {"model": "fake-model", "prompt": "Once", **extra}
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 400, (extra, response.text)
        assert words in response.json()["error"]["message"]


async def test_completions_take_token_id_prompts(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await http.post(
        "/v1/completions", json={"model": "fake-model", "prompt": [[1, 2, 3], [4]]}
    )
    assert response.status_code == 200, response.text
    assert [prompt.token_ids for prompt, _ in engine.calls[-2:]] == [(1, 2, 3), (4,)]
    assert response.json()["usage"]["prompt_tokens"] == 4


async def test_malformed_json_and_wrong_methods_speak_openai(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert "not valid JSON" in error["message"]

    response = await http.get("/v1/chat/completions")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_tokenize_and_detokenize(http: httpx.AsyncClient) -> None:
    response = await http.post("/tokenize", json={"prompt": "a story of dragons"})
    assert response.status_code == 200, response.text
    tokens = response.json()
    assert tokens["count"] == 4
    assert tokens["max_model_len"] == 8192
    response = await http.post("/detokenize", json={"tokens": tokens["tokens"]})
    assert response.json() == {"prompt": "a story of dragons"}

    chat = await http.post("/tokenize", json={"messages": CHAT["messages"]})
    assert chat.json()["count"] == 2
    unknown = await http.post("/detokenize", json={"tokens": [99999]})
    assert unknown.status_code == 400
    assert unknown.json()["error"]["param"] == "tokens"
    both = await http.post("/tokenize", json={"prompt": "x", "messages": CHAT["messages"]})
    assert both.status_code == 400
    wrong_model = await http.post("/tokenize", json={"prompt": "x", "model": "gpt-4"})
    assert wrong_model.status_code == 404
    assert wrong_model.json()["error"]["code"] == "model_not_found"


class BrokenEngine(FakeTextEngine):
    """An engine with a bug: it raises an exception nobody mapped."""

    async def generate(  # type: ignore[override]
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        raise RuntimeError("an unforeseen bug")
        yield  # pragma: no cover - makes this an async generator


@pytest.fixture
async def broken_server() -> AsyncIterator[int]:
    async with live_server(create_app(services=make_services(BrokenEngine()))) as port:
        yield port


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """One HTTP/1.1 request on an open connection; the status and JSON body of the answer."""
    payload = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status = int(head.split()[1])
    length = next(
        int(line.split(":")[1])
        for line in head.split("\r\n")
        if line.lower().startswith("content-length")
    )
    return status, json.loads(await reader.readexactly(length))


async def test_an_unforeseen_error_is_a_json_500_and_the_connection_lives_on(
    broken_server: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broken_server)
    try:
        status, body = await _exchange(reader, writer, "/v1/chat/completions", CHAT)
        assert status == 500
        assert body["error"]["type"] == "server_error"
        assert "request id" in body["error"]["message"]
        assert "unforeseen" not in body["error"]["message"]  # details stay in the log
        # The same connection serves the next requests.
        status, body = await _exchange(
            reader, writer, "/api/v1/text/generate", {"prompt": "x", "max_tokens": 2}
        )
        assert status == 500
        assert body["detail"].startswith("Internal server error")
        status, body = await _exchange(reader, writer, "/tokenize", {"prompt": "a b"})
        assert (status, body["count"]) == (200, 2)
    finally:
        writer.close()


async def test_openai_image_parameters_are_served_or_refused(
    http: httpx.AsyncClient, image_engine: FakeImageEngine
) -> None:
    served = await http.post(
        "/v1/images/generations",
        json={
            "prompt": "a cat",
            "size": "auto",
            "quality": "standard",
            "output_format": "png",
            "background": "opaque",
            "response_format": None,
            "n": None,
            "steps": None,
            "moderation": "auto",
        },
    )
    assert served.status_code == 200, served.text
    assert (image_engine.calls[-1].width, image_engine.calls[-1].height) == (1024, 1024)
    for extra, words in [
        ({"style": "vivid"}, "describe the style in the prompt"),
        ({"quality": "hd"}, "quality"),
        ({"output_format": "jpeg"}, "output_format"),
        ({"background": "transparent"}, "background"),
        ({"stream": True}, "/api/v1/images/stream"),
    ]:
        refused = await http.post("/v1/images/generations", json={"prompt": "a cat", **extra})
        assert refused.status_code == 400, (extra, refused.text)
        assert words in refused.json()["error"]["message"]


async def test_nan_and_infinity_are_400s_on_both_surfaces(http: httpx.AsyncClient) -> None:
    for path, body in [
        (
            "/v1/chat/completions",
            '{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], '
            '"temperature": NaN}',
        ),
        ("/api/v1/text/generate", '{"prompt": "x", "top_p": Infinity}'),
        ("/api/v1/images/generate", '{"prompt": "x", "guidance_scale": NaN}'),
    ]:
        response = await http.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert "finite number" in response.text


async def test_union_errors_name_the_parameter_as_clients_write_it(
    http: httpx.AsyncClient,
) -> None:
    response = await http.post("/v1/completions", json={"model": "fake-model", "prompt": [1.5]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt[0]" or error["param"] == "prompt"
    assert "list[" not in error["message"]
    response = await http.post("/v1/chat/completions", json={**CHAT, "tool_choice": "maybe"})
    assert response.json()["error"]["param"] == "tool_choice"
    response = await http.post("/v1/chat/completions", json={**CHAT, "seed": 2**63 - 1, "n": 2})
    assert response.json()["error"]["param"] == "seed"


async def test_a_body_that_is_not_json_says_so(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 400
    assert "Content-Type: application/json" in response.json()["error"]["message"]


async def test_empty_completion_prompts_are_400s(http: httpx.AsyncClient) -> None:
    for prompt in ("", [], [""], [[]]):
        response = await http.post(
            "/v1/completions", json={"model": "fake-model", "prompt": prompt}
        )
        assert response.status_code == 400, (prompt, response.text)
        assert response.json()["error"]["param"] == "prompt"


async def test_the_fictures_surface_takes_a_seed(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await http.post("/api/v1/text/generate", json={"prompt": "x", "seed": -5})
    assert response.status_code == 200, response.text
    assert engine.calls[-1][1].seed == -5
    response = await http.post("/api/v1/text/generate", json={"prompt": "x", "seed": 2**63})
    assert response.status_code == 400


async def test_retrieve_one_model(http: httpx.AsyncClient) -> None:
    for name in ("fake-model", "fake-image-model"):
        response = await http.get(f"/v1/models/{name}")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == name
    missing = await http.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_a_chat_prompt_too_long_names_the_messages(
    http: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    engine.max_model_len = 4
    messages = [{"role": "user", "content": "far too many words for this context"}]
    response = await http.post("/v1/chat/completions", json={**CHAT, "messages": messages})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


# JSON may spell what Python cannot encode: a lone UTF-16 surrogate, a number past a float.
SURROGATE_BODIES = [
    ("/api/v1/text/generate", '{"prompt": "\\u0000hi\\ud800"}', "prompt"),
    ("/api/v1/text/stream", '{"prompt": "hi", "stop_sequences": ["\\udfff"]}', "stop_sequences[0]"),
    (
        "/api/v1/text/structured",
        '{"prompt": "hi", "guided_decoding": {"type": "choice", "choices": ["\\ud83d"]}}',
        "guided_decoding.choices[0]",
    ),
    ("/api/v1/images/generate", '{"prompt": "x", "negative_prompt": "\\ud800"}', "negative_prompt"),
    ("/api/v1/images/stream", '{"prompt": "\\ud800"}', "prompt"),
    (
        "/v1/chat/completions",
        '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800"}]}',
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '{"model": "fake-model", "messages": [{"role": "user", "content": [{"type": "text", '
        '"text": "\\ud800"}]}], "stream": true}',
        "messages[0].content[0].text",
    ),
    ("/v1/completions", '{"model": "fake-model", "prompt": "x", "stop": "\\ud800"}', "stop"),
    ("/v1/images/generations", '{"prompt": "\\udc00"}', "prompt"),
    ("/tokenize", '{"prompt": "\\ud800"}', "prompt"),
    ("/api/v1/text/generate", '{"prompt": "hi", "max_tokens": "\\ud800"}', "max_tokens"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATE_BODIES)
async def test_a_lone_surrogate_in_any_string_is_a_400_naming_the_field(
    http: httpx.AsyncClient, engine: FakeTextEngine, path: str, body: str, field: str
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    message = (
        response.json()["error"]["message"]
        if path.startswith(("/v1", "/tokenize"))
        else response.json()["detail"]
    )
    assert message.startswith(f"{field}: holds a lone UTF-16 surrogate")
    assert not engine.calls


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/v1/text/generate", '{"prompt": "hi", "max_tokens": 1e309}', 422),
        ("/api/v1/text/generate", '{"prompt": "hi", "temperature": -1e309}', 400),
        ("/api/v1/images/generate", '{"prompt": "x", "width": 1e309}', 422),
        (
            "/v1/chat/completions",
            '{"model": "fake-model", "max_tokens": 1e309, "messages": []}',
            400,
        ),
    ],
)
async def test_a_number_past_a_float_is_a_client_error_in_json(
    http: httpx.AsyncClient, path: str, body: str, status: int
) -> None:
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"


@pytest.mark.parametrize("body", ["[" * 200_000 + "]" * 200_000, b'{"prompt": "Z\xff"}'])
@pytest.mark.parametrize(
    ("path", "status"), [("/api/v1/text/generate", 422), ("/v1/chat/completions", 400)]
)
async def test_a_body_the_json_decoder_cannot_read_is_malformed(
    http: httpx.AsyncClient, path: str, status: int, body: str | bytes
) -> None:
    # Nested past the decoder's recursion limit, or bytes that are not UTF-8.
    response = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert "could not be parsed as JSON" in response.text
    if status == 422:  # the Fictures surface's validation-error shape, as documented
        (error,) = response.json()["detail"]
        assert error["loc"] == ["body"]
