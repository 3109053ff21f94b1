"""Routes of the Fictures surface: system endpoints, model listings, ``/api/v1/text/...`` and
``/api/v1/images/...`` (the last two mounted only when ``GENERATION_MODE`` serves them)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request

from fictures_ai import __version__
from fictures_ai.api.auth import Client, require_scope
from fictures_ai.api.cache_control import caller_ticket, report_cache
from fictures_ai.api.dependencies import Services, get_models, get_services
from fictures_ai.api.disconnect import cancel_on_disconnect
from fictures_ai.api.errors import error_responses
from fictures_ai.api.fictures.encoding import ImageEventEncoder, TextEventEncoder, png_data_url
from fictures_ai.api.fictures.protocol import (
    ErrorResponse,
    HealthGpu,
    HealthImageQueue,
    HealthJobQueue,
    HealthModels,
    HealthQueues,
    HealthRequests,
    HealthResponse,
    HealthTextQueue,
    ImageGenerationRequest,
    ImageGenerationResponse,
    ImageModelEntry,
    ImageModelInfo,
    ImageModelsResponse,
    ModelsResponse,
    RootResponse,
    StructuredGenerationRequest,
    StructuredGenerationResponse,
    TextGenerationRequest,
    TextGenerationResponse,
    TextModelEntry,
    TextModelInfo,
    TextModelsResponse,
    contract_finish_reason,
)
from fictures_ai.api.health import ObservabilityDep
from fictures_ai.api.model_views import requested_loras, state_fields, with_model_defaults
from fictures_ai.api.sse import EventStreamResponse, sse_response_doc, stream_events
from fictures_ai.engines.base import INTERACTIVE_PRIORITY, ProgressCallback
from fictures_ai.observability.context import current_request_id
from fictures_ai.observability.gpu import gpu_memory
from fictures_ai.services.model_loader import LoadState
from fictures_ai.services.models.registry import ModelRegistry, ModelStatus
from fictures_ai.services.response_cache import CacheTicket

logger = logging.getLogger(__name__)

DESCRIPTION = "Self-hosted text (vLLM) and image (diffusers) generation for Fictures."

system_router = APIRouter(tags=["system"])
_ERRORS = error_responses(ErrorResponse, include_422=False)
models_router = APIRouter(prefix="/api/v1", responses=_ERRORS)
text_router = APIRouter(prefix="/api/v1/text", tags=["text"], responses=_ERRORS)
image_router = APIRouter(prefix="/api/v1/images", tags=["images"], responses=_ERRORS)

ServicesDep = Annotated[Services, Depends(get_services)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
# Model listings: any valid key (api-contract.md, "Authentication").
listing_access = [Depends(require_scope(None))]
# Generation: the route admits the request once the body is parsed (model, images).
Caller = Annotated[Client, Depends(require_scope("stories:write", admit=False))]

TEXT_DEFAULT_FIELDS = {"stop": ("stop_sequences",)}
"""A text model's defaults (models file) by the Fictures requests' field names."""


def _text_info(status: ModelStatus) -> TextModelInfo:
    return TextModelInfo(
        name=status.name,
        max_tokens=status.max_model_len or 0,
        initialized=status.state is LoadState.LOADED,
        **state_fields(status),
    )


def _image_info(status: ModelStatus) -> ImageModelInfo:
    return ImageModelInfo(
        name=status.name,
        device=status.device or "",
        initialized=status.state is LoadState.LOADED,
        notice=status.notice,
        **state_fields(status),
    )


def _contract_status(status: ModelStatus) -> Literal["initialized", "not_loaded"]:
    return "initialized" if status.state is LoadState.LOADED else "not_loaded"


@system_router.get("/", response_model=RootResponse)
async def describe_server() -> RootResponse:
    """Name, version and the main links of the server."""
    return RootResponse(version=__version__, description=DESCRIPTION)


@system_router.get("/health", response_model=HealthResponse)
async def check_health(services: ServicesDep, observability: ObservabilityDep) -> HealthResponse:
    """Answers at once, also while models load; ``initialized`` says whether they have.

    ``models`` holds the default model of each kind (``/api/v1/models`` lists them all); a
    kind that ``generation_mode`` leaves out is not listed. Beyond the
    contract's fields: recent request latency and error rate, GPU memory when this process
    uses CUDA (``gpu`` is null otherwise), and the requests waiting and running now, summed
    over the models of each kind (``queues``).
    """
    registry = services.models
    text, image = registry.default("text"), registry.default("image")
    models = HealthModels(
        text=_text_info(registry.status(text)) if text is not None else None,
        image=_image_info(registry.status(image)) if image is not None else None,
    )
    engines = registry.engine_snapshots()
    images = [engine for engine in engines if engine.engine == "image"]
    texts = [engine for engine in engines if engine.engine == "text"]
    queues = HealthQueues(
        images=HealthImageQueue(
            waiting=sum(engine.waiting or 0 for engine in images),
            running=sum(engine.running for engine in images),
        )
        if images
        else None,
        text=HealthTextQueue(running=sum(engine.running for engine in texts)) if texts else None,
        jobs={
            kind: HealthJobQueue(**counts)
            for kind, counts in services.jobs.runner.queue_lengths.items()
        }
        if services.jobs is not None
        else None,
    )
    recent = observability.window.summary()
    gpus = gpu_memory()
    return HealthResponse(
        version=__version__,
        generation_mode=services.settings.generation_mode,
        models=models,
        requests=HealthRequests(
            window_s=recent.window_s,
            count=recent.count,
            latency_p50_ms=recent.latency_p50_ms,
            latency_p95_ms=recent.latency_p95_ms,
            error_rate=recent.error_rate,
        ),
        gpu=None
        if gpus is None
        else [
            HealthGpu(
                index=gpu.index,
                name=gpu.name,
                used_bytes=gpu.used_bytes,
                total_bytes=gpu.total_bytes,
                allocated_bytes=gpu.allocated_bytes,
            )
            for gpu in gpus
        ],
        queues=queues,
    )


@models_router.get(
    "/models", response_model=ModelsResponse, dependencies=listing_access, tags=["models"]
)
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every model this server serves, adapters included, with its state (an empty list for
    a kind it does not serve)."""
    registry = services.models
    return ModelsResponse(
        generation_mode=services.settings.generation_mode,
        text_generation=[_text_info(status) for status in registry.statuses("text")],
        image_generation=[_image_info(status) for status in registry.statuses("image")],
    )


@text_router.get("/models", response_model=TextModelsResponse, dependencies=listing_access)
async def list_text_models(models: ModelsDep) -> TextModelsResponse:
    """The text models, with their state (``status``: the contract's loaded or not)."""
    return TextModelsResponse(
        models=[
            TextModelEntry(
                id=status.name,
                name=status.name,
                max_tokens=status.max_model_len or 0,
                status=_contract_status(status),
                **state_fields(status),
            )
            for status in models.statuses("text")
        ]
    )


@text_router.post("/generate", response_model=TextGenerationResponse)
async def generate_text(
    body: TextGenerationRequest, request: Request, caller: Caller, services: ServicesDep
) -> TextGenerationResponse:
    """Generate text and return it whole; a client that disconnects aborts the generation.

    With ``response_format: "json"`` the text is JSON, constrained to ``response_schema``.
    """
    return await text_generation(
        body,
        services,
        admit=lambda model: caller.admit(model=model),
        request=request,
        cache=caller_ticket(request, caller, deterministic=body.deterministic),
    )


async def text_generation(
    body: TextGenerationRequest,
    services: Services,
    *,
    admit: Callable[[str], Awaitable[None]],
    request: Request | None,
    priority: int = INTERACTIVE_PRIORITY,
    request_id: str | None = None,
    cache: CacheTicket | None = None,
) -> TextGenerationResponse:
    """Answer ``body`` as ``POST /api/v1/text/generate`` does, with the engine ``priority``
    (a job's request runs without an HTTP ``request``) and the response ``cache`` ticket;
    raises what the route answers."""
    target = services.models.text(body.model)
    body = with_model_defaults(body, target.defaults, TEXT_DEFAULT_FIELDS)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    params = replace(target.params(body.to_generation_params()), priority=priority)
    await admit(target.name)
    work = target.service.generate(
        prompt, params, request_id=request_id or current_request_id(), cache=cache
    )
    result = await (cancel_on_disconnect(request, work) if request is not None else work)
    report_cache(cache)
    return TextGenerationResponse(
        text=result.text,
        model=target.name,
        tokens_used=result.completion_tokens,
        finish_reason=contract_finish_reason(result.finish_reason) or "stop",
    )


@text_router.post(
    "/stream",
    response_class=EventStreamResponse,
    responses=sse_response_doc(
        "Server-sent events: `data: TextStreamResponse` (JSON), then `data: [DONE]`."
    ),
)
async def stream_text(
    body: TextGenerationRequest, request: Request, caller: Caller, services: ServicesDep
) -> EventStreamResponse:
    """Stream text as server-sent events with the cumulative text and the new delta."""
    cache = caller_ticket(request, caller, deterministic=body.deterministic)
    target = services.models.text(body.model)
    body = with_model_defaults(body, target.defaults, TEXT_DEFAULT_FIELDS)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    params = target.params(body.to_generation_params())
    await caller.admit(model=target.name)
    chunks = target.service.stream(prompt, params, request_id=current_request_id(), cache=cache)
    response = await stream_events(chunks, TextEventEncoder(target.name))
    report_cache(cache)
    return response


@text_router.post("/structured", response_model=StructuredGenerationResponse)
async def generate_structured_text(
    body: StructuredGenerationRequest, request: Request, caller: Caller, services: ServicesDep
) -> StructuredGenerationResponse:
    """Generate output constrained by a JSON schema, regex, choice list or grammar."""
    cache = caller_ticket(request, caller, deterministic=body.deterministic)
    target = services.models.text(body.model)
    body = with_model_defaults(body, target.defaults, TEXT_DEFAULT_FIELDS)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    params = target.params(body.to_generation_params())
    await caller.admit(model=target.name)
    outcome = await cancel_on_disconnect(
        request,
        target.service.generate_structured(
            prompt, params, request_id=current_request_id(), cache=cache
        ),
    )
    report_cache(cache)
    return StructuredGenerationResponse(
        output=outcome.result.text,
        parsed_output=outcome.parsed,
        model=target.name,
        tokens_used=outcome.result.completion_tokens,
        finish_reason=contract_finish_reason(outcome.result.finish_reason) or "stop",
        is_valid=outcome.is_valid,
    )


@image_router.post("/generate", response_model=ImageGenerationResponse)
async def generate_image(
    body: ImageGenerationRequest, request: Request, caller: Caller, models: ModelsDep
) -> ImageGenerationResponse:
    """Render one image of exactly the requested size; a client that disconnects frees its
    queue place or stops the render."""
    return await image_generation(
        body,
        models,
        admit=lambda model: caller.admit(model=model, images=1),
        request=request,
        image_url=_data_url,
        cache=caller_ticket(request, caller, deterministic=body.deterministic),
    )


async def _data_url(png: bytes) -> str:
    return png_data_url(png)


async def image_generation(
    body: ImageGenerationRequest,
    models: ModelRegistry,
    *,
    admit: Callable[[str], Awaitable[None]],
    request: Request | None,
    image_url: Callable[[bytes], Awaitable[str]],
    priority: int = INTERACTIVE_PRIORITY,
    progress: ProgressCallback | None = None,
    cache: CacheTicket | None = None,
) -> ImageGenerationResponse:
    """Answer ``body`` as ``POST /api/v1/images/generate`` does: ``image_url`` makes the URL
    of the PNG (a data URL for the route, a stored file's URL for a job), ``priority`` orders
    the render queue, ``progress`` hears each denoising step, ``cache`` is the response
    cache ticket."""
    target = models.image(body.model)
    body = with_model_defaults(body, target.defaults)
    params = target.params(body.to_generation_params(), requested_loras(body.loras))
    await admit(target.name)
    work = target.service.generate(params, progress=progress, priority=priority, cache=cache)
    image = await (cancel_on_disconnect(request, work) if request is not None else work)
    report_cache(cache)
    return ImageGenerationResponse(
        image_url=await image_url(image.png),
        model=target.name,
        width=image.width,
        height=image.height,
        seed=image.seed,
    )


@image_router.post(
    "/stream",
    response_class=EventStreamResponse,
    responses=sse_response_doc(
        "Server-sent events (JSON): `{queued: true, position, step: 0, total_steps, done: "
        "false}` while the render waits for a slot (when it starts to wait and each time its "
        "place changes; `position` 1 starts next), `{step, total_steps, done: false}` after "
        "each denoising step, then the image response with `done: true`, then `data: [DONE]`."
    ),
)
async def stream_image(
    body: ImageGenerationRequest, request: Request, caller: Caller, models: ModelsDep
) -> EventStreamResponse:
    """Render one image, reporting its place in the queue and progress per step as
    server-sent events."""
    cache = caller_ticket(request, caller, deterministic=body.deterministic)
    target = models.image(body.model)
    body = with_model_defaults(body, target.defaults)
    params = target.params(body.to_generation_params(), requested_loras(body.loras))
    await caller.admit(model=target.name, images=1)
    renders = target.service.stream(params, cache=cache)
    report_cache(cache)  # looked up already: the stream starts at once
    encoder = ImageEventEncoder(target.name, total_steps=params.num_inference_steps)
    # Started at once: the render may wait long in the queue; its errors are events.
    return await stream_events(renders, encoder, wait_for_first=False)


@image_router.get("/models", response_model=ImageModelsResponse, dependencies=listing_access)
async def list_image_models(models: ModelsDep) -> ImageModelsResponse:
    """The image models, with their state (``status``: the contract's loaded or not)."""
    return ImageModelsResponse(
        models=[
            ImageModelEntry(
                id=status.name,
                name=status.name,
                device=status.device or "",
                status=_contract_status(status),
                notice=status.notice,
                **state_fields(status),
            )
            for status in models.statuses("image")
        ]
    )
