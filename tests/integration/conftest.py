"""The real vLLM engine on the bundled SmolLM2, loaded once per test session."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fictures_ai.config import Settings
from fictures_ai.engines.vllm_engine import VllmTextEngine
from fictures_ai.services.engine_factory import text_engine_options


@pytest.fixture(scope="session")
async def text_engine() -> AsyncIterator[VllmTextEngine]:
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, text_max_model_len=4096, text_max_num_seqs=32, text_cpu_kv_cache_mb=256
    )
    engine = await VllmTextEngine.load(text_engine_options(settings))
    yield engine
    await engine.shutdown()
