"""Probes and metrics: ``/health/live``, ``/health/ready`` and ``/metrics``.

The contract's ``/health`` (always 200, model status) stays in ``api/fictures/router.py``;
these are for orchestrators and Prometheus:

- ``/health/live``: the process answers (a liveness probe restarts it when this fails);
- ``/health/ready``: 200 when every model is loaded or can be loaded and every loaded
  engine passes its own health check; otherwise 503 with ``Retry-After`` and, per model,
  why not (a readiness probe takes the instance out of the load balancer meanwhile);
- ``/metrics``: the app's Prometheus registry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from fictures_ai.api.dependencies import Services, get_services
from fictures_ai.errors import FicturesError
from fictures_ai.observability import Observability
from fictures_ai.services.model_loader import LoadState
from fictures_ai.services.models.registry import GenerationService

logger = logging.getLogger(__name__)

HEALTH_CHECK_TIMEOUT_S = 5.0
"""An engine that takes longer than this to answer its health check is not ready."""
NOT_READY_RETRY_AFTER_S = 30

health_router = APIRouter(tags=["system"])


def get_observability(request: Request) -> Observability:
    """The app's metrics, request window and tracer."""
    observability: Observability = request.app.state.observability
    return observability


ObservabilityDep = Annotated[Observability, Depends(get_observability)]
ServicesDep = Annotated[Services, Depends(get_services)]


class LiveResponse(BaseModel):
    """Answer of ``/health/live``."""

    status: Literal["alive"] = "alive"


class ModelReadiness(BaseModel):
    """One model in ``/health/ready``: its load state, and why it is not ready if it is not."""

    name: str
    state: str
    ready: bool
    reason: str | None = None


class ReadyResponse(BaseModel):
    """Answer of ``/health/ready`` (200 ``ready`` or 503 ``not_ready``)."""

    status: Literal["ready", "not_ready"]
    models: dict[str, ModelReadiness]
    """By model name: every model with an engine of its own (adapters run on their base's)."""


@health_router.get("/health/live", response_model=LiveResponse)
async def check_liveness() -> LiveResponse:
    """200 whenever the process answers HTTP."""
    return LiveResponse()


@health_router.get(
    "/health/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "A model is not ready"}},
)
async def check_readiness(services: ServicesDep) -> JSONResponse:
    """200 when every model is loaded or loadable and loaded engines are healthy, else 503.

    A model that is not loaded (never yet, or unloaded) or is loading for the first time
    counts as ready: the next request loads it. A failed load, a reload after a failure (a dead
    engine being restarted) or a failing engine health check does not.
    """
    served = [model.service for model in services.models.bases()]
    readiness = await asyncio.gather(*(_readiness(service) for service in served))
    body = ReadyResponse(
        status="ready" if all(model.ready for model in readiness) else "not_ready",
        models={model.name: model for model in readiness},
    )
    if body.status == "ready":
        return JSONResponse(body.model_dump())
    return JSONResponse(
        body.model_dump(),
        status_code=503,
        headers={"Retry-After": str(NOT_READY_RETRY_AFTER_S)},
    )


async def _readiness(service: GenerationService) -> ModelReadiness:
    info = service.info()
    name = info.name
    # Failed, or loading again after a failure (an engine that died is being restarted).
    if info.state is LoadState.FAILED or (info.state is LoadState.LOADING and info.last_error):
        return ModelReadiness(
            name=name,
            state=info.state.value,
            ready=False,
            reason=info.last_error or "the last load failed",
        )
    if info.state is not LoadState.LOADED:
        return ModelReadiness(name=name, state=info.state.value, ready=True)
    try:
        await asyncio.wait_for(service.check_health(), HEALTH_CHECK_TIMEOUT_S)
    except TimeoutError:
        reason = f"the engine did not answer its health check within {HEALTH_CHECK_TIMEOUT_S} s"
    except FicturesError as exc:
        reason = exc.message
    except Exception as exc:
        logger.warning("Health check of %s failed", name, exc_info=True)
        reason = f"health check failed: {exc}"
    else:
        return ModelReadiness(name=name, state=info.state.value, ready=True)
    return ModelReadiness(name=name, state=info.state.value, ready=False, reason=reason)


@health_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus metrics"}},
)
async def export_metrics(request: Request, observability: ObservabilityDep) -> Response:
    """The app's metrics in Prometheus text format (OpenMetrics when the scraper asks)."""
    body, content_type = observability.metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)
