"""FastAPI dependencies: access to the services, and the authorisation hook."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from fictures_ai.config import Settings
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.image_store import GeneratedImageStore
from fictures_ai.services.text_generation import TextGenerationService


@dataclass(frozen=True, slots=True)
class Services:
    """The services one app serves from, built once in ``create_app``."""

    settings: Settings
    text: TextGenerationService
    image: ImageGenerationService
    image_store: GeneratedImageStore = field(
        default_factory=lambda: GeneratedImageStore(ttl_s=3600, max_bytes=256 << 20)
    )


def get_services(request: Request) -> Services:
    """The app's services."""
    services: Services = request.app.state.services
    return services


def get_text_service(request: Request) -> TextGenerationService:
    """The text generation service."""
    return get_services(request).text


def get_image_service(request: Request) -> ImageGenerationService:
    """The image generation service."""
    return get_services(request).image


def require_scope(scope: str) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """The authorisation hook of a route: the scope it needs (``stories:read`` or ``:write``).

    API keys are not enforced yet (they arrive with the key store); the hook records the
    required scope on the request so that routes already declare what they need.
    """

    async def authorize(request: Request) -> None:
        request.state.required_scope = scope

    return authorize
