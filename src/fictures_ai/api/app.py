"""The application factory: ``create_app(settings)`` wires settings, services and routes."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from fictures_ai import __version__
from fictures_ai.api.dependencies import Services
from fictures_ai.api.errors import install_error_handlers
from fictures_ai.api.fictures.router import DESCRIPTION, router, system_router
from fictures_ai.api.openai.router import router as openai_router
from fictures_ai.config import Settings
from fictures_ai.engines.factory import (
    create_image_engine,
    create_text_engine,
    image_device,
    image_model_display_name,
    text_model_display_name,
)
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.text_generation import TextGenerationService

logger = logging.getLogger(__name__)


def build_services(settings: Settings) -> Services:
    """The production services: engines chosen by the factory from the settings.

    Raises ``ValueError`` for settings that cannot work on this machine.
    """

    text = TextGenerationService(
        model_name=text_model_display_name(settings),
        max_model_len=settings.text_max_model_len,
        loader=functools.partial(create_text_engine, settings),
    )
    device = image_device(settings)
    image = ImageGenerationService(
        model_name=image_model_display_name(settings, device),
        device=device,
        max_concurrency=settings.image_max_concurrency,
        loader=functools.partial(create_image_engine, settings),
    )
    return Services(settings=settings, text=text, image=image)


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """Build the FastAPI app. Tests pass ``services`` built over fake engines."""
    settings = settings or (services.settings if services else Settings())
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("Fictures AI Server %s starting", __version__)
        changed = settings.non_default_items()
        if changed:
            logger.info("Settings changed from their defaults: %s", changed)
        preload: asyncio.Task[None] | None = None
        if settings.preload_models:
            # In the background: /health must answer while the model loads.
            preload = asyncio.create_task(_preload(services), name="preload models")
        try:
            yield
        finally:
            if preload is not None and not preload.done():
                preload.cancel()
            await services.text.shutdown()
            await services.image.shutdown()
            logger.info("Fictures AI Server stopped")

    app = FastAPI(
        title="Fictures AI Server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = services
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins_list,
        # Browsers refuse credentials with a wildcard origin; never send both.
        allow_credentials="*" not in settings.cors_origins_list,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    install_error_handlers(app)
    app.include_router(system_router)
    app.include_router(router)
    app.include_router(openai_router)
    return app


async def _preload(services: Services) -> None:
    for service in (services.text, services.image):
        try:
            await service.initialize()
        except Exception:
            logger.warning("Preloading a model failed; requests will retry the load")
