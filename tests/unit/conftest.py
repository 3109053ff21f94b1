"""Apps over fake engines, served in-process through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from fictures_ai.api.app import create_app
from fictures_ai.api.dependencies import Services
from fictures_ai.config import Settings
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.keys.base import KeyStore
from fictures_ai.services.keys.stores import KeyStores
from fictures_ai.services.models.registry import ModelRegistry, RegisteredModel
from fictures_ai.services.rate_limit import RateLimiter
from fictures_ai.services.text_generation import TextGenerationService
from tests.support import free_port
from tests.unit.fake_engines import FakeImageEngine, FakeTextEngine

JOBS_ROOT = Path(tempfile.gettempdir()) / f"fictures-ai-unit-{os.getpid()}"
"""Where the apps of this test session keep their jobs' databases and files."""

UNUSED_DEFAULT_MODEL = {
    "state": "not_loaded",
    "reason": None,
    "memory_bytes": None,
    "last_used_at": None,
    "in_flight": 0,
    "parent": None,
    "aliases": [],
    "default": True,
}
"""The state fields a listing gives the default model before any request used it."""


def make_services(
    engine: FakeTextEngine | None = None,
    *,
    settings: Settings | None = None,
    loader: Callable[[], Any] | None = None,
    image_engine: FakeImageEngine | None = None,
    image_loader: Callable[[], Any] | None = None,
    api_keys: KeyStore | list[KeyStore] | None = None,
    rate_limiter: RateLimiter | None = None,
) -> Services:
    """Services over fake engines (or whatever the loaders return).

    Queue bounds and timeouts come from ``settings``; without ``api_keys`` (one store or
    several) no key is needed. ``GENERATION_MODE`` in ``settings`` leaves a half out.
    """
    settings = settings or Settings(_env_file=None)  # type: ignore[call-arg]
    if settings.database_url is None:  # jobs: a database of this app's own, never the user's
        folder = JOBS_ROOT / uuid.uuid4().hex
        folder.mkdir(parents=True)
        settings = settings.model_copy(
            update={"database_url": f"sqlite:///{folder}/server.db", "jobs_dir": folder}
        )
    engine = engine or FakeTextEngine()
    image_engine = image_engine or FakeImageEngine()

    async def load() -> FakeTextEngine:
        return engine

    async def load_image() -> FakeImageEngine:
        return image_engine

    text = TextGenerationService(
        model_name="fake-model",
        max_model_len=engine.max_model_len,
        loader=loader or load,
        max_pending=settings.text_max_pending,
        timeout_s=settings.request_timeout_s,
        response_cache_bytes=settings.response_cache_max_bytes,
    )
    image = ImageGenerationService(
        model_name="fake-image-model",
        device="cpu",
        max_concurrency=settings.image_max_concurrency,
        loader=image_loader or load_image,
        max_queue=settings.image_max_queue,
        timeout_s=settings.request_timeout_s,
        response_cache_bytes=settings.response_cache_max_bytes,
        max_batch=settings.image_max_batch,
        batch_wait_s=settings.image_batch_wait_ms / 1000,
    )
    models = []
    if settings.serves_text:
        models.append(
            RegisteredModel(
                name="fake-model",
                kind="text",
                source="fake",
                service=text,
                default=True,
                capacity=settings.text_max_num_seqs,
                max_model_len=engine.max_model_len,
            )
        )
    if settings.serves_images:
        models.append(
            RegisteredModel(
                name="fake-image-model",
                kind="image",
                source="fake",
                service=image,
                default=True,
                capacity=settings.image_max_concurrency,
                device="cpu",
            )
        )
    stores = None
    if api_keys is not None:
        stores = KeyStores(api_keys if isinstance(api_keys, list) else [api_keys])
    services = Services(settings=settings, models=ModelRegistry(models), api_keys=stores)
    if rate_limiter is not None:
        services = dataclasses.replace(services, rate_limiter=rate_limiter)
    return services


def text_of(services: Services) -> TextGenerationService:
    """The default text model's service of ``services``."""
    model = services.models.default("text")
    assert model is not None
    assert isinstance(model.service, TextGenerationService)
    return model.service


def image_of(services: Services) -> ImageGenerationService:
    """The default image model's service of ``services``."""
    model = services.models.default("image")
    assert model is not None
    assert isinstance(model.service, ImageGenerationService)
    return model.service


@pytest.fixture
def engine() -> FakeTextEngine:
    return FakeTextEngine()


@pytest.fixture
def image_engine() -> FakeImageEngine:
    return FakeImageEngine()


@pytest.fixture
async def client(
    engine: FakeTextEngine, image_engine: FakeImageEngine
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services=make_services(engine, image_engine=image_engine))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@contextlib.asynccontextmanager
async def live_server(app: FastAPI) -> AsyncIterator[int]:
    """``app`` served by a real Uvicorn on a free loopback port (real sockets, keep-alive,
    disconnects); yields the port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="on")
    )
    task = asyncio.create_task(server.serve())
    try:
        await wait_until(lambda: server.started, timeout=10)
        yield port
    finally:
        server.should_exit = True
        await task


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll ``predicate`` until it is true or ``timeout`` passes (then fail)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.01)
