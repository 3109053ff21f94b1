"""A scripted text engine for unit tests of the HTTP and service layers (no model)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ImageLora,
    ImageModelInfo,
    LoraAdapter,
    ProgressCallback,
    StructuredOutputKind,
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextModelInfo,
    TextPrompt,
    TokenLogprob,
    ToolCallParser,
    ToolDefinition,
    fit_output_tokens,
)
from fictures_ai.errors import EngineDeadError, GenerationError, InvalidRequestError
from fictures_ai.services.tool_calls import RequiredToolCallParser
from fictures_ai.shared import EngineStats


@dataclass
class FakeTextEngine(TextEngine):
    """Answers with ``reply`` (``json_reply`` under a JSON constraint) one word per token;
    records every call.

    A prompt counts one token per word. ``token_delay`` slows each token; ``fail_after`` raises
    ``GenerationError`` (or ``EngineDeadError`` when ``dead``) after that many tokens.
    """

    reply: str = "Once upon a time there was a brave little dragon ."
    max_model_len: int = 8192
    token_delay: float = 0.0
    fail_after: int | None = None
    dead: bool = False
    json_reply: str = '{"name": "Ava", "age": 20}'
    calls: list[tuple[TextPrompt, TextGenerationParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    shut_down: bool = False
    produced_tokens: int = 0
    vocabulary: list[str] = field(default_factory=list)
    writes_tool_calls: bool = False
    loras: dict[int, LoraAdapter] = field(default_factory=dict)
    """Adapters added (``add_lora``); a path with ``bad`` in it is refused."""
    engine_stats: EngineStats | None = None
    """What ``stats()`` reports, as vLLM's scheduler would."""

    def _script(self, params: TextGenerationParams) -> list[str]:
        spec = params.structured
        if spec is not None and spec.kind is StructuredOutputKind.JSON:
            return _words(self.json_reply)
        if spec is not None and spec.kind is StructuredOutputKind.CHOICE:
            return [(spec.choices or ("",))[0]]
        return _words(self.reply)

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        self.calls.append((prompt, params))
        text = prompt.text or " ".join(m.content for m in prompt.messages or ())
        prompt_tokens = len(prompt.token_ids or text.split())
        max_tokens, _ = fit_output_tokens(
            params, prompt_tokens=prompt_tokens, max_model_len=self.max_model_len
        )
        pieces = self._script(params)
        if params.lora is not None:
            if params.lora.id not in self.loras:
                raise InvalidRequestError(f"Unknown adapter {params.lora.name}", param="lora")
            pieces = [f"[{params.lora.name}]", *pieces]
        done = False
        try:
            produced = ""
            for index, piece in enumerate(pieces[:max_tokens]):
                if self.fail_after is not None and index >= self.fail_after:
                    if self.dead:
                        raise EngineDeadError("The fake engine died.")
                    raise GenerationError("The fake engine failed.")
                await asyncio.sleep(self.token_delay)
                produced += piece
                self.produced_tokens += 1
                stop_hit = next((s for s in params.stop if s in produced), None)
                last = index + 1 == min(len(pieces), max_tokens)
                reason = None
                if stop_hit is not None:
                    piece = piece[: len(piece) - (len(produced) - produced.index(stop_hit))]
                    reason = "stop"
                elif last:
                    reason = "length" if max_tokens < len(pieces) else "stop"
                yield TextChunk(
                    delta=piece,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=index + 1,
                    finish_reason=reason,  # type: ignore[arg-type]
                    logprobs=(
                        None
                        if params.logprobs is None
                        else (
                            TokenLogprob(
                                token=piece,
                                logprob=-0.5,
                                top=tuple((f"alt{k}", -1.0 - k) for k in range(params.logprobs)),
                            ),
                        )
                    ),
                )
                if reason is not None:
                    done = True
                    self.finished.append(request_id)
                    return
        finally:
            if not done:
                self.aborted.append(request_id)

    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        """One token per word; a word's id is where it entered ``vocabulary``."""
        text = prompt.text or " ".join(m.content for m in prompt.messages or ())
        ids = []
        for word in text.split():
            if word not in self.vocabulary:
                self.vocabulary.append(word)
            ids.append(self.vocabulary.index(word))
        return ids

    async def detokenize(self, token_ids: list[int]) -> str:
        outside = [token for token in token_ids if not 0 <= token < len(self.vocabulary)]
        if outside:
            raise InvalidRequestError(f"Unknown token ids: {outside}", param="tokens")
        return " ".join(self.vocabulary[token] for token in token_ids)

    def tool_call_parser(self, tools: tuple[ToolDefinition, ...]) -> ToolCallParser | None:
        """With ``writes_tool_calls``, the reply is read as JSON calls, as a model whose
        parser is configured writes them (``tool_choice: auto``)."""
        return RequiredToolCallParser() if self.writes_tool_calls else None

    async def add_lora(self, adapter: LoraAdapter) -> None:
        if "bad" in adapter.path:
            raise InvalidRequestError(f"{adapter.path}: not a LoRA adapter", param="lora")
        self.loras[adapter.id] = adapter

    async def remove_lora(self, adapter: LoraAdapter) -> None:
        self.loras.pop(adapter.id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("The fake engine is dead.")

    def stats(self) -> EngineStats | None:
        return self.engine_stats

    def model_info(self) -> TextModelInfo:
        return TextModelInfo(
            name="fake-model", framework="vLLM", max_model_len=self.max_model_len, source="fake"
        )

    async def shutdown(self) -> None:
        self.shut_down = True


def _words(text: str) -> list[str]:
    """``text`` as tokens: one word each, with the space before it."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])]


@dataclass
class FakeImageEngine(ImageEngine):
    """Renders a flat PNG whose colour depends on the request and seed; records every call.

    Each step sleeps ``step_delay`` (on the event loop, like an engine that renders elsewhere);
    ``fail`` raises ``GenerationError``.
    """

    step_delay: float = 0.0
    fail: bool = False
    calls: list[ImageGenerationParams] = field(default_factory=list)
    completed: list[ImageGenerationParams] = field(default_factory=list)
    cancelled: list[ImageGenerationParams] = field(default_factory=list)
    shut_down: bool = False
    loras: dict[str, ImageLora] = field(default_factory=dict)
    """Adapters loaded (``add_lora`` or a render's ``loras``); ``bad`` paths are refused."""
    batching: bool = False
    """Render a batch in one call (as the diffusers engine does)."""
    fail_batches: bool = False
    """Fail every call of more than one image (as running out of memory would)."""
    batch_calls: list[tuple[ImageGenerationParams, ...]] = field(default_factory=list)

    async def add_lora(self, lora: ImageLora) -> None:
        if "bad" in lora.path:
            raise InvalidRequestError(f"{lora.path}: not a LoRA of this pipeline", param="loras")
        self.loras[lora.name] = lora

    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        return (await self.generate_batch([params], progress=[progress]))[0]

    async def generate_batch(
        self,
        batch: Sequence[ImageGenerationParams],
        *,
        progress: Sequence[ProgressCallback | None] | None = None,
    ) -> list[GeneratedImage]:
        """With ``batching``, one "call" for the batch (its steps once, each progress callback
        after each step), recorded in ``batch_calls``; otherwise one call per image."""
        if not self.batching and len(batch) > 1:
            return await super().generate_batch(batch, progress=progress)
        self.batch_calls.append(tuple(batch))
        self.calls.extend(batch)
        params = batch[0]
        assert all(item.batch_key() == params.batch_key() for item in batch)
        callbacks = [callback for callback in progress or () if callback is not None]
        for lora in params.loras:
            await self.add_lora(lora)
        try:
            for step in range(params.num_inference_steps):
                await asyncio.sleep(self.step_delay)
                for callback in callbacks:  # like a real engine: from a render thread
                    await asyncio.to_thread(callback, step + 1, params.num_inference_steps)
        except asyncio.CancelledError:
            self.cancelled.extend(batch)
            raise
        if self.fail or (self.fail_batches and len(batch) > 1):
            raise GenerationError("The fake pipeline failed.")
        return [self._image(item) for item in batch]

    @property
    def batches(self) -> bool:
        return self.batching

    def _image(self, params: ImageGenerationParams) -> GeneratedImage:
        loras = ",".join(f"{lora.name}:{lora.weight}" for lora in params.loras)
        key = f"{params.prompt}|{params.negative_prompt}|{params.seed}|{loras}".encode()
        colour = tuple(hashlib.sha256(key).digest()[:3])
        buffer = io.BytesIO()
        Image.new("RGB", (params.width, params.height), colour).save(buffer, format="PNG")
        self.completed.append(params)
        return GeneratedImage(
            png=buffer.getvalue(), width=params.width, height=params.height, seed=params.seed
        )

    async def check_health(self) -> None:
        return None

    def model_info(self) -> ImageModelInfo:
        return ImageModelInfo(
            name="fake-image-model",
            framework="diffusers",
            device="cpu",
            dtype="float32",
            source="fake",
            notice="draws flat colours",
        )

    async def shutdown(self) -> None:
        self.shut_down = True


def json_events(body: str) -> list[dict[str, object] | str]:
    """Parse an SSE body into its events: dicts, or the string ``[DONE]``."""
    events: list[dict[str, object] | str] = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
