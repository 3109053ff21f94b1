"""The Fictures text endpoints over a fake engine: contract, defaults, SSE and status codes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.engines.base import StructuredOutputKind
from fictures_ai.errors import ModelLoadError
from tests.unit.conftest import make_services, wait_until
from tests.unit.fake_engines import FakeTextEngine, json_events

GENERATE = "/api/v1/text/generate"
STREAM = "/api/v1/text/stream"
STRUCTURED = "/api/v1/text/structured"


async def test_generate_returns_the_contract_fields(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json={"prompt": "Tell me a story"})
    assert response.status_code == 200
    assert response.json() == {
        "text": "Once upon a time there was a brave little dragon .",
        "model": "fake-model",
        "tokens_used": 11,
        "finish_reason": "stop",
    }


async def test_generate_applies_the_contract_defaults(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    await client.post(GENERATE, json={"prompt": "Hi"})
    prompt, params = engine.calls[-1]
    assert prompt.text == "Hi"
    assert prompt.format == "chat"
    assert (params.max_tokens, params.temperature, params.top_p) == (2048, 0.7, 0.9)
    assert params.stop == ()


async def test_max_tokens_cuts_the_output_with_length(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json={"prompt": "Hi", "max_tokens": 3})
    assert response.json()["text"] == "Once upon a"
    assert response.json()["finish_reason"] == "length"
    assert response.json()["tokens_used"] == 3


async def test_stop_sequences_end_the_output(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await client.post(GENERATE, json={"prompt": "Hi", "stop_sequences": ["brave"]})
    assert response.json()["text"] == "Once upon a time there was a "
    assert response.json()["finish_reason"] == "stop"
    assert engine.calls[-1][1].stop == ("brave",)


async def test_stream_sends_cumulative_text_delta_and_done(client: httpx.AsyncClient) -> None:
    response = await client.post(STREAM, json={"prompt": "Hi", "max_tokens": 4})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.text.endswith("data: [DONE]\n\n")
    events = json_events(response.text)
    assert events[-1] == "[DONE]"
    data = [event for event in events if isinstance(event, dict)]
    assert [event["delta"] for event in data] == ["Once", " upon", " a", " time"]
    assert [event["text"] for event in data] == [
        "Once",
        "Once upon",
        "Once upon a",
        "Once upon a time",
    ]
    assert [event["tokens_used"] for event in data] == [1, 2, 3, 4]
    assert all(event["done"] is False and event["finish_reason"] is None for event in data[:-1])
    assert data[-1]["done"] is True
    assert data[-1]["finish_reason"] == "length"
    assert all(event["model"] == "fake-model" for event in data)


async def test_stream_error_after_start_is_a_final_error_event() -> None:
    engine = FakeTextEngine(fail_after=2)
    app = create_app(services=make_services(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(STREAM, json={"prompt": "Hi"})
    assert response.status_code == 200
    events = json_events(response.text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert isinstance(final, dict)
    assert final["done"] is True
    assert final["finish_reason"] == "error"
    assert final["error"] == "The fake engine failed."
    assert final["text"] == "Once upon"


async def test_structured_json_is_parsed_and_validated(client: httpx.AsyncClient) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    response = await client.post(
        STRUCTURED,
        json={"prompt": "A character", "guided_decoding": {"type": "json", "schema": schema}},
    )
    assert response.status_code == 200
    body = response.json()
    assert body["parsed_output"] == {"name": "Ava", "age": 20}
    assert body["is_valid"] is True
    assert body["output"] == '{"name": "Ava", "age": 20}'
    assert body["finish_reason"] == "stop"
    assert set(body) == {
        "output",
        "parsed_output",
        "model",
        "tokens_used",
        "finish_reason",
        "is_valid",
    }


async def test_structured_output_that_breaks_the_schema_is_not_valid() -> None:
    engine = FakeTextEngine(json_reply='{"name": 3}')
    app = create_app(services=make_services(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        schema = {"type": "object", "properties": {"name": {"type": "string"}}}
        response = await c.post(
            STRUCTURED, json={"prompt": "x", "guided_decoding": {"type": "json", "schema": schema}}
        )
    assert response.json()["is_valid"] is False
    assert response.json()["parsed_output"] == {"name": 3}


async def test_structured_choice_reaches_the_engine(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await client.post(
        STRUCTURED,
        json={"prompt": "Yes?", "guided_decoding": {"type": "choice", "choices": ["yes", "no"]}},
    )
    assert response.json()["output"] == "yes"
    assert response.json()["is_valid"] is True
    spec = engine.calls[-1][1].structured
    assert spec is not None
    assert spec.kind is StructuredOutputKind.CHOICE
    assert spec.choices == ("yes", "no")


@pytest.mark.parametrize(
    ("guided", "field"),
    [
        ({"type": "json"}, "schema"),
        ({"type": "regex"}, "pattern"),
        ({"type": "choice", "choices": []}, "choices"),
        ({"type": "grammar"}, "grammar"),
    ],
)
async def test_structured_without_the_field_its_type_needs_is_400(
    client: httpx.AsyncClient, guided: dict[str, object], field: str
) -> None:
    response = await client.post(STRUCTURED, json={"prompt": "x", "guided_decoding": guided})
    assert response.status_code == 400
    assert field in response.json()["detail"]


@pytest.mark.parametrize("path", [GENERATE, STREAM, STRUCTURED])
async def test_prompt_over_50000_characters_is_400_with_the_contract_message(
    client: httpx.AsyncClient, path: str
) -> None:
    body: dict[str, object] = {"prompt": "a" * 50_001}
    if path == STRUCTURED:
        body["guided_decoding"] = {"type": "choice", "choices": ["a"]}
    response = await client.post(path, json=body)
    assert response.status_code == 400
    assert response.json() == {"detail": "Prompt too long (max 50000 characters)"}


async def test_prompt_of_exactly_50000_characters_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json={"prompt": "a" * 50_000, "max_tokens": 5})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 40_961},
        {"prompt": "x", "min_tokens": -1},
        {"prompt": "x", "max_tokens": 10, "min_tokens": 11},
        {"prompt": "x", "temperature": 2.5},
        {"prompt": "x", "temperature": -0.1},
        {"prompt": "x", "top_p": 1.5},
    ],
)
async def test_values_out_of_range_are_400(
    client: httpx.AsyncClient, body: dict[str, object]
) -> None:
    response = await client.post(GENERATE, json=body)
    assert response.status_code == 400
    assert isinstance(response.json()["detail"], str)


@pytest.mark.parametrize(
    "content",
    [
        b'{"max_tokens": 5}',
        b'{"prompt": "x", "max_tokens": "many"}',
        b'{"prompt": ["not", "a", "string"]}',
        b'{"prompt": "x", "stop_sequences": "not-a-list"}',
        b"{not json",
    ],
)
async def test_malformed_bodies_are_422(client: httpx.AsyncClient, content: bytes) -> None:
    response = await client.post(
        GENERATE, content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


@pytest.mark.parametrize("path", [GENERATE, STREAM, STRUCTURED])
async def test_max_tokens_beyond_the_context_is_lowered_to_what_fits(path: str) -> None:
    engine = FakeTextEngine(max_model_len=100, reply=" ".join(["word"] * 120))
    app = create_app(services=make_services(engine))
    body: dict[str, object] = {"prompt": "one two three", "max_tokens": 16_384}
    if path == STRUCTURED:
        body["guided_decoding"] = {"type": "regex", "pattern": "[a-z ]+"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(path, json=body)
    assert response.status_code == 200
    assert engine.calls[-1][1].fit_to_context
    if path == GENERATE:
        assert response.json()["finish_reason"] == "length"
        assert response.json()["tokens_used"] == 97  # 100 - 3 prompt tokens


@pytest.mark.parametrize("path", [GENERATE, STREAM, STRUCTURED])
async def test_a_prompt_that_cannot_fit_by_itself_is_400_with_both_numbers(path: str) -> None:
    engine = FakeTextEngine(max_model_len=100)
    app = create_app(services=make_services(engine))
    body: dict[str, object] = {"prompt": "word " * 100, "max_tokens": 5}
    if path == STRUCTURED:
        body["guided_decoding"] = {"type": "choice", "choices": ["a"]}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(path, json=body)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "The prompt has 100 tokens" in detail
    assert "context is 100 tokens" in detail


async def test_generation_failure_is_500(client: httpx.AsyncClient) -> None:
    engine = FakeTextEngine(fail_after=0)
    app = create_app(services=make_services(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(GENERATE, json={"prompt": "x"})
    assert response.status_code == 500
    assert response.json() == {"detail": "The fake engine failed."}


async def test_a_model_that_fails_to_load_is_503_and_a_later_request_retries() -> None:
    attempts = 0
    engine = FakeTextEngine()

    async def flaky_loader() -> FakeTextEngine:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ModelLoadError("disk on fire", model="fake-model")
        return engine

    app = create_app(services=make_services(engine, loader=flaky_loader))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        failed = await c.post(GENERATE, json={"prompt": "x"})
        failed_stream = await c.post(STREAM, json={"prompt": "x"})
        retried = await c.post(GENERATE, json={"prompt": "x"})
    assert failed.status_code == 503
    assert failed.headers["retry-after"] == "30"
    assert "disk on fire" in failed.json()["detail"]
    assert failed_stream.status_code == 200  # the second attempt loaded the model
    assert retried.status_code == 200
    assert attempts == 2


async def test_engine_death_is_503_and_the_next_request_reloads() -> None:
    dead = FakeTextEngine(fail_after=0, dead=True)
    healthy = FakeTextEngine()
    engines = [dead, healthy]

    async def loader() -> FakeTextEngine:
        return engines.pop(0)

    app = create_app(services=make_services(dead, loader=loader))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        first = await c.post(GENERATE, json={"prompt": "x"})
        second = await c.post(GENERATE, json={"prompt": "x"})
    assert first.status_code == 503
    assert dead.shut_down
    assert second.status_code == 200


async def test_concurrent_first_requests_load_the_model_once() -> None:
    loads = 0
    release = asyncio.Event()
    engine = FakeTextEngine()

    async def slow_loader() -> FakeTextEngine:
        nonlocal loads
        loads += 1
        await release.wait()
        return engine

    app = create_app(services=make_services(engine, loader=slow_loader))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        requests = [asyncio.create_task(c.post(GENERATE, json={"prompt": "x"})) for _ in range(8)]
        await wait_until(lambda: loads == 1)
        health = await c.get("/health")
        assert health.json()["models"]["text"]["initialized"] is False
        release.set()
        responses = await asyncio.gather(*requests)
        assert all(response.status_code == 200 for response in responses)
        health = await c.get("/health")
    assert health.json()["models"]["text"]["initialized"] is True
    assert loads == 1


# What the Fictures web app sends (api-contract.md, revision 2)

ZOD_CHARACTER = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "nullable": True},
    },
    "required": ["name", "age"],
}


async def test_a_min_tokens_over_max_tokens_is_400_in_plain_words(
    client: httpx.AsyncClient,
) -> None:
    body = {"prompt": "x", "max_tokens": 10, "min_tokens": 11}
    response = await client.post(GENERATE, json=body)
    assert response.status_code == 400
    assert response.json() == {"detail": "min_tokens (11) must not exceed max_tokens (10)"}


async def test_an_empty_stop_sequences_list_means_none(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await client.post(GENERATE, json={"prompt": "x", "stop_sequences": []})
    assert response.status_code == 200
    assert engine.calls[-1][1].stop == ()


@pytest.mark.parametrize("path", [GENERATE, STREAM])
async def test_response_format_json_constrains_the_output_to_the_converted_schema(
    client: httpx.AsyncClient, engine: FakeTextEngine, path: str
) -> None:
    response = await client.post(
        path,
        json={"prompt": "A character", "response_format": "json", "response_schema": ZOD_CHARACTER},
    )
    assert response.status_code == 200
    spec = engine.calls[-1][1].structured
    assert spec is not None
    assert spec.kind is StructuredOutputKind.JSON
    assert spec.json_schema is not None
    assert spec.json_schema["properties"]["age"] == {"type": ["integer", "null"]}
    if path == GENERATE:
        assert json.loads(response.json()["text"]) == {"name": "Ava", "age": 20}


async def test_response_format_json_without_a_schema_asks_for_any_object(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    response = await client.post(GENERATE, json={"prompt": "x", "response_format": "json"})
    assert response.status_code == 200
    spec = engine.calls[-1][1].structured
    assert spec is not None
    assert spec.json_schema == {"type": "object"}


async def test_plain_text_requests_are_unconstrained(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    for body in ({"prompt": "x"}, {"prompt": "x", "response_format": "text"}):
        assert (await client.post(GENERATE, json=body)).status_code == 200
        assert engine.calls[-1][1].structured is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"response_format": "text", "response_schema": ZOD_CHARACTER}, "response_schema"),
        ({"response_format": "json", "response_schema": {"type": "thing"}}, "response_schema"),
        ({"response_format": "json", "response_schema": {"type": "object", "required": "a"}},
         "response_schema is not a valid JSON schema"),
    ],
)  # fmt: skip
async def test_a_bad_response_schema_is_400_naming_it(
    client: httpx.AsyncClient, body: dict[str, object], needle: str
) -> None:
    response = await client.post(GENERATE, json={"prompt": "x", **body})
    assert response.status_code == 400
    assert needle in response.json()["detail"]


async def test_a_zod_schema_is_enforced_on_structured_too(
    client: httpx.AsyncClient, engine: FakeTextEngine
) -> None:
    engine.json_reply = '{"name": "Ava", "age": null}'
    response = await client.post(
        STRUCTURED,
        json={
            "prompt": "A character",
            "max_tokens": 16_384,
            "guided_decoding": {"type": "json", "schema": ZOD_CHARACTER},
        },
    )
    assert response.status_code == 200
    assert response.json()["is_valid"] is True
    assert response.json()["parsed_output"] == {"name": "Ava", "age": None}
    spec = engine.calls[-1][1].structured
    assert spec is not None
    assert spec.json_schema is not None
    assert spec.json_schema["properties"]["age"]["type"] == ["integer", "null"]


@pytest.mark.parametrize("path", [GENERATE, STREAM, STRUCTURED])
async def test_min_tokens_and_model_reach_the_service(
    client: httpx.AsyncClient, engine: FakeTextEngine, path: str
) -> None:
    body: dict[str, object] = {"prompt": "x", "min_tokens": 3, "model": "fake-model"}
    if path == STRUCTURED:
        body["guided_decoding"] = {"type": "choice", "choices": ["a"]}
    response = await client.post(path, json=body)
    assert response.status_code == 200
    assert engine.calls[-1][1].min_tokens == 3


@pytest.mark.parametrize("path", [GENERATE, STREAM, STRUCTURED])
async def test_an_unknown_model_is_404(
    client: httpx.AsyncClient, engine: FakeTextEngine, path: str
) -> None:
    body: dict[str, object] = {"prompt": "x", "model": "qwen3-14b"}
    if path == STRUCTURED:
        body["guided_decoding"] = {"type": "choice", "choices": ["a"]}
    response = await client.post(path, json=body)
    assert response.status_code == 404
    assert response.json() == {
        "detail": "There is no text model 'qwen3-14b' on this server. Text models here: fake-model."
    }
    assert engine.calls == []


async def test_a_structured_reply_cut_by_the_context_is_invalid_with_length() -> None:
    engine = FakeTextEngine(max_model_len=4)  # 2 prompt tokens leave room for 2 of 4
    app = create_app(services=make_services(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(
            STRUCTURED,
            json={
                "prompt": "one two",
                "max_tokens": 16_384,
                "guided_decoding": {"type": "json", "schema": ZOD_CHARACTER},
            },
        )
    assert response.status_code == 200
    body = response.json()
    assert (body["finish_reason"], body["is_valid"], body["parsed_output"]) == (
        "length",
        False,
        None,
    )
