"""``ImageGenerationService``: lazy loading, seeds, and a bounded render queue.

Requests without a seed get one from ``random_seed()`` (> 0), so every answer can be
reproduced. The service lets ``max_concurrency`` renders reach the engine at once and queues
the rest by priority, then arrival (``RenderQueue``): interactive requests
(``INTERACTIVE_PRIORITY``, every API request) start before batch items (``BATCH_PRIORITY``)
waiting for a slot. It counts what is waiting and running, and tells a waiting request its
place in the queue. A request cancelled while it waits (its client went away) leaves the queue
without rendering; one cancelled mid-render stops at the engine's next denoising step.

Batches (``max_batch`` above 1, ``IMAGE_MAX_BATCH``): when a render slot frees, the request
at the head of the queue takes with it the waiting requests of its priority whose renders can
share one pipeline call (``ImageGenerationParams.batch_key``: size, steps, guidance, adapters
and weights), up to ``max_batch`` images, and the engine renders them in one call
(``ImageEngine.generate_batch``), each from its own seed. The batch runs in a task of its own,
so a request that leaves it (its client went away) does not stop the others: its image is
computed with theirs and thrown away, and only when every request of a batch has left does the
render stop, at its next step. Each request still gets its own progress callbacks, queue
positions, spans and metrics.

Image metrics are observed here: queue wait (model load plus render slot), render seconds and
outcomes; the request gets ``queue.image_slot`` and ``image.render`` spans and its image size
on the access-log line.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from opentelemetry.util.types import AttributeValue

from fictures_ai.engines.base import (
    INTERACTIVE_PRIORITY,
    GeneratedImage,
    ImageEngine,
    ImageGenerationParams,
    ProgressCallback,
)
from fictures_ai.errors import (
    GenerationError,
    GenerationTimeoutError,
    OverloadedError,
    ServiceUnavailableError,
)
from fictures_ai.observability.context import (
    RequestContext,
    bind_request,
    current_request,
    request_in,
)
from fictures_ai.observability.metrics import ImageMetrics, Metrics
from fictures_ai.observability.tracing import child_span
from fictures_ai.services.model_loader import LOAD_RETRY_AFTER_S, LazyModel, ModelLoadInfo
from fictures_ai.services.render_queue import PositionCallback, RenderQueue
from fictures_ai.services.response_cache import CacheTicket, ResponseCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RenderProgress:
    """A render has finished denoising step ``step`` of ``total_steps`` (1-based)."""

    step: int
    total_steps: int


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """A request waits for a render slot: ``position - 1`` requests will start before it (as
    far as is known now; 1: it starts next)."""

    position: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageServiceInfo(ModelLoadInfo):
    """What ``/health`` and the model listings say about the image model."""

    name: str
    device: str
    initialized: bool
    notice: str | None
    waiting: int
    running: int


@dataclass(eq=False, slots=True)
class _Ticket:
    """One request's image on its way through the queue and a batch."""

    params: ImageGenerationParams
    progress: ProgressCallback | None
    started: asyncio.Future[None]
    """Done when its batch starts (cancelled: the request left while waiting)."""
    done: asyncio.Future[GeneratedImage]
    context: contextvars.Context
    """The request's context (its log fields, trace, response headers such as the replica's)."""
    batch: _Batch | None = None
    cancelled: bool = False
    """The request left the running batch; its image is thrown away."""

    def settle(self, outcome: GeneratedImage | BaseException) -> None:
        """Hand the request its image or error (a request that left gets nothing), with the
        response headers the engine recorded on its shared render (the replica's)."""
        if self.done.done():
            return
        shared = self.batch.request if self.batch is not None else None
        request = request_in(self.context)
        if shared is not None and request is not None:
            request.response_headers.update(shared.response_headers)
        if self.cancelled:
            self.done.cancel()
        elif isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)


@dataclass(eq=False, slots=True)
class _Batch:
    """Requests rendered by one engine call."""

    tickets: tuple[_Ticket, ...]
    task: asyncio.Task[None] | None = None
    request: RequestContext | None = None
    """The shared render's own request context (None: a render of one request, which runs
    in that request's)."""


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
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
        response_cache_bytes: int = 0,
    ) -> None:
        """``max_queue`` bounds the requests a new one would wait behind (beyond it: 429;
        batch items waiting never count against an interactive request);
        ``timeout_s`` stops a render that runs longer; ``notice`` is what the model info says
        about the model before it loads (the tiny pipeline's warning); ``max_batch`` is the
        most images one engine call renders (``IMAGE_MAX_BATCH``; engines whose batches are
        no single call never batch), ``batch_wait_s`` how long an idle renderer waits to fill
        a batch (see ``RenderQueue``); ``response_cache_bytes`` bounds the images kept for
        requests with a seed (0: none, see ``services.response_cache``)."""
        self._model = LazyModel(name=model_name, loader=loader, retry_after=LOAD_RETRY_AFTER_S)
        self._cache: ResponseCache[GeneratedImage] = ResponseCache(
            max_bytes=response_cache_bytes, size_of=lambda image: len(image.png)
        )
        self._model.on_engine_change.append(self._cache.clear)
        self._device = device
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._notice = notice
        self._queue: RenderQueue[_Ticket] = RenderQueue(
            max_concurrency, max_batch=max_batch, batch_wait_s=batch_wait_s
        )
        self._metrics: ImageMetrics | None = None
        self._rendering = 0  # requests whose batch runs now

    def instrument(self, metrics: Metrics) -> None:
        """Record this service's figures in ``metrics`` (the app's registry) from now on."""
        self._metrics = metrics.image(self._model.name)
        self._cache.instrument(metrics.response_cache(self._model.name, "image"))

    @property
    def model(self) -> LazyModel[ImageEngine]:
        """The lazily loaded pipeline (its state, load and unload)."""
        return self._model

    @property
    def model_name(self) -> str:
        """The name the API reports for the model (known before it loads)."""
        return self._model.name

    @property
    def response_cache(self) -> ResponseCache[GeneratedImage]:
        """The images kept for requests with a seed."""
        return self._cache

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
            waiting=self._queue.waiting,
            running=self._rendering,
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
        self,
        params: ImageGenerationParams,
        *,
        progress: ProgressCallback | None = None,
        priority: int = INTERACTIVE_PRIORITY,
        on_position: PositionCallback | None = None,
        cache: CacheTicket | None = None,
    ) -> GeneratedImage:
        """Render one image, waiting for a free render slot first (by ``priority``, lower
        first, then arrival).

        ``progress`` is called from the render thread after each denoising step;
        ``on_position`` on the event loop with the request's place in the queue when it has
        to wait and each time that changes (see ``RenderQueue``). With a ``cache`` ticket
        the response cache is looked up first: a hit is answered without the engine; a
        miss stores the image once rendered.

        Raises:
            ModelLoadError: the pipeline cannot load (503, retried by the next request).
            OverloadedError: ``max_queue`` requests already wait ahead of this one.
            GenerationTimeoutError: the render ran past ``timeout_s`` and was stopped.
            ServiceUnavailableError: the engine was shut down mid-render.
            GenerationError: the pipeline failed.
        """
        kept, key = self._cache.lookup(cache, lambda: self._cache_request(params))
        if kept is not None:
            return kept
        return await self._generate(params, progress, priority, on_position, key)

    def _cache_request(self, params: ImageGenerationParams) -> dict[str, Any]:
        """What the response cache's key covers: the model and every parameter."""
        return {"model": self._model.name, "params": asdict(params)}

    async def _generate(
        self,
        params: ImageGenerationParams,
        progress: ProgressCallback | None,
        priority: int,
        on_position: PositionCallback | None,
        cache_key: str | None,
    ) -> GeneratedImage:
        request = current_request()
        if request is not None:
            request.fields.update(width=params.width, height=params.height)
        arrived = time.perf_counter()
        async with self._model.use() as engine:
            generation = self._model.generation
            image = await self._render(
                engine,
                params,
                progress=progress,
                arrived=arrived,
                priority=priority,
                on_position=on_position,
            )
        if cache_key is not None and generation == self._model.generation:
            self._cache.store(cache_key, image)
        return image

    async def _render(
        self,
        engine: ImageEngine,
        params: ImageGenerationParams,
        *,
        progress: ProgressCallback | None,
        arrived: float,
        priority: int,
        on_position: PositionCallback | None,
    ) -> GeneratedImage:
        metrics = self._metrics
        queue = self._queue
        ahead = queue.ahead(priority)
        if self._max_queue is not None and queue.full and ahead >= self._max_queue:
            raise OverloadedError(
                f"The image queue is full ({ahead} requests waiting for a render). "
                "Try again shortly.",
                retry_after=5,
            )
        loop = asyncio.get_running_loop()
        ticket = _Ticket(
            params, progress, loop.create_future(), loop.create_future(), contextvars.copy_context()
        )
        batches = queue.max_batch > 1 and engine.batches
        with child_span("queue.image_slot", {"fictures.priority": priority}):
            handle = queue.submit(
                ticket,
                start=lambda tickets: self._start(engine, tickets),
                priority=priority,
                batch_key=params.batch_key() if batches else None,
                on_position=on_position,
                gone=ticket.started.cancelled,
            )
            try:
                await ticket.started
            except asyncio.CancelledError:
                if ticket.batch is None:  # still waiting: leave the queue
                    queue.withdraw(handle)
                    raise
                await self._leave(ticket)  # started as it was cancelled
                raise
        started = time.perf_counter()
        if metrics is not None:
            metrics.queue_wait.observe(started - arrived)
        outcome = "error"
        try:
            attributes: dict[str, AttributeValue] = {
                "fictures.model": self._model.name,
                "fictures.width": params.width,
                "fictures.height": params.height,
                "fictures.steps": params.num_inference_steps,
                "fictures.seed": params.seed,
                "fictures.batch_size": len(ticket.batch.tickets) if ticket.batch else 1,
            }
            with child_span("image.render", attributes):
                # Shielded: the render belongs to the batch, not to this request.
                image = await asyncio.shield(ticket.done)
            outcome = "ok"
            if metrics is not None:
                metrics.render_seconds.observe(time.perf_counter() - started)
            return image
        except asyncio.CancelledError:
            outcome = "cancelled"
            await self._leave(ticket)
            raise
        finally:
            if metrics is not None:
                metrics.finished[outcome].inc()

    def _start(self, engine: ImageEngine, tickets: tuple[_Ticket, ...]) -> None:
        """Start a batch the queue formed (called on the event loop by the queue)."""
        live = tuple(ticket for ticket in tickets if not ticket.started.done())
        if not live:  # every one was cancelled as the slot came
            self._queue.release()
            return
        batch = _Batch(live)
        self._rendering += len(live)
        for ticket in live:
            ticket.batch = batch
            ticket.started.set_result(None)
        if self._metrics is not None:
            self._metrics.batch_size.observe(len(live))
        # A render of one request runs in its context (what the engine records, such as the
        # replica that served it, lands on its response); one serving several requests runs in
        # a context of its own, so it never logs or traces as whichever one it happened to be,
        # and the headers the engine records there reach every request (``_Ticket.settle``).
        if len(live) == 1:
            context = live[0].context
        else:
            context = contextvars.Context()
            batch.request = RequestContext(request_id=f"batch-{uuid.uuid4().hex}")
            context.run(bind_request, batch.request)
        batch.task = asyncio.get_running_loop().create_task(
            self._run_batch(engine, batch), context=context
        )

    async def _leave(self, ticket: _Ticket) -> None:
        """A request left the batch it rendered in (its client went away). The others go on
        and its image is thrown away; when it was the last one waiting for the batch, the
        render stops at its next denoising step, and this returns once the engine let go."""
        ticket.cancelled = True
        batch = ticket.batch
        if batch is None or batch.task is None or batch.task.done():
            return
        if all(member.cancelled for member in batch.tickets):
            batch.task.cancel()
            await asyncio.gather(batch.task, return_exceptions=True)

    async def _run_batch(self, engine: ImageEngine, batch: _Batch) -> None:
        """Render a batch in one engine call and hand each request its image; the slot is
        released at the end. A ``GenerationError`` of a batch of several images (running out
        of memory is the likely one) is retried once with each image alone, so that only the
        image that fails by itself fails; any other error fails every request of the batch
        with that same error."""
        tickets = batch.tickets
        try:
            try:
                images = await self._call(engine, tickets)
            except GenerationError as exc:
                if len(tickets) == 1:
                    raise
                logger.warning(
                    "A batch of %d images failed (%s); rendering them one at a time",
                    len(tickets),
                    exc,
                )
                for ticket in tickets:
                    if ticket.cancelled:
                        continue
                    try:
                        ticket.settle((await self._call(engine, (ticket,)))[0])
                    except (GenerationError, GenerationTimeoutError) as alone:
                        ticket.settle(alone)
                return
            for ticket, image in zip(tickets, images, strict=True):
                ticket.settle(image)
        except asyncio.CancelledError:
            for ticket in tickets:
                ticket.done.cancel()
            raise
        except Exception as exc:
            for ticket in tickets:
                ticket.settle(exc)
        finally:
            self._rendering -= len(tickets)
            self._queue.release()

    async def _call(
        self, engine: ImageEngine, tickets: tuple[_Ticket, ...]
    ) -> list[GeneratedImage]:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await engine.generate_batch(
                    [ticket.params for ticket in tickets],
                    progress=[ticket.progress for ticket in tickets],
                )
        except TimeoutError:
            # The timeout cancelled the render: the engine stopped it at its next step.
            raise GenerationTimeoutError(timeout_s=self._timeout_s or 0) from None

    def stream(
        self,
        params: ImageGenerationParams,
        *,
        priority: int = INTERACTIVE_PRIORITY,
        cache: CacheTicket | None = None,
    ) -> AsyncGenerator[QueuePosition | RenderProgress | GeneratedImage, None]:
        """Render one image as :meth:`generate` does, yielding a ``QueuePosition`` when the
        request has to wait for a render slot and again each time its place changes, a
        ``RenderProgress`` after each denoising step, and the image last.

        With a ``cache`` ticket the cache is looked up now, before the stream is iterated: a
        hit yields the last step's progress and the kept image.

        Raises what :meth:`generate` raises. Closing the generator early (the client left)
        leaves the queue or stops the render at its next step.
        """
        kept, key = self._cache.lookup(cache, lambda: self._cache_request(params))
        if kept is not None:
            return _replay(kept, params.num_inference_steps)
        return self._stream(params, priority, key)

    async def _stream(
        self, params: ImageGenerationParams, priority: int, cache_key: str | None
    ) -> AsyncGenerator[QueuePosition | RenderProgress | GeneratedImage, None]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[QueuePosition | RenderProgress] = asyncio.Queue()

        def progress(step: int, total: int) -> None:  # called from the render thread
            loop.call_soon_threadsafe(events.put_nowait, RenderProgress(step, total))

        def on_position(position: int) -> None:  # called on the event loop
            events.put_nowait(QueuePosition(position))

        render = asyncio.ensure_future(
            self._generate(params, progress, priority, on_position, cache_key)
        )
        try:
            while not render.done():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({render, next_event}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                else:
                    next_event.cancel()
            while not events.empty():  # steps reported just before the render finished
                yield events.get_nowait()
            yield render.result()
        finally:
            render.cancel()

    async def shutdown(self) -> None:
        """Release the pipeline (called from the app lifespan)."""
        await self._model.shutdown()


async def _replay(
    image: GeneratedImage, steps: int
) -> AsyncGenerator[RenderProgress | GeneratedImage, None]:
    """A kept image as a render stream: its last step, then the image."""
    yield RenderProgress(steps, steps)
    yield image
