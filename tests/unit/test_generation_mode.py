"""GENERATION_MODE=text|image: one half of /api/v1 and /v1, the other half's model never loaded."""

from __future__ import annotations

import httpx
import pytest

from fictures_ai.api.app import build_services, create_app
from fictures_ai.config import Settings
from tests.unit.conftest import make_services

TEXT_ROUTES = [
    ("POST", "/api/v1/text/generate", {"prompt": "x", "max_tokens": 2}),
    ("POST", "/api/v1/text/stream", {"prompt": "x", "max_tokens": 2}),
    ("POST", "/api/v1/text/structured",
     {"prompt": "x", "guided_decoding": {"type": "choice", "choices": ["a"]}}),
    ("GET", "/api/v1/text/models", None),
    ("POST", "/v1/chat/completions",
     {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}),
    ("POST", "/v1/completions", {"model": "fake-model", "prompt": "x", "max_tokens": 2}),
]  # fmt: skip
IMAGE_ROUTES = [
    ("POST", "/api/v1/images/generate", {"prompt": "x", "width": 256, "height": 256}),
    ("POST", "/api/v1/images/stream", {"prompt": "x", "width": 256, "height": 256}),
    ("GET", "/api/v1/images/models", None),
    ("POST", "/v1/images/generations", {"prompt": "x", "size": "256x256"}),
]


def app_in(mode: str, loaded: list[str]) -> httpx.AsyncClient:
    async def never(kind: str) -> None:
        loaded.append(kind)
        raise AssertionError(f"the {kind} model must not load")

    settings = Settings(_env_file=None, generation_mode=mode)  # type: ignore[call-arg]
    services = make_services(
        settings=settings,
        loader=(lambda: never("text")) if mode == "image" else None,
        image_loader=(lambda: never("image")) if mode == "text" else None,
    )
    transport = httpx.ASGITransport(app=create_app(services=services))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


@pytest.mark.parametrize(
    ("mode", "served", "unserved", "word"),
    [("text", TEXT_ROUTES, IMAGE_ROUTES, "images"), ("image", IMAGE_ROUTES, TEXT_ROUTES, "text")],
)
async def test_one_half_is_served_and_the_other_is_404_in_each_surfaces_shape(
    mode: str,
    served: list[tuple[str, str, dict[str, object] | None]],
    unserved: list[tuple[str, str, dict[str, object] | None]],
    word: str,
) -> None:
    loaded: list[str] = []
    async with app_in(mode, loaded) as client:
        for method, path, body in served:
            response = await client.request(method, path, json=body)
            assert response.status_code == 200, (path, response.text)
        for method, path, body in unserved:
            response = await client.request(method, path, json=body)
            assert response.status_code == 404, path
            expected = (
                f"Not Found: this server runs with GENERATION_MODE={mode} and does not "
                f"generate {word}; send this request to the server that does."
            )
            if path.startswith("/v1/"):
                assert response.json()["error"]["message"] == expected
                assert response.json()["error"]["type"] == "invalid_request_error"
            else:
                assert response.json() == {"detail": expected}
    assert loaded == []


async def test_an_unknown_path_is_still_a_plain_404() -> None:
    async with app_in("text", []) as client:
        response = await client.get("/api/v1/nothing-here")
    assert response.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(("mode", "kind", "other"), [("text", "text", "image"),
                                                     ("image", "image", "text")])  # fmt: skip
async def test_health_and_listings_report_the_mode_and_leave_the_other_half_out(
    mode: str, kind: str, other: str
) -> None:
    async with app_in(mode, []) as client:
        health = (await client.get("/health")).json()
        models = (await client.get("/api/v1/models")).json()
        openai_models = (await client.get("/v1/models")).json()
        ready = await client.get("/health/ready")
        metrics = (await client.get("/metrics")).text
    assert health["generation_mode"] == mode
    assert set(health["models"]) == {kind}
    assert models["generation_mode"] == mode
    assert len(models[f"{kind}_generation"]) == 1
    assert models[f"{other}_generation"] == []
    assert [model["id"] for model in openai_models["data"]] == [
        "fake-model" if kind == "text" else "fake-image-model"
    ]
    assert ready.status_code == 200
    # Readiness lists the models by name.
    assert set(ready.json()["models"]) == {"fake-model" if kind == "text" else "fake-image-model"}
    assert f'fictures_engine_up{{engine="{kind}"' in metrics
    assert f'engine="{other}"' not in metrics


async def test_all_serves_both_halves_and_says_so(client: httpx.AsyncClient) -> None:
    health = (await client.get("/health")).json()
    models = (await client.get("/api/v1/models")).json()
    assert health["generation_mode"] == "all"
    assert set(health["models"]) == {"text", "image"}
    assert models["generation_mode"] == "all"
    assert len(models["text_generation"]) == len(models["image_generation"]) == 1


@pytest.mark.parametrize(("mode", "text", "image"), [("text", True, False), ("image", False, True)])
def test_the_production_services_hold_only_the_served_half(
    mode: str, text: bool, image: bool
) -> None:
    settings = Settings(_env_file=None, generation_mode=mode, require_api_key=False)  # type: ignore[call-arg]
    services = build_services(settings)
    kinds = services.models.kinds()
    assert ("text" in kinds, "image" in kinds) == (text, image)
