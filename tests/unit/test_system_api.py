"""System endpoints, model listings, docs and CORS of the Fictures surface."""

from __future__ import annotations

import httpx

from fictures_ai import __version__
from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from tests.unit.conftest import UNUSED_DEFAULT_MODEL, make_services


async def test_root_describes_the_server(client: httpx.AsyncClient) -> None:
    body = (await client.get("/")).json()
    assert body["message"] == "Fictures AI Server"
    assert body["version"] == __version__
    assert body["description"]
    assert body["endpoints"] == {
        "docs": "/docs",
        "redoc": "/redoc",
        "health": "/health",
        "models": "/api/v1/models",
    }


async def test_health_reports_the_text_model_before_and_after_loading(
    client: httpx.AsyncClient,
) -> None:
    before = (await client.get("/health")).json()
    assert before["status"] == "healthy"
    assert before["version"] == __version__
    assert before["models"]["text"] == {
        "name": "fake-model",
        "type": "text-generation",
        "framework": "vLLM",
        "max_tokens": 8192,
        "initialized": False,
        **UNUSED_DEFAULT_MODEL,
    }
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    after = (await client.get("/health")).json()["models"]["text"]
    assert after["initialized"] is True
    assert after["state"] == "loaded"
    assert after["last_used_at"] is not None


async def test_models_lists_text_generation(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/v1/models")).json()
    assert body["text_generation"][0]["name"] == "fake-model"
    assert body["text_generation"][0]["type"] == "text-generation"
    assert "image_generation" in body


async def test_text_models_report_their_status(client: httpx.AsyncClient) -> None:
    body = (await client.get("/api/v1/text/models")).json()
    assert body == {
        "models": [
            {
                "id": "fake-model",
                "name": "fake-model",
                "type": "text-generation",
                "framework": "vLLM",
                "max_tokens": 8192,
                "status": "not_loaded",
                **UNUSED_DEFAULT_MODEL,
            }
        ]
    }
    await client.post("/api/v1/text/generate", json={"prompt": "x", "max_tokens": 1})
    body = (await client.get("/api/v1/text/models")).json()
    assert body["models"][0]["status"] == "initialized"


async def test_docs_and_openapi_are_served(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs")).status_code == 200
    assert (await client.get("/redoc")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    for path in ["/api/v1/text/generate", "/api/v1/text/stream", "/api/v1/text/structured"]:
        assert path in spec["paths"]
    prompt = spec["components"]["schemas"]["TextGenerationRequest"]["properties"]["prompt"]
    assert prompt["maxLength"] == 50_000


async def test_cors_allows_the_configured_origins_only() -> None:
    settings = Settings(_env_file=None, cors_origins="https://fictures.example")  # type: ignore[call-arg]
    app = create_app(services=make_services(settings=settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        allowed = await c.options(
            "/api/v1/text/generate",
            headers={
                "Origin": "https://fictures.example",
                "Access-Control-Request-Method": "POST",
            },
        )
        denied = await c.options(
            "/api/v1/text/generate",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
    assert allowed.headers["access-control-allow-origin"] == "https://fictures.example"
    assert allowed.headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in denied.headers


async def test_wildcard_cors_never_allows_credentials() -> None:
    settings = Settings(_env_file=None, cors_origins="*")  # type: ignore[call-arg]
    app = create_app(services=make_services(settings=settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/", headers={"Origin": "https://anywhere.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
