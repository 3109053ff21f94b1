"""``ImageGenerationService``: lazy loading, seeds, and a bounded render queue.

Requests without a seed get one from ``random_seed()`` (> 0), so every answer can be
reproduced. The service lets ``max_concurrency`` renders reach the engine at once, queues the
rest in arrival order, and counts what is waiting and running. A request cancelled while it
waits (its client went away) leaves the queue without rendering; one cancelled mid-render
stops at the engine's next denoising step.

Image metrics are observed here: queue wait (model load plus render slot), render seconds and
outcomes; the request gets ``queue.image_slot`` and ``image.render`` spans and its image size
on the access-log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from opentelemetry.util.types import AttributeValue

from fictures_ai.engines.base import (
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ProgressCallback,
)
from fictures_ai.errors import GenerationTimeoutError, OverloadedError, ServiceUnavailableError
from fictures_ai.observability.context import current_request
from fictures_ai.observability.metrics import ImageMetrics, Metrics
from fictures_ai.observability.tracing import child_span
from fictures_ai.services.model_loader import LOAD_RETRY_AFTER_S, LazyModel, ModelLoadInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RenderProgress:
    """A render has finished denoising step ``step`` of ``total_steps`` (1-based)."""

    step: int
    total_steps: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageServiceInfo(ModelLoadInfo):
    """What ``/health`` and the model listings say about the image model."""

    name: str
    device: str
    initialized: bool
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
        max_queue: int | None = None,
        timeout_s: float | None = None,
        notice: str | None = None,
    ) -> None:
        """``max_queue`` bounds the requests waiting for a render slot (beyond it: 429);
        ``timeout_s`` stops a render that runs longer; ``notice`` is what the model info says
        about the model before it loads (the tiny pipeline's warning)."""
        self._model = LazyModel(name=model_name, loader=loader, retry_after=LOAD_RETRY_AFTER_S)
        self._device = device
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._notice = notice
        self._slots = asyncio.Semaphore(max_concurrency)
        self._waiting = 0
        self._running = 0
        self._metrics: ImageMetrics | None = None

    def instrument(self, metrics: Metrics) -> None:
        """Record this service's figures in ``metrics`` (the app's registry) from now on."""
        self._metrics = metrics.image(self._model.name)

    @property
    def model(self) -> LazyModel[ImageEngine]:
        """The lazily loaded pipeline (its state, load and unload)."""
        return self._model

    @property
    def model_name(self) -> str:
        """The name the API reports for the model (known before it loads)."""
        return self._model.name

    def info(self) -> ImageServiceInfo:
        """Describe the model and the queue without loading anything."""
        engine = self._model.engine
        model = engine.model_info() if engine is not None else None
        lazy = self._model
        return ImageServiceInfo(
            name=self._model.name,
            device=model.device if model else self._device,
            initialized=engine is not None,
            notice=model.notice if model else self._notice,
            waiting=self._waiting,
            running=self._running,
            **lazy.load_info(),
        )

    async def check_health(self) -> None:
        """Ask the loaded pipeline whether it can render; a no-op while nothing is loaded.

        Raises ``ServiceUnavailableError`` when it cannot.
        """
        engine = self._model.engine
        if engine is not None:
            await engine.check_health()

    async def supervise(self, interval_s: float) -> None:
        """Check the loaded pipeline every ``interval_s``; reload it when it stopped working."""
        await self._model.supervise(interval_s, broken=ServiceUnavailableError)

    async def initialize(self) -> None:
        """Load the pipeline now (preloaded at start-up, or an admin's load)."""
        await self._model.get()

    async def generate(
        self, params: ImageGenerationParams, *, progress: ProgressCallback | None = None
    ) -> GeneratedImage:
        """Render one image, waiting for a free render slot first (in arrival order).

        Raises:
            ModelLoadError: the pipeline cannot load (503, retried by the next request).
            OverloadedError: ``max_queue`` requests already wait for a render slot.
            GenerationTimeoutError: the render ran past ``timeout_s`` and was stopped.
            ServiceUnavailableError: the engine was shut down mid-render.
            GenerationError: the pipeline failed.
        """
        request = current_request()
        if request is not None:
            request.fields.update(width=params.width, height=params.height)
        arrived = time.perf_counter()
        async with self._model.use() as engine:
            return await self._render(engine, params, progress, arrived)

    async def _render(
        self,
        engine: ImageEngine,
        params: ImageGenerationParams,
        progress: ProgressCallback | None,
        arrived: float,
    ) -> GeneratedImage:
        metrics = self._metrics
        if (
            self._max_queue is not None
            and self._slots.locked()
            and self._waiting >= self._max_queue
        ):
            raise OverloadedError(
                f"The image queue is full ({self._waiting} requests waiting for a render). "
                "Try again shortly.",
                retry_after=5,
            )
        with child_span("queue.image_slot"):
            self._waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self._waiting -= 1
        started = time.perf_counter()
        if metrics is not None:
            metrics.queue_wait.observe(started - arrived)
        self._running += 1
        outcome = "error"
        try:
            attributes: dict[str, AttributeValue] = {
                "fictures.model": self._model.name,
                "fictures.width": params.width,
                "fictures.height": params.height,
                "fictures.steps": params.num_inference_steps,
                "fictures.seed": params.seed,
            }
            with child_span("image.render", attributes):
                try:
                    async with asyncio.timeout(self._timeout_s):
                        image = await engine.generate(params, progress=progress)
                except TimeoutError:
                    # The timeout cancelled the render: the engine stopped it at its next step.
                    raise GenerationTimeoutError(timeout_s=self._timeout_s or 0) from None
            outcome = "ok"
            if metrics is not None:
                metrics.render_seconds.observe(time.perf_counter() - started)
            return image
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._running -= 1
            self._slots.release()
            if metrics is not None:
                metrics.finished[outcome].inc()

    async def stream(
        self, params: ImageGenerationParams
    ) -> AsyncGenerator[RenderProgress | GeneratedImage, None]:
        """Render one image as :meth:`generate` does, yielding a ``RenderProgress`` after each
        denoising step and the image last.

        Raises what :meth:`generate` raises. Closing the generator early (the client left)
        leaves the queue or stops the render at its next step.
        """
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[RenderProgress] = asyncio.Queue()

        def progress(step: int, total: int) -> None:  # called from the render thread
            loop.call_soon_threadsafe(steps.put_nowait, RenderProgress(step, total))

        render = asyncio.ensure_future(self.generate(params, progress=progress))
        try:
            while not render.done():
                next_step = asyncio.ensure_future(steps.get())
                await asyncio.wait({render, next_step}, return_when=asyncio.FIRST_COMPLETED)
                if next_step.done():
                    yield next_step.result()
                else:
                    next_step.cancel()
            while not steps.empty():  # steps reported just before the render finished
                yield steps.get_nowait()
            yield render.result()
        finally:
            render.cancel()

    async def shutdown(self) -> None:
        """Release the pipeline (called from the app lifespan)."""
        await self._model.shutdown()
