"""The engine interfaces: what the services see of vLLM, diffusers or a test double.

Like vLLM's ``EngineClient``, an engine is an object with an async generation call, ``abort``,
``check_health`` and ``shutdown``. Everything that crosses this boundary is a frozen dataclass;
no HTTP or web-framework type appears here.
"""

from __future__ import annotations

import abc
import enum
import secrets
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fictures_ai.errors import ContextLengthExceededError, InvalidRequestError
from fictures_ai.shared import EngineStats, PromptFormat

FinishReason = Literal["stop", "length", "abort"]

INTERACTIVE_PRIORITY = 0
"""The priority of a request a client waits for (every API request): served first."""

BATCH_PRIORITY = 1
"""The priority of a batch job's items: they run when no interactive request waits.

Priorities follow vLLM's convention, lower first. Text requests carry theirs to vLLM's
scheduler (``TextGenerationParams.priority``); image requests to the render queue
(``fictures_ai.services.render_queue``).
"""


class StructuredOutputKind(enum.StrEnum):
    """The kinds of constrained decoding an engine supports."""

    JSON = "json"
    REGEX = "regex"
    CHOICE = "choice"
    GRAMMAR = "grammar"


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """A constraint on the generated text, enforced by the engine while sampling."""

    kind: StructuredOutputKind
    json_schema: dict[str, Any] | None = None
    regex: str | None = None
    choices: tuple[str, ...] | None = None
    grammar: str | None = None


@dataclass(frozen=True, slots=True)
class ToolDefinition:
    """A function the model may call: its name, what it does, and a JSON schema of its
    arguments (OpenAI's ``tools[].function``)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text of the arguments."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation, rendered with the model's chat template.

    An assistant message may carry the ``tool_calls`` it made; a ``tool`` message answers the
    call ``tool_call_id``.
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """A LoRA adapter of a text model, as vLLM's ``LoRARequest`` names one: ``name`` (what
    clients pass as ``model``), ``id`` (a positive integer, unique per engine for the adapter's
    files: a re-registered adapter gets a new id) and ``path`` (a local PEFT folder)."""

    name: str
    id: int
    path: str


GREEDY_TEMPERATURE = 1e-5
"""A temperature below this samples greedily: vLLM's ``_SAMPLING_EPS`` (``vllm.sampling_params``),
under which it takes the most likely token."""


def is_greedy(temperature: float, top_p: float) -> bool:
    """Whether sampling with ``temperature`` and ``top_p`` takes the most likely token every
    time (a temperature under ``GREEDY_TEMPERATURE``, or ``top_p`` 0: see
    ``TextGenerationParams``)."""
    return temperature < GREEDY_TEMPERATURE or top_p == 0


@dataclass(frozen=True, slots=True)
class TextGenerationParams:
    """Sampling parameters of one text request, independent of any engine.

    ``max_tokens=None`` means "the rest of the context window"; with ``fit_to_context`` a larger
    ``max_tokens`` than the context leaves room for is lowered to what fits (the Fictures
    contract) instead of refused (OpenAI's). ``min_tokens``: no end (EOS or stop sequence)
    before that many tokens. ``logprobs=None`` returns no log-probabilities; ``0`` returns the
    chosen token's; ``k`` adds the ``k`` most likely. ``top_p=0`` keeps only the most likely
    token: greedy sampling, as ``temperature=0``. ``seed`` is a signed 64-bit integer.
    ``skip_special_tokens=False`` keeps special tokens in the text (the tool-call markers some
    tool-call parsers read).
    """

    max_tokens: int | None
    temperature: float = 0.7
    top_p: float = 0.9
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    structured: StructuredOutputSpec | None = None
    min_tokens: int = 0
    fit_to_context: bool = False
    skip_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs: the bias is added to the token's logit before sampling."""
    lora: LoraAdapter | None = None
    """Generate through this adapter of the engine's model (registered with ``add_lora``)."""
    priority: int = INTERACTIVE_PRIORITY
    """Scheduling priority, as vLLM reads it: a lower value is scheduled first
    (``INTERACTIVE_PRIORITY``, ``BATCH_PRIORITY``); equal values go in arrival order."""


def fit_output_tokens(
    params: TextGenerationParams, *, prompt_tokens: int, max_model_len: int
) -> tuple[int, int]:
    """``(max_tokens, min_tokens)`` for a prompt of ``prompt_tokens`` in a context of
    ``max_model_len`` tokens (prompt plus output).

    Raises ``ContextLengthExceededError`` when the prompt leaves no room for one output token,
    or when ``max_tokens`` does not fit and ``params.fit_to_context`` is false.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        raise ContextLengthExceededError(
            prompt_tokens=prompt_tokens, max_tokens=None, max_model_len=max_model_len
        )
    max_tokens = room if params.max_tokens is None else params.max_tokens
    if max_tokens > room:
        if not params.fit_to_context:
            raise ContextLengthExceededError(
                prompt_tokens=prompt_tokens, max_tokens=max_tokens, max_model_len=max_model_len
            )
        max_tokens = room
    return max_tokens, min(params.min_tokens, max_tokens)


@dataclass(frozen=True, slots=True)
class TextPrompt:
    """What to generate from: a plain prompt (formatted per ``format``), chat messages, or
    token ids (sent as they are)."""

    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    format: PromptFormat = PromptFormat.CHAT
    tools: tuple[ToolDefinition, ...] = ()
    """Functions the chat template shows the model (templates without tool support skip them)."""


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The log-probability of one generated token and, if asked, of its top alternatives."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TextChunk:
    """One step of a text generation stream.

    ``delta`` is the text produced since the previous chunk; ``completion_tokens`` counts every
    token generated so far for this request, as reported by the engine. ``finish_reason`` is
    set on the last chunk only.
    """

    delta: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    token_ids: Sequence[int] = ()
    """The ids of the tokens new in this chunk (what ``delta`` decodes from)."""


def merge_chunks(chunks: Sequence[TextChunk]) -> TextChunk:
    """One chunk that says what ``chunks`` (consecutive, of one request, at least one) say:
    their deltas, token ids and log-probabilities joined, the counts and finish reason of the
    last. Consumers already take chunks of several tokens (a slow consumer gets them)."""
    if len(chunks) == 1:
        return chunks[0]
    last = chunks[-1]
    logprobs = [chunk.logprobs for chunk in chunks if chunk.logprobs is not None]
    return TextChunk(
        delta="".join(chunk.delta for chunk in chunks),
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        finish_reason=last.finish_reason,
        logprobs=tuple(item for group in logprobs for item in group) if logprobs else None,
        token_ids=[token for chunk in chunks for token in chunk.token_ids],
    )


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a streamed tool call, in OpenAI's order: the first piece of call ``index``
    carries its ``id`` and ``name``; the ``arguments`` pieces joined are its arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedDelta:
    """What one chunk of generated text turned into: plain text and tool-call pieces."""

    content: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


class ToolCallParser(abc.ABC):
    """Splits one choice's generated text into content and tool calls, chunk by chunk.

    One parser per choice: it keeps the text seen so far. ``skip_special_tokens`` says
    whether the generation may drop special tokens (parsers that read marker tokens say no);
    ``finish_reason`` is OpenAI's finish reason of a generation that ended by itself after
    calls (``tool_calls``; ``stop`` for a named function, as OpenAI answers it).
    """

    skip_special_tokens: bool = True
    finish_reason: Literal["tool_calls", "stop"] = "tool_calls"

    @abc.abstractmethod
    def feed(self, chunk: TextChunk) -> ParsedDelta:
        """The content and tool-call pieces the new chunk completes."""

    def finish(self) -> ParsedDelta:
        """Whatever the parser still holds once the generation ended."""
        return ParsedDelta()


@dataclass(frozen=True, slots=True)
class TextModelInfo:
    """What the text engine serves."""

    name: str
    framework: str
    max_model_len: int
    source: str


class TextEngine(abc.ABC):
    """An engine that turns prompts into streams of text chunks."""

    @abc.abstractmethod
    def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        """Stream the generation of one request.

        Cancelling or closing the iterator aborts the request in the engine. Raises
        ``InvalidRequestError`` (including ``ContextLengthExceededError``) before the first
        chunk when the request cannot be served, ``EngineDeadError`` when the engine dies.
        """

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop producing tokens for ``request_id``; a no-op for unknown or finished ids."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Return when the engine can serve requests; raise ``EngineDeadError`` otherwise."""

    @abc.abstractmethod
    def model_info(self) -> TextModelInfo:
        """Describe the loaded model."""

    @abc.abstractmethod
    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        """The token ids the model sees for ``prompt`` (chat template applied as for
        ``generate``)."""

    @abc.abstractmethod
    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; ``InvalidRequestError`` for ids outside the vocabulary."""

    def check_structured(self, spec: StructuredOutputSpec) -> None:
        """Raise ``InvalidRequestError`` when the engine cannot enforce ``spec`` (a schema its
        grammar compiler does not take); engines without such limits accept every spec."""
        return

    def tool_call_parser(self, tools: tuple[ToolDefinition, ...]) -> ToolCallParser | None:
        """A parser for the tool calls the model writes on its own (``tool_choice: auto``),
        or None when none is configured for the model."""
        return None

    async def add_lora(self, adapter: LoraAdapter) -> None:
        """Load ``adapter`` into the engine, checking it against the model first, so that
        requests naming it (``params.lora``) can run; adding a loaded id again is a no-op.

        Raises ``InvalidRequestError`` when the adapter cannot serve this model (missing or
        unreadable files, a rank or target modules the engine cannot take) or the engine
        serves no adapters; the engine is unchanged then.
        """
        raise InvalidRequestError(
            f"This text engine serves no LoRA adapters (adapter '{adapter.name}').",
            param="lora",
        )

    async def remove_lora(self, adapter: LoraAdapter) -> None:
        """Unload ``adapter``, freeing its slot in the engine; a no-op for an unknown id."""
        return

    def stats(self) -> EngineStats | None:
        """What the engine's scheduler last reported (requests running and waiting, KV-cache
        use, prefix-cache lookups), or None for an engine that reports none. Called at every
        metrics scrape: it returns what is already at hand, never waits."""
        return None

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the engine and its processes; the engine is unusable afterwards."""


MAX_SEED = 2**32 - 1
"""The largest image seed: image seeds are unsigned 32-bit numbers."""


def random_seed() -> int:
    """A random seed in 1..``MAX_SEED`` (never 0, which some clients read as 'no seed')."""
    return secrets.randbelow(MAX_SEED) + 1


@dataclass(frozen=True, slots=True)
class ImageLora:
    """A diffusers LoRA adapter applied to one render: ``name`` (unique per engine: the
    adapter's name in the pipeline), ``path`` (a local folder or file of LoRA weights, as
    ``load_lora_weights`` reads them) and ``weight`` (the adapter's scale for this render)."""

    name: str
    path: str
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class ImageGenerationParams:
    """Parameters of one text-to-image request. ``seed`` is always set by the service.

    ``loras``: the adapters active for this render and their weights (none: the base model).
    """

    prompt: str
    seed: int
    negative_prompt: str | None = None
    width: int = 1344
    height: int = 768
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    loras: tuple[ImageLora, ...] = ()

    def batch_key(self) -> Hashable:
        """What one pipeline call takes as a single value for all of its images: renders
        with equal keys can share a call (:meth:`ImageEngine.generate_batch`), each with its
        own prompt, negative prompt and seed.

        Size, steps and guidance scale; the adapters with their paths and weights (a render
        never shares a call with another adapter set); and whether there is a negative prompt
        at all (SDXL pipelines use zeros, not an encoded empty prompt, when there is none,
        and a call takes either for all of its images). The model and its scheduler are the
        engine's, one per engine.
        """
        loras = tuple(sorted((lora.name, lora.path, float(lora.weight)) for lora in self.loras))
        return (
            self.width,
            self.height,
            self.num_inference_steps,
            float(self.guidance_scale),
            self.negative_prompt is None,
            loras,
        )


def covering_size(width: int, height: int, *, multiple: int) -> tuple[int, int]:
    """The smallest ``(width, height)`` in multiples of ``multiple`` that covers the request.

    Pipelines render only sizes their VAE (and, for transformer models, their latent packing)
    can produce: SDXL multiples of 8, Flux- and SD3-type models multiples of 16.
    """
    return -(-width // multiple) * multiple, -(-height // multiple) * multiple


def centre_crop_box(
    rendered: tuple[int, int], requested: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box (PIL's) of the ``requested`` size in the middle
    of an image of the ``rendered`` size; the few pixels over are cut evenly from both sides.
    """
    (rendered_w, rendered_h), (width, height) = rendered, requested
    left, top = (rendered_w - width) // 2, (rendered_h - height) // 2
    return left, top, left + width, top + height


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One rendered image as PNG bytes, with the seed that produced it."""

    png: bytes
    width: int
    height: int
    seed: int


@dataclass(frozen=True, slots=True)
class ImageModelInfo:
    """What the image engine serves. ``notice`` says plainly when the output is not real art."""

    name: str
    framework: str
    device: str
    dtype: str
    source: str
    notice: str | None = None


ProgressCallback = Callable[[int, int], None]
"""Called from the render thread after each denoising step with (step, total_steps)."""


class ImageEngine(abc.ABC):
    """An engine that renders images from text."""

    @abc.abstractmethod
    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        """Render one image off the event loop.

        ``params.loras`` are loaded on first use and active for this render only, at their
        weights: renders running at once never see each other's adapters. Cancelling the
        awaiting task stops the render at the next denoising step and re-raises
        ``asyncio.CancelledError``. Raises ``InvalidRequestError`` for parameters the model
        cannot render (an adapter that does not fit it included), ``GenerationError`` when the
        pipeline fails.
        """

    async def generate_batch(
        self,
        batch: Sequence[ImageGenerationParams],
        *,
        progress: Sequence[ProgressCallback | None] | None = None,
    ) -> list[GeneratedImage]:
        """Render ``batch`` (renders with equal :meth:`ImageGenerationParams.batch_key`) and
        return their images in order; ``progress``, when given, holds one callback per render.

        Each image is the one :meth:`generate` gives for its parameters alone, up to the
        floating-point differences a larger batch brings (see docs/architecture.md). Engines
        that can run one pipeline call for all of them override this; the default renders
        them one after another. Errors and cancellation as :meth:`generate`, for the whole
        batch.
        """
        callbacks = list(progress) if progress is not None else [None] * len(batch)
        return [
            await self.generate(params, progress=callback)
            for params, callback in zip(batch, callbacks, strict=True)
        ]

    @property
    def batches(self) -> bool:
        """Whether :meth:`generate_batch` runs one pipeline call for a batch (so that
        batching pays off)."""
        return False

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Return when the engine can render; raise ``ServiceUnavailableError`` otherwise."""

    @abc.abstractmethod
    def model_info(self) -> ImageModelInfo:
        """Describe the loaded pipeline."""

    async def add_lora(self, lora: ImageLora) -> None:
        """Load ``lora`` now (else on the first render that uses it), checking it against the
        pipeline; raises ``InvalidRequestError`` when it does not fit or the engine takes no
        adapters."""
        raise InvalidRequestError(
            f"This image engine serves no LoRA adapters (adapter '{lora.name}').", param="loras"
        )

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the pipeline and its memory."""
