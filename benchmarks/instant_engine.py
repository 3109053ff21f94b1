"""An instant text engine: a ``TextEngine`` test double that costs nothing per token.

It yields one-token chunks as fast as the consumer pulls them, so a server built over it
measures the HTTP and service layers alone (the HTTP-layer ceiling). ``build_instant_services``
wires it into the real services the way ``create_app`` expects; no model is loaded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fictures_ai.api.dependencies import Services
from fictures_ai.config import Settings
from fictures_ai.engines.base import (
    TextChunk,
    TextEngine,
    TextGenerationParams,
    TextModelInfo,
    TextPrompt,
)
from fictures_ai.services.models.registry import ModelRegistry, RegisteredModel
from fictures_ai.services.text_generation import TextGenerationService

MODEL_NAME = "SmolLM2-135M-Instruct"
TOKEN = " word"
"""The text of every token: short and ASCII, the common case of a real model's tokens."""
PROMPT_TOKENS = 32
MAX_MODEL_LEN = 1 << 20


class InstantTextEngine(TextEngine):
    """Streams ``max_tokens`` chunks of ``TOKEN`` without waiting between them."""

    async def generate(
        self, prompt: TextPrompt, params: TextGenerationParams, *, request_id: str
    ) -> AsyncIterator[TextChunk]:
        """One chunk per token; the last one finishes with ``length``."""
        total = params.max_tokens or 256
        for produced in range(1, total):
            yield TextChunk(delta=TOKEN, prompt_tokens=PROMPT_TOKENS, completion_tokens=produced)
        yield TextChunk(
            delta=TOKEN,
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=total,
            finish_reason="length",
        )

    async def tokenize(self, prompt: TextPrompt) -> list[int]:
        """Every prompt is ``PROMPT_TOKENS`` tokens of id 0."""
        return [0] * PROMPT_TOKENS

    async def detokenize(self, token_ids: list[int]) -> str:
        """Every token reads ``TOKEN``."""
        return TOKEN * len(token_ids)

    async def abort(self, request_id: str) -> None:
        """Nothing runs outside the iterator, so there is nothing to stop."""

    async def check_health(self) -> None:
        """Always healthy."""

    def model_info(self) -> TextModelInfo:
        """A made-up model with an unbounded window."""
        return TextModelInfo(
            name=MODEL_NAME, framework="instant", max_model_len=MAX_MODEL_LEN, source="none"
        )

    async def shutdown(self) -> None:
        """Nothing to release."""


def build_instant_services(settings: Settings) -> Services:
    """The app's real services over the instant text engine (text only: the HTTP-ceiling
    benchmark serves no images)."""
    engine = InstantTextEngine()

    async def load_text() -> TextEngine:
        return engine

    text = TextGenerationService(
        model_name=MODEL_NAME,
        max_model_len=MAX_MODEL_LEN,
        loader=load_text,
        max_pending=settings.text_max_pending,
        timeout_s=settings.request_timeout_s,
    )
    model = RegisteredModel(
        name=MODEL_NAME,
        kind="text",
        source="none",
        service=text,
        default=True,
        capacity=settings.text_max_num_seqs,
        max_model_len=MAX_MODEL_LEN,
    )
    return Services(settings=settings, models=ModelRegistry([model]))
