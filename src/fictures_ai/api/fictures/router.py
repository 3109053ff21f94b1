"""Routes of the Fictures surface: system endpoints and ``/api/v1/text/...``."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from fictures_ai import __version__
from fictures_ai.api.dependencies import (
    Services,
    get_services,
    get_text_service,
    require_scope,
)
from fictures_ai.api.fictures.protocol import (
    HealthModels,
    HealthResponse,
    ModelsResponse,
    RootResponse,
    StructuredGenerationRequest,
    StructuredGenerationResponse,
    TextGenerationRequest,
    TextGenerationResponse,
    TextModelEntry,
    TextModelInfo,
    TextModelsResponse,
    TextStreamResponse,
    contract_finish_reason,
)
from fictures_ai.api.sse import DONE_EVENT, SSE_HEADERS, SSE_MEDIA_TYPE, sse_event
from fictures_ai.engines.base import TextChunk
from fictures_ai.errors import FicturesError
from fictures_ai.services.text_generation import TextGenerationService

logger = logging.getLogger(__name__)

DESCRIPTION = "Self-hosted text (vLLM) and image (diffusers) generation for Fictures."

system_router = APIRouter(tags=["system"])
router = APIRouter(prefix="/api/v1")

TextService = Annotated[TextGenerationService, Depends(get_text_service)]
ServicesDep = Annotated[Services, Depends(get_services)]
read_access = [Depends(require_scope("stories:read"))]
write_access = [Depends(require_scope("stories:write"))]


def _text_info(service: TextGenerationService) -> TextModelInfo:
    info = service.info()
    return TextModelInfo(
        name=info.name, max_tokens=info.max_model_len, initialized=info.initialized
    )


@system_router.get("/", response_model=RootResponse)
async def describe_server() -> RootResponse:
    """Name, version and the main links of the server."""
    return RootResponse(version=__version__, description=DESCRIPTION)


@system_router.get("/health", response_model=HealthResponse)
async def check_health(services: ServicesDep) -> HealthResponse:
    """Answers at once, also while models load; ``initialized`` says whether they have."""
    return HealthResponse(version=__version__, models=HealthModels(text=_text_info(services.text)))


@router.get("/models", response_model=ModelsResponse, dependencies=read_access, tags=["models"])
async def list_models(services: ServicesDep) -> ModelsResponse:
    """Every model this server serves."""
    return ModelsResponse(text_generation=[_text_info(services.text)], image_generation=[])


@router.get(
    "/text/models", response_model=TextModelsResponse, dependencies=read_access, tags=["text"]
)
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


@router.post(
    "/text/generate",
    response_model=TextGenerationResponse,
    dependencies=write_access,
    tags=["text"],
)
async def generate_text(
    body: TextGenerationRequest, service: TextService, services: ServicesDep
) -> TextGenerationResponse:
    """Generate text and return it whole."""
    result = await service.generate(
        body.to_prompt(services.settings.text_prompt_format), body.to_generation_params()
    )
    return TextGenerationResponse(
        text=result.text,
        model=service.model_name,
        tokens_used=result.completion_tokens,
        finish_reason=contract_finish_reason(result.finish_reason) or "stop",
    )


@router.post(
    "/text/stream",
    dependencies=write_access,
    tags=["text"],
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events: `data: TextStreamResponse`, then `data: [DONE]`.",
            "content": {SSE_MEDIA_TYPE: {"schema": TextStreamResponse.model_json_schema()}},
        }
    },
)
async def stream_text(
    body: TextGenerationRequest, service: TextService, services: ServicesDep
) -> StreamingResponse:
    """Stream text as server-sent events with the cumulative text and the new delta."""
    chunks = service.stream(
        body.to_prompt(services.settings.text_prompt_format), body.to_generation_params()
    )
    # Pull the first chunk before answering, so that load failures and invalid requests get
    # their status code (503, 400) instead of an error event inside a 200 stream.
    try:
        first = await anext(chunks)
    except BaseException:
        await chunks.aclose()
        raise
    return StreamingResponse(
        _text_events(first, chunks, service.model_name),
        media_type=SSE_MEDIA_TYPE,
        headers=SSE_HEADERS,
    )


async def _text_events(
    first: TextChunk, rest: AsyncGenerator[TextChunk, None], model: str
) -> AsyncIterator[bytes]:
    parts: list[str] = []
    tokens = 0
    chunk: TextChunk | None = first
    try:
        while chunk is not None:
            parts.append(chunk.delta)
            tokens = chunk.completion_tokens
            event: dict[str, Any] = {
                "text": "".join(parts),
                "delta": chunk.delta,
                "model": model,
                "tokens_used": tokens,
                "finish_reason": contract_finish_reason(chunk.finish_reason),
                "done": chunk.finish_reason is not None,
            }
            yield sse_event(event)
            chunk = await anext(rest, None)
    except FicturesError as exc:
        logger.error("Text stream failed after it started: %s", exc.message, exc_info=exc)
        yield sse_event(
            {
                "text": "".join(parts),
                "delta": "",
                "model": model,
                "tokens_used": tokens,
                "finish_reason": "error",
                "done": True,
                "error": exc.message,
            }
        )
    finally:
        # Closing the service stream aborts the engine request when the client went away.
        await rest.aclose()
    yield DONE_EVENT


@router.post(
    "/text/structured",
    response_model=StructuredGenerationResponse,
    dependencies=write_access,
    tags=["text"],
)
async def generate_structured_text(
    body: StructuredGenerationRequest, service: TextService, services: ServicesDep
) -> StructuredGenerationResponse:
    """Generate output constrained by a JSON schema, regex, choice list or grammar."""
    params = body.to_generation_params()
    outcome = await service.generate_structured(
        body.to_prompt(services.settings.text_prompt_format), params
    )
    return StructuredGenerationResponse(
        output=outcome.result.text,
        parsed_output=outcome.parsed,
        model=service.model_name,
        tokens_used=outcome.result.completion_tokens,
        finish_reason=contract_finish_reason(outcome.result.finish_reason) or "stop",
        is_valid=outcome.is_valid,
    )
