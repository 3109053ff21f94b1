"""The real vLLM engine on the bundled SmolLM2, loaded once per test session: one as the server
starts it by default but with n-gram speculative decoding on (LoRA off, whose refusal is tested
too), so that every engine test (structured output, tool calls, stops, seeds) runs with several
tokens per step; one with LoRA adapters (and n-gram) on, started only when a LoRA test runs; and
one as the server starts it by default (no speculative decoding), started only by the tests
that need it. All start eager: vLLM's graph compilation (the server's default) adds about a
minute to each start. With enable_lora on the first one the other tests
took 13 % longer (90 s to 102 s on the 2-core machine): more than the second engine's start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from fictures_ai.config import Settings
from fictures_ai.engines.vllm_engine import VllmTextEngine
from fictures_ai.services.engine_factory import text_engine_options


async def loaded_engine(**settings: Any) -> AsyncIterator[VllmTextEngine]:
    """An engine of the bundled model, eager, with ``settings`` over a small context."""
    values = {
        "text_max_model_len": 4096,
        "text_max_num_seqs": 32,
        "text_cpu_kv_cache_mb": 256,
        "text_enforce_eager": True,
        **settings,
    }
    engine = await VllmTextEngine.load(text_engine_options(Settings(_env_file=None, **values)))
    yield engine
    await engine.shutdown()


@pytest.fixture(scope="session")
async def text_engine() -> AsyncIterator[VllmTextEngine]:
    async for engine in loaded_engine(text_speculative_method="ngram"):
        yield engine


@pytest.fixture(scope="session")
async def lora_text_engine() -> AsyncIterator[VllmTextEngine]:
    async for engine in loaded_engine(
        text_max_model_len=2048,
        text_max_num_seqs=8,
        text_cpu_kv_cache_mb=128,
        text_enable_lora=True,
        text_max_loras=1,
        text_max_lora_rank=16,
        text_speculative_method="ngram",
    ):
        yield engine


@pytest.fixture(scope="session")
async def plain_text_engine() -> AsyncIterator[VllmTextEngine]:
    """The engine as the server starts it (TEXT_SPECULATIVE_METHOD=none)."""
    async for engine in loaded_engine(text_speculative_method="none"):
        yield engine
