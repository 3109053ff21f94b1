"""Routes of the OpenAI-compatible surface under ``/v1``, over the same services as ``/api/v1``.

Streaming follows OpenAI: ``data: {chunk}`` events, usage in a last chunk with no choices when
``stream_options.include_usage`` is set, an error event if the stream fails after it started,
and ``data: [DONE]``; the chunks are written by ``api/openai/encoding.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fictures_ai.api.auth import Client, require_scope
from fictures_ai.api.cache_control import caller_ticket, report_cache
from fictures_ai.api.dependencies import Services, get_models, get_services
from fictures_ai.api.disconnect import cancel_on_disconnect
from fictures_ai.api.errors import error_responses
from fictures_ai.api.model_views import requested_loras, state_fields, with_model_defaults
from fictures_ai.api.openai.encoding import (
    ChunkEncoder,
    chat_logprobs,
    collect_choices,
    completion_logprobs,
    usage,
)
from fictures_ai.api.openai.errors import error_body
from fictures_ai.api.openai.protocol import (
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    Model,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    ToolPlan,
)
from fictures_ai.api.sse import EventStreamResponse, stream_events
from fictures_ai.engines.base import (
    INTERACTIVE_PRIORITY,
    GeneratedImage,
    TextChunk,
    TextGenerationParams,
    TextPrompt,
    ToolCallParser,
)
from fictures_ai.errors import InvalidRequestError
from fictures_ai.observability.context import current_request_id
from fictures_ai.services.fanout import merge_streams
from fictures_ai.services.models.registry import ModelRegistry, ModelStatus
from fictures_ai.services.response_cache import CacheTicket
from fictures_ai.services.text_generation import TextGenerationService
from fictures_ai.services.tool_calls import (
    FirstCallParser,
    NamedToolCallParser,
    RequiredToolCallParser,
    named_tool_call_spec,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

_ERRORS = error_responses(ErrorResponse, include_422=True)
models_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)
text_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)
image_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)
tokenizer_router = APIRouter(tags=["openai"], responses=_ERRORS)
"""vLLM's ``/tokenize`` and ``/detokenize``, at vLLM's paths (outside ``/v1``)."""

ServicesDep = Annotated[Services, Depends(get_services)]
ModelsDep = Annotated[ModelRegistry, Depends(get_models)]
# Model listings: any valid key (api-contract.md, "Authentication").
listing_access = [Depends(require_scope(None))]
# Generation: the route admits the request once the body is parsed (model, images).
Caller = Annotated[Client, Depends(require_scope("stories:write", admit=False))]

TEXT_DEFAULT_FIELDS = {"max_tokens": ("max_tokens", "max_completion_tokens")}
"""A text model's defaults (models file) by the OpenAI requests' field names."""
IMAGE_DEFAULT_FIELDS = {"num_inference_steps": ("steps",)}


def _model_card(status: ModelStatus, created: int) -> Model:
    return Model(
        id=status.name,
        created=created,
        root=status.source,
        max_model_len=status.max_model_len,
        kind=status.kind,
        **state_fields(status),
    )


@models_router.get("/models", response_model=ModelList, dependencies=listing_access)
async def list_models(models: ModelsDep) -> ModelList:
    """Every model this server serves (adapters with their ``parent``), with its state."""
    created = int(time.time())
    return ModelList(data=[_model_card(status, created) for status in models.statuses()])


@models_router.get("/models/{model:path}", response_model=Model, dependencies=listing_access)
async def retrieve_model(model: str, models: ModelsDep) -> Model:
    """One served model, by name or alias (``client.models.retrieve``); 404
    ``model_not_found`` otherwise."""
    return _model_card(models.status(models.find(model)), int(time.time()))


def _open_streams(
    service: TextGenerationService,
    prompts: list[TextPrompt],
    params: list[TextGenerationParams],
    request_id: str,
    cache: CacheTicket | None,
) -> AsyncGenerator[tuple[int, TextChunk], None]:
    # Engine request ids carry the HTTP request id, so that logs and aborts line up.
    base = current_request_id() or request_id
    streams = [
        service.stream(prompt, choice_params, request_id=f"{base}-{p}-{c}", cache=cache)
        for p, prompt in enumerate(prompts)
        for c, choice_params in enumerate(params)
    ]
    return merge_streams(streams)


async def _name_the_tool(
    service: TextGenerationService, plan: ToolPlan, refusal: InvalidRequestError
) -> None:
    """The engine refused the schema built from the tools: find the tool whose parameters it
    cannot enforce and say so (the refusal stands as it is if each tool passes alone)."""
    for index, tool in enumerate(plan.tools):
        try:
            await service.check_structured(named_tool_call_spec(tool))
        except InvalidRequestError as exc:
            raise InvalidRequestError(
                f"tools[{index}] ('{tool.name}'): its parameters schema cannot be enforced "
                f"while sampling: {exc.message}",
                param=f"tools[{index}].function.parameters",
            ) from refusal


async def _tool_call_parsers(
    service: TextGenerationService, plan: ToolPlan, count: int
) -> list[ToolCallParser] | None:
    """One parser per choice for a request that may call tools, else None."""
    if plan.choice == "required":
        return [RequiredToolCallParser() for _ in range(count)]
    if plan.choice == "named" and plan.name is not None:
        return [NamedToolCallParser(plan.name) for _ in range(count)]
    if plan.choice == "auto":
        parsers = [await service.tool_call_parser(plan.tools) for _ in range(count)]
        return parsers if plan.parallel else [FirstCallParser(parser) for parser in parsers]
    return None


Admit = Callable[[str], Awaitable[None]]
"""Admits a request for a model once its body is parsed: ``Client.admit`` for a route (model
allow-list and per-minute budgets), the job's key's allow-list for a batch line."""


async def _until_done(request: Request | None, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result; cancelled when the client of ``request`` disconnects (a batch line,
    without a request, runs until done or cancelled with its batch)."""
    if request is None:
        return await work
    return await cancel_on_disconnect(request, work)


@text_router.post("/chat/completions", response_model=ChatCompletionResponse)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, caller: Caller, models: ModelsDep
) -> Any:
    """Chat with the text model; ``stream: true`` answers with server-sent events.

    With ``tools``, calls come back as OpenAI's ``tool_calls``: forced by structured output
    for ``tool_choice`` required or a named function, read by ``TEXT_TOOL_CALL_PARSER``'s
    parser for auto.
    """
    return await chat_completion(
        body,
        models,
        admit=lambda model: caller.admit(model=model),
        request=request,
        cache=caller_ticket(request, caller, deterministic=body.deterministic),
    )


async def chat_completion(
    body: ChatCompletionRequest,
    models: ModelRegistry,
    *,
    admit: Admit,
    request: Request | None,
    priority: int = INTERACTIVE_PRIORITY,
    cache: CacheTicket | None = None,
) -> ChatCompletionResponse | EventStreamResponse:
    """Answer ``body`` as ``POST /v1/chat/completions`` does (a stream when it asks for one),
    with the engine ``priority`` and the response ``cache`` ticket; raises what the route
    answers as errors."""
    target = models.text(body.model)
    body = with_model_defaults(body, target.defaults, TEXT_DEFAULT_FIELDS)
    model, service = target.name, target.service
    plan = body.tool_plan()
    params = [
        replace(target.params(choice), priority=priority)
        for choice in body.to_generation_params(plan)
    ]
    parsers = await _tool_call_parsers(service, plan, len(params))
    if parsers and not parsers[0].skip_special_tokens:
        params = [replace(choice, skip_special_tokens=False) for choice in params]
    prompts = [TextPrompt(messages=body.to_messages(), tools=plan.tools)]
    await admit(model)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = _open_streams(service, prompts, params, request_id, cache)
    try:
        if body.streams:
            encoder = ChunkEncoder(
                request_id,
                model,
                chat=True,
                usage=body.include_usage,
                count=len(params),
                parsers=parsers,
            )
            response = await stream_events(streams, encoder)
            report_cache(cache)
            return response
        choices = await _until_done(request, collect_choices(streams, len(params), parsers))
        report_cache(cache)
    except InvalidRequestError as exc:
        if plan.structured() is not None and exc.param is None:
            await _name_the_tool(service, plan, exc)
        if exc.param == "prompt":  # a chat request's prompt is its messages
            exc.param = "messages"
        raise
    return ChatCompletionResponse(
        id=request_id,
        created=int(time.time()),
        model=model,
        choices=[
            ChatCompletionChoice(
                index=index,
                message=choice.message(),
                logprobs=chat_logprobs(choice.logprobs) if body.logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for index, choice in enumerate(choices)
        ],
        usage=usage(choices, 1),
    )


@text_router.post("/completions", response_model=CompletionResponse)
async def create_completion(
    body: CompletionRequest, request: Request, caller: Caller, models: ModelsDep
) -> Any:
    """Continue a prompt as it is (no chat template); ``stream: true`` streams it."""
    return await completion(
        body,
        models,
        admit=lambda model: caller.admit(model=model),
        request=request,
        cache=caller_ticket(request, caller, deterministic=body.deterministic),
    )


async def completion(
    body: CompletionRequest,
    models: ModelRegistry,
    *,
    admit: Admit,
    request: Request | None,
    priority: int = INTERACTIVE_PRIORITY,
    cache: CacheTicket | None = None,
) -> CompletionResponse | EventStreamResponse:
    """Answer ``body`` as ``POST /v1/completions`` does, with the engine ``priority`` and
    the response ``cache`` ticket."""
    target = models.text(body.model)
    body = with_model_defaults(body, target.defaults, TEXT_DEFAULT_FIELDS)
    model, service = target.name, target.service
    params = [
        replace(target.params(choice), priority=priority) for choice in body.to_generation_params()
    ]
    prompts = body.prompts()
    await admit(model)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = _open_streams(service, prompts, params, request_id, cache)
    count = len(prompts) * len(params)
    if body.streams:
        encoder = ChunkEncoder(
            request_id,
            model,
            chat=False,
            usage=body.include_usage,
            count=count,
            prompts=len(prompts),
        )
        response = await stream_events(streams, encoder)
        report_cache(cache)
        return response
    choices = await _until_done(request, collect_choices(streams, count))
    report_cache(cache)
    return CompletionResponse(
        id=request_id,
        created=int(time.time()),
        model=model,
        choices=[
            CompletionChoice(
                index=index,
                text="".join(choice.text),
                logprobs=(
                    completion_logprobs(choice.logprobs) if body.logprobs is not None else None
                ),
                finish_reason=choice.finish_reason,
            )
            for index, choice in enumerate(choices)
        ],
        usage=usage(choices, len(prompts)),
    )


@image_router.post("/images/generations", response_model=ImagesResponse)
async def create_image(
    body: ImageGenerationRequest, request: Request, caller: Caller, services: ServicesDep
) -> ImagesResponse:
    """Render ``n`` images of exactly ``size``; answer with URLs (kept for a while) or base64
    PNGs."""

    async def keep(png: bytes) -> str:
        token = services.image_store.put(png)
        return str(request.url_for("get_generated_image", token=token))

    return await image_generation(
        body,
        services.models,
        admit=lambda model, images: caller.admit(model=model, images=images),
        request=request,
        keep=keep,
        cache=caller_ticket(request, caller, deterministic=body.deterministic),
    )


async def image_generation(
    body: ImageGenerationRequest,
    models: ModelRegistry,
    *,
    admit: Callable[[str, int], Awaitable[None]],
    request: Request | None,
    keep: Callable[[bytes], Awaitable[str]],
    priority: int = INTERACTIVE_PRIORITY,
    cache: CacheTicket | None = None,
) -> ImagesResponse:
    """Answer ``body`` as ``POST /v1/images/generations`` does; ``keep`` stores a PNG and
    returns its URL (for ``response_format: url``); ``priority`` orders the render queue;
    ``cache`` is the response cache ticket (each image is looked up and kept alone: the
    answer is a hit when every image was)."""
    target = models.image(body.model)
    body = with_model_defaults(body, target.defaults, IMAGE_DEFAULT_FIELDS)
    loras = requested_loras(body.loras)
    params = [target.params(choice, loras) for choice in body.to_generation_params()]
    await admit(target.name, len(params))

    async def render_all() -> list[GeneratedImage]:
        return list(
            await asyncio.gather(
                *(target.service.generate(p, priority=priority, cache=cache) for p in params)
            )
        )

    images = await _until_done(request, render_all())
    report_cache(cache)
    data = []
    for image in images:
        if body.wants_base64:
            data.append(ImageData(b64_json=base64.b64encode(image.png).decode(), seed=image.seed))
        else:
            data.append(ImageData(url=await keep(image.png), seed=image.seed))
    return ImagesResponse(created=int(time.time()), data=data)


@image_router.get("/images/files/{token}", include_in_schema=False)
async def get_generated_image(token: str, services: ServicesDep) -> Response:
    """A PNG stored for a URL answer; 404 once it expired. The token is the permission."""
    png = services.image_store.get(token)
    if png is None:
        return Response(
            json.dumps(error_body("This image does not exist or has expired.", 404)),
            status_code=404,
            media_type="application/json",
        )
    ttl = int(services.image_store.ttl_s)
    return Response(
        png, media_type="image/png", headers={"Cache-Control": f"private, max-age={ttl}"}
    )


@tokenizer_router.post("/tokenize", response_model=TokenizeResponse, dependencies=listing_access)
async def tokenize(body: TokenizeRequest, models: ModelsDep) -> TokenizeResponse:
    """The token ids of a prompt or a conversation, as the generation routes count them (so a
    client can check a long story against the context window before sending it)."""
    service = models.text(body.model).service
    tokens = await service.tokenize(body.to_prompt())
    return TokenizeResponse(
        count=len(tokens), max_model_len=service.info().max_model_len, tokens=tokens
    )


@tokenizer_router.post(
    "/detokenize", response_model=DetokenizeResponse, dependencies=listing_access
)
async def detokenize(body: DetokenizeRequest, models: ModelsDep) -> DetokenizeResponse:
    """The text of token ids."""
    service = models.text(body.model).service
    return DetokenizeResponse(prompt=await service.detokenize(body.tokens))
