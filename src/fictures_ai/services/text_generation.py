"""``TextGenerationService``: lazy loading, generation, streaming and structured output.

The service owns the text engine's life cycle (load on first use, restart after the engine
dies, shut down with the app) and the per-request bookkeeping (request ids, accumulating the
text of a non-streaming request, validating structured output). It knows nothing of HTTP.

Its stream sees every chunk, so it is where text metrics are observed: time to first token,
inter-token latency, tokens, outcomes (``observability.metrics``), the ``text.generate`` span,
and the token counts of the request's access-log line. Per chunk that costs one clock read
and one histogram observation; everything else happens once per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, replace
from typing import Any

import jsonschema
from opentelemetry.trace import Span

from fictures_ai.engines.base import (
    FinishReason,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextPrompt,
    ToolCallParser,
    ToolDefinition,
    merge_chunks,
)
from fictures_ai.errors import (
    EngineDeadError,
    GenerationTimeoutError,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
)
from fictures_ai.observability.context import LoggedPrompt, RequestContext, current_request
from fictures_ai.observability.metrics import HistogramTally, Metrics, TextMetrics
from fictures_ai.observability.tracing import end_span, start_child_span
from fictures_ai.services.model_loader import LOAD_RETRY_AFTER_S, LazyModel, ModelLoadInfo
from fictures_ai.services.response_cache import CacheTicket, ResponseCache
from fictures_ai.shared import EngineStats

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TextResult:
    """The whole output of a non-streaming request."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True, slots=True)
class StructuredResult:
    """Output of a constrained request, with the parsed value and whether it validates."""

    result: TextResult
    parsed: Any
    is_valid: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class TextServiceInfo(ModelLoadInfo):
    """What ``/health`` and the model listings say about the text model."""

    name: str
    max_model_len: int
    initialized: bool
    running: int = 0
    """Requests handed to the engine and not finished (vLLM's own queue included)."""
    engine_stats: EngineStats | None = None
    """What the loaded engine's scheduler reports (None: not loaded, or it reports nothing)."""


def _cached_size(chunk: TextChunk) -> int:
    """What a cached answer costs, roughly: its text, token ids and log-probabilities."""
    size = len(chunk.delta.encode()) + 8 * len(chunk.token_ids)
    for item in chunk.logprobs or ():
        size += 64 + len(item.token.encode()) + sum(64 + len(top) for top, _ in item.top)
    return size


def _loggable_prompt(prompt: TextPrompt) -> LoggedPrompt:
    """The prompt as the access line shows it (built only when prompts may be logged)."""
    if prompt.text is not None:
        return prompt.text
    return [{"role": message.role, "content": message.content} for message in prompt.messages or ()]


class TextGenerationService:
    """Serves text generation from one lazily loaded ``TextEngine``."""

    def __init__(
        self,
        *,
        model_name: str,
        max_model_len: int,
        loader: Callable[[], Awaitable[TextEngine]],
        max_pending: int | None = None,
        timeout_s: float | None = None,
        response_cache_bytes: int = 0,
    ) -> None:
        """``max_pending`` bounds the requests running or waiting at once (beyond it: 429, or
        503 while the model loads); ``timeout_s`` aborts a generation that runs longer;
        ``response_cache_bytes`` bounds the answers kept for deterministic requests (0:
        none, see ``services.response_cache``)."""
        self._model = LazyModel(name=model_name, loader=loader, retry_after=LOAD_RETRY_AFTER_S)
        self._cache: ResponseCache[TextChunk] = ResponseCache(
            max_bytes=response_cache_bytes, size_of=_cached_size
        )
        self._model.on_engine_change.append(self._cache.clear)
        self._max_pending = max_pending
        self._timeout_s = timeout_s
        self._configured_max_model_len = max_model_len
        self._metrics: TextMetrics | None = None
        self._active_ids: set[str] = set()
        self._adapter_requests: Counter[int] = Counter()
        self._tasks: set[asyncio.Future[None]] = set()

    def instrument(self, metrics: Metrics) -> None:
        """Record this service's figures in ``metrics`` (the app's registry) from now on."""
        self._metrics = metrics.text(self._model.name)
        self._cache.instrument(metrics.response_cache(self._model.name, "text"))

    @property
    def model(self) -> LazyModel[TextEngine]:
        """The lazily loaded engine (its state, load and unload)."""
        return self._model

    @property
    def model_name(self) -> str:
        """The name the API reports for the model (known before it loads)."""
        return self._model.name

    @property
    def response_cache(self) -> ResponseCache[TextChunk]:
        """The answers kept for deterministic requests."""
        return self._cache

    def adapter_requests(self, adapter_id: int) -> int:
        """Requests running through the LoRA adapter ``adapter_id`` now."""
        return self._adapter_requests[adapter_id]

    def forget_adapter(self, adapter_id: int) -> None:
        """Drop the cached answers of the LoRA adapter ``adapter_id`` (it was removed; a name
        registered again gets a new id, so they could never be hit again)."""
        self._cache.drop(adapter_id)

    def info(self) -> TextServiceInfo:
        """Describe the model without loading it."""
        engine = self._model.engine
        max_len = (
            engine.model_info().max_model_len
            if engine is not None
            else self._configured_max_model_len
        )
        model = self._model
        return TextServiceInfo(
            name=self.model_name,
            max_model_len=max_len,
            initialized=engine is not None,
            running=len(self._active_ids),
            engine_stats=engine.stats() if engine is not None else None,
            **model.load_info(),
        )

    async def check_health(self) -> None:
        """Ask the loaded engine whether it can serve; a no-op while nothing is loaded.

        Raises ``EngineDeadError`` when the engine cannot serve.
        """
        engine = self._model.engine
        if engine is not None:
            await engine.check_health()

    async def supervise(self, interval_s: float) -> None:
        """Check the loaded engine every ``interval_s``; restart it when it died.

        A dead vLLM engine core (crashed, killed, out of memory) is noticed here even when no
        request is running, so the replacement is loading before the next request arrives.
        """
        await self._model.supervise(interval_s, broken=EngineDeadError)

    async def initialize(self) -> None:
        """Load the model now (preloaded at start-up, or an admin's load)."""
        await self._model.get()

    def _admit(self) -> None:
        """Refuse a request beyond ``max_pending``: never an unbounded queue."""
        if self._max_pending is None:
            return
        pending = len(self._active_ids) + self._model.waiting
        if pending < self._max_pending:
            return
        if self._model.engine is None:
            raise ServiceUnavailableError(
                f"The text model is loading and {pending} requests already wait for it. "
                "Try again shortly.",
                retry_after=LOAD_RETRY_AFTER_S,
            )
        raise OverloadedError(
            f"The text engine is at capacity ({pending} requests running or waiting). "
            "Try again shortly.",
            retry_after=2,
        )

    def stream(
        self,
        prompt: TextPrompt,
        params: TextGenerationParams,
        *,
        request_id: str | None = None,
        cache: CacheTicket | None = None,
    ) -> AsyncGenerator[TextChunk, None]:
        """Stream the output of one request; closing the generator aborts it in the engine.

        ``request_id`` becomes the engine's request id (so the engine's logs and aborts line
        up with ours); an id already in flight gets a random suffix, because aborting one
        would abort both.

        With a ``cache`` ticket the response cache is looked up now, before the stream is
        iterated (so the outcome is on the ticket when this returns): a hit streams the kept
        answer as one chunk, without the engine (no capacity check, no token counts); a
        miss stores the answer once the engine finished it (``stop`` or ``length``), never
        an aborted, failed or timed-out one.

        Raises (before the first chunk or while streaming):
            ServiceUnavailableError: the model is loading and ``max_pending`` requests
                already wait for it; ``ModelLoadError`` (a subclass) when it cannot load.
            OverloadedError: ``max_pending`` requests are running or waiting.
            InvalidRequestError: the engine refuses the prompt or the parameters
                (``ContextLengthExceededError`` for a prompt beyond the context window).
            EngineDeadError: the engine died; it is being restarted.
            GenerationTimeoutError: the request ran past ``timeout_s`` and was aborted.
            GenerationError: the engine failed otherwise.
        """
        kept, key = self._cache.lookup(cache, lambda: self._cache_request(prompt, params))
        if kept is not None:
            return _replay(kept)
        return self._generate_stream(prompt, params, request_id, key)

    def _cache_request(self, prompt: TextPrompt, params: TextGenerationParams) -> dict[str, Any]:
        """What the response cache's key covers (everything but the scheduling priority)."""
        fields = asdict(params)
        del fields["priority"]
        return {"model": self._model.name, "prompt": asdict(prompt), "params": fields}

    async def _generate_stream(
        self,
        prompt: TextPrompt,
        params: TextGenerationParams,
        request_id: str | None,
        cache_key: str | None,
    ) -> AsyncGenerator[TextChunk, None]:
        self._admit()
        adapter = params.lora.id if params.lora is not None else None
        if adapter is not None:
            self._adapter_requests[adapter] += 1
        arrived = time.perf_counter()
        try:
            async with (
                self._model.use() as engine,
                # Closed here, not left to the garbage collector: its bookkeeping (metrics,
                # tokens of the access line) must be done when this stream ends.
                contextlib.aclosing(
                    self._stream(engine, prompt, params, request_id, arrived, cache_key)
                ) as chunks,
            ):
                async for chunk in chunks:
                    yield chunk
        finally:
            if adapter is not None:
                self._adapter_requests[adapter] -= 1
                if not self._adapter_requests[adapter]:
                    del self._adapter_requests[adapter]

    async def _stream(
        self,
        engine: TextEngine,
        prompt: TextPrompt,
        params: TextGenerationParams,
        request_id: str | None,
        arrived: float,
        cache_key: str | None,
    ) -> AsyncGenerator[TextChunk, None]:
        request = current_request()
        generation = self._model.generation
        kept: list[TextChunk] | None = [] if cache_key is not None else None
        metrics = self._metrics
        started = time.perf_counter()
        if metrics is not None:
            metrics.queue_wait.observe(started - arrived)
        engine_id = request_id or uuid.uuid4().hex
        if engine_id in self._active_ids:
            engine_id = f"{engine_id}-{uuid.uuid4().hex[:8]}"
        self._active_ids.add(engine_id)
        if request is not None and request.log_prompts:
            request.note_prompt(_loggable_prompt(prompt))
        span = start_child_span(
            "text.generate", {"fictures.model": self._model.name, "fictures.engine_id": engine_id}
        )
        last: TextChunk | None = None
        last_time = started
        tokens = 0
        # Inter-token gaps are counted here and reach the histogram once, when the stream ends.
        gaps = metrics.inter_token_latency.tally() if metrics is not None else None
        outcome: str | None = None
        error: BaseException | None = None
        timed_out = False

        def stop_for_timeout() -> None:
            nonlocal timed_out
            timed_out = True
            # Abort in the engine: the stream then ends even when no token is coming.
            self._background(engine.abort(engine_id))

        timer = (
            asyncio.get_running_loop().call_later(self._timeout_s, stop_for_timeout)
            if self._timeout_s
            else None
        )
        try:
            async for chunk in engine.generate(prompt, params, request_id=engine_id):
                if timed_out:
                    raise GenerationTimeoutError(timeout_s=self._timeout_s or 0)
                if metrics is not None and gaps is not None:
                    now = time.perf_counter()
                    produced = chunk.completion_tokens - tokens
                    if last is None:
                        metrics.time_to_first_token.observe(now - started)
                    elif produced > 0:
                        # A chunk may carry several tokens (the consumer was slower than the
                        # engine): each gets its share of the gap.
                        gaps.observe((now - last_time) / produced, produced)
                    last_time = now
                    tokens = chunk.completion_tokens
                last = chunk
                if kept is not None:
                    kept.append(chunk)
                    if chunk.finish_reason in ("stop", "length") and cache_key is not None:
                        self._keep(cache_key, kept, params, generation)
                yield chunk
            if timed_out:  # the engine ended the aborted request without a last chunk
                raise GenerationTimeoutError(timeout_s=self._timeout_s or 0)
        except InvalidRequestError as exc:
            outcome, error = "rejected", exc
            raise
        except EngineDeadError as exc:
            outcome, error = "error", exc
            await self._model.restart(engine, exc.message)
            raise
        except Exception as exc:
            outcome, error = "error", exc
            raise
        except BaseException as exc:  # cancelled, or closed by the consumer
            if last is None or last.finish_reason is None:
                error = exc
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._active_ids.discard(engine_id)
            if outcome is None:
                # Closed after the last chunk counts as finished; before it, as aborted.
                outcome = last.finish_reason if last is not None and last.finish_reason else "abort"
            self._finish(request, last, gaps, outcome, span, error)

    def _keep(
        self,
        key: str,
        chunks: list[TextChunk],
        params: TextGenerationParams,
        generation: int,
    ) -> None:
        """Store a finished answer, unless the engine changed since it started."""
        if generation != self._model.generation:
            return
        whole = merge_chunks(chunks)
        whole = replace(whole, token_ids=tuple(whole.token_ids))  # kept: no shared list
        self._cache.store(key, whole, tag=params.lora.id if params.lora is not None else None)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)  # keep a reference until done (asyncio holds only weak ones)
        task.add_done_callback(self._tasks.discard)

    def _finish(
        self,
        request: RequestContext | None,
        last: TextChunk | None,
        gaps: HistogramTally | None,
        outcome: str,
        span: Span | None,
        error: BaseException | None,
    ) -> None:
        """Once per request: tokens and outcome into the metrics, span and access log.

        ``request`` is the one captured when the stream started: a generator may be closed
        (finalised) from another request's context.
        """
        prompt_tokens = last.prompt_tokens if last is not None else 0
        completion_tokens = last.completion_tokens if last is not None else 0
        metrics = self._metrics
        if metrics is not None:
            metrics.prompt_tokens.inc(prompt_tokens)
            metrics.generation_tokens.inc(completion_tokens)
            metrics.finished[outcome].inc()
            if gaps is not None:
                metrics.inter_token_latency.add(gaps)
        if request is not None and last is not None:
            request.add_tokens(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        if span is not None:
            span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
            span.set_attribute("fictures.finish_reason", outcome)
            end_span(span, error)

    async def generate(
        self,
        prompt: TextPrompt,
        params: TextGenerationParams,
        *,
        request_id: str | None = None,
        cache: CacheTicket | None = None,
    ) -> TextResult:
        """Run one request to the end and return its whole text (``cache``: as for
        :meth:`stream`).

        Raises what :meth:`stream` raises.
        """
        pieces: list[str] = []
        last: TextChunk | None = None
        async for chunk in self.stream(prompt, params, request_id=request_id, cache=cache):
            pieces.append(chunk.delta)
            last = chunk
        if last is None:  # an engine always ends with a finishing chunk
            raise EngineDeadError("The text engine ended a request without output.")
        return TextResult(
            text="".join(pieces),
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            finish_reason=last.finish_reason or "stop",
        )

    async def generate_structured(
        self,
        prompt: TextPrompt,
        params: TextGenerationParams,
        *,
        request_id: str | None = None,
        cache: CacheTicket | None = None,
    ) -> StructuredResult:
        """Generate under ``params.structured`` and check the output against the constraint.

        Output that does not validate (cut by ``max_tokens``) is returned with
        ``is_valid=False``, not raised. Raises ``InvalidRequestError`` without a constraint or
        for one the engine cannot enforce, and what :meth:`stream` raises.
        """
        spec = params.structured
        if spec is None:
            raise InvalidRequestError("A structured request needs a constraint.", param="type")
        result = await self.generate(prompt, params, request_id=request_id, cache=cache)
        parsed, is_valid = validate_structured_output(spec, result.text, result.finish_reason)
        if not is_valid:
            logger.info("Structured output did not validate (finish=%s)", result.finish_reason)
        return StructuredResult(result=result, parsed=parsed, is_valid=is_valid)

    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        """The token ids the model sees for ``prompt`` (loads the model if needed).

        Raises ``ModelLoadError`` when the model cannot load, ``InvalidRequestError`` when the
        chat template refuses the messages.
        """
        async with self._model.use() as engine:
            return await engine.tokenize(prompt)

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``.

        Raises ``InvalidRequestError`` for ids outside the vocabulary, ``ModelLoadError`` when
        the model cannot load.
        """
        async with self._model.use() as engine:
            return await engine.detokenize(token_ids)

    async def check_structured(self, spec: StructuredOutputSpec) -> None:
        """Raise ``InvalidRequestError`` when the engine cannot enforce ``spec`` (compiled off
        the event loop: a grammar compile can take a while); ``ModelLoadError`` when the model
        cannot load."""
        async with self._model.use() as engine:
            await asyncio.to_thread(engine.check_structured, spec)

    async def tool_call_parser(self, tools: tuple[ToolDefinition, ...]) -> ToolCallParser:
        """The model's parser for tool calls it writes on its own (``tool_choice: auto``).

        Raises ``InvalidRequestError`` when the server has none (``TEXT_TOOL_CALL_PARSER``).
        """
        async with self._model.use() as engine:
            parser = engine.tool_call_parser(tools)
        if parser is None:
            raise InvalidRequestError(
                'tool_choice "auto" with tools needs a tool-call parser for the model, and '
                "this server has none: set TEXT_TOOL_CALL_PARSER (hermes, llama3_json, "
                'pythonic, ...), or send tool_choice "required" or a named function, which '
                "work with any model.",
                param="tool_choice",
            )
        return parser

    async def shutdown(self) -> None:
        """Stop the engine (called from the app lifespan)."""
        await self._model.shutdown()


async def _replay(chunk: TextChunk) -> AsyncGenerator[TextChunk, None]:
    """A kept answer as a stream: one chunk with the whole text and its finish reason (a
    live stream's consumer already takes chunks of several tokens)."""
    yield chunk


def validate_structured_output(
    spec: StructuredOutputSpec, text: str, finish_reason: FinishReason
) -> tuple[Any, bool]:
    """Return (parsed value or None, whether ``text`` satisfies ``spec``).

    JSON output is parsed and validated against the schema; regex and choice outputs are
    matched exactly. Grammar output is valid when the engine ended it on its own under the
    grammar (finish reason ``stop``) rather than cutting it off at ``max_tokens``.
    """
    if spec.kind is StructuredOutputKind.JSON:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None, False
        try:
            jsonschema.validate(parsed, spec.json_schema or {})
        except jsonschema.ValidationError:
            return parsed, False
        return parsed, True
    if spec.kind is StructuredOutputKind.REGEX:
        return None, re.fullmatch(spec.regex or "", text) is not None
    if spec.kind is StructuredOutputKind.CHOICE:
        return None, text in (spec.choices or ())
    return None, bool(text) and finish_reason == "stop"
