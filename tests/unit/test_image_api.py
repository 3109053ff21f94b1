"""The Fictures image endpoints over a fake engine: contract, validation, seeds, queueing."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import pytest
from PIL import Image

from fictures_ai.api.app import create_app
from fictures_ai.config import Settings
from tests.unit.conftest import UNUSED_DEFAULT_MODEL, image_of, make_services, wait_until
from tests.unit.fake_engines import FakeImageEngine, json_events

GENERATE = "/api/v1/images/generate"


def decode(data_url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :])))


async def test_generate_returns_a_png_data_url_and_the_contract_fields(
    client: httpx.AsyncClient, image_engine: FakeImageEngine
) -> None:
    response = await client.post(GENERATE, json={"prompt": "a castle", "seed": 42})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"image_url", "model", "width", "height", "seed"}
    assert (body["width"], body["height"], body["seed"]) == (1344, 768, 42)
    assert body["model"] == "fake-image-model"
    image = decode(body["image_url"])
    assert image.format == "PNG"
    assert image.size == (1344, 768)
    params = image_engine.calls[-1]
    assert (params.num_inference_steps, params.guidance_scale) == (30, 7.5)
    assert params.negative_prompt is None


async def test_a_request_without_seed_gets_a_random_positive_one(
    client: httpx.AsyncClient,
) -> None:
    seeds = {
        (await client.post(GENERATE, json={"prompt": "x", "width": 256, "height": 256})).json()[
            "seed"
        ]
        for _ in range(5)
    }
    assert all(seed > 0 for seed in seeds)
    assert len(seeds) > 1


async def test_same_seed_and_request_give_the_same_image(client: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "width": 256, "height": 256, "seed": 7}
    first = (await client.post(GENERATE, json=body)).json()["image_url"]
    second = (await client.post(GENERATE, json=body)).json()["image_url"]
    other = (await client.post(GENERATE, json={**body, "seed": 8})).json()["image_url"]
    assert first == second
    assert first != other


async def test_sizes_and_fields_reach_the_engine(
    client: httpx.AsyncClient, image_engine: FakeImageEngine
) -> None:
    body = {
        "prompt": "x",
        "negative_prompt": "blurry",
        "width": 512,
        "height": 1024,
        "num_inference_steps": 4,
        "guidance_scale": 3.0,
        "seed": 1,
    }
    response = await client.post(GENERATE, json=body)
    assert (response.json()["width"], response.json()["height"]) == (512, 1024)
    params = image_engine.calls[-1]
    assert params.negative_prompt == "blurry"
    assert (params.width, params.height, params.num_inference_steps) == (512, 1024, 4)
    assert params.guidance_scale == 3.0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"width": 2056}, "width"),
        ({"height": 4096}, "height"),
        ({"width": 128}, "width"),
        ({"height": 248}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 101}, "num_inference_steps"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 21}, "guidance_scale"),
        ({"seed": -1}, "seed"),
    ],
)
async def test_out_of_range_values_are_400(
    client: httpx.AsyncClient, body: dict[str, object], needle: str
) -> None:
    response = await client.post(GENERATE, json={"prompt": "x", **body})
    assert response.status_code == 400
    assert needle in response.json()["detail"]


@pytest.mark.parametrize(("width", "height"), [(1344, 756), (768, 1365), (257, 2047), (1001, 999)])
async def test_any_size_in_range_is_served_exactly(
    client: httpx.AsyncClient, image_engine: FakeImageEngine, width: int, height: int
) -> None:
    response = await client.post(GENERATE, json={"prompt": "x", "width": width, "height": height})
    assert response.status_code == 200
    body = response.json()
    assert (body["width"], body["height"]) == (width, height)
    assert decode(body["image_url"]).size == (width, height)
    assert (image_engine.calls[-1].width, image_engine.calls[-1].height) == (width, height)


async def test_unknown_model_is_404_and_the_served_one_is_accepted(
    client: httpx.AsyncClient,
) -> None:
    body = {"prompt": "x", "width": 256, "height": 256}
    unknown = await client.post(GENERATE, json={**body, "model": "sdxl-turbo"})
    served = await client.post(GENERATE, json={**body, "model": "fake-image-model"})
    assert unknown.status_code == 404
    assert "There is no image model 'sdxl-turbo'" in unknown.json()["detail"]
    assert "fake-image-model" in unknown.json()["detail"]
    assert served.status_code == 200


async def test_empty_prompt_is_rejected(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json={"prompt": ""})
    assert response.status_code in (400, 422)


async def test_wrong_types_are_422(client: httpx.AsyncClient) -> None:
    response = await client.post(GENERATE, json={"prompt": "x", "width": "wide"})
    assert response.status_code == 422


async def test_pipeline_failure_is_500_and_the_server_stays_up() -> None:
    app = create_app(services=make_services(image_engine=FakeImageEngine(fail=True)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        failed = await c.post(GENERATE, json={"prompt": "x", "width": 256, "height": 256})
        health = await c.get("/health")
    assert failed.status_code == 500
    assert failed.json() == {"detail": "The fake pipeline failed."}
    assert health.status_code == 200


async def test_image_models_and_health_report_the_image_model(
    client: httpx.AsyncClient,
) -> None:
    models = (await client.get("/api/v1/images/models")).json()["models"]
    assert models[0]["id"] == "fake-image-model"
    assert models[0]["type"] == "image-generation"
    assert models[0]["framework"] == "diffusers"
    assert models[0]["device"] == "cpu"
    assert models[0]["status"] == "not_loaded"
    health = (await client.get("/health")).json()["models"]["image"]
    assert health == {
        "name": "fake-image-model",
        "type": "image-generation",
        "framework": "diffusers",
        "device": "cpu",
        "initialized": False,
        "notice": None,
        **UNUSED_DEFAULT_MODEL,
    }
    await client.post(GENERATE, json={"prompt": "x", "width": 256, "height": 256})
    models = (await client.get("/api/v1/images/models")).json()["models"]
    assert models[0]["status"] == "initialized"
    assert models[0]["notice"] == "draws flat colours"
    listing = (await client.get("/api/v1/models")).json()
    assert listing["image_generation"][0]["initialized"] is True


async def test_renders_beyond_the_concurrency_wait_in_a_queue() -> None:
    engine = FakeImageEngine(step_delay=0.01)
    services = make_services(image_engine=engine)
    app = create_app(services=services)
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 10}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        requests = [asyncio.create_task(c.post(GENERATE, json=body)) for _ in range(3)]
        await wait_until(lambda: image_of(services).info().waiting == 2)
        assert image_of(services).info().running == 1
        responses = await asyncio.gather(*requests)
    assert all(response.status_code == 200 for response in responses)
    assert image_of(services).info().waiting == 0


async def test_settings_allow_more_renders_at_once() -> None:
    settings = Settings(_env_file=None, image_max_concurrency=2)  # type: ignore[call-arg]
    engine = FakeImageEngine(step_delay=0.01)
    services = make_services(settings=settings, image_engine=engine)
    app = create_app(services=services)
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 10}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        requests = [asyncio.create_task(c.post(GENERATE, json=body)) for _ in range(3)]
        await wait_until(lambda: image_of(services).info().running == 2)
        assert image_of(services).info().waiting == 1
        await asyncio.gather(*requests)


async def test_health_answers_while_an_image_renders() -> None:
    engine = FakeImageEngine(step_delay=0.05)
    app = create_app(services=make_services(image_engine=engine))
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 20}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        render = asyncio.create_task(c.post(GENERATE, json=body))
        await wait_until(lambda: len(engine.calls) == 1)
        started = asyncio.get_running_loop().time()
        health = await c.get("/health")
        assert asyncio.get_running_loop().time() - started < 0.5
        assert health.status_code == 200
        assert not render.done()
        assert (await render).status_code == 200


async def test_image_stream_reports_every_step_then_the_image(client: httpx.AsyncClient) -> None:
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 4, "seed": 3}
    response = await client.post("/api/v1/images/stream", json=body)
    assert response.status_code == 200
    events = json_events(response.text)
    assert events[-1] == "[DONE]"
    progress = [event for event in events[:-2] if isinstance(event, dict)]
    assert [(e["step"], e["total_steps"], e["done"]) for e in progress] == [
        (1, 4, False),
        (2, 4, False),
        (3, 4, False),
        (4, 4, False),
    ]
    final = events[-2]
    assert isinstance(final, dict)
    assert final["done"] is True
    assert final["seed"] == 3
    assert decode(str(final["image_url"])).size == (256, 256)


async def test_image_stream_failure_is_a_final_error_event() -> None:
    app = create_app(services=make_services(image_engine=FakeImageEngine(fail=True)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.post(
            "/api/v1/images/stream",
            json={"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 2},
        )
    events = json_events(response.text)
    assert events[-2] == {"error": "The fake pipeline failed.", "done": True}
    assert events[-1] == "[DONE]"


async def test_image_stream_sends_its_place_in_the_queue_before_rendering() -> None:
    engine = FakeImageEngine(step_delay=0.01)
    services = make_services(image_engine=engine)
    app = create_app(services=services)
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 5}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        rendering = asyncio.create_task(c.post(GENERATE, json=body))
        await wait_until(lambda: image_of(services).info().running == 1)
        waiting = asyncio.create_task(c.post(GENERATE, json=body))
        await wait_until(lambda: image_of(services).info().waiting == 1)
        streamed = {**body, "num_inference_steps": 2, "seed": 9}
        response = await c.post("/api/v1/images/stream", json=streamed)
        assert all(r.status_code == 200 for r in await asyncio.gather(rendering, waiting))
    events = json_events(response.text)
    # Second in line, then first (the render ahead of it started), then its own steps.
    assert events[:4] == [
        {"queued": True, "position": 2, "step": 0, "total_steps": 2, "done": False},
        {"queued": True, "position": 1, "step": 0, "total_steps": 2, "done": False},
        {"step": 1, "total_steps": 2, "done": False},
        {"step": 2, "total_steps": 2, "done": False},
    ]
    final = events[4]
    assert isinstance(final, dict)
    assert (final["done"], final["seed"]) == (True, 9)
    assert events[5:] == ["[DONE]"]


async def test_image_stream_without_a_wait_sends_no_queued_event(
    client: httpx.AsyncClient,
) -> None:
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 2}
    events = json_events((await client.post("/api/v1/images/stream", json=body)).text)
    assert not any(isinstance(event, dict) and "queued" in event for event in events)
    assert [event["step"] for event in events[:-2] if isinstance(event, dict)] == [1, 2]
