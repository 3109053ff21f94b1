"""``ImageGenerationService``: lazy loading, seeds, and a bounded render queue.

Requests without a seed get one from ``random_seed()`` (> 0), so every answer can be
reproduced. The service lets ``max_concurrency`` renders reach the engine at once, queues the
rest in arrival order, and counts what is waiting and running. A request cancelled while it
waits (its client went away) leaves the queue without rendering; one cancelled mid-render
stops at the engine's next denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ProgressCallback,
)
from fictures_ai.services.model_loader import LazyModel, LoadState

logger = logging.getLogger(__name__)

LOAD_RETRY_AFTER_S = 30
MAX_SEED = 2**32 - 1


def random_seed() -> int:
    """A random seed in 1..2**32-1 (never 0, which some clients read as 'no seed')."""
    return secrets.randbelow(MAX_SEED) + 1


@dataclass(frozen=True, slots=True)
class ImageServiceInfo:
    """What ``/health`` and the model listings say about the image model."""

    name: str
    device: str
    initialized: bool
    state: LoadState
    notice: str | None
    waiting: int
    running: int


class ImageGenerationService:
    """Serves text-to-image from one lazily loaded ``ImageEngine``."""

    def __init__(
        self,
        *,
        model_name: str,
        device: str,
        max_concurrency: int,
        loader: Callable[[], Awaitable[ImageEngine]],
    ) -> None:
        self._model = LazyModel(name=model_name, loader=loader, retry_after=LOAD_RETRY_AFTER_S)
        self._device = device
        self._slots = asyncio.Semaphore(max_concurrency)
        self._waiting = 0
        self._running = 0

    def info(self) -> ImageServiceInfo:
        """Describe the model and the queue without loading anything."""
        engine = self._model.engine
        model = engine.model_info() if engine is not None else None
        return ImageServiceInfo(
            name=model.name if model else self._model.name,
            device=model.device if model else self._device,
            initialized=engine is not None,
            state=self._model.state,
            notice=model.notice if model else None,
            waiting=self._waiting,
            running=self._running,
        )

    async def initialize(self) -> None:
        """Load the pipeline now (used when models are preloaded at start-up)."""
        await self._model.get()

    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        """Render one image, waiting for a free render slot first (in arrival order)."""
        engine = await self._model.get()
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            return await engine.generate(params, progress=progress)
        finally:
            self._running -= 1
            self._slots.release()

    async def shutdown(self) -> None:
        """Release the pipeline (called from the app lifespan)."""
        await self._model.shutdown()
