"""Routes of the OpenAI-compatible surface under ``/v1``, over the same services as ``/api/v1``.

Streaming follows OpenAI: ``data: {chunk}`` events, usage in a last chunk with no choices when
``stream_options.include_usage`` is set, an error event if the stream fails after it started,
and ``data: [DONE]``. Chunks are written from precomputed JSON templates: only the new text is
JSON-encoded per token, which keeps the per-token cost of the HTTP layer small.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from fictures_ai.api.auth import require_scope
from fictures_ai.api.dependencies import (
    Services,
    get_image_service,
    get_services,
    get_text_service,
)
from fictures_ai.api.disconnect import cancel_on_disconnect
from fictures_ai.api.errors import error_responses, stream_failure
from fictures_ai.api.openai.errors import error_body
from fictures_ai.api.openai.protocol import (
    AssistantMessage,
    AssistantToolCall,
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
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
    ToolCallFunction,
    ToolPlan,
    TopLogprob,
    Usage,
)
from fictures_ai.api.sse import DONE_EVENT, EventStreamResponse, encode_json_string
from fictures_ai.engines.base import (
    GeneratedImage,
    ParsedDelta,
    TextChunk,
    TextGenerationParams,
    TextPrompt,
    TokenLogprob,
    ToolCallDelta,
    ToolCallParser,
)
from fictures_ai.errors import InvalidRequestError, ModelNotFoundError
from fictures_ai.observability.context import current_request_id
from fictures_ai.services.fanout import merge_streams
from fictures_ai.services.image_generation import ImageGenerationService
from fictures_ai.services.text_generation import TextGenerationService
from fictures_ai.services.tool_calls import (
    FirstCallParser,
    NamedToolCallParser,
    RequiredToolCallParser,
    named_tool_call_spec,
    new_tool_call_id,
)

logger = logging.getLogger(__name__)

OpenAIFinishReason = Literal["stop", "length", "tool_calls"]

_ERRORS = error_responses(ErrorResponse, include_422=True)
models_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)
text_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)
image_router = APIRouter(prefix="/v1", tags=["openai"], responses=_ERRORS)
tokenizer_router = APIRouter(tags=["openai"], responses=_ERRORS)
"""vLLM's ``/tokenize`` and ``/detokenize``, at vLLM's paths (outside ``/v1``)."""

TextService = Annotated[TextGenerationService, Depends(get_text_service)]
ImageService = Annotated[ImageGenerationService, Depends(get_image_service)]
ServicesDep = Annotated[Services, Depends(get_services)]
# Model listings: any valid key (api-contract.md, "Authentication").
listing_access = [Depends(require_scope(None))]
text_access = [Depends(require_scope("stories:write", model="body"))]
image_access = [Depends(require_scope("stories:write", images="n", model="image"))]


@models_router.get("/models", response_model=ModelList, dependencies=listing_access)
async def list_models(services: ServicesDep) -> ModelList:
    """The text and image models this server serves (per ``GENERATION_MODE``)."""
    created = int(time.time())
    names = []
    if services.text is not None:
        names.append(services.text.model_name)
    if services.image is not None:
        names.append(services.image.info().name)
    return ModelList(data=[Model(id=name, created=created) for name in names])


@models_router.get("/models/{model}", response_model=Model, dependencies=listing_access)
async def retrieve_model(model: str, services: ServicesDep) -> Model:
    """One served model (``client.models.retrieve``); 404 ``model_not_found`` otherwise."""
    served = {}
    if services.text is not None:
        served[services.text.model_name] = "text"
    if services.image is not None:
        served[services.image.info().name] = "image"
    if model not in served:
        raise ModelNotFoundError(model, kind="served", available=list(served))
    return Model(id=model, created=int(time.time()))


@dataclass
class _Choice:
    """What one choice has produced so far; with a tool-call parser, its text is split into
    content and calls as it comes."""

    parser: ToolCallParser | None = None
    text: list[str] = field(default_factory=list)
    calls: list[AssistantToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: OpenAIFinishReason | None = None

    def add(self, chunk: TextChunk) -> None:
        if self.parser is None:
            self.text.append(chunk.delta)
        else:
            parsed = _parse(self.parser, chunk)
            self.text.append(parsed.content)
            for piece in parsed.tool_calls:
                if piece.name is not None:
                    self.calls.append(
                        AssistantToolCall(
                            id=piece.id or new_tool_call_id(),
                            function=ToolCallFunction(name=piece.name, arguments=""),
                        )
                    )
                if piece.arguments and piece.index < len(self.calls):
                    self.calls[piece.index].function.arguments += piece.arguments
        if chunk.logprobs:
            self.logprobs.extend(chunk.logprobs)
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        self.finish_reason = _finish_reason(chunk, self.parser if self.calls else None)

    def message(self) -> AssistantMessage:
        """The choice's message: no content but calls when it only called tools."""
        content = "".join(self.text)
        return AssistantMessage(
            content=content if content or not self.calls else None,
            tool_calls=self.calls or None,
        )


def _parse(parser: ToolCallParser, chunk: TextChunk) -> ParsedDelta:
    """The parser's reading of ``chunk``, with what it still held if the chunk is the last."""
    parsed = parser.feed(chunk)
    if chunk.finish_reason is None:
        return parsed
    rest = parser.finish()
    return ParsedDelta(parsed.content + rest.content, parsed.tool_calls + rest.tool_calls)


def _finish_reason(
    chunk: TextChunk, caller: ToolCallParser | None = None
) -> OpenAIFinishReason | None:
    # OpenAI knows stop and length; an aborted request is cut short like one at its limit.
    # ``caller``: the parser that read calls in this choice; it says how such a choice ends.
    if chunk.finish_reason is None:
        return None
    if chunk.finish_reason != "stop":
        return "length"
    return "stop" if caller is None else caller.finish_reason


def _usage(choices: list[_Choice], prompts: int) -> Usage:
    # Every choice of a prompt repeats the prompt; usage counts each prompt once, as OpenAI does.
    per_prompt = len(choices) // prompts
    prompt_tokens = sum(choices[i * per_prompt].prompt_tokens for i in range(prompts))
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def _open_streams(
    service: TextGenerationService,
    prompts: list[TextPrompt],
    params: list[TextGenerationParams],
    request_id: str,
) -> AsyncGenerator[tuple[int, TextChunk], None]:
    # Engine request ids carry the HTTP request id, so that logs and aborts line up.
    base = current_request_id() or request_id
    streams = [
        service.stream(prompt, choice_params, request_id=f"{base}-{p}-{c}")
        for p, prompt in enumerate(prompts)
        for c, choice_params in enumerate(params)
    ]
    return merge_streams(streams)


async def _collect(
    streams: AsyncGenerator[tuple[int, TextChunk], None],
    count: int,
    parsers: list[ToolCallParser] | None = None,
) -> list[_Choice]:
    choices = [_Choice(parser=parsers[index] if parsers else None) for index in range(count)]
    async for index, chunk in streams:
        choices[index].add(chunk)
    return choices


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


def _chat_logprobs(entries: list[TokenLogprob]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(
        content=[
            ChatTokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=list(entry.token.encode()),
                top_logprobs=[
                    TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
                    for token, logprob in entry.top
                ],
            )
            for entry in entries
        ]
    )


def _completion_logprobs(entries: list[TokenLogprob]) -> CompletionLogprobs:
    offsets, position = [], 0
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[entry.logprob for entry in entries],
        top_logprobs=[dict(entry.top) for entry in entries],
        text_offset=offsets,
    )


@text_router.post(
    "/chat/completions", response_model=ChatCompletionResponse, dependencies=text_access
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, service: TextService
) -> Any:
    """Chat with the text model; ``stream: true`` answers with server-sent events.

    With ``tools``, calls come back as OpenAI's ``tool_calls``: forced by structured output
    for ``tool_choice`` required or a named function, read by ``TEXT_TOOL_CALL_PARSER``'s
    parser for auto.
    """
    model = service.check_model(body.model)
    plan = body.tool_plan()
    params = body.to_generation_params(plan)
    parsers = await _tool_call_parsers(service, plan, len(params))
    if parsers and not parsers[0].skip_special_tokens:
        params = [replace(choice, skip_special_tokens=False) for choice in params]
    prompts = [TextPrompt(messages=body.to_messages(), tools=plan.tools)]
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = _open_streams(service, prompts, params, request_id)
    try:
        if body.streams:
            encoder = _ChunkEncoder(
                request_id,
                model,
                chat=True,
                usage=body.include_usage,
                count=len(params),
                parsers=parsers,
            )
            return await _stream_response(streams, encoder)
        choices = await cancel_on_disconnect(request, _collect(streams, len(params), parsers))
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
                logprobs=_chat_logprobs(choice.logprobs) if body.logprobs else None,
                finish_reason=choice.finish_reason,
            )
            for index, choice in enumerate(choices)
        ],
        usage=_usage(choices, 1),
    )


@text_router.post("/completions", response_model=CompletionResponse, dependencies=text_access)
async def create_completion(body: CompletionRequest, request: Request, service: TextService) -> Any:
    """Continue a prompt as it is (no chat template); ``stream: true`` streams it."""
    model = service.check_model(body.model)
    params = body.to_generation_params()
    prompts = body.prompts()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams = _open_streams(service, prompts, params, request_id)
    count = len(prompts) * len(params)
    if body.streams:
        encoder = _ChunkEncoder(
            request_id, model, chat=False, usage=body.include_usage, count=count
        )
        return await _stream_response(streams, encoder, prompts=len(prompts))
    choices = await cancel_on_disconnect(request, _collect(streams, count))
    return CompletionResponse(
        id=request_id,
        created=int(time.time()),
        model=model,
        choices=[
            CompletionChoice(
                index=index,
                text="".join(choice.text),
                logprobs=(
                    _completion_logprobs(choice.logprobs) if body.logprobs is not None else None
                ),
                finish_reason=choice.finish_reason,
            )
            for index, choice in enumerate(choices)
        ],
        usage=_usage(choices, len(prompts)),
    )


class _ChunkEncoder:
    """Writes the SSE events of one streamed completion from precomputed JSON pieces.

    It also keeps each choice's token counts (not its text), for the usage chunk at the end.
    """

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        chat: bool,
        usage: bool,
        count: int,
        parsers: list[ToolCallParser] | None = None,
    ) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            f'data: {{"id":"{request_id}","object":"{obj}","created":{int(time.time())},'
            f'"model":{json.dumps(model)},"choices":['
        ).encode()
        self._tail = b'],"usage":null}\n\n' if usage else b"]}\n\n"
        self.chat = chat
        self.usage = usage
        self._started = [False] * count
        self._choices = [_Choice() for _ in range(count)]
        self._parsers = parsers
        self._called = [False] * count

    def chunk(self, index: int, chunk: TextChunk) -> bytes:
        """One event for one engine chunk of choice ``index`` (log-probs when it has them);
        empty when a tool-call parser holds the chunk's text back."""
        counts = self._choices[index]
        counts.prompt_tokens = chunk.prompt_tokens
        counts.completion_tokens = chunk.completion_tokens
        logprobs_json = "null"
        if chunk.logprobs:
            entries = list(chunk.logprobs)
            model = _chat_logprobs(entries) if self.chat else _completion_logprobs(entries)
            logprobs_json = model.model_dump_json()
        if self._parsers is not None:
            return self._tool_chunk(index, chunk, logprobs_json)
        text = encode_json_string(chunk.delta)
        finish = _finish_reason(chunk)
        finish_json = "null" if finish is None else f'"{finish}"'
        if self.chat:
            if self._started[index]:
                role = ""
            else:
                role = '"role":"assistant",'
                self._started[index] = True
            choice = (
                f'{{"index":{index},"delta":{{{role}"content":{text}}},'
                f'"logprobs":{logprobs_json},"finish_reason":{finish_json}}}'
            )
        else:
            choice = (
                f'{{"index":{index},"text":{text},"logprobs":{logprobs_json},'
                f'"finish_reason":{finish_json}}}'
            )
        return self._head + choice.encode() + self._tail

    def _tool_chunk(self, index: int, chunk: TextChunk, logprobs_json: str) -> bytes:
        """A chat chunk of a request that may call tools: content and OpenAI's tool-call
        deltas (index, id, type and name first; then argument pieces)."""
        assert self._parsers is not None
        parser = self._parsers[index]
        parsed = _parse(parser, chunk)
        self._called[index] = self._called[index] or any(p.name for p in parsed.tool_calls)
        finish = _finish_reason(chunk, parser if self._called[index] else None)
        delta: dict[str, Any] = {}
        if not self._started[index]:
            delta["role"] = "assistant"
            self._started[index] = True
        if parsed.content:
            delta["content"] = parsed.content
        if parsed.tool_calls:
            delta["tool_calls"] = [_tool_call_delta(piece) for piece in parsed.tool_calls]
        if not delta and finish is None and logprobs_json == "null":
            return b""
        choice = (
            f'{{"index":{index},"delta":{json.dumps(delta)},"logprobs":{logprobs_json},'
            f'"finish_reason":{json.dumps(finish)}}}'
        )
        return self._head + choice.encode() + self._tail

    def usage_chunk(self, prompts: int) -> bytes:
        """The last chunk when usage was asked for: no choices, the request's token counts."""
        usage = _usage(self._choices, prompts)
        return self._head + b'],"usage":' + usage.model_dump_json().encode() + b"}\n\n"


def _tool_call_delta(piece: ToolCallDelta) -> dict[str, Any]:
    if piece.name is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {
        "index": piece.index,
        "id": piece.id or new_tool_call_id(),
        "type": "function",
        "function": {"name": piece.name, "arguments": piece.arguments},
    }


async def _stream_response(
    streams: AsyncGenerator[tuple[int, TextChunk], None],
    encoder: _ChunkEncoder,
    *,
    prompts: int = 1,
) -> EventStreamResponse:
    # Errors before the first token (bad request, model not loadable) keep their status code.
    try:
        first = await anext(streams)
    except BaseException:
        await streams.aclose()
        raise
    return EventStreamResponse(_events(first, streams, encoder, prompts))


async def _events(
    first: tuple[int, TextChunk],
    rest: AsyncGenerator[tuple[int, TextChunk], None],
    encoder: _ChunkEncoder,
    prompts: int,
) -> AsyncGenerator[bytes, None]:
    try:
        yield encoder.chunk(*first)
        async for index, chunk in rest:
            event = encoder.chunk(index, chunk)
            if event:
                yield event
        if encoder.usage:
            yield encoder.usage_chunk(prompts)
    except Exception as exc:
        message, status = stream_failure(exc)
        yield b"data: " + json.dumps(error_body(message, status)).encode() + b"\n\n"
    finally:
        await rest.aclose()  # aborts the engine requests when the client went away
    yield DONE_EVENT


@image_router.post("/images/generations", response_model=ImagesResponse, dependencies=image_access)
async def create_image(
    body: ImageGenerationRequest, request: Request, service: ImageService, services: ServicesDep
) -> ImagesResponse:
    """Render ``n`` images of exactly ``size``; answer with URLs (kept for a while) or base64
    PNGs."""
    service.check_model(body.model)
    params = body.to_generation_params()

    async def render_all() -> list[GeneratedImage]:
        return list(await asyncio.gather(*(service.generate(p) for p in params)))

    images = await cancel_on_disconnect(request, render_all())
    data = []
    for image in images:
        if body.wants_base64:
            data.append(ImageData(b64_json=base64.b64encode(image.png).decode(), seed=image.seed))
        else:
            token = services.image_store.put(image.png)
            url = str(request.url_for("get_generated_image", token=token))
            data.append(ImageData(url=url, seed=image.seed))
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
async def tokenize(body: TokenizeRequest, service: TextService) -> TokenizeResponse:
    """The token ids of a prompt or a conversation, as the generation routes count them (so a
    client can check a long story against the context window before sending it)."""
    service.check_model(body.model)
    tokens = await service.tokenize(body.to_prompt())
    return TokenizeResponse(
        count=len(tokens), max_model_len=service.info().max_model_len, tokens=tokens
    )


@tokenizer_router.post(
    "/detokenize", response_model=DetokenizeResponse, dependencies=listing_access
)
async def detokenize(body: DetokenizeRequest, service: TextService) -> DetokenizeResponse:
    """The text of token ids."""
    service.check_model(body.model)
    return DetokenizeResponse(prompt=await service.detokenize(body.tokens))
