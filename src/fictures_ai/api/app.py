"""The application factory: ``create_app(settings)`` wires settings, services and routes.

Observability is wired here too: the app's metrics registry (the services record into it),
the optional tracer provider, and the middleware that gives every request its id, span,
metrics and access line (``api/middleware.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from opentelemetry.trace import TracerProvider
from starlette.types import ASGIApp

from fictures_ai import __version__
from fictures_ai.api.body_limit import BodySizeLimitMiddleware
from fictures_ai.api.dependencies import Services
from fictures_ai.api.error_handlers import InternalErrorMiddleware, install_error_handlers
from fictures_ai.api.fictures.jobs import jobs_router
from fictures_ai.api.fictures.model_admin import admin_router
from fictures_ai.api.fictures.router import (
    DESCRIPTION,
    image_router,
    models_router,
    system_router,
    text_router,
)
from fictures_ai.api.health import health_router
from fictures_ai.api.job_executor import RouteExecutor
from fictures_ai.api.middleware import ObservabilityMiddleware
from fictures_ai.api.openai.batches import batch_router
from fictures_ai.api.openai.router import image_router as openai_image_router
from fictures_ai.api.openai.router import models_router as openai_models_router
from fictures_ai.api.openai.router import text_router as openai_text_router
from fictures_ai.api.openai.router import tokenizer_router
from fictures_ai.api.playground.router import router as playground_router
from fictures_ai.config import Settings, setting_name_warnings
from fictures_ai.database import default_database_url
from fictures_ai.observability import Observability
from fictures_ai.observability.context import REQUEST_ID_HEADER
from fictures_ai.observability.gpu import gpu_memory
from fictures_ai.observability.metrics import Metrics, RequestWindow
from fictures_ai.observability.tracing import build_tracer_provider
from fictures_ai.services.engine_factory import EngineLoaders
from fictures_ai.services.image_store import GeneratedImageStore
from fictures_ai.services.jobs.files import JobFiles
from fictures_ai.services.jobs.runner import JobRunner, JobRunnerOptions
from fictures_ai.services.jobs.service import JobLimits, JobService
from fictures_ai.services.jobs.store import JobKind, JobStore
from fictures_ai.services.jobs.webhooks import WebhookSender
from fictures_ai.services.keys.base import KeyStoreSchemaError
from fictures_ai.services.keys.stores import KeyStores, open_key_stores
from fictures_ai.services.models.registry import build_model_registry
from fictures_ai.services.rate_limit import create_rate_limiter

logger = logging.getLogger(__name__)

UPLOAD_ENVELOPE_BYTES = 64 << 10
"""Room in a /v1/files body for the multipart envelope around the file (boundaries, headers,
the purpose field)."""


def build_services(settings: Settings, engines: EngineLoaders | None = None) -> Services:
    """The production services: the models from ``MODELS_FILE`` or the settings, their engines
    from ``engines`` (default: loaded in this process; Ray Serve replicas with ``serve --ray``).

    Only the kinds ``GENERATION_MODE`` serves are built. Raises ``ModelsFileError`` or
    ``ValueError`` for a models file or settings that cannot work on this machine.
    """
    # First: a bad models file stops start-up at once.
    models = build_model_registry(settings, engines)
    rate_limiter = create_rate_limiter(
        redis_url=settings.redis_url,
        requests_per_minute=settings.rate_limit_per_minute,
        tokens_per_minute=settings.rate_limit_tokens_per_minute,
        images_per_minute=settings.rate_limit_images_per_minute,
    )
    return Services(
        settings=settings,
        models=models,
        api_keys=build_key_stores(settings) if settings.require_api_key else None,
        rate_limiter=rate_limiter,
        image_store=GeneratedImageStore(ttl_s=settings.image_url_ttl_s),
    )


def build_key_stores(settings: Settings) -> KeyStores:
    """The server's own key store and, with ``API_KEY_STORE=fictures``, the web app's (their
    URLs were checked by the settings)."""
    return open_key_stores(
        database_url=settings.database_url,
        fictures_database_url=(
            settings.fictures_database_url if settings.api_key_store == "fictures" else None
        ),
        pepper=settings.api_key_pepper,
        cache_ttl_s=settings.api_key_cache_s,
    )


def build_job_service(settings: Settings, services: Services) -> JobService:
    """Durable jobs and batches over the server's database (``DATABASE_URL``) and
    ``JOBS_DIR``, their requests run through this app's routes' code (``RouteExecutor``).

    Raises ``ValueError`` for a ``WEBHOOK_SECRET`` or ``WEBHOOK_ALLOWED_HOSTS`` entry the
    sender cannot use.
    """
    store = JobStore(database_url=settings.database_url or default_database_url())
    files = JobFiles(settings.jobs_dir)
    webhooks = (
        WebhookSender(
            secret=settings.webhook_secret,
            allowed_hosts=settings.webhook_allowed_hosts_list,
            timeout_s=settings.webhook_timeout_s,
            retry_base_s=settings.webhook_retry_base_s,
            retry_max_s=settings.webhook_retry_max_s,
        )
        if settings.webhook_secret
        else None
    )
    kinds: list[JobKind] = []
    if "text" in services.models.kinds():
        kinds.append("text")
    if "image" in services.models.kinds():
        kinds.append("images")
    runner = JobRunner(
        store=store,
        files=files,
        executor=RouteExecutor(services, store_image=files.write_image),
        webhooks=webhooks,
        options=JobRunnerOptions(
            text_concurrency=settings.job_text_concurrency,
            image_concurrency=settings.job_image_slots,
            lease_s=settings.job_lease_s,
            result_ttl_s=settings.job_result_ttl_s,
            webhook_max_attempts=settings.webhook_max_attempts,
        ),
        kinds=tuple(kinds),
    )
    return JobService(
        store=store,
        files=files,
        runner=runner,
        webhooks=webhooks,
        limits=JobLimits(
            max_requests=settings.job_max_requests,
            max_active_per_key=settings.job_max_active_per_key,
            max_stored_bytes=settings.job_max_stored_bytes,
            max_file_bytes=settings.job_max_file_bytes,
        ),
    )


class FicturesApp(FastAPI):
    """FastAPI with the observability middleware outermost.

    Starlette always puts its error middleware outside every ``add_middleware`` layer; an
    unhandled exception's 500 would then skip ours (no request id, not counted). Wrapping the
    built stack puts ours outside it.
    """

    def __init__(self, *, observability: Observability, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.observability = observability

    def build_middleware_stack(self) -> ASGIApp:
        observability: Observability = self.state.observability
        return ObservabilityMiddleware(
            super().build_middleware_stack(), observability=observability
        )


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    engines: EngineLoaders | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the FastAPI app. Tests pass ``services`` built over fake engines; without them,
    the services are built from the settings with engines from ``engines`` (default: loaded
    in this process).

    ``tracer_provider`` overrides the one built from the settings (an OTLP exporter when an
    endpoint is configured, else none); tests pass one with an in-memory exporter. Either way
    the app owns it and shuts it down (flushing spans) when its lifespan ends.
    """
    settings = settings or (services.settings if services else Settings())
    services = services or build_services(settings, engines)
    if services.jobs is None:
        services = dataclasses.replace(services, jobs=build_job_service(settings, services))
    jobs = services.jobs
    observability = _build_observability(settings, services, tracer_provider)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "Fictures AI Server %s starting (GENERATION_MODE=%s)",
            __version__,
            settings.generation_mode,
        )
        changed = settings.non_default_items()
        if changed:
            logger.info("Settings changed from their defaults: %s", changed)
        for warning in setting_name_warnings(os.environ):
            logger.warning("Settings: %s", warning)
        tasks: list[asyncio.Task[None]] = []
        if services.api_keys is None:
            logger.warning(
                "REQUIRE_API_KEY=false: every route is open to anyone who can reach this "
                "server. Use this for development only."
            )
        else:
            await _prepare_key_stores(services.api_keys, settings)
            tasks.append(asyncio.create_task(services.api_keys.record_usage(), name="key usage"))
        logger.info(
            "Serving %s",
            ", ".join(f"{model.name} ({model.kind})" for model in services.models.models()),
        )
        # In the background: /health must answer while models preload.
        tasks.append(
            asyncio.create_task(
                services.models.run(settings.engine_health_interval_s), name="models"
            )
        )
        if jobs is not None:
            logger.info(
                "Jobs and batches in %s, their files in %s",
                jobs.store.database_url,
                settings.jobs_dir,
            )
            tasks.append(asyncio.create_task(jobs.runner.run(), name="jobs"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # The key stores write their last batch of last-use times as their task ends.
            await asyncio.gather(*tasks, return_exceptions=True)
            await services.models.shutdown()
            if jobs is not None:
                jobs.store.close()
            await services.rate_limiter.close()
            if services.api_keys is not None:
                services.api_keys.close()
            await _shutdown_tracing(observability.tracer_provider)
            logger.info("Fictures AI Server stopped")

    app = FicturesApp(
        observability=observability,
        title="Fictures AI Server",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.services = services
    # Innermost first: an unforeseen exception becomes a JSON 500 that CORS still wraps.
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        # A job's requests and a batch's file are many requests in one body.
        # The file's own size is checked against JOB_MAX_FILE_BYTES once it is read; the
        # body also holds the form's envelope.
        larger={
            "/api/v1/jobs": (settings.job_max_file_bytes, "JOB_MAX_FILE_BYTES"),
            "/v1/files": (
                settings.job_max_file_bytes + UPLOAD_ENVELOPE_BYTES,
                "JOB_MAX_FILE_BYTES",
            ),
        },
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins_list,
        # Browsers refuse credentials with a wildcard origin; never send both.
        allow_credentials="*" not in settings.cors_origins_list,
        allow_methods=["*"],
        allow_headers=["*"],
        # Browser clients may read the id to quote it in bug reports.
        expose_headers=[REQUEST_ID_HEADER],
    )
    install_error_handlers(app)
    app.include_router(system_router)
    app.include_router(health_router)
    app.include_router(models_router)
    app.include_router(admin_router)
    app.include_router(openai_models_router)
    if "text" in services.models.kinds():
        app.include_router(text_router)
        app.include_router(openai_text_router)
        app.include_router(tokenizer_router)
    if "image" in services.models.kinds():
        app.include_router(image_router)
        app.include_router(openai_image_router)
    app.include_router(jobs_router)
    app.include_router(batch_router)
    app.include_router(playground_router)
    return app


async def _prepare_key_stores(stores: KeyStores, settings: Settings) -> None:
    """Create or check the key tables; a clash stops the server with a message that says so."""
    if settings.fictures_database_url and settings.api_key_store != "fictures":
        logger.warning(
            "FICTURES_DATABASE_URL is set but API_KEY_STORE=local: the web app's keys are not "
            "accepted. Set API_KEY_STORE=fictures to accept them."
        )
    try:
        await stores.prepare()
    except KeyStoreSchemaError as exc:
        logger.error("Cannot start: %s", exc)
        raise
    for store in stores.stores:
        if store.prepared:  # the others logged why not, and answer 503 until they can
            logger.info("Accepting API keys from %s", store.description)


def _build_observability(
    settings: Settings, services: Services, tracer_provider: TracerProvider | None
) -> Observability:
    """The app's registry (the services record into it from now on), window and tracing."""
    metrics = Metrics(version=__version__)
    services.models.instrument(metrics)
    metrics.watch(engines=services.models.engine_snapshots, gpus=gpu_memory)
    return Observability(
        metrics=metrics,
        window=RequestWindow(window_s=settings.health_window_s),
        tracer_provider=tracer_provider or build_tracer_provider(settings.otlp_endpoint),
        log_prompts=settings.log_prompts,
    )


async def _shutdown_tracing(provider: TracerProvider | None) -> None:
    # The SDK provider flushes its batch of spans on shutdown (a blocking export).
    shutdown = getattr(provider, "shutdown", None)
    if shutdown is not None:
        await asyncio.to_thread(shutdown)
