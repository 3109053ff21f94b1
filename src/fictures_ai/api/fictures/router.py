"""Routes of the Fictures surface: system endpoints, model listings, ``/api/v1/text/...`` and
``/api/v1/images/...`` (the last two mounted only when ``GENERATION_MODE`` serves them)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fictures_ai import __version__
from fictures_ai.api.auth import Client, require_scope
from fictures_ai.api.dependencies import (
    Services,
    get_image_service,
    get_services,
    get_text_service,
)
from fictures_ai.api.disconnect import cancel_on_disconnect
from fictures_ai.api.errors import error_responses
from fictures_ai.api.fictures.encoding import ImageEventEncoder, TextEventEncoder, png_data_url
from fictures_ai.api.fictures.protocol import (
    ErrorResponse,
    HealthGpu,
    HealthModels,
    HealthRequests,
    HealthResponse,
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
from fictures_ai.api.sse import EventStreamResponse, sse_response_doc, stream_events
from fictures_ai.observability.context import current_request_id
from fictures_ai.observability.gpu import gpu_memory
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.text_generation import TextGenerationService

logger = logging.getLogger(__name__)

DESCRIPTION = "Self-hosted text (vLLM) and image (diffusers) generation for Fictures."

system_router = APIRouter(tags=["system"])
_ERRORS = error_responses(ErrorResponse, include_422=False)
models_router = APIRouter(prefix="/api/v1", responses=_ERRORS)
text_router = APIRouter(prefix="/api/v1/text", tags=["text"], responses=_ERRORS)
image_router = APIRouter(prefix="/api/v1/images", tags=["images"], responses=_ERRORS)

TextService = Annotated[TextGenerationService, Depends(get_text_service)]
ImageService = Annotated[ImageGenerationService, Depends(get_image_service)]
ServicesDep = Annotated[Services, Depends(get_services)]
# Model listings: any valid key (api-contract.md, "Authentication").
listing_access = [Depends(require_scope(None))]
# Generation: the route admits the request once the body is parsed (model, images).
Caller = Annotated[Client, Depends(require_scope("stories:write", admit=False))]


def _text_info(service: TextGenerationService) -> TextModelInfo:
    info = service.info()
    return TextModelInfo(
        name=info.name, max_tokens=info.max_model_len, initialized=info.initialized
    )


def _image_info(service: ImageGenerationService) -> ImageModelInfo:
    info = service.info()
    return ImageModelInfo(
        name=info.name, device=info.device, initialized=info.initialized, notice=info.notice
    )


@system_router.get("/", response_model=RootResponse)
async def describe_server() -> RootResponse:
    """Name, version and the main links of the server."""
    return RootResponse(version=__version__, description=DESCRIPTION)


@system_router.get("/health", response_model=HealthResponse)
async def check_health(services: ServicesDep, observability: ObservabilityDep) -> HealthResponse:
    """Answers at once, also while models load; ``initialized`` says whether they have.

    A model of the half that ``generation_mode`` leaves out is not listed. Beyond the
    contract's fields: recent request latency and error rate, and GPU memory when this process
    uses CUDA (``gpu`` is null otherwise).
    """
    models = HealthModels(
        text=_text_info(services.text) if services.text is not None else None,
        image=_image_info(services.image) if services.image is not None else None,
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
    )


@models_router.get(
    "/models", response_model=ModelsResponse, dependencies=listing_access, tags=["models"]
)
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every model this server serves (an empty list for a half it does not serve)."""
    return ModelsResponse(
        generation_mode=services.settings.generation_mode,
        text_generation=[_text_info(services.text)] if services.text is not None else [],
        image_generation=[_image_info(services.image)] if services.image is not None else [],
    )


@text_router.get("/models", response_model=TextModelsResponse, dependencies=listing_access)
async def list_text_models(service: TextService) -> TextModelsResponse:
    """The text models, with whether each is loaded."""
    info = service.info()
    entry = TextModelEntry(
        id=info.name,
        name=info.name,
        max_tokens=info.max_model_len,
        status="initialized" if info.initialized else "not_loaded",
    )
    return TextModelsResponse(models=[entry])


@text_router.post("/generate", response_model=TextGenerationResponse)
async def generate_text(
    body: TextGenerationRequest,
    request: Request,
    caller: Caller,
    service: TextService,
    services: ServicesDep,
) -> TextGenerationResponse:
    """Generate text and return it whole; a client that disconnects aborts the generation.

    With ``response_format: "json"`` the text is JSON, constrained to ``response_schema``.
    """
    model = service.check_model(body.model)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    params = body.to_generation_params()
    await caller.admit(model=model)
    result = await cancel_on_disconnect(
        request, service.generate(prompt, params, request_id=current_request_id())
    )
    return TextGenerationResponse(
        text=result.text,
        model=service.model_name,
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
    body: TextGenerationRequest, caller: Caller, service: TextService, services: ServicesDep
) -> EventStreamResponse:
    """Stream text as server-sent events with the cumulative text and the new delta."""
    model = service.check_model(body.model)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    params = body.to_generation_params()
    await caller.admit(model=model)
    chunks = service.stream(prompt, params, request_id=current_request_id())
    return await stream_events(chunks, TextEventEncoder(service.model_name))


@text_router.post("/structured", response_model=StructuredGenerationResponse)
async def generate_structured_text(
    body: StructuredGenerationRequest,
    request: Request,
    caller: Caller,
    service: TextService,
    services: ServicesDep,
) -> StructuredGenerationResponse:
    """Generate output constrained by a JSON schema, regex, choice list or grammar."""
    model = service.check_model(body.model)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    params = body.to_generation_params()
    await caller.admit(model=model)
    outcome = await cancel_on_disconnect(
        request, service.generate_structured(prompt, params, request_id=current_request_id())
    )
    return StructuredGenerationResponse(
        output=outcome.result.text,
        parsed_output=outcome.parsed,
        model=service.model_name,
        tokens_used=outcome.result.completion_tokens,
        finish_reason=contract_finish_reason(outcome.result.finish_reason) or "stop",
        is_valid=outcome.is_valid,
    )


@image_router.post("/generate", response_model=ImageGenerationResponse)
async def generate_image(
    body: ImageGenerationRequest, request: Request, caller: Caller, service: ImageService
) -> ImageGenerationResponse:
    """Render one image of exactly the requested size; a client that disconnects frees its
    queue place or stops the render."""
    model = service.check_model(body.model)
    params = body.to_generation_params()
    await caller.admit(model=model, images=1)
    image = await cancel_on_disconnect(request, service.generate(params))
    return ImageGenerationResponse(
        image_url=png_data_url(image.png),
        model=service.info().name,
        width=image.width,
        height=image.height,
        seed=image.seed,
    )


@image_router.post(
    "/stream",
    response_class=EventStreamResponse,
    responses=sse_response_doc(
        "Server-sent events: `{step, total_steps, done: false}` (JSON) after each denoising "
        "step, then the image response with `done: true`, then `data: [DONE]`."
    ),
)
async def stream_image(
    body: ImageGenerationRequest, caller: Caller, service: ImageService
) -> EventStreamResponse:
    """Render one image, reporting progress per step as server-sent events."""
    model = service.check_model(body.model)
    params = body.to_generation_params()
    await caller.admit(model=model, images=1)
    renders = service.stream(params)
    # Started at once: the render may wait long in the queue; its errors are events.
    return await stream_events(
        renders, ImageEventEncoder(service.info().name), wait_for_first=False
    )


@image_router.get("/models", response_model=ImageModelsResponse, dependencies=listing_access)
async def list_image_models(service: ImageService) -> ImageModelsResponse:
    """The image models, with whether each is loaded."""
    info = service.info()
    entry = ImageModelEntry(
        id=info.name,
        name=info.name,
        device=info.device,
        status="initialized" if info.initialized else "not_loaded",
        notice=info.notice,
    )
    return ImageModelsResponse(models=[entry])
