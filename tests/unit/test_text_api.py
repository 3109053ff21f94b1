"""The Fictures text endpoints over a fake engine: contract, defaults, SSE and status codes."""

from __future__ import annotations

import asyncio

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
async def test_prompt_over_8000_characters_is_400_with_the_contract_message(
    client: httpx.AsyncClient, path: str
) -> None:
    body: dict[str, object] = {"prompt": "a" * 8001}
    if path == STRUCTURED:
        body["guided_decoding"] = {"type": "choice", "choices": ["a"]}
    response = await client.post(path, json=body)
    assert response.status_code == 400
    assert response.json() == {"detail": "Prompt too long (max 8000 characters)"}


async def test_prompt_of_exactly_8000_characters_is_accepted(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json={"prompt": "a" * 8000, "max_tokens": 5})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": 8193},
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


async def test_prompt_plus_max_tokens_beyond_the_context_is_400_with_numbers() -> None:
    engine = FakeTextEngine(max_model_len=100)
    app = create_app(services=make_services(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(GENERATE, json={"prompt": "one two three", "max_tokens": 98})
        stream = await c.post(STREAM, json={"prompt": "one two three", "max_tokens": 98})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "100 tokens" in detail
    assert "3 tokens" in detail
    assert "98" in detail
    assert stream.status_code == 400


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
