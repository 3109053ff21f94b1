"""FastAPI dependencies: access to the services (authorisation is in ``auth.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from fictures_ai.config import Settings
from fictures_ai.services.api_keys import ApiKeyService
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.image_store import GeneratedImageStore
from fictures_ai.services.rate_limit import InMemoryRateLimiter, RateLimiter
from fictures_ai.services.text_generation import TextGenerationService


@dataclass(frozen=True, slots=True)
class Services:
    """The services one app serves from, built once in ``create_app``."""

    settings: Settings
    text: TextGenerationService
    image: ImageGenerationService
    api_keys: ApiKeyService | None = None
    """The key store; None when keys are not required (REQUIRE_API_KEY=false)."""
    rate_limiter: RateLimiter = field(
        default_factory=lambda: InMemoryRateLimiter(
            requests_per_minute=0, tokens_per_minute=0, images_per_minute=0
        )
    )
    image_store: GeneratedImageStore = field(
        default_factory=lambda: GeneratedImageStore(ttl_s=3600, max_bytes=256 << 20)
    )


# Async on purpose: FastAPI runs plain ``def`` dependencies in its thread pool, a thread hop per
# request for what is an attribute lookup.
async def get_services(request: Request) -> Services:
    """The app's services."""
    services: Services = request.app.state.services
    return services


async def get_text_service(request: Request) -> TextGenerationService:
    """The text generation service."""
    services: Services = request.app.state.services
    return services.text


async def get_image_service(request: Request) -> ImageGenerationService:
    """The image generation service."""
    services: Services = request.app.state.services
    return services.image
