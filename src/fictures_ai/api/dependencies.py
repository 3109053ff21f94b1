"""FastAPI dependencies: access to the services (authorisation is in ``auth.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from fictures_ai.config import Settings
from fictures_ai.errors import ServiceUnavailableError
from fictures_ai.services.image_store import GeneratedImageStore
from fictures_ai.services.jobs.service import JobService
from fictures_ai.services.keys.stores import KeyStores
from fictures_ai.services.models.registry import ModelRegistry
from fictures_ai.services.rate_limit import InMemoryRateLimiter, RateLimiter


@dataclass(frozen=True, slots=True)
class Services:
    """The services one app serves from, built once in ``create_app``.

    ``models`` holds the models of the kinds ``GENERATION_MODE`` serves: the routes of a kind
    it has none of are not mounted.
    """

    settings: Settings
    models: ModelRegistry
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
    jobs: JobService | None = None
    """Durable jobs and batches; ``create_app`` builds them when absent."""


# Async on purpose: FastAPI runs plain ``def`` dependencies in its thread pool, a thread hop per
# request for what is an attribute lookup.
async def get_services(request: Request) -> Services:
    """The app's services."""
    services: Services = request.app.state.services
    return services


async def get_models(request: Request) -> ModelRegistry:
    """The app's model registry."""
    services: Services = request.app.state.services
    return services.models


async def get_jobs(request: Request) -> JobService:
    """The app's job service (503 in an app built without one)."""
    services: Services = request.app.state.services
    if services.jobs is None:
        raise ServiceUnavailableError("Jobs and batches are not available on this server.")
    return services.jobs
