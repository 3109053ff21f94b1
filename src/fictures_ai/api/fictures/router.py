"""Routes of the Fictures surface: system endpoints, model listings, ``/api/v1/text/...`` and
``/api/v1/images/...`` (the last two mounted only when ``GENERATION_MODE`` serves them)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from fictures_ai import __version__
from fictures_ai.api.auth import require_scope
from fictures_ai.api.dependencies import (
    Services,
    get_image_service,
    get_services,
    get_text_service,
)
from fictures_ai.api.disconnect import cancel_on_disconnect
from fictures_ai.api.errors import error_responses, stream_failure
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
from fictures_ai.api.sse import (
    DONE_EVENT,
    EventStreamResponse,
    encode_json_string,
    sse_event,
    sse_response_doc,
)
from fictures_ai.engines.base import TextChunk
from fictures_ai.observability.context import current_request_id
from fictures_ai.observability.gpu import gpu_memory
from fictures_ai.observability.tracing import child_span
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
text_access = [Depends(require_scope("stories:write", model="text"))]
image_access = [Depends(require_scope("stories:write", images=1, model="image"))]


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


@text_router.post("/generate", response_model=TextGenerationResponse, dependencies=text_access)
async def generate_text(
    body: TextGenerationRequest, request: Request, service: TextService, services: ServicesDep
) -> TextGenerationResponse:
    """Generate text and return it whole; a client that disconnects aborts the generation.

    With ``response_format: "json"`` the text is JSON, constrained to ``response_schema``.
    """
    service.check_model(body.model)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    result = await cancel_on_disconnect(
        request,
        service.generate(prompt, body.to_generation_params(), request_id=current_request_id()),
    )
    return TextGenerationResponse(
        text=result.text,
        model=service.model_name,
        tokens_used=result.completion_tokens,
        finish_reason=contract_finish_reason(result.finish_reason) or "stop",
    )


@text_router.post(
    "/stream",
    dependencies=text_access,
    response_class=EventStreamResponse,
    responses=sse_response_doc(
        "Server-sent events: `data: TextStreamResponse` (JSON), then `data: [DONE]`."
    ),
)
async def stream_text(
    body: TextGenerationRequest, service: TextService, services: ServicesDep
) -> EventStreamResponse:
    """Stream text as server-sent events with the cumulative text and the new delta."""
    service.check_model(body.model)
    chunks = service.stream(
        body.to_prompt(services.settings.text_prompt_format),
        body.to_generation_params(),
        request_id=current_request_id(),
    )
    # Pull the first chunk before answering, so that load failures and invalid requests get
    # their status code (503, 400) instead of an error event inside a 200 stream.
    try:
        first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise
    return EventStreamResponse(_text_events(first, chunks, service.model_name))


class _TextEventEncoder:
    """Writes the events of one ``/text/stream`` response and keeps the text so far.

    Per token only the texts are JSON-encoded; the rest of the event is precomputed. The
    cumulative ``text`` the contract asks for makes each event grow with the stream.
    """

    _NOT_DONE = b',"finish_reason":null,"done":false}\n\n'

    def __init__(self, model: str) -> None:
        self.model = model
        self.text = ""
        self.tokens = 0
        self._middle = b',"model":' + json.dumps(model).encode() + b',"tokens_used":'

    def event(self, chunk: TextChunk) -> bytes:
        """The event of one engine chunk."""
        self.text += chunk.delta
        self.tokens = chunk.completion_tokens
        finish = contract_finish_reason(chunk.finish_reason)
        tail = (
            self._NOT_DONE
            if finish is None
            else b',"finish_reason":"' + finish.encode() + b'","done":true}\n\n'
        )
        return (
            b'data: {"text":'
            + encode_json_string(self.text).encode()
            + b',"delta":'
            + encode_json_string(chunk.delta).encode()
            + self._middle
            + str(self.tokens).encode()
            + tail
        )

    def error_event(self, message: str) -> bytes:
        """The last event of a stream that failed after it started."""
        return sse_event(
            {
                "text": self.text,
                "delta": "",
                "model": self.model,
                "tokens_used": self.tokens,
                "finish_reason": "error",
                "done": True,
                "error": message,
            }
        )


async def _text_events(
    first: TextChunk, rest: AsyncGenerator[TextChunk, None], model: str
) -> AsyncGenerator[bytes, None]:
    encoder = _TextEventEncoder(model)
    try:
        yield encoder.event(first)
        async for chunk in rest:
            yield encoder.event(chunk)
    except Exception as exc:
        yield encoder.error_event(stream_failure(exc)[0])
    finally:
        # Closing the service stream aborts the engine request when the client went away.
        await rest.aclose()
    yield DONE_EVENT


@text_router.post(
    "/structured", response_model=StructuredGenerationResponse, dependencies=text_access
)
async def generate_structured_text(
    body: StructuredGenerationRequest,
    request: Request,
    service: TextService,
    services: ServicesDep,
) -> StructuredGenerationResponse:
    """Generate output constrained by a JSON schema, regex, choice list or grammar."""
    service.check_model(body.model)
    prompt = body.to_prompt(services.settings.text_prompt_format)
    outcome = await cancel_on_disconnect(
        request,
        service.generate_structured(
            prompt, body.to_generation_params(), request_id=current_request_id()
        ),
    )
    return StructuredGenerationResponse(
        output=outcome.result.text,
        parsed_output=outcome.parsed,
        model=service.model_name,
        tokens_used=outcome.result.completion_tokens,
        finish_reason=contract_finish_reason(outcome.result.finish_reason) or "stop",
        is_valid=outcome.is_valid,
    )


def _png_data_url(png: bytes) -> str:
    # Its own span: for a large image the base64 step is a visible share of the request.
    with child_span("image.encode", {"fictures.png_bytes": len(png)}):
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@image_router.post("/generate", response_model=ImageGenerationResponse, dependencies=image_access)
async def generate_image(
    body: ImageGenerationRequest, request: Request, service: ImageService
) -> ImageGenerationResponse:
    """Render one image of exactly the requested size; a client that disconnects frees its
    queue place or stops the render."""
    service.check_model(body.model)
    image = await cancel_on_disconnect(request, service.generate(body.to_generation_params()))
    return ImageGenerationResponse(
        image_url=_png_data_url(image.png),
        model=service.info().name,
        width=image.width,
        height=image.height,
        seed=image.seed,
    )


@image_router.post(
    "/stream",
    dependencies=image_access,
    response_class=EventStreamResponse,
    responses=sse_response_doc(
        "Server-sent events: `{step, total_steps, done: false}` (JSON) after each denoising "
        "step, then the image response with `done: true`, then `data: [DONE]`."
    ),
)
async def stream_image(body: ImageGenerationRequest, service: ImageService) -> EventStreamResponse:
    """Render one image, reporting progress per step as server-sent events."""
    service.check_model(body.model)
    return EventStreamResponse(_image_events(service, body))


async def _image_events(
    service: ImageGenerationService, body: ImageGenerationRequest
) -> AsyncGenerator[bytes, None]:
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()

    def progress(step: int, total: int) -> None:  # called from the render thread
        loop.call_soon_threadsafe(steps.put_nowait, (step, total))

    render = asyncio.ensure_future(service.generate(body.to_generation_params(), progress=progress))
    try:
        while not render.done():
            next_step = asyncio.ensure_future(steps.get())
            await asyncio.wait({render, next_step}, return_when=asyncio.FIRST_COMPLETED)
            if next_step.done():
                step, total = next_step.result()
                yield sse_event({"step": step, "total_steps": total, "done": False})
            else:
                next_step.cancel()
        while not steps.empty():  # steps reported just before the render finished
            step, total = steps.get_nowait()
            yield sse_event({"step": step, "total_steps": total, "done": False})
        image = render.result()
        yield sse_event(
            {
                "image_url": _png_data_url(image.png),
                "model": service.info().name,
                "width": image.width,
                "height": image.height,
                "seed": image.seed,
                "done": True,
            }
        )
    except Exception as exc:
        yield sse_event({"error": stream_failure(exc)[0], "done": True})
    finally:
        render.cancel()  # the client went away: leave the queue or stop the render
    yield DONE_EVENT


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
