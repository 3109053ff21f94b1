"""FastAPI dependencies: access to the services (authorisation is in ``auth.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from fictures_ai.config import Settings
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.image_store import GeneratedImageStore
from fictures_ai.services.keys.stores import KeyStores
from fictures_ai.services.rate_limit import InMemoryRateLimiter, RateLimiter
from fictures_ai.services.text_generation import TextGenerationService

GenerationService = TextGenerationService | ImageGenerationService


@dataclass(frozen=True, slots=True)
class Services:
    """The services one app serves from, built once in ``create_app``.

    ``text`` or ``image`` is None when ``GENERATION_MODE`` leaves that half out: its routes are
    not mounted and its model is never loaded.
    """

    settings: Settings
    text: TextGenerationService | None
    image: ImageGenerationService | None
    api_keys: KeyStores | None = None
    """The key stores; None when keys are not required (REQUIRE_API_KEY=false)."""
    rate_limiter: RateLimiter = field(
        default_factory=lambda: InMemoryRateLimiter(
            requests_per_minute=0, tokens_per_minute=0, images_per_minute=0
        )
    )
    image_store: GeneratedImageStore = field(
        default_factory=lambda: GeneratedImageStore(ttl_s=3600)
    )

    def generation(self) -> dict[str, GenerationService]:
        """The generation services this server runs, by kind (``text``, ``image``)."""
        served: dict[str, GenerationService] = {}
        if self.text is not None:
            served["text"] = self.text
        if self.image is not None:
            served["image"] = self.image
        return served


# Async on purpose: FastAPI runs plain ``def`` dependencies in its thread pool, a thread hop per
# request for what is an attribute lookup.
async def get_services(request: Request) -> Services:
    """The app's services."""
    services: Services = request.app.state.services
    return services


async def get_text_service(request: Request) -> TextGenerationService:
    """The text generation service (its routes are mounted only when there is one)."""
    services: Services = request.app.state.services
    if services.text is None:  # pragma: no cover - the text routes are not mounted then
        raise RuntimeError("text route mounted on a server that does not generate text")
    return services.text


async def get_image_service(request: Request) -> ImageGenerationService:
    """The image generation service (its routes are mounted only when there is one)."""
    services: Services = request.app.state.services
    if services.image is None:  # pragma: no cover - the image routes are not mounted then
        raise RuntimeError("image route mounted on a server that does not generate images")
    return services.image
