"""``TextGenerationService``: lazy loading, generation, streaming and structured output.

The service owns the text engine's life cycle (load on first use, restart after the engine
dies, shut down with the app) and the per-request bookkeeping (request ids, accumulating the
text of a non-streaming request, validating structured output). It knows nothing of HTTP.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from fictures_ai.engines.base import (
    FinishReason,
    StructuredOutputKind,
    StructuredOutputSpec,
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextPrompt,
)
from fictures_ai.errors import EngineDeadError, InvalidRequestError
from fictures_ai.services.model_loader import LazyModel, LoadState

logger = logging.getLogger(__name__)

LOAD_RETRY_AFTER_S = 30


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


@dataclass(frozen=True, slots=True)
class TextServiceInfo:
    """What ``/health`` and the model listings say about the text model."""

    name: str
    max_model_len: int
    initialized: bool
    state: LoadState


class TextGenerationService:
    """Serves text generation from one lazily loaded ``TextEngine``."""

    def __init__(
        self,
        *,
        model_name: str,
        max_model_len: int,
        loader: Callable[[], Awaitable[TextEngine]],
    ) -> None:
        self._model = LazyModel(name=model_name, loader=loader, retry_after=LOAD_RETRY_AFTER_S)
        self._configured_max_model_len = max_model_len

    @property
    def model_name(self) -> str:
        """The name the API reports for the model (known before it loads)."""
        engine = self._model.engine
        return engine.model_info().name if engine is not None else self._model.name

    def info(self) -> TextServiceInfo:
        """Describe the model without loading it."""
        engine = self._model.engine
        max_len = (
            engine.model_info().max_model_len
            if engine is not None
            else self._configured_max_model_len
        )
        return TextServiceInfo(
            name=self.model_name,
            max_model_len=max_len,
            initialized=engine is not None,
            state=self._model.state,
        )

    async def initialize(self) -> None:
        """Load the model now (used when models are preloaded at start-up)."""
        await self._model.get()

    async def stream(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str | None = None
    ) -> AsyncGenerator[TextChunk, None]:
        """Stream the output of one request; closing the generator aborts it in the engine."""
        engine = await self._model.get()
        request_id = request_id or uuid.uuid4().hex
        try:
            async for chunk in engine.generate(prompt, params, request_id=request_id):
                yield chunk
        except EngineDeadError as exc:
            await self._model.discard(exc.message)
            raise

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str | None = None
    ) -> TextResult:
        """Run one request to the end and return its whole text."""
        pieces: list[str] = []
        last: TextChunk | None = None
        async for chunk in self.stream(prompt, params, request_id=request_id):
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
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str | None = None
    ) -> StructuredResult:
        """Generate under ``params.structured`` and check the output against the constraint."""
        spec = params.structured
        if spec is None:
            raise InvalidRequestError("A structured request needs a constraint.", param="type")
        result = await self.generate(prompt, params, request_id=request_id)
        parsed, is_valid = validate_structured_output(spec, result.text, result.finish_reason)
        if not is_valid:
            logger.info("Structured output did not validate (finish=%s)", result.finish_reason)
        return StructuredResult(result=result, parsed=parsed, is_valid=is_valid)

    async def shutdown(self) -> None:
        """Stop the engine (called from the app lifespan)."""
        await self._model.shutdown()


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
