"""Keys, scopes, model access, rate limits, body limits, queue bounds and timeouts in the app.

The key store is the real one on an SQLite file; the engines are the fakes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from fictures_ai.engines.base import TextGenerationParams, TextPrompt
from fictures_ai.services.keys.local_store import ApiKeyService
from fictures_ai.services.rate_limit import InMemoryRateLimiter
from tests.support import WEATHER_TOOL
from tests.unit.conftest import image_of, make_services, text_of, wait_until
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine, json_events

GENERATE = "/api/v1/text/generate"


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[call-arg, arg-type]


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[ApiKeyService]:
    service = ApiKeyService(database_url=f"sqlite:///{tmp_path / 'keys.db'}")
    yield service
    service.close()


def client_for(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")  # type: ignore[arg-type]


@pytest.fixture
async def limited(keys: ApiKeyService) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    limiter = InMemoryRateLimiter(requests_per_minute=10, tokens_per_minute=0, images_per_minute=0)
    app = create_app(services=make_services(api_keys=keys, rate_limiter=limiter))
    _, key = keys.create("writer", "stories:write")
    async with client_for(app) as client:
        yield client, key


async def test_the_11th_request_in_a_minute_is_429_with_retry_after(
    limited: tuple[httpx.AsyncClient, str],
) -> None:
    client, key = limited
    headers = {"Authorization": f"Bearer {key}"}
    for number in range(1, 11):
        response = await client.post(GENERATE, json={"prompt": "x"}, headers=headers)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-requests"] == str(10 - number)
    refused = await client.post(GENERATE, json={"prompt": "x"}, headers=headers)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert "Rate limit" in refused.json()["detail"]


async def test_a_request_is_charged_once_its_body_is_valid_and_its_model_known(
    limited: tuple[httpx.AsyncClient, str],
) -> None:
    # The body is parsed once, by the route: what it refuses before generating (a bad value,
    # an unknown model, tools without a parser) never reaches the budget.
    client, key = limited
    headers = {"Authorization": f"Bearer {key}"}
    for _ in range(12):
        invalid = await client.post(GENERATE, json={"prompt": "x", "top_p": 7}, headers=headers)
        assert invalid.status_code == 400
        unknown = await client.post(
            "/v1/chat/completions",
            json={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]},
            headers=headers,
        )
        assert unknown.status_code == 404
        no_parser = await client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [WEATHER_TOOL],
                "tool_choice": "auto",
            },
            headers=headers,
        )
        assert no_parser.status_code == 400
    admitted = await client.post(GENERATE, json={"prompt": "x"}, headers=headers)
    assert admitted.status_code == 200
    assert admitted.headers["x-ratelimit-remaining-requests"] == "9"


async def test_openai_images_charge_n_images_from_the_parsed_body(keys: ApiKeyService) -> None:
    limiter = InMemoryRateLimiter(requests_per_minute=0, tokens_per_minute=0, images_per_minute=5)
    app = create_app(services=make_services(api_keys=keys, rate_limiter=limiter))
    _, key = keys.create("illustrator", "stories:write")
    headers = {"Authorization": f"Bearer {key}"}
    body = {"prompt": "a lighthouse", "size": "256x256", "n": 3, "response_format": "b64_json"}
    async with client_for(app) as client:
        first = await client.post("/v1/images/generations", json=body, headers=headers)
        assert first.status_code == 200
        assert len(first.json()["data"]) == 3
        assert first.headers["x-ratelimit-remaining-images"] == "2"
        refused = await client.post("/v1/images/generations", json=body, headers=headers)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_error"


async def test_keys_scopes_and_both_header_forms(keys: ApiKeyService) -> None:
    app = create_app(services=make_services(api_keys=keys))
    _, writer = keys.create("writer", "stories:write")
    _, reader = keys.create("reader", "stories:read")
    _, admin = keys.create("admin", "admin:all")
    async with client_for(app) as client:
        missing = await client.post(GENERATE, json={"prompt": "x"})
        assert missing.status_code == 401
        assert "x-api-key" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        denied = await client.post(GENERATE, json={"prompt": "x"}, headers={"x-api-key": reader})
        assert denied.status_code == 403
        assert denied.json()["detail"] == "Insufficient permissions. Required scope: stories:write"
        listing = await client.get("/api/v1/models", headers={"x-api-key": reader})
        assert listing.status_code == 200
        for key in (writer, admin):
            for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key}):
                ok = await client.post(GENERATE, json={"prompt": "x"}, headers=headers)
                assert ok.status_code == 200
        openai_missing = await client.get("/v1/models")
        assert openai_missing.status_code == 401
        assert openai_missing.json()["error"]["type"] == "authentication_error"


async def test_revoked_keys_stop_working(keys: ApiKeyService) -> None:
    app = create_app(services=make_services(api_keys=keys))
    info, key = keys.create("temp", "stories:write")
    async with client_for(app) as client:
        headers = {"x-api-key": key}
        assert (await client.post(GENERATE, json={"prompt": "x"}, headers=headers)).is_success
        keys.revoke(str(info.id))
        revoked = await client.post(GENERATE, json={"prompt": "x"}, headers=headers)
    assert revoked.status_code == 401


async def test_a_key_limited_to_other_models_gets_403_naming_the_model(
    keys: ApiKeyService,
) -> None:
    app = create_app(services=make_services(api_keys=keys))
    _, key = keys.create("images-only", "stories:write", models="fake-image-model")
    async with client_for(app) as client:
        headers = {"x-api-key": key}
        text = await client.post(GENERATE, json={"prompt": "x"}, headers=headers)
        chat = await client.post(
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
            headers=headers,
        )
        image = await client.post(
            "/api/v1/images/generate",
            json={"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 1},
            headers=headers,
        )
    assert text.status_code == 403
    assert "'fake-model'" in text.json()["detail"]
    assert chat.status_code == 403
    assert "'fake-model'" in chat.json()["error"]["message"]
    assert image.status_code == 200


async def test_a_chunked_body_over_the_limit_is_413() -> None:
    app = create_app(services=make_services(settings=settings(max_request_bytes=2048)))

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    async with client_for(app) as client:
        chunked = await client.post(
            GENERATE, content=chunks(), headers={"content-type": "application/json"}
        )
        sized = await client.post("/v1/completions", content=b"x" * 4096)
        small = await client.post(GENERATE, json={"prompt": "x"})
    assert chunked.status_code == 413
    assert "2048 bytes" in chunked.json()["detail"]
    assert sized.status_code == 413
    assert sized.json()["error"]["code"] is None
    assert small.status_code == 200


async def test_text_beyond_the_pending_bound_is_429() -> None:
    engine = FakeTextEngine(token_delay=0.05)
    app = create_app(services=make_services(engine, settings=settings(text_max_pending=1)))
    async with client_for(app) as client:
        first = asyncio.create_task(client.post(GENERATE, json={"prompt": "x"}))
        await wait_until(lambda: engine.produced_tokens > 0)
        second = await client.post(GENERATE, json={"prompt": "x"})
        assert (await first).status_code == 200
    assert second.status_code == 429
    assert second.headers["retry-after"] == "2"
    assert "capacity" in second.json()["detail"]


async def test_images_beyond_the_queue_bound_are_429() -> None:
    image_engine = FakeImageEngine(step_delay=0.02)
    services = make_services(image_engine=image_engine, settings=settings(image_max_queue=1))
    app = create_app(services=services)
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 10}
    async with client_for(app) as client:
        running = asyncio.create_task(client.post("/api/v1/images/generate", json=body))
        await wait_until(lambda: image_of(services).info().running == 1)
        queued = asyncio.create_task(client.post("/api/v1/images/generate", json=body))
        await wait_until(lambda: image_of(services).info().waiting == 1)
        refused = await client.post("/api/v1/images/generate", json=body)
        assert (await running).status_code == 200
        assert (await queued).status_code == 200
    assert refused.status_code == 429
    assert "queue is full" in refused.json()["detail"]


async def test_generations_past_the_timeout_are_stopped() -> None:
    engine = FakeTextEngine(token_delay=0.1)
    image_engine = FakeImageEngine(step_delay=0.1)
    app = create_app(
        services=make_services(
            engine, image_engine=image_engine, settings=settings(request_timeout_s=0.3)
        )
    )
    async with client_for(app) as client:
        text = await client.post(GENERATE, json={"prompt": "x"})
        stream = await client.post("/api/v1/text/stream", json={"prompt": "x"})
        image = await client.post(
            "/api/v1/images/generate",
            json={"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 50},
        )
    assert text.status_code == 504
    assert "REQUEST_TIMEOUT_S" in text.json()["detail"]
    final = json_events(stream.text)[-2]
    assert isinstance(final, dict)
    assert "REQUEST_TIMEOUT_S" in str(final["error"])
    assert image.status_code == 504
    assert len(image_engine.cancelled) == 1
    assert engine.aborted  # the engine was told to stop


async def test_a_dead_engine_is_restarted_by_the_supervisor() -> None:
    first = FakeTextEngine()
    second = FakeTextEngine()
    engines = [first, second]

    async def loader() -> FakeTextEngine:
        return engines.pop(0)

    services = make_services(first, loader=loader)
    await text_of(services).initialize()
    supervisor = asyncio.create_task(text_of(services).supervise(0.01))
    first.dead = True
    await wait_until(lambda: text_of(services).info().initialized and not engines)
    supervisor.cancel()
    assert first.shut_down
    result = await text_of(services).generate(
        TextPrompt(text="x"), TextGenerationParams(max_tokens=2)
    )
    assert result.completion_tokens == 2
